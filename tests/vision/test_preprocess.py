from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.errors import ModelError, SourceError
from agent.vision.preprocess import Letterboxer, scale_boxes_to_source
from agent.vision.types import Letterbox


def reference(image: np.ndarray, h: int, w: int, pad: int = 114) -> tuple[np.ndarray, tuple[float, int, int]]:
    """Straightforward Ultralytics-style letterbox: allocating, one step at a time."""
    sh, sw = image.shape[:2]
    r = min(h / sh, w / sw)
    nw, nh = round(sw * r), round(sh * r)
    dw, dh = (w - nw) / 2, (h - nh) / 2
    img = image if (nw, nh) == (sw, sh) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad, pad, pad))
    assert img.shape[:2] == (h, w)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return (rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255.0), (r, left, top)


def _frame(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("w", "h"), [(1920, 1080), (1280, 720), (333, 517), (640, 640), (100, 37),
                                      (719, 1280)])
def test_matches_reference(dtype: type, w: int, h: int) -> None:
    lbx = Letterboxer((1, 3, 640, 640), dtype)
    img = _frame(w, h)
    out, lb = lbx(img)
    ref, (r, left, top) = reference(img, 640, 640)
    assert out.shape == (1, 3, 640, 640) and out.dtype == np.dtype(dtype)
    assert np.abs(out.astype(np.float32) - ref).max() <= 1 / 255 + 1e-6
    assert lb == Letterbox(scale=r, pad_x=left, pad_y=top, src_w=w, src_h=h)


def test_non_square_input_and_uint8() -> None:
    img = _frame(1280, 720, seed=3)
    out, _ = Letterboxer((1, 3, 384, 640), np.float32)(img)
    ref, _ = reference(img, 384, 640)
    assert np.abs(out - ref).max() <= 1 / 255 + 1e-6
    out8, _ = Letterboxer((1, 3, 384, 640), np.uint8)(img)
    assert np.abs(out8.astype(np.float32) / 255 - ref).max() <= 1 / 255 + 1e-6


def test_same_buffer_every_call_and_no_stale_pixels() -> None:
    lbx = Letterboxer((1, 3, 320, 320))
    first, _ = lbx(_frame(1280, 720, 1))
    for w, h, seed in [(720, 1280, 2), (333, 517, 3), (1280, 720, 4), (720, 1280, 5)]:
        img = _frame(w, h, seed)
        out, _ = lbx(img)
        assert out is first is lbx.buffer
        ref, _ = reference(img, 320, 320)
        assert np.abs(out - ref).max() <= 1 / 255 + 1e-6  # padding of the previous size not left behind


def test_pad_value() -> None:
    out, lb = Letterboxer((1, 3, 64, 64), pad_value=0)(np.full((32, 64, 3), 255, np.uint8))
    assert lb.pad_y == 16 and lb.pad_x == 0
    assert out[0, :, :16].max() == 0 and out[0, :, 16:48].min() == 1.0


def test_rgb_order() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 255  # blue in BGR
    out, _ = Letterboxer((1, 3, 64, 64))(img)
    assert out[0, 2].min() == 1.0 and out[0, 0].max() == 0.0 and out[0, 1].max() == 0.0


@pytest.mark.parametrize("shape", [(1, 640, 640, 3), (3, 640, 640), (2, 3, 640, 640), (1, 1, 640, 640)])
def test_rejects_non_nchw(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match="NCHW"):
        Letterboxer(shape)


def test_rejects_bad_dtype_and_frames() -> None:
    with pytest.raises(ModelError, match="dtype"):
        Letterboxer((1, 3, 64, 64), np.int64)
    lbx = Letterboxer((1, 3, 64, 64))
    with pytest.raises(SourceError):
        lbx(np.zeros((10, 10), np.uint8))
    with pytest.raises(SourceError):
        lbx(np.zeros((10, 10, 3), np.float32))


def _find_rect(tensor: np.ndarray) -> np.ndarray:
    """xyxy (exclusive max) of the bright rectangle in the letterboxed tensor."""
    mask = tensor[0, 0] > 0.5
    ys, xs = np.nonzero(mask)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)


@pytest.mark.parametrize(("w", "h", "rect"), [
    (1280, 720, (200, 100, 601, 413)),
    (333, 517, (41, 77, 290, 402)),
    (720, 1280, (10, 1000, 700, 1270)),
])
def test_letterbox_round_trip(w: int, h: int, rect: tuple[int, int, int, int]) -> None:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = rect
    img[y1:y2, x1:x2] = 255
    out, lb = Letterboxer((1, 3, 640, 640))(img)
    back = scale_boxes_to_source(_find_rect(out), lb)[0]
    assert np.abs(back - np.array(rect, np.float32)).max() <= 1.0, (back, rect)


def test_scale_boxes_clips() -> None:
    lb = Letterbox(scale=0.5, pad_x=0.0, pad_y=140.0, src_w=1280, src_h=720)
    boxes = np.array([[-10, 100, 700, 600], [10, 150, 20, 160]], np.float32)
    out = scale_boxes_to_source(boxes, lb)
    np.testing.assert_allclose(out, [[0, 0, 1280, 720], [20, 20, 40, 40]])
    assert boxes[0, 0] == -10  # input untouched


def _fixed_point_resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """The GPU letterbox kernel's arithmetic (agent/vision/gpu.py), in numpy: cv2's uint8 INTER_LINEAR."""
    from agent.vision.preprocess import linear_taps

    x0, x1, a0, a1 = (t.astype(np.int64) for t in linear_taps(img.shape[1], w))
    y0, y1, b0, b1 = (t.astype(np.int64) for t in linear_taps(img.shape[0], h))
    src = img.astype(np.int64)
    h0 = src[y0][:, x0] * a0[None, :, None] + src[y0][:, x1] * a1[None, :, None]
    h1 = src[y1][:, x0] * a0[None, :, None] + src[y1][:, x1] * a1[None, :, None]
    v = (((b0[:, None, None] * (h0 >> 4)) >> 16) + ((b1[:, None, None] * (h1 >> 4)) >> 16) + 2) >> 2
    return v.astype(np.uint8)


@pytest.mark.parametrize(("src", "dst"), [((1920, 1080), (640, 360)), ((1280, 720), (640, 360)),
                                          ((333, 517), (206, 320)), ((640, 360), (320, 180)),
                                          ((640, 640), (640, 640))])
def test_gpu_kernel_taps_equal_cv2_when_downscaling(src: tuple[int, int], dst: tuple[int, int]) -> None:
    img = _frame(*src, seed=5)
    want = cv2.resize(img, dst, interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(_fixed_point_resize(img, *dst), want)


def test_gpu_kernel_taps_within_one_level_when_upscaling() -> None:
    img = _frame(200, 120, seed=6)
    want = cv2.resize(img, (640, 384), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(_fixed_point_resize(img, 640, 384).astype(int) - want).max() <= 1
