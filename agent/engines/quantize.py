"""INT8 Q/DQ ONNX models from calibration frames (ONNX Runtime static quantization).

Two variants (measured on YOLOv8n, DESIGN.md "Versions on the devices"):

- "tensorrt": int8 activations AND weights, both symmetric, per-channel weights, QDQ format, biases
  left in float (QuantizeBias False): the explicit quantization TensorRT expects (build it with
  precision int8, no calibrator). A quantized bias would be an INT32 DequantizeLinear input, which
  TensorRT's ONNX parser rejects (8.6 takes INT8 only, 10.x INT8 / FP8 / INT4: onnx-tensorrt#850,
  onnxruntime#17738), so every int8 build would fail. On ONNX
  Runtime's CPU EP this form is SLOWER than fp32 (107 ms vs 68 ms there): check its accuracy on the
  CPU, do not time it there.
- "cpu": uint8 (asymmetric) activations with symmetric int8 per-channel weights: the fast form for
  ONNX Runtime's CPU EP (42 ms there).

Calibration frames are letterboxed exactly as the agent does at run time (agent.vision.preprocess
.Letterboxer), so the activation ranges seen in calibration are the ones seen in production.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import EngineError, ModelError

__all__ = ["IMAGE_SUFFIXES", "calibration_digest", "load_frames", "make_calibration_reader", "quantize_int8"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
Variant = Literal["tensorrt", "cpu"]


def load_frames(source: Path | Sequence[np.ndarray], limit: int = 128) -> list[np.ndarray]:
    """Calibration frames: BGR uint8 arrays, from a folder of images (sorted by name) or as given."""
    if isinstance(source, (str, Path)):
        import cv2

        folder = Path(source)
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        frames = []
        for p in paths[:limit]:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ModelError(f"calibration image {p} cannot be decoded")
            frames.append(img)
    else:
        frames = [np.asarray(f) for f in list(source)[:limit]]
    if not frames:
        raise ModelError(f"no calibration frames in {source if isinstance(source, (str, Path)) else 'the list'}")
    return frames


def calibration_digest(frames: Iterable[np.ndarray]) -> str:
    """sha256 over the calibration frames (shape, dtype and bytes), for provenance / cache keys."""
    h = hashlib.sha256()
    for f in frames:
        a = np.ascontiguousarray(f)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _model_input(model_path: Path) -> tuple[str, tuple[int, ...], np.dtype]:
    from agent.engines.trt_common import onnx_io_specs

    inputs, _ = onnx_io_specs(model_path)
    if len(inputs) != 1:
        raise ModelError(f"expected one input tensor, {model_path.name} has {len(inputs)}")
    return inputs[0].name, inputs[0].shape, inputs[0].dtype


def make_calibration_reader(model_path: Path, frames: Sequence[np.ndarray]) -> Any:
    """An onnxruntime CalibrationDataReader feeding letterboxed frames to the model's input."""
    from onnxruntime.quantization import CalibrationDataReader

    from agent.vision.preprocess import Letterboxer

    name, shape, dtype = _model_input(model_path)
    letterbox = Letterboxer(shape, dtype=dtype)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(frames)

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self._it, None)
            if frame is None:
                return None
            tensor, _ = letterbox(frame)
            return {name: tensor.copy()}  # the Letterboxer reuses its buffer

        def rewind(self) -> None:
            self._it = iter(frames)

    return _Reader()


def quantize_int8(model_path: Path, out_path: Path, calibration: Path | Sequence[np.ndarray],
                  variant: Variant = "tensorrt", max_frames: int = 128) -> Path:
    """Write a Q/DQ INT8 copy of `model_path` to `out_path`, calibrated on `calibration` frames."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise EngineError("onnxruntime is needed for quantization: `pip install edge-agent[cpu]`") from exc
    if variant not in ("tensorrt", "cpu"):
        raise EngineError(f"unknown quantization variant {variant!r} (tensorrt or cpu)")
    model_path, out_path = Path(model_path), Path(out_path)
    frames = load_frames(calibration, max_frames)
    reader = make_calibration_reader(model_path, frames)
    symmetric_act = variant == "tensorrt"
    try:
        quantize_static(
            str(model_path), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric_act else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Only the compute is quantized. The decode tail (Sigmoid, box arithmetic, the Concat
            # of box pixels 0..640 with scores 0..1) stays float: one int8 scale across both
            # ranges rounds every score to zero (seen on the demo model: mAP 0).
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            # TensorRT: biases stay float (an INT32 DequantizeLinear fails its parser); the CPU
            # variant keeps ONNX Runtime's INT32 biases, which its QLinearConv fusion wants.
            extra_options={"ActivationSymmetric": symmetric_act, "WeightSymmetric": True,
                           "QuantizeBias": variant != "tensorrt"},
        )
    except Exception as exc:
        raise EngineError(f"quantization of {model_path.name} failed: {str(exc)[:300]}") from exc
    import onnx

    model = onnx.load(str(out_path))
    for k, v in (("edge_agent.quantization", variant),
                 ("edge_agent.calibration_sha256", calibration_digest(frames)),
                 ("edge_agent.calibration_frames", str(len(frames)))):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(out_path))
    return out_path
