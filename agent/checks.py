"""Checks of a valid config against the files it names, without building anything.

config (already schema-valid) -> model file read by `onnx` (graph and metadata only: no session, no
external data) -> labels resolved as the runtime does -> decoder fitted to the first output's
shape; file cameras -> their video file exists. Each problem is one "field.path: message" line,
as the schema errors are, so `check-config` and `run` report them the same way and exit 2.

What is not checked here: that the engine builds, that the video decodes, that network cameras
answer. Those are run-time faults (the service reports and retries them), not config mistakes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import AgentConfig, ModelConfig
from agent.errors import AgentError

__all__ = ["camera_errors", "check_config_files", "model_errors"]


def _output_shape(model: object) -> tuple[int, ...] | None:
    """The first graph output's shape with a symbolic batch taken as 1; None if another dim is symbolic."""
    outputs = model.graph.output  # type: ignore[attr-defined]
    if not outputs:
        return None
    dims: list[int] = []
    for i, d in enumerate(outputs[0].type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(1)  # dynamic batch: the agent runs at batch 1
        else:
            return None
    return tuple(dims)


def model_errors(cfg: ModelConfig) -> list[str]:
    """Problems of model.path / labels / decoder: a missing or non-ONNX file, labels or a declared
    decoder that do not fit the model's output shape."""
    import onnx

    from agent.pipeline import _num_classes
    from agent.vision.labels import load_labels
    from agent.vision.postprocess import Postprocessor

    path = Path(cfg.path)
    if not path.is_file():
        return [f"model.path: {'not a file' if path.exists() else 'file not found'}: {path}"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf's DecodeError, OSError, ValueError...: all mean "not ONNX"
        return [f"model.path: not a readable ONNX model: {path} ({type(exc).__name__}: {str(exc)[:120]})"]
    shape = _output_shape(model)
    if shape is None:
        return []  # symbolic output dims: the runtime checks the real shape when it loads the engine
    meta = {p.key: p.value for p in model.metadata_props}
    # load_labels warns about fallbacks the runtime would use; that is not an error here
    quiet = logging.getLogger("agent.vision.labels")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        try:
            labels = load_labels(cfg.labels, meta, _num_classes(shape))
        except AgentError as exc:
            return [f"model.labels: {exc}"]
        try:
            Postprocessor.from_config(cfg, labels, [shape])
        except AgentError as exc:
            where = "model.decoder" if cfg.decoder != "auto" or not cfg.labels else "model.labels"
            return [f"{where}: {exc} (model output {list(shape)})"]
    finally:
        quiet.setLevel(level)
    return []


def camera_errors(cfg: AgentConfig) -> list[str]:
    """Cameras whose source scheme is unknown, or whose video file does not exist."""
    from agent.capture.sources import open_source

    errors = []
    for i, cam in enumerate(cfg.cameras):
        try:
            source = open_source(cam)  # constructs only: nothing is opened
        except AgentError as exc:
            errors.append(f"cameras[{i}].source: {exc}")
            continue
        path = getattr(source, "path", None)  # file sources name their file
        if isinstance(path, Path) and not path.is_file():
            errors.append(f"cameras[{i}].source: video file {'is not a file' if path.exists() else 'not found'}: "
                          f"{path}")
    return errors


def check_config_files(cfg: AgentConfig, model: bool = True) -> list[str]:
    """Every problem of the files a schema-valid config names (empty when there is none)."""
    return (model_errors(cfg.model) if model else []) + camera_errors(cfg)
