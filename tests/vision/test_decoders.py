from __future__ import annotations

import numpy as np
import pytest

from agent.errors import ModelError
from agent.vision.decoders import decode, decode_end2end, decode_yolov5, decode_yolov8, detect_layout


def _thr(nc: int, value: float = 0.25, **over: float) -> np.ndarray:
    t = np.full(nc, value, np.float32)
    for k, v in over.items():
        t[int(k[1:])] = v
    return t


def _v8() -> np.ndarray:
    out = np.zeros((1, 4 + 3, 10), np.float32)
    out[0, :4, 2] = (100, 50, 20, 10)
    out[0, 4:, 2] = (0.3, 0.9, 0.1)  # class 1 wins
    out[0, :4, 5] = (10, 10, 4, 4)
    out[0, 6, 5] = 0.2  # class 2, under 0.25
    out[0, :4, 7] = (300, 200, 60, 40)
    out[0, 4, 7] = 0.5  # class 0
    return out


def test_yolov8() -> None:
    c = decode_yolov8(_v8(), _thr(3), 0.25)
    assert c.boxes.dtype == np.float32 and c.scores.dtype == np.float32 and c.class_ids.dtype == np.int32
    order = np.argsort(-c.scores)
    np.testing.assert_allclose(c.boxes[order], [[90, 45, 110, 55], [270, 180, 330, 220]])
    np.testing.assert_allclose(c.scores[order], [0.9, 0.5])
    assert c.class_ids[order].tolist() == [1, 0]


def test_yolov8_per_class_thresholds_and_fp16_2d() -> None:
    out = _v8()
    c = decode_yolov8(out, _thr(3, c0=0.6, c2=0.1), 0.25)
    assert sorted(c.class_ids.tolist()) == [1, 2]
    c16 = decode_yolov8(out[0].astype(np.float16), _thr(3, c0=0.6, c2=0.1), 0.25)
    assert sorted(c16.class_ids.tolist()) == [1, 2] and c16.boxes.dtype == np.float32


def test_yolov8_single_class_and_empty() -> None:
    out = np.zeros((1, 5, 8), np.float32)
    out[0, :, 3] = (8, 8, 4, 2, 0.7)
    c = decode_yolov8(out, _thr(1), 0.25)
    assert c.class_ids.tolist() == [0] and c.boxes.tolist() == [[6, 7, 10, 9]]
    zeros = np.zeros((1, 84, 8400), np.float32)
    assert len(decode_yolov8(zeros, _thr(80), 0.0)) == 0  # zero scores are never kept


def test_yolov5_obj_times_cls() -> None:
    out = np.zeros((1, 6, 5 + 2), np.float32)
    out[0, 1] = (50, 60, 10, 20, 0.9, 0.5, 0.8)  # class 1, 0.72
    out[0, 3] = (5, 5, 2, 2, 0.4, 0.9, 0.1)  # class 0, 0.36
    out[0, 4] = (5, 5, 2, 2, 0.2, 1.0, 0.0)  # objectness under threshold
    out[0, 5] = (5, 5, 2, 2, 0.9, 0.2, 0.1)  # 0.18 under threshold
    c = decode_yolov5(out, _thr(2), 0.25)
    order = np.argsort(-c.scores)
    np.testing.assert_allclose(c.scores[order], [0.72, 0.36], rtol=1e-6)
    assert c.class_ids[order].tolist() == [1, 0]
    np.testing.assert_allclose(c.boxes[order], [[45, 50, 55, 70], [4, 4, 6, 6]])
    assert decode_yolov5(out, _thr(2, c0=0.5), 0.25).class_ids.tolist() == [1]


def test_end2end() -> None:
    out = np.zeros((1, 300, 6), np.float32)  # padded rows stay zero
    out[0, 0] = (10, 20, 30, 40, 0.95, 3)
    out[0, 1] = (50, 60, 70, 80, 0.30, 1)
    out[0, 2] = (1, 2, 3, 4, 0.10, 1)
    out[0, 3] = (1, 2, 3, 4, 0.90, 12)  # id beyond the threshold table: default threshold
    c = decode_end2end(out, _thr(5, c1=0.5), 0.25)
    assert c.class_ids.tolist() == [3, 12]
    np.testing.assert_allclose(c.boxes, [[10, 20, 30, 40], [1, 2, 3, 4]])
    assert len(decode_end2end(out, np.zeros(0, np.float32), 0.0)) == 4  # threshold 0 still drops padding


def test_decode_dispatch_and_bad_shapes() -> None:
    assert len(decode("yolov8", _v8(), _thr(3), 0.25)) == 2
    with pytest.raises(ModelError, match="unknown decoder"):
        decode("ssd", _v8(), _thr(3), 0.25)
    with pytest.raises(ModelError):
        decode_end2end(np.zeros((1, 10, 7), np.float32), _thr(1), 0.25)
    with pytest.raises(ModelError):
        decode_yolov8(np.zeros((2, 84, 100), np.float32), _thr(80), 0.25)


@pytest.mark.parametrize(("shape", "nc", "layout"), [
    ((1, 84, 8400), None, "yolov8"),  # YOLOv8 / YOLO11 COCO 640
    ((1, 84, 8400), 80, "yolov8"),
    ((1, 6, 2100), None, "yolov8"),  # 2 classes at 320
    ((1, 5, 8400), 1, "yolov8"),
    ((1, 6, 16), 2, "yolov8"),  # tiny test model: the class count settles it
    ((1, 1004, 2100), None, "yolov8"),
    ((1, 25200, 85), None, "yolov5"),  # YOLOv5 / YOLOv7 COCO 640
    ((1, 25200, 85), 80, "yolov5"),
    ((1, 6300, 7), 2, "yolov5"),
    ((1, 25200, 6), None, "yolov5"),  # single-class YOLOv5 (anchor count is a multiple of 63)
    ((1, 25200, 6), 1, "yolov5"),
    ((1, 300, 6), None, "end2end"),  # YOLOv10 / end2end exports
    ((1, 300, 6), 80, "end2end"),
    ((1, 100, 6), 1, "end2end"),
    ((300, 6), None, "end2end"),
])
def test_detect_layout(shape: tuple[int, ...], nc: int | None, layout: str) -> None:
    assert detect_layout([shape], nc) == layout


@pytest.mark.parametrize(("shape", "nc"), [
    ((1, 252, 6), None),  # yolov5 single class at 64 px, or end2end with 252 rows
    ((1, 126, 6), None),
    ((1, 84, 8400), 3),  # class count contradicts the shape
    ((1, 4, 8400), None),
    ((1, 84, 84), None),
    ((2, 84, 8400), None),
    ((1, 3, 80, 80), None),
])
def test_detect_layout_ambiguous(shape: tuple[int, ...], nc: int | None) -> None:
    with pytest.raises(ModelError, match=r"model\.decoder"):
        detect_layout([shape], nc)


def test_detect_layout_no_outputs() -> None:
    with pytest.raises(ModelError):
        detect_layout([], None)
