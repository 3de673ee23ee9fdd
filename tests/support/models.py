"""Tiny real ONNX models built by the tests, whose outputs are known in advance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fixed_yolov8_model(path: Path, boxes: list[tuple[float, float, float, float, int, float]],
                       size: int = 64, num_classes: int = 2, anchors: int = 16,
                       labels: list[str] | None = None, version: str = "1",
                       input_gain: float = 0.0) -> Path:
    """A YOLOv8-layout model [1, 4+nc, anchors] that outputs the given boxes whatever the input.

    boxes: (cx, cy, w, h, class_id, score) in model-input pixels. `input_gain` > 0 adds the input's
    mean to every score (so a test can make outputs depend on the frame).
    """
    out = np.zeros((1, 4 + num_classes, anchors), dtype=np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    const = numpy_helper.from_array(out, "const")
    gain = numpy_helper.from_array(np.array(input_gain, dtype=np.float32), "gain")
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "gain"], ["scaled"]),
        helper.make_node("Add", ["const", "scaled"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + num_classes, anchors])],
        [const, gain],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    names = labels or [f"c{i}" for i in range(num_classes)]
    for k, v in {"names": repr(dict(enumerate(names))), "imgsz": f"[{size}, {size}]", "version": version}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
