"""A corpus of broken ONNX models for the update / validation tests (importable library).

`make_bad_models(out_dir)` writes each into out_dir and returns {kind: path}:

- wrong_input_shape:   input NHWC [1, 320, 320, 3] instead of [1, 3, S, S] (output is fine)
- wrong_output_layout: output [1, 512] (rank 2) instead of [1, 4 + nc, N]
- nan_outputs:         correct IO contract and metadata, every output value is NaN
- truncated:           the first half of the bundled demo model's bytes (fails to parse)
- checker_fails:       a node reads a tensor nothing produces (onnx.checker raises)

All but `truncated` are tiny graphs built with onnx.helper (a few KB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = ("part", "scratch", "dent", "missing_hole")
SIZE = 320
ANCHORS = 64
DEMO_MODEL = Path(__file__).resolve().parents[1] / "agent" / "data" / "demo" / "model.onnx"

__all__ = ["BAD_KINDS", "make_bad_models"]

BAD_KINDS = ("wrong_input_shape", "wrong_output_layout", "nan_outputs", "truncated", "checker_fails")


def _model(nodes: list[onnx.NodeProto], inp: list[int], out: list[int], inits: list[onnx.TensorProto],
           version: str = "99") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, inp)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out)],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent bad_models")
    m.ir_version = 8
    meta = {"names": repr(dict(enumerate(LABELS))), "imgsz": f"[{SIZE}, {SIZE}]", "stride": "32",
            "task": "detect", "version": version, "license": "Apache-2.0"}
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    return m


def _const_plus_input(const: np.ndarray, inp: list[int], scale: float = 0.0) -> onnx.ModelProto:
    """output0 = const + scale * mean(images): depends on the input so nothing folds it away."""
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Add", ["const", "scaled"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(const.astype(np.float32), "const"),
             numpy_helper.from_array(np.array(scale, np.float32), "scale")]
    return _model(nodes, inp, list(const.shape), inits)


def _valid_output() -> np.ndarray:
    out = np.zeros((1, 4 + len(LABELS), ANCHORS), np.float32)
    out[0, :4] = np.array([[160.0], [160.0], [40.0], [40.0]], np.float32)
    return out


def make_bad_models(out_dir: Path | str, source: Path | str | None = None) -> dict[str, Path]:
    """Write the corpus into out_dir; `source` is the model to truncate (default: the bundled demo)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    m = _const_plus_input(_valid_output(), [1, SIZE, SIZE, 3])
    onnx.checker.check_model(m)
    paths["wrong_input_shape"] = out / "wrong_input_shape.onnx"
    onnx.save(m, str(paths["wrong_input_shape"]))

    m = _const_plus_input(np.zeros((1, 512), np.float32), [1, 3, SIZE, SIZE])
    onnx.checker.check_model(m)
    paths["wrong_output_layout"] = out / "wrong_output_layout.onnx"
    onnx.save(m, str(paths["wrong_output_layout"]))

    m = _const_plus_input(np.full((1, 4 + len(LABELS), ANCHORS), np.nan, np.float32), [1, 3, SIZE, SIZE],
                          scale=1.0)
    onnx.checker.check_model(m)
    paths["nan_outputs"] = out / "nan_outputs.onnx"
    onnx.save(m, str(paths["nan_outputs"]))

    src = Path(source) if source is not None else DEMO_MODEL
    if src.is_file():
        data = src.read_bytes()
    else:  # no bundled model (yet): truncate a small valid one instead
        data = _const_plus_input(np.random.default_rng(0).random((1, 8, 4096), np.float32),
                                 [1, 3, SIZE, SIZE]).SerializeToString()
    paths["truncated"] = out / "truncated.onnx"
    paths["truncated"].write_bytes(data[: len(data) // 2])

    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Add", ["const", "nowhere"], ["output0"]),  # 'nowhere' is never produced
    ]
    m = _model(nodes, [1, 3, SIZE, SIZE], [1, 4 + len(LABELS), ANCHORS],
               [numpy_helper.from_array(_valid_output(), "const")])
    paths["checker_fails"] = out / "checker_fails.onnx"
    onnx.save(m, str(paths["checker_fails"]))
    return paths
