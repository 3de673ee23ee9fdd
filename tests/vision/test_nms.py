from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from agent.vision import nms as nms_mod
from agent.vision.nms import HAVE_CV2_NMS, nms, nms_cv2, nms_numpy

NmsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float, int], np.ndarray]
IMPLS: list[NmsFn] = [nms_numpy, nms] + ([nms_cv2] if HAVE_CV2_NMS else [])


def _arr(boxes: list[list[float]], scores: list[float], cls: list[int]) -> tuple[np.ndarray, ...]:
    return np.array(boxes, np.float32), np.array(scores, np.float32), np.array(cls, np.int32)


@pytest.mark.parametrize("fn", IMPLS)
def test_known_overlaps(fn: NmsFn) -> None:
    b, s, c = _arr(
        [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5], [21, 21, 31, 31]],
        [0.8, 0.9, 0.7, 0.6, 0.75],
        [0, 0, 0, 0, 0],
    )
    # IoU(0,1)=9/11=0.82 -> 0 suppressed; IoU(1,3)=45/105=0.43 <= 0.45 kept; IoU(4,2)=81/119=0.68
    assert fn(b, s, c, 0.45, 100).tolist() == [1, 4, 3]
    assert fn(b, s, c, 0.4, 100).tolist() == [1, 4]
    assert fn(b, s, c, 0.9, 100).tolist() == [1, 0, 4, 2, 3]
    assert fn(b, s, c, 0.9, 2).tolist() == [1, 0]


@pytest.mark.parametrize("fn", IMPLS)
def test_class_aware(fn: NmsFn) -> None:
    b, s, c = _arr([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.9, 0.7], [1, 0, 1])
    assert fn(b, s, c, 0.45, 100).tolist() == [1, 2]  # different classes both kept; same class suppressed


@pytest.mark.parametrize("fn", IMPLS)
def test_negative_coordinates_keep_classes_apart(fn: NmsFn) -> None:
    b, s, c = _arr([[-50, -50, 5, 5], [600, 600, 640, 640], [-50, -50, 5, 5]], [0.9, 0.8, 0.7], [0, 0, 1])
    assert fn(b, s, c, 0.45, 100).tolist() == [0, 1, 2]


@pytest.mark.parametrize("fn", IMPLS)
def test_empty_and_ties(fn: NmsFn) -> None:
    b, s, c = _arr([], [], [])
    assert fn(b.reshape(0, 4), s, c, 0.5, 10).tolist() == []
    b, s, c = _arr([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], [0.5, 0.5, 0.5], [0, 0, 0])
    assert fn(b, s, c, 0.5, 10).tolist() == [0, 1]


@pytest.mark.parametrize("fn", IMPLS)
def test_a_single_box_is_kept(fn: NmsFn) -> None:
    """The common frame: one candidate (cv2's call is skipped for it)."""
    b, s, c = _arr([[-5, 3, 40, 50]], [0.3], [7])
    assert fn(b, s, c, 0.45, 100).tolist() == [0]
    assert fn(b, s, c, 0.45, 0).tolist() == []


@pytest.mark.skipif(not HAVE_CV2_NMS, reason="cv2.dnn.NMSBoxesBatched not available")
@pytest.mark.parametrize("n", [5, 60, 400, 1200])
def test_cv2_and_numpy_agree(n: int) -> None:
    rng = np.random.default_rng(n)
    xy = rng.uniform(-20, 600, (n, 2)).astype(np.float32)
    wh = rng.uniform(5, 150, (n, 2)).astype(np.float32)
    b = np.hstack([xy, xy + wh])
    s = rng.uniform(0.05, 1, n).astype(np.float32)
    c = rng.integers(0, 4, n).astype(np.int32)
    for thr in (0.3, 0.45, 0.7):
        for k in (10, 300):
            np.testing.assert_array_equal(nms_numpy(b, s, c, thr, k), nms_cv2(b, s, c, thr, k))


def test_large_inputs_use_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def fake(name: str) -> NmsFn:
        def run(*_: object) -> np.ndarray:
            called.append(name)
            return np.zeros(0, np.int64)
        return run

    monkeypatch.setattr(nms_mod, "nms_numpy", fake("numpy"))
    monkeypatch.setattr(nms_mod, "nms_cv2", fake("cv2"))
    z = np.zeros(nms_mod._CV2_MAX_CANDIDATES + 1, np.float32)
    nms(np.zeros((z.size, 4), np.float32), z, z.astype(np.int32), 0.5, 10)
    assert called == ["numpy"]
