from __future__ import annotations

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.errors import ModelError
from agent.vision.postprocess import Postprocessor
from agent.vision.preprocess import Letterboxer
from agent.vision.types import Letterbox

LABELS = ["person", "car", "dog"]
# 1280x720 into 640x640: scale 0.5, 140 px of padding on top
LB = Letterbox(scale=0.5, pad_x=0.0, pad_y=140.0, src_w=1280, src_h=720)


def _v8(rows: list[tuple[float, float, float, float, int, float]], nc: int = 3, n: int = 32) -> np.ndarray:
    out = np.zeros((1, 4 + nc, n), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def _post(layout: str = "yolov8", class_thresholds: dict[str, float] | None = None,
          max_detections: int = 100) -> Postprocessor:
    return Postprocessor(LABELS, layout, 0.25, class_thresholds or {}, 0.45, max_detections)


def test_decode_nms_scale_sort() -> None:
    out = _v8([
        (100, 240, 40, 40, 0, 0.80),  # person
        (102, 240, 40, 40, 0, 0.90),  # same person, higher score: suppresses the one above
        (100, 240, 40, 40, 1, 0.60),  # car on the same spot: other class, kept
        (500, 400, 20, 20, 2, 0.20),  # under threshold
    ])
    dets = _post()([out], LB)
    assert [(d.label, d.class_id) for d in dets] == [("person", 0), ("car", 1)]
    assert dets[0].score == pytest.approx(0.9)
    assert dets[0].box == pytest.approx((164, 160, 244, 240))  # ((102-20)/.5, (220-140)/.5, ...)
    assert dets[1].box == pytest.approx((160, 160, 240, 240))
    assert isinstance(dets[0].box[0], float) and isinstance(dets[0].score, float)


def test_boxes_clipped_and_max_detections() -> None:
    out = _v8([(10, 150, 60, 40, 1, 0.9), (600, 300, 30, 30, 2, 0.5), (300, 300, 30, 30, 0, 0.7)])
    dets = _post(max_detections=2)([out], LB)
    assert [d.label for d in dets] == ["car", "person"]
    assert dets[0].box == pytest.approx((0, 0, 80, 60))


def test_class_thresholds_and_live_update() -> None:
    out = _v8([(100, 300, 20, 20, 0, 0.5), (300, 300, 20, 20, 1, 0.3), (500, 300, 20, 20, 2, 0.15)])
    post = _post(class_thresholds={"person": 0.6, "dog": 0.1})
    assert [d.label for d in post([out], LB)] == ["car", "dog"]
    post.set_thresholds(0.4, {}, 0.5)
    assert [d.label for d in post([out], LB)] == ["person"]
    assert post.score_threshold == 0.4 and post.iou_threshold == 0.5
    assert post.class_threshold(2) == pytest.approx(0.4)
    with pytest.raises(ModelError, match="unknown labels"):
        post.set_thresholds(0.4, {"cat": 0.5}, 0.5)
    assert [d.label for d in post([out], LB)] == ["person"]  # a rejected reload leaves the old set


def test_unknown_class_threshold_label() -> None:
    with pytest.raises(ModelError, match=r"\['bird'\]"):
        _post(class_thresholds={"bird": 0.5})
    with pytest.raises(ModelError, match="unknown decoder"):
        _post(layout="ssd")


def test_end2end_no_nms_and_generic_ids() -> None:
    out = np.zeros((1, 300, 6), np.float32)
    out[0, 0] = (0, 140, 20, 160, 0.5, 0)
    out[0, 1] = (0, 140, 20, 160, 0.9, 0)  # duplicate kept: NMS is the graph's job
    out[0, 2] = (0, 140, 20, 160, 0.8, 7)  # id beyond the labels
    post = Postprocessor(LABELS, "end2end", 0.25, {"class_7": 0.85}, 0.45, 100)
    assert [(d.label, d.score) for d in post([out], LB)] == [("person", pytest.approx(0.9)),
                                                              ("person", pytest.approx(0.5))]
    post.set_thresholds(0.25, {}, 0.45)
    dets = post([out], LB)
    assert [d.label for d in dets] == ["person", "class_7", "person"]
    assert dets[0].box == pytest.approx((0, 0, 40, 40))


def test_yolov5_layout() -> None:
    out = np.zeros((1, 20, 5 + 3), np.float32)
    out[0, 0] = (320, 320, 64, 64, 0.9, 0.1, 0.9, 0.0)
    dets = Postprocessor(LABELS, "yolov5", 0.25, {}, 0.45, 100)([out], LB)
    assert [(d.label, round(d.score, 3)) for d in dets] == [("car", 0.81)]
    assert dets[0].box == pytest.approx((576, 296, 704, 424))


def _cfg(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate(fields)


def test_from_config() -> None:
    cfg = _cfg(score_threshold=0.3, class_thresholds={"car": 0.9}, iou_threshold=0.5, max_detections=7)
    post = Postprocessor.from_config(cfg, LABELS, [(1, 7, 8400)])
    assert post.layout == "yolov8" and post.max_detections == 7
    assert post.class_threshold(1) == pytest.approx(0.9) and post.class_threshold(0) == pytest.approx(0.3)
    assert Postprocessor.from_config(cfg, LABELS, [(1, 300, 6)]).layout == "end2end"
    assert Postprocessor.from_config(cfg, LABELS, [(1, 25200, 8)]).layout == "yolov5"
    generic = Postprocessor.from_config(_cfg(), [], [(1, 6, 8400)])
    assert generic.labels == ["class_0", "class_1"]
    with pytest.raises(ModelError, match="3 labels"):
        Postprocessor.from_config(_cfg(decoder="yolov8"), LABELS, [(1, 84, 8400)])
    with pytest.raises(ModelError, match="does not fit"):
        Postprocessor.from_config(_cfg(decoder="end2end"), LABELS, [(1, 7, 8400)])
    with pytest.raises(ModelError, match=r"model\.decoder"):
        Postprocessor.from_config(_cfg(), [], [(1, 126, 6)])


def test_end_to_end_with_letterboxer() -> None:
    """A box drawn in a 1280x720 frame, 'detected' in the letterboxed tensor, comes back in place."""
    img = np.zeros((720, 1280, 3), np.uint8)
    img[200:400, 300:700] = 255
    tensor, lb = Letterboxer((1, 3, 640, 640))(img)
    ys, xs = np.nonzero(tensor[0, 0] > 0.5)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    out = _v8([((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 2, 0.95)])
    (det,) = _post()([out], lb)
    assert det.label == "dog" and det.box == pytest.approx((300, 200, 700, 400), abs=1.0)
