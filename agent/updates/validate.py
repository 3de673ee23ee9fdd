"""Static checks of a downloaded model against its signed manifest, and the smoke inference check.

Reasons (UpdateError.reason), one per failure kind:
  size_mismatch      file size differs from the manifest
  checksum_mismatch  sha256 differs from the manifest
  external_data      the model keeps tensors in external files (the signed hash would not cover them)
  onnx_invalid       unreadable, or rejected by onnx.checker
  io_mismatch        not exactly one [1, 3, H, W] float input of the manifest's size, or an output
                     that does not fit the manifest's decoder and label count
  smoke_failed       the engine raised, or there was nothing to run
  non_finite_output  NaN / Inf in an output
  too_slow           p50 latency above the budget
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import UpdateError
from agent.updates.manifest import Manifest

__all__ = ["IOContract", "ModelIO", "smoke_test", "validate_model"]

log = logging.getLogger(__name__)

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class IOContract:
    """What the device expects; by default derived from the manifest."""

    width: int
    height: int
    decoder: str  # yolov8 | yolov5 | end2end
    num_classes: int
    input_dtypes: tuple[str, ...] = ("float32", "float16")

    @classmethod
    def from_manifest(cls, m: Manifest) -> IOContract:
        return cls(m.model.input.width, m.model.input.height, m.model.decoder, len(m.model.labels))


@dataclass(frozen=True)
class ModelIO:
    input_name: str
    input_shape: tuple[Dim, ...]
    input_dtype: str
    outputs: tuple[tuple[str, tuple[Dim, ...], str], ...]
    decoder: str
    num_classes: int | None
    opset: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _dims(t: Any) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for d in t.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(str(d.dim_param))
        else:
            out.append(None)
    return tuple(out)


def _all_tensors(graph: Any) -> list[Any]:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    out = list(graph.initializer)
    out += [s.values for s in graph.sparse_initializer]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                out.append(attr.t)
            out += list(attr.tensors)
            if attr.HasField("g"):
                out += _all_tensors(attr.g)
            for g in attr.graphs:
                out += _all_tensors(g)
    return out


def _fits(dim: Dim, want: int) -> bool:
    return not isinstance(dim, int) or dim == want


def validate_model(path: Path, manifest: Manifest, expected_io: IOContract | None = None) -> ModelIO:
    """Check size, sha256, ONNX validity and the IO contract; returns the model's IO description."""
    import onnx
    from onnx import TensorProto

    path = Path(path)
    exp = expected_io or IOContract.from_manifest(manifest)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UpdateError("size_mismatch", f"cannot stat {path}: {exc.strerror}") from None
    if size != manifest.model.size:
        raise UpdateError("size_mismatch", f"{size} bytes, the manifest says {manifest.model.size}")
    digest = _sha256(path)
    if digest != manifest.model.sha256:
        raise UpdateError("checksum_mismatch",
                          f"sha256 {digest[:16]}..., the manifest says {manifest.model.sha256[:16]}...")

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UpdateError("onnx_invalid", f"cannot parse: {str(exc)[:160]}") from None
    tensors = _all_tensors(model.graph)
    if any(t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL for t in tensors):
        raise UpdateError("external_data", "the model stores tensors in external files; export it as one file")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise UpdateError("onnx_invalid", f"checker: {str(exc)[:200]}") from None
    custom = sorted({op.domain for op in model.opset_import if op.domain not in ("", "ai.onnx", "ai.onnx.ml")})
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        if custom:  # shape inference cannot know custom ops (TensorRT plugins, say): not a defect
            log.warning("full ONNX check skipped for custom domains %s: %s", custom, str(exc)[:120])
        else:
            raise UpdateError("onnx_invalid", f"full check: {str(exc)[:200]}") from None

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UpdateError("io_mismatch", f"expected one input, found {len(inputs)}")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "undefined"
    if dtype not in exp.input_dtypes:
        raise UpdateError("io_mismatch", f"input {inp.name!r} is {dtype}, expected one of {exp.input_dtypes}")
    ishape = _dims(inp)
    if len(ishape) != 4 or not (_fits(ishape[0], 1) and _fits(ishape[1], 3) and _fits(ishape[2], exp.height)
                                and _fits(ishape[3], exp.width)):
        raise UpdateError("io_mismatch", f"input shape {list(ishape)}, expected [1, 3, {exp.height}, {exp.width}]")
    if not graph.output:
        raise UpdateError("io_mismatch", "the model has no outputs")
    outs = []
    for o in graph.output:
        e = o.type.tensor_type.elem_type
        outs.append((o.name, _dims(o), onnx.helper.tensor_dtype_to_np_dtype(e).name if e else "undefined"))
    oshape = outs[0][1]
    if len(oshape) == 3 and not _fits(oshape[0], 1):
        raise UpdateError("io_mismatch", f"output batch {oshape[0]}, expected 1")
    if len(oshape) not in (2, 3):
        raise UpdateError("io_mismatch", f"output shape {list(oshape)} is not [1, A, B]")
    a, b = oshape[-2], oshape[-1]
    nc = exp.num_classes
    found_nc: int | None = None
    if exp.decoder == "yolov8":
        if not isinstance(a, int) or a != 4 + nc:
            raise UpdateError("io_mismatch", f"yolov8 output {list(oshape)} needs {4 + nc} channels for {nc} labels")
        found_nc = a - 4
    elif exp.decoder == "yolov5":
        if not isinstance(b, int) or b != 5 + nc:
            raise UpdateError("io_mismatch", f"yolov5 output {list(oshape)} needs {5 + nc} values for {nc} labels")
        found_nc = b - 5
    elif exp.decoder == "end2end":
        if not isinstance(b, int) or b != 6:
            raise UpdateError("io_mismatch", f"end2end output {list(oshape)} needs [1, K, 6]")
    else:
        raise UpdateError("io_mismatch", f"unknown decoder {exp.decoder!r}")
    opset = max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=0)
    return ModelIO(inp.name, ishape, dtype, tuple(outs), exp.decoder, found_nc, int(opset))


def smoke_test(engine_infer: Callable[[np.ndarray], list[np.ndarray]], tensors: Sequence[np.ndarray],
               budget_ms: float, warmup: int = 1) -> dict[str, Any]:
    """Run every tensor once (after `warmup` untimed runs): finite outputs, p50 latency <= budget."""
    if not tensors:
        raise UpdateError("smoke_failed", "no input tensors to run")
    times: list[float] = []
    shapes: list[list[int]] = []
    try:
        for i in range(min(warmup, len(tensors))):
            engine_infer(tensors[i])
        for t in tensors:
            t0 = time.perf_counter()
            outs = engine_infer(t)
            times.append((time.perf_counter() - t0) * 1000.0)
            if not outs:
                raise UpdateError("smoke_failed", "the engine returned no outputs")
            for o in outs:
                arr = np.asarray(o)
                if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                    raise UpdateError("non_finite_output", f"output of shape {list(arr.shape)} holds NaN or Inf")
            shapes = [list(np.asarray(o).shape) for o in outs]
    except UpdateError:
        raise
    except Exception as exc:
        raise UpdateError("smoke_failed", f"{type(exc).__name__}: {str(exc)[:160]}") from None
    times.sort()
    p50 = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    result = {"runs": len(times), "p50_ms": round(p50, 3), "max_ms": round(times[-1], 3),
              "budget_ms": budget_ms, "output_shapes": shapes}
    if not math.isfinite(p50) or p50 > budget_ms:
        raise UpdateError("too_slow", f"p50 {p50:.1f} ms over the budget of {budget_ms:g} ms")
    return result
