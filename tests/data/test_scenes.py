"""The synthetic scene generator: deterministic by seed, boxes clipped to the frame correctly."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from scripts import scenes


def test_render_scene_is_deterministic_by_seed() -> None:
    a_img, a_obj = scenes.render_scene(123)
    b_img, b_obj = scenes.render_scene(123)
    c_img, _ = scenes.render_scene(124)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_obj == b_obj
    assert a_img.tobytes() != c_img.tobytes()
    assert a_img.shape == (360, 640, 3) and a_img.dtype == np.uint8


def test_video_is_deterministic_by_seed() -> None:
    a = list(scenes.iter_video(5, 6))
    b = list(scenes.iter_video(5, 6))
    assert len(a) == 6
    for (ia, oa), (ib, ob) in zip(a, b, strict=True):
        assert ia.tobytes() == ib.tobytes()
        assert oa == ob
    c = next(scenes.iter_video(6, 1))
    assert c[0].tobytes() != a[0][0].tobytes()


@pytest.mark.parametrize("variant", scenes.VARIANTS)
def test_boxes_lie_inside_the_frame(variant: str) -> None:
    W, H = 640, 360
    n = 0
    for seed in range(25):
        _, objs = scenes.render_scene(np.random.default_rng([seed, 3]), W, H, variant)
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, o
            need = scenes.MIN_EXTENT[o["class_id"]]
            assert x2 - x1 >= min(need, 12) and y2 - y1 >= min(need, 12)
            assert o["label"] == scenes.LABELS[o["class_id"]]
            n += 1
    assert n > 50


def test_partly_outside_objects_are_clipped_or_dropped() -> None:
    assert scenes.MIN_EXTENT[0] == 40
    dent = scenes.Defect(scenes.DENT, {"cx": 20.0, "cy": 20.0, "a": 10.0, "b": 8.0, "k": 0.4}, (10, 12, 31, 29))
    part = scenes.Part(100, 80, 160.0, (1.0, 1.0, 1.0), [dent])
    # 70 px visible on the left edge: kept, clipped to x = 0; the dent shows 1 px: dropped
    assert scenes._objects_of(part, -30, 50, 640, 360) == [{"class_id": 0, "label": "part", "box": [0, 50, 70, 130]}]
    # 80 px visible on the right edge: clipped to the width; the dent is whole
    objs = scenes._objects_of(part, 560, 50, 640, 360)
    assert [o["box"] for o in objs] == [[560, 50, 640, 130], [570, 62, 591, 79]]
    # exactly 40 px visible: kept; 39 px: dropped (the dent, 12 px visible of 21, is kept)
    assert [o["class_id"] for o in scenes._objects_of(part, -60, 50, 640, 360)] == [0]
    assert [o["box"] for o in scenes._objects_of(part, -61, 50, 640, 360)] == []
    assert [o["box"] for o in scenes._objects_of(part, -22, 50, 640, 360)] == [[0, 50, 78, 130], [0, 62, 9, 79]][:1]
    assert [o["box"] for o in scenes._objects_of(part, -19, 50, 640, 360)] == [[0, 50, 81, 130], [0, 62, 12, 79]]


def test_stills_cover_every_class_and_touching_or_truncated_plates() -> None:
    seen: set[int] = set()
    truncated = 0
    for seed in range(30):
        _, objs = scenes.render_scene(seed)
        seen.update(o["class_id"] for o in objs)
        truncated += sum(1 for o in objs if o["class_id"] == 0 and (o["box"][0] == 0 or o["box"][2] == 640))
    assert seen == {0, 1, 2, 3}
    assert truncated > 0


def test_write_images_yolo_labels(tmp_path: Path) -> None:
    paths = scenes.write_images(tmp_path, 3, seed=9)
    assert len(paths) == 3
    for p in paths:
        img = cv2.imread(str(p))
        assert img is not None
        assert img.shape == (360, 640, 3)
        for line in (tmp_path / "labels" / f"{p.stem}.txt").read_text().splitlines():
            cls, *vals = line.split()
            assert 0 <= int(cls) < 4
            assert all(0.0 <= float(v) <= 1.0 for v in vals)
    assert (tmp_path / "names.txt").read_text().split() == list(scenes.LABELS)


def test_write_video_and_truth(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    truth = scenes.write_video(path, seed=4, seconds=1.0, fps=10, variant="unseen")
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk == truth
    assert on_disk["labels"] == list(scenes.LABELS)
    assert (on_disk["width"], on_disk["height"], on_disk["fps"]) == (640, 360, 10)
    assert [f["index"] for f in on_disk["frames"]] == list(range(10))
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 10
