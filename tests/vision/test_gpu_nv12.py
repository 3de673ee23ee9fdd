"""The NV12 letterbox kernel's arithmetic (agent/vision/gpu.py), in numpy, against OpenCV.

The kernel runs only on a GPU (scripts/streams_check.py compares it with `nv12_letterbox_reference`
there, pixel for pixel); here its arithmetic is held to the reference path: OpenCV's NV12 -> BGR,
then the CPU letterbox, with the BGR kernel's tolerance rules (equal when downscaling, within
one level when upscaling, and the normalised tensor within 1/255).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.errors import SourceError
from agent.vision.gpu import nv12_coefficients, nv12_letterbox_reference, nv12_to_bgr
from agent.vision.preprocess import Letterboxer

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo" / "sample.mp4"


def random_nv12(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h * 3 // 2, w), dtype=np.uint8)


def demo_nv12(w: int, h: int) -> np.ndarray:
    """A demo frame scaled to w x h, as an encoder would see it: BGR -> YUV 4:2:0 (I420) -> NV12."""
    cap = cv2.VideoCapture(str(DEMO))
    ok, img = cap.read()
    cap.release()
    assert ok
    i420 = cv2.cvtColor(cv2.resize(img, (w, h)), cv2.COLOR_BGR2YUV_I420)
    y, u, v = i420[:h], i420[h:h + h // 4].reshape(h // 2, w // 2), i420[h + h // 4:].reshape(h // 2, w // 2)
    return np.vstack([y, np.stack([u, v], axis=-1).reshape(h // 2, w)])


def planes(nv12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = nv12.shape[0] * 2 // 3
    return nv12[:h], nv12[h:].reshape(h // 2, nv12.shape[1] // 2, 2)


@pytest.mark.parametrize(("w", "h"), [(1920, 1080), (640, 360), (64, 48), (2, 2)])
def test_colour_conversion_equals_opencv(w: int, h: int) -> None:
    for nv in (random_nv12(w, h, seed=w), demo_nv12(max(w, 16), max(h, 16))):
        assert np.array_equal(nv12_to_bgr(*planes(nv)), cv2.cvtColor(nv, cv2.COLOR_YUV2BGR_NV12))


@pytest.mark.parametrize(("src", "dst"), [((1920, 1080), (640, 640)), ((1280, 720), (320, 320)),
                                          ((640, 360), (320, 320)), ((640, 360), (640, 384))])
def test_letterbox_equals_opencv_then_cpu_letterbox_when_downscaling(src: tuple[int, int],
                                                                     dst: tuple[int, int]) -> None:
    nv = demo_nv12(*src)
    got = nv12_letterbox_reference(*planes(nv), dst[0], dst[1])
    bgr = cv2.cvtColor(nv, cv2.COLOR_YUV2BGR_NV12)
    tensor, lb = Letterboxer((1, 3, dst[1], dst[0]), np.dtype(np.float32))(bgr)
    want = (tensor[0].transpose(1, 2, 0)[..., ::-1] * 255.0).round().astype(np.uint8)  # back to BGR levels
    assert np.array_equal(got, want)
    # the tensor the kernel writes (levels through the CPU path's 1/255 table, RGB planes)
    mine = got[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)
    assert np.abs(mine - tensor).max() <= 1 / 255 + 1e-6
    assert (lb.src_w, lb.src_h) == src


def test_letterbox_within_one_level_when_upscaling() -> None:
    nv = random_nv12(200, 120, seed=3)
    got = nv12_letterbox_reference(*planes(nv), 640, 640).astype(int)
    bgr = cv2.cvtColor(nv, cv2.COLOR_YUV2BGR_NV12)
    tensor, _ = Letterboxer((1, 3, 640, 640), np.dtype(np.float32))(bgr)
    want = (tensor[0].transpose(1, 2, 0)[..., ::-1] * 255.0).round().astype(int)
    assert np.abs(got - want).max() <= 1


def float_reference(nv: np.ndarray, kr: float, kb: float, full: bool) -> np.ndarray:
    """The textbook YUV -> RGB for matrix (kr, kb) and range, in float."""
    y, uv = planes(nv)
    h, w = y.shape
    c = np.repeat(np.repeat(uv.astype(np.float64), 2, 0), 2, 1)[:h, :w] - 128.0
    u, v = c[..., 0], c[..., 1]
    yy = y.astype(np.float64) if full else (y.astype(np.float64) - 16.0) * 255.0 / 219.0
    s = 1.0 if full else 255.0 / 224.0
    kg = 1.0 - kr - kb
    r = yy + s * 2 * (1 - kr) * v
    b = yy + s * 2 * (1 - kb) * u
    g = yy - s * (2 * kb * (1 - kb) * u + 2 * kr * (1 - kr) * v) / kg
    return np.clip(np.stack([b, g, r], -1), 0, 255)


@pytest.mark.parametrize(("matrix", "kr", "kb"), [("bt601", 0.299, 0.114), ("bt709", 0.2126, 0.0722)])
@pytest.mark.parametrize("full", [False, True])
def test_matrices_and_ranges_follow_the_standards(matrix: str, kr: float, kb: float, full: bool) -> None:
    nv = demo_nv12(320, 180)
    if not full:  # limited range: what an encoder writes (Y 16..235, C 16..240)
        nv = (16 + nv.astype(np.float64) * 219.0 / 255.0).round().astype(np.uint8)
    got = nv12_to_bgr(*planes(nv), matrix, full).astype(np.float64)
    # three-decimal coefficients (OpenCV's for BT.601): within 2 levels of the exact formula
    assert np.abs(got - float_reference(nv, kr, kb, full)).max() <= 2.0


def test_bt709_differs_from_bt601_and_pad_is_kept() -> None:
    nv = demo_nv12(640, 360)
    a = nv12_letterbox_reference(*planes(nv), 320, 320, "bt601")
    b = nv12_letterbox_reference(*planes(nv), 320, 320, "bt709")
    assert not np.array_equal(a, b)
    assert (a[:40] == 114).all() and (a[-40:] == 114).all()  # 640x360 -> 320x180 centred in 320x320


def test_unknown_matrix_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="unsupported colour matrix"):
        nv12_coefficients("bt2020", False)
