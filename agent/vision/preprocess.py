"""Letterbox preprocessing: BGR uint8 frame -> NCHW RGB tensor in 0..1, aspect ratio kept.

Geometry follows the Ultralytics `LetterBox` convention exactly (scale-up allowed, centred padding,
Python `round`, `top = round(dh - 0.1)`, `left = round(dw - 0.1)`), so boxes match what the model
was validated with.

Nothing big is allocated per frame. Per source size we keep an HxWx3 uint8 canvas (already padded)
and the view of it that `cv2.resize(dst=...)` writes into; a 3xHxW uint8 plane buffer; and the one
NCHW output tensor, which every call returns (the caller must consume it before the next call).

Conversion variants measured at 1920x1080 -> 640x640 (2 shared x86 cores, median, after resize):
  numpy strided fused `np.multiply(canvas[..., ::-1].transpose(2, 0, 1), 1/255, out=)`  ~620 us
  cv2.split into planes (RGB order) + `np.multiply(planes, 1/255, out=)`                ~50 + 240 us
  cv2.split + `cv2.LUT(planes, lut_f32, dst=)` (this one)                               ~50 + 190 us
  fp16 output: numpy multiply with cast ~3300 us; cv2.LUT with a uint16 table of fp16 bit
  patterns ~185 us (this one: exact, one pass, no fp16 arithmetic).
Total with the INTER_LINEAR resize (~250 us): ~480-590 us (float32 and float16 alike; shared box, noisy).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from agent.errors import ModelError, SourceError
from agent.vision.types import Letterbox

__all__ = ["Letterboxer", "letterbox_geometry", "linear_taps", "scale_boxes_to_source"]

_MAX_SOURCE_SIZES = 4  # distinct source sizes whose scratch buffers are kept (LRU)


def letterbox_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int, float]:
    """(new_w, new_h, left, top, scale) exactly as Ultralytics LetterBox computes them."""
    r = min(dst_h / src_h, dst_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    dw, dh = (dst_w - new_w) / 2, (dst_h - new_h) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    return new_w, new_h, left, top, r


def linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps for uint8 along one axis: (first, second source index, their weights).

    Weights are fixed point (2048 = 1.0) computed as cv2.resize does (pixel-centre mapping in
    double, fraction in float, edge clamping, rounded to short), so a kernel combining them with
    cv2's integer arithmetic (see gpu.py) reproduces cv2's downscaled pixels exactly.
    """
    d = np.arange(dst, dtype=np.float64)
    f = ((d + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int32)
    f = (f - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    f[low] = 0.0
    i0[low] = 0
    f[high] = 0.0
    i0[high] = src - 1
    w0 = np.rint((np.float32(1.0) - f) * np.float32(2048.0)).astype(np.int32)
    w1 = np.rint(f * np.float32(2048.0)).astype(np.int32)
    return i0, np.minimum(i0 + 1, src - 1).astype(np.int32), w0, w1


@dataclass(slots=True)
class _Scratch:
    """Buffers for one source size: the padded canvas and the region the resize writes into."""

    canvas: np.ndarray  # H x W x 3 uint8, padded once at creation
    region: np.ndarray  # view of canvas: new_h x new_w x 3
    new_w: int
    new_h: int
    lb: Letterbox


class Letterboxer:
    """Callable turning a BGR uint8 frame into the model's NCHW input tensor (plus its Letterbox).

    The returned tensor is the same preallocated array on every call. Not thread-safe: one per
    inference thread.
    """

    def __init__(self, input_shape: tuple[int, ...], dtype: np.dtype | type = np.float32,
                 pad_value: int = 114) -> None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or shape[2] <= 0 or shape[3] <= 0:
            raise ModelError(
                f"model input must be NCHW (1, 3, H, W) with fixed H and W, got {tuple(input_shape)}"
                + (" (NHWC inputs are not supported)" if len(shape) == 4 and shape[-1] == 3 else "")
            )
        if not 0 <= int(pad_value) <= 255:
            raise ValueError(f"pad_value must be within 0..255, got {pad_value}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8)):
            raise ModelError(f"model input dtype {self.dtype} is not supported (float32, float16 or uint8)")
        self.input_shape = shape
        self.height, self.width = shape[2], shape[3]
        self.pad_value = int(pad_value)
        self._buffer = np.empty(shape, dtype=self.dtype)
        self._planes = np.empty((3, self.height, self.width), dtype=np.uint8)
        # cv2.split writes B, G, R into these planes: RGB order in the output for free.
        self._split_dst = [self._planes[2], self._planes[1], self._planes[0]]
        self._planes_2d = self._planes.reshape(3 * self.height, self.width)
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        self._lut: np.ndarray | None
        self._out_2d: np.ndarray | None
        if self.dtype == np.dtype(np.float32):
            self._lut = levels.reshape(1, 256)
            self._out_2d = self._buffer.reshape(3 * self.height, self.width)
        elif self.dtype == np.dtype(np.float16):
            # cv2 has no fp16 LUT: a uint16 table holding fp16 bit patterns is exact and fast.
            self._lut = levels.astype(np.float16).view(np.uint16).reshape(1, 256)
            self._out_2d = self._buffer.view(np.uint16).reshape(3 * self.height, self.width)
        else:  # uint8 models take 0..255 as is: split straight into the output planes
            self._lut = None
            self._out_2d = None
            self._split_dst = [self._buffer[0, 2], self._buffer[0, 1], self._buffer[0, 0]]
        self._scratch: OrderedDict[tuple[int, int], _Scratch] = OrderedDict()
        self._cv2_in_place = self._check_cv2_in_place()

    def _check_cv2_in_place(self) -> bool:
        """True when this cv2 build writes split / LUT results into our buffers (all 4.x do)."""
        probe = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        got = cv2.split(probe, mv=self._split_dst)
        ok = all(np.may_share_memory(g, d) for g, d in zip(got, self._split_dst, strict=True))
        if ok and self._lut is not None and self._out_2d is not None:
            ok = np.may_share_memory(cv2.LUT(self._planes_2d, self._lut, dst=self._out_2d), self._out_2d)
        return ok

    @property
    def buffer(self) -> np.ndarray:
        """The preallocated NCHW tensor every call writes and returns."""
        return self._buffer

    def _scratch_for(self, src_w: int, src_h: int) -> _Scratch:
        key = (src_w, src_h)
        s = self._scratch.get(key)
        if s is not None:
            self._scratch.move_to_end(key)
            return s
        new_w, new_h, left, top, r = letterbox_geometry(src_w, src_h, self.width, self.height)
        canvas = np.full((self.height, self.width, 3), self.pad_value, dtype=np.uint8)
        s = _Scratch(canvas=canvas, region=canvas[top:top + new_h, left:left + new_w], new_w=new_w,
                     new_h=new_h, lb=Letterbox(scale=r, pad_x=float(left), pad_y=float(top),
                                               src_w=src_w, src_h=src_h))
        self._scratch[key] = s
        if len(self._scratch) > _MAX_SOURCE_SIZES:
            self._scratch.popitem(last=False)
        return s

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise SourceError(f"expected a BGR uint8 HxWx3 frame, got {image.dtype} {image.shape}")
        src_h, src_w = int(image.shape[0]), int(image.shape[1])
        if src_h == 0 or src_w == 0:
            raise SourceError(f"empty frame {image.shape}")
        s = self._scratch_for(src_w, src_h)
        if s.new_w == src_w and s.new_h == src_h:
            np.copyto(s.region, image)
        else:
            out = cv2.resize(image, (s.new_w, s.new_h), dst=s.region, interpolation=cv2.INTER_LINEAR)
            if out is not s.region and not np.shares_memory(out, s.canvas):  # pragma: no cover
                np.copyto(s.region, out)  # cv2 reallocated (odd build): still correct
        if self._cv2_in_place:
            cv2.split(s.canvas, mv=self._split_dst)
            if self._lut is not None and self._out_2d is not None:
                cv2.LUT(self._planes_2d, self._lut, dst=self._out_2d)
        else:  # pragma: no cover - slower numpy path, same result
            rgb_chw = s.canvas.transpose(2, 0, 1)[::-1]
            if self.dtype == np.dtype(np.uint8):
                np.copyto(self._buffer[0], rgb_chw)
            else:
                np.multiply(rgb_chw, np.float32(1.0 / 255.0), out=self._buffer[0], dtype=np.float32,
                            casting="unsafe")
        return self._buffer, s.lb


def scale_boxes_to_source(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Model-input xyxy boxes (Nx4) -> source-frame pixels, clipped to [0, w] x [0, h]. New float32 array."""
    # whole-array ufuncs: a frame has a handful of boxes, where np.clip's and strided slices' fixed
    # costs were most of the post thread's time for this step
    out = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    out -= np.array((lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y), np.float32)
    out /= np.float32(lb.scale)
    np.maximum(out, np.float32(0.0), out=out)
    np.minimum(out, np.array((lb.src_w, lb.src_h, lb.src_w, lb.src_h), np.float32), out=out)
    return out
