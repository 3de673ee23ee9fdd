"""INT8 Q/DQ quantization of the real demo model keeps its detections (checked on the CPU EP)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from agent.config import DEMO_MODEL, DEMO_VIDEO, EngineConfig, ModelConfig
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.engines.quantize import quantize_int8
from agent.pipeline import build_runtime


def _frames(n: int) -> list:
    cap = cv2.VideoCapture(str(DEMO_VIDEO))
    out = []
    while len(out) < n:
        ok, img = cap.read()
        assert ok, "the bundled sample video must decode"
        out.append(img)
    cap.release()
    return out


def _labels_per_frame(model: Path, frames: list) -> list[list[str]]:
    rt = build_runtime(OnnxRuntimeEngine(model, EngineConfig(intra_op_threads=1)),
                       ModelConfig(path=model, score_threshold=0.5), model)
    try:
        out = []
        for f in frames:
            tensor, lb = rt.letterbox(f)
            out.append(sorted(d.label for d in rt.post(rt.engine.infer(tensor), lb)))
        return out
    finally:
        rt.close()


@pytest.mark.parametrize("variant", ["tensorrt", "cpu"])
def test_int8_keeps_the_demo_models_detections(tmp_path: Path, variant: str) -> None:
    frames = _frames(12)
    q = quantize_int8(DEMO_MODEL, tmp_path / f"int8_{variant}.onnx", frames[::2], variant=variant)
    ref = _labels_per_frame(DEMO_MODEL, frames)
    got = _labels_per_frame(q, frames)
    assert sum(len(x) for x in ref) > 0
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    assert same >= len(frames) - 1, (ref, got)  # one borderline frame may differ


def test_tensorrt_variant_keeps_biases_float(tmp_path: Path) -> None:
    """Issue 14 point 1: a quantized bias is an INT32 DequantizeLinear input, which TensorRT's ONNX
    parser rejects (8.6: INT8 only; 10.x: INT8 / FP8 / INT4). The TensorRT variant leaves it float;
    the CPU variant keeps ONNX Runtime's INT32 bias (its fused QLinearConv wants it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    from tests.engines.conftest import conv_model

    model = conv_model(tmp_path / "m.onnx")
    frames = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(4)]

    def dq_input_types(path: Path) -> set[int]:
        q = onnx.load(str(path))
        inits = {t.name: t.data_type for t in q.graph.initializer}
        return {inits[n.input[0]] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}

    trt = quantize_int8(model, tmp_path / "trt.onnx", frames, variant="tensorrt")
    assert dq_input_types(trt) == {TensorProto.INT8}
    conv = next(n for n in onnx.load(str(trt)).graph.node if n.op_type == "Conv")
    assert conv.input[2] == "b"  # the float bias initializer itself, no DequantizeLinear in front
    cpu = quantize_int8(model, tmp_path / "cpu.onnx", frames, variant="cpu")
    assert TensorProto.INT32 in dq_input_types(cpu)
