"""Frame -> candidates on the GPU: one upload, letterbox in a kernel, inference, score filter on the device.

Per frame, in three steps that three pipeline threads take in turn, none waiting for another's GPU work:
  stage (inference thread): upload, letterbox into one of two input buffers, on a prep stream;
  launch (launch thread): inference on that buffer, candidate selection, copy back, on the engine's stream;
  result (post thread): wait for the frame's event, read the candidates.
So frame N+1 is uploaded and letterboxed while frame N infers (ONNX Runtime's graph replay
blocks its caller until the inference ends: preparing the next frame must happen elsewhere).
  1. the BGR uint8 frame is uploaded on the prep stream (straight from page-locked memory, or
     after one copy into a pinned staging buffer);
  2. a kernel letterboxes it (OpenCV INTER_LINEAR taps and integer arithmetic, so downscaled pixels
     equal cv2.resize's), converts BGR -> RGB and HWC -> CHW and normalises through the same
     256-entry table as the CPU path, straight into the engine's bound input buffer;
  3. the engine runs on its bound device buffers (nothing crosses the bus);
  4. for YOLOv8-layout outputs a kernel keeps the anchors whose best class passes its threshold
     (the CPU decoder's rule, per-class thresholds included) and packs them; only their count and
     those rows come back to the host. Other layouts copy their (small) outputs back whole.
NMS runs on the host on those few candidates, in the post thread, exactly as on the CPU path.

Frames decoded by NVDEC (agent.capture.sources.nvdec) arrive as `Nv12Frame`s already on the
device: step 1 is skipped and the NV12 letterbox kernel reads the Y plane and the interleaved UV
plane itself, converting each tap to BGR before the same resize. The conversion is libswscale's
x86 yuv420p -> bgr24 fixed point (16-bit constants, products truncated to their high 16 bits,
chroma of the 2x2 block as it is) with the stream's matrix and range (BT.601 limited unless it
declares BT.709 or full range): what cv2.VideoCapture's FFmpeg backend does on x86, so NVDEC's
frames convert to exactly the BGR of the CPU decode path (H.264 decoding is bit-exact;
tests/vision/test_gpu_nv12.py checks the four cases against OpenCV and PyAV's libswscale).
`nv12_to_bgr` / `nv12_letterbox_reference` are that arithmetic in numpy, for the tests and the
CPU fallback.

Up to SLOTS frames are in flight; each slot owns its staging, device frame and result buffers, so
nothing is reused before its result was read. The two input buffers alternate; events order the
streams on the device (a buffer is letterboxed again only after the inference that read it), and
the host stages a frame into a buffer only once the frame before it there was launched, so that
the event it waits on is that frame's (without this, the third frame could overwrite the first's
input before its inference ran: seen on the H200 as results of frame N+2 reported for frame N).

Kernels are compiled by NVRTC at start (agent.engines.cuda.Kernel), not shipped as binaries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from agent.engines import cuda
from agent.engines.base import Engine
from agent.errors import EngineError, SourceError
from agent.vision.decoders import Candidates
from agent.vision.postprocess import Postprocessor
from agent.vision.preprocess import letterbox_geometry, linear_taps
from agent.vision.types import Letterbox

log = logging.getLogger(__name__)

__all__ = ["GpuFrontend", "Nv12Frame", "Pending", "Staged", "nv12_coefficients", "nv12_letterbox_reference",
           "nv12_to_bgr"]

# libswscale's YUV -> RGB matrices (crv, cbu, cgu, cgv; x 2^16, its ff_yuv2rgb_coeffs rows), the
# ones OpenCV's FFmpeg backend converts with: BT.601 for an unspecified stream, and BT.709 (the
# row of libswscale 9 / FFmpeg 8; older releases had 117504, 138453, 13954, 34903).
_SWS_MATRIX = {"bt601": (104597, 132201, 25675, 53279), "bt709": (117489, 138438, 13975, 34925)}


def _round16(v: int) -> int:
    """libswscale's rounding of a 2^16-scaled constant to a signed 16-bit one (floor of v / 2^16 + 1/2)."""
    return max(-0x7FFF, min(0x7FFF, (v + (1 << 15)) >> 16))


def _c_div(a: int, b: int) -> int:
    """C's integer division (towards zero), which libswscale uses on the negative green terms."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def nv12_coefficients(matrix: str, full_range: bool) -> tuple[int, int, int, int, int, int]:
    """(cy, cvr, cug, cvg, cub, yoff) for `matrix` and range: libswscale's 16-bit constants.

    The same derivation as libswscale's table setup (default brightness, contrast, saturation):
    limited range scales luma by 255/219 and offsets it by 16, full range scales chroma by 224/255.
    Coefficients multiply samples shifted left by 3, so yoff is 16 << 3 (limited) or 0 (full).
    BT.601 limited: (9539, 13075, -3209, -6660, 16525, 128).
    """
    try:
        crv, cbu, cgu, cgv = _SWS_MATRIX[matrix]
    except KeyError:
        raise SourceError(f"unsupported colour matrix {matrix!r} (bt601, bt709)") from None
    cgu, cgv = -cgu, -cgv
    cy, oy = 1 << 16, 0
    if full_range:
        crv, cbu, cgu, cgv = (_c_div(c * 224, 255) for c in (crv, cbu, cgu, cgv))
    else:
        cy, oy = cy * 255 // 219, 16 << 16
    return (_round16(cy << 13), _round16(crv << 13), _round16(cgu << 13), _round16(cgv << 13),
            _round16(cbu << 13), _round16(oy << 3))


def nv12_to_bgr(y: np.ndarray, uv: np.ndarray, matrix: str = "bt601", full_range: bool = False) -> np.ndarray:
    """NV12 planes (Y: HxW, UV: H/2 x W/2 x 2) -> BGR uint8, the kernel's arithmetic.

    It is libswscale's x86 (SSSE3) yuv420p -> bgr24 conversion, which cv2.VideoCapture's FFmpeg
    backend runs: samples shifted left by 3, each product with a 16-bit constant keeps its high
    16 bits (pmulhw: floor of / 2^16), the terms are summed and saturated to 0..255 once; the
    chroma of each 2x2 block is used as it is (no interpolation). libswscale also saturates the
    intermediate sums to 16 bits, which never binds for 8-bit samples (all stay within +-600).
    """
    cy, cvr, cug, cvg, cub, yoff = nv12_coefficients(matrix, full_range)
    h, w = y.shape
    chroma = np.repeat(np.repeat(uv.astype(np.int32), 2, axis=0), 2, axis=1)[:h, :w]
    u, v = (chroma[..., 0] << 3) - (128 << 3), (chroma[..., 1] << 3) - (128 << 3)
    luma = (((y.astype(np.int32) << 3) - yoff) * cy) >> 16
    bgr = np.stack([luma + ((u * cub) >> 16),
                    luma + ((u * cug) >> 16) + ((v * cvg) >> 16),
                    luma + ((v * cvr) >> 16)], axis=-1)
    return np.clip(bgr, 0, 255).astype(np.uint8)


def nv12_letterbox_reference(y: np.ndarray, uv: np.ndarray, width: int, height: int, matrix: str = "bt601",
                             full_range: bool = False, pad: int = 114) -> np.ndarray:
    """The NV12 letterbox kernel in numpy: HxWx3 BGR uint8 letterboxed to width x height (before the LUT)."""
    src = nv12_to_bgr(y, uv, matrix, full_range).astype(np.int64)
    src_h, src_w = y.shape
    new_w, new_h, left, top, _ = letterbox_geometry(src_w, src_h, width, height)
    x0, x1, a0, a1 = (t.astype(np.int64) for t in linear_taps(src_w, new_w))
    y0, y1, b0, b1 = (t.astype(np.int64) for t in linear_taps(src_h, new_h))
    h0 = src[y0][:, x0] * a0[None, :, None] + src[y0][:, x1] * a1[None, :, None]
    h1 = src[y1][:, x0] * a0[None, :, None] + src[y1][:, x1] * a1[None, :, None]
    v = (((b0[:, None, None] * (h0 >> 4)) >> 16) + ((b1[:, None, None] * (h1 >> 4)) >> 16) + 2) >> 2
    out = np.full((height, width, 3), pad, np.uint8)
    out[top:top + new_h, left:left + new_w] = v.astype(np.uint8)
    return out


class Nv12Frame:
    """A decoded frame on the GPU in NV12: Y plane (pitch bytes a row), then the interleaved UV plane.

    Stands in for the BGR array of a Frame (`shape` is (H, W, 3)); the GPU frontend letterboxes it
    where it lies. `owner` keeps its device memory alive (a decoder's pool buffer returns to its
    pool when the last reference goes). `ready`, when given, is an event recorded once the frame's
    memory is written (the decoder's copy, queued on its own stream): readers wait on it first, on
    the device (the frontend's stream) or on the host (`planes()`). `to_bgr()` copies it to the
    host for the CPU path.
    """

    __slots__ = ("full_range", "height", "matrix", "owner", "pitch", "ready", "uv_ptr", "width", "y_ptr")
    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, y_ptr: int, uv_ptr: int, pitch: int, width: int, height: int, matrix: str = "bt601",
                 full_range: bool = False, owner: object = None, ready: cuda.Event | None = None) -> None:
        self.y_ptr, self.uv_ptr, self.pitch = int(y_ptr), int(uv_ptr), int(pitch)
        self.width, self.height, self.matrix, self.full_range = int(width), int(height), matrix, bool(full_range)
        self.owner, self.ready = owner, ready

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def size(self) -> int:
        return self.height * self.width * 3

    def planes(self) -> tuple[np.ndarray, np.ndarray]:
        """(Y, UV) copied to the host."""
        y = np.empty((self.height, self.pitch), np.uint8)
        uv = np.empty((self.height // 2, self.pitch), np.uint8)
        with cuda.CAPTURE.shared():
            if self.ready is not None:
                self.ready.synchronize()
            cuda.copy_dtoh_ptr(y, self.y_ptr)
            cuda.copy_dtoh_ptr(uv, self.uv_ptr)
        return (y[:, : self.width],
                uv[:, : self.width].reshape(self.height // 2, self.width // 2, 2))

    def to_bgr(self) -> np.ndarray:
        return nv12_to_bgr(*self.planes(), self.matrix, self.full_range)


_SOURCE = r"""
typedef unsigned char u8;
typedef unsigned short u16;

// One thread per output pixel. taps: x0, x1, wx0, wx1 per output column inside the letterbox
// region (int4), then y0, y1, wy0, wy1 per row. Arithmetic is cv2's fixed-point INTER_LINEAR
// for uint8 (HResizeLinear + VResizeLinear with FixedPtCast): identical results when downscaling.
#define LETTERBOX(NAME, T)                                                                            \
extern "C" __global__ void NAME(const u8* __restrict__ src, int src_pitch, const int4* __restrict__ xt,   \
        const int4* __restrict__ yt, int new_w, int new_h, int left, int top, int out_w, int out_h,      \
        int pad, const T* __restrict__ lut, T* __restrict__ dst) {                                      \
    int x = blockIdx.x * blockDim.x + threadIdx.x;                                                    \
    int y = blockIdx.y * blockDim.y + threadIdx.y;                                                    \
    if (x >= out_w || y >= out_h) return;                                                             \
    int plane = out_w * out_h, o = y * out_w + x, dx = x - left, dy = y - top;                        \
    if (dx < 0 || dx >= new_w || dy < 0 || dy >= new_h) {                                             \
        T v = lut[pad];                                                                               \
        dst[o] = v; dst[plane + o] = v; dst[2 * plane + o] = v;                                       \
        return;                                                                                       \
    }                                                                                                 \
    int4 tx = xt[dx], ty = yt[dy];                                                                    \
    const u8* r0 = src + (long)ty.x * src_pitch;                                                      \
    const u8* r1 = src + (long)ty.y * src_pitch;                                                      \
    for (int c = 0; c < 3; ++c) {                                                                     \
        int h0 = r0[tx.x * 3 + c] * tx.z + r0[tx.y * 3 + c] * tx.w;                                   \
        int h1 = r1[tx.x * 3 + c] * tx.z + r1[tx.y * 3 + c] * tx.w;                                   \
        int v = (((ty.z * (h0 >> 4)) >> 16) + ((ty.w * (h1 >> 4)) >> 16) + 2) >> 2;                  \
        dst[(2 - c) * plane + o] = lut[v];  /* BGR in, RGB planes out */                              \
    }                                                                                                 \
}
LETTERBOX(letterbox_f32, float)
LETTERBOX(letterbox_u16, u16)
LETTERBOX(letterbox_u8, u8)

// NV12 (Y plane, then interleaved U, V at half resolution) -> B, G, R of one pixel, in libswscale's
// x86 yuv2rgb fixed point (what cv2.VideoCapture's FFmpeg backend converts with; nv12_to_bgr in
// numpy): samples shifted left by 3, each product keeps its high 16 bits (>> 16, a floor), one
// saturation to 0..255 at the end; the chroma of the 2x2 block as it is. Integer arithmetic only.
// k: cy, cvr, cug, cvg, cub (16-bit constants from nv12_coefficients), yoff (128 limited, 0 full).
__device__ __forceinline__ int sat8(int v) { return v < 0 ? 0 : (v > 255 ? 255 : v); }
__device__ __forceinline__ void nv12_bgr(const u8* __restrict__ ys, const u8* __restrict__ uvs, int py, int puv,
                                         int x, int y, const int* k, int* b, int* g, int* r) {
    int Y = ys[(long)y * py + x];
    const u8* c = uvs + (long)(y >> 1) * puv + (x & ~1);
    int U = (c[0] << 3) - (128 << 3), V = (c[1] << 3) - (128 << 3);
    int l = (((Y << 3) - k[5]) * k[0]) >> 16;  /* >> of a negative int is arithmetic (a floor) in CUDA */
    *r = sat8(l + ((V * k[1]) >> 16));
    *g = sat8(l + ((U * k[2]) >> 16) + ((V * k[3]) >> 16));
    *b = sat8(l + ((U * k[4]) >> 16));
}

#define LETTERBOX_NV12(NAME, T)                                                                       \
extern "C" __global__ void NAME(const u8* __restrict__ ys, const u8* __restrict__ uvs, int py, int puv,  \
        const int4* __restrict__ xt, const int4* __restrict__ yt, int new_w, int new_h, int left, int top,  \
        int out_w, int out_h, int pad, const T* __restrict__ lut, int cy, int cvr, int cug, int cvg,       \
        int cub, int yoff, T* __restrict__ dst) {                                                      \
    int x = blockIdx.x * blockDim.x + threadIdx.x;                                                    \
    int y = blockIdx.y * blockDim.y + threadIdx.y;                                                    \
    if (x >= out_w || y >= out_h) return;                                                             \
    int plane = out_w * out_h, o = y * out_w + x, dx = x - left, dy = y - top;                        \
    if (dx < 0 || dx >= new_w || dy < 0 || dy >= new_h) {                                             \
        T v = lut[pad];                                                                               \
        dst[o] = v; dst[plane + o] = v; dst[2 * plane + o] = v;                                       \
        return;                                                                                       \
    }                                                                                                 \
    int4 tx = xt[dx], ty = yt[dy];                                                                    \
    int p[4][3], k[6] = {cy, cvr, cug, cvg, cub, yoff};                                              \
    nv12_bgr(ys, uvs, py, puv, tx.x, ty.x, k, &p[0][0], &p[0][1], &p[0][2]);                      \
    nv12_bgr(ys, uvs, py, puv, tx.y, ty.x, k, &p[1][0], &p[1][1], &p[1][2]);                      \
    nv12_bgr(ys, uvs, py, puv, tx.x, ty.y, k, &p[2][0], &p[2][1], &p[2][2]);                      \
    nv12_bgr(ys, uvs, py, puv, tx.y, ty.y, k, &p[3][0], &p[3][1], &p[3][2]);                      \
    for (int c = 0; c < 3; ++c) {                                                                     \
        int h0 = p[0][c] * tx.z + p[1][c] * tx.w;                                                     \
        int h1 = p[2][c] * tx.z + p[3][c] * tx.w;                                                     \
        int v = (((ty.z * (h0 >> 4)) >> 16) + ((ty.w * (h1 >> 4)) >> 16) + 2) >> 2;                  \
        dst[(2 - c) * plane + o] = lut[v];  /* B, G, R taps; RGB planes out */                        \
    }                                                                                                 \
}
LETTERBOX_NV12(letterbox_nv12_f32, float)
LETTERBOX_NV12(letterbox_nv12_u16, u16)
LETTERBOX_NV12(letterbox_nv12_u8, u8)

__device__ __forceinline__ float load_f32(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float load_f16(const u16* p, int i) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i])); return f;
}

// One thread per anchor of a [1, 4+nc, n] output: best class (first on ties, like numpy argmax),
// kept when best >= floor and best >= its class threshold; kept rows are packed as
// x1, y1, x2, y2, score, class, anchor (anchor lets the host restore the CPU decoder's order).
#define CANDIDATES(NAME, T, LOAD)                                                                     \
extern "C" __global__ void NAME(const T* __restrict__ out, int nc, int n, const float* __restrict__ thr, \
        int nthr, float beyond, float floor_, float* __restrict__ rows, int* __restrict__ count, int cap) { \
    int j = blockIdx.x * blockDim.x + threadIdx.x;                                                    \
    if (j >= n) return;                                                                               \
    float best = LOAD(out, 4 * n + j); int cls = 0;                                                   \
    for (int c = 1; c < nc; ++c) { float v = LOAD(out, (4 + c) * n + j); if (v > best) { best = v; cls = c; } } \
    if (!(best >= floor_)) return;                                                                    \
    float t = cls < nthr ? thr[cls] : beyond;                                                         \
    if (!(best >= t)) return;                                                                         \
    int k = atomicAdd(count, 1);                                                                      \
    if (k >= cap) return;                                                                             \
    float cx = LOAD(out, j), cy = LOAD(out, n + j), hw = LOAD(out, 2 * n + j) * 0.5f;                 \
    float hh = LOAD(out, 3 * n + j) * 0.5f;                                                           \
    float* r = rows + 7 * k;                                                                          \
    r[0] = cx - hw; r[1] = cy - hh; r[2] = cx + hw; r[3] = cy + hh;                                   \
    r[4] = best; r[5] = (float)cls; r[6] = (float)j;                                                  \
}
CANDIDATES(candidates_f32, float, load_f32)
CANDIDATES(candidates_f16, u16, load_f16)
"""

_KERNELS = ["letterbox_f32", "letterbox_u16", "letterbox_u8", "letterbox_nv12_f32", "letterbox_nv12_u16",
            "letterbox_nv12_u8", "candidates_f32", "candidates_f16"]
SLOTS = 3  # frames in flight: enough to keep the GPU busy while the host prepares and collects
INPUTS = 2  # input buffers used in turn: one is letterboxed while the other is inferred
_TINY = float(np.finfo(np.float32).tiny)
_NV12_LAUNCHES = 128  # packed NV12 launches kept per source size (decoder buffers x input buffers)
RESULT_WAIT_S = 10.0  # a submitted run not done by then is reported as failed
_O = TypeVar("_O", bound=cuda._Owned)


@dataclass
class _SourceSize:
    """Buffers for one source frame size: pinned staging and device frame per slot, the resize taps."""

    pinned: list[cuda.PinnedBuffer]
    frames: list[cuda.DeviceBuffer]
    letterbox: list[list[cuda.Launch]]  # [slot][input buffer]: the kernel from that frame into that buffer
    xtaps: cuda.DeviceBuffer
    ytaps: cuda.DeviceBuffer
    new_w: int
    new_h: int
    left: int
    top: int
    lb: Letterbox
    # NV12 launches packed once per (decoder buffer, input buffer): the decoder's pool reuses a few
    # buffers, and packing 21 arguments every frame cost Python time on the inference thread
    nv12: dict[tuple[object, ...], cuda.Launch] = field(default_factory=dict)

    def free(self) -> None:
        for b in (*self.pinned, *self.frames, self.xtaps, self.ytaps):
            b.free()


@dataclass
class _Slot:
    index: int
    uploaded: cuda.Event  # on the copy stream: the frame is on the device
    done: cuda.Event  # on the engine stream: results are in the host buffers
    host_out: list[cuda.PinnedBuffer]  # candidates: [count, then rows, in one buffer]; other layouts: every output
    free: threading.Event
    keep: object = None  # an Nv12Frame read by this slot's letterbox: its memory stays until the result
    # submitted runs (engine.submits_device_runs): set once `done` is recorded, or the run failed
    queued: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    candidates: cuda.DeviceBuffer | None = None  # this slot's own (its frame may be on any lane)
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False  # its reader gave up on a submitted run: the run frees the slot when it ends
    on_queued: Callable[[], None] | None = None  # told (lane thread) once `queued` is set: wakes the reader


def _run_finished(slot: _Slot) -> None:
    """A submitted run's results are queued, or it failed: wake the reader. A slot whose reader gave
    up waiting is freed only now: until the late run ended, its buffers were still the run's."""
    with slot.lock:
        slot.queued.set()
        if slot.abandoned:
            slot.abandoned = False
            slot.keep = None
            slot.free.set()
    if slot.on_queued is not None:
        try:
            slot.on_queued()
        except Exception:  # the reader still finds `queued` set when it looks
            log.exception("waking the reader of a GPU result failed")


@dataclass
class Staged:
    """A frame uploaded and letterboxed (or queued to be) into input buffer `input`; or (`frame`) an
    NV12 frame the lane that runs it letterboxes straight into its own input (input -1)."""

    slot: _Slot
    input: int
    lb: Letterbox
    frame: Nv12Frame | None = None
    size: _SourceSize | None = None


class Pending:
    """A frame queued on the GPU; `result()` (any thread) waits for it and frees its slot."""

    def __init__(self, frontend: GpuFrontend, slot: _Slot, lb: Letterbox) -> None:
        self._frontend, self._slot, self.lb = frontend, slot, lb

    def queued(self) -> bool:
        """result() will not wait for a lane: the run's results are queued on the GPU (or it failed)."""
        return not self._frontend.submits or self._slot.queued.is_set()

    def result(self) -> tuple[Candidates | list[np.ndarray], Letterbox]:
        slot = self._slot
        if self._frontend.submits and not self._run_ended(slot):
            # the slot stays taken: the late run may still write its buffers (_run_finished frees it)
            raise EngineError(f"inference not run within {RESULT_WAIT_S:.0f} s")
        try:
            if slot.error is not None:
                raise EngineError(f"inference failed: {str(slot.error).strip()[:300]}") from slot.error
            with cuda.CAPTURE.shared():
                slot.done.synchronize()
            return self._frontend._collect(slot), self.lb
        finally:
            slot.keep = None
            slot.free.set()

    @staticmethod
    def _run_ended(slot: _Slot) -> bool:
        if slot.queued.wait(RESULT_WAIT_S):
            return True
        with slot.lock:
            if slot.queued.is_set():  # it ended just now
                return True
            slot.abandoned = True
            return False


_compiled: dict[int, cuda.Kernel] = {}
_compiled_lock = threading.Lock()


def _kernels(device: int) -> cuda.Kernel:
    """The kernels compiled once per device and process: every camera's frontend shares the module
    (NVRTC takes a few hundred ms; with dozens of cameras that was the start-up)."""
    with _compiled_lock:
        k = _compiled.get(device)
        if k is None or k.closed:
            k = _compiled[device] = cuda.Kernel(_SOURCE, _KERNELS, device)
        return k


def _upload(host: np.ndarray, stream: cuda.Stream) -> cuda.DeviceBuffer:
    buf = cuda.DeviceBuffer(host.nbytes)
    cuda.copy_htod_async(buf, np.ascontiguousarray(host), stream)
    stream.synchronize()  # `host` may be a temporary
    return buf


class GpuFrontend:
    """BGR uint8 frame -> (candidates, or the raw outputs for non-YOLOv8 layouts; Letterbox).

    `submit(frame)` queues a frame and returns a Pending; `frontend(frame)` does both steps. Owns
    the engine's device input / output buffers and binds them once. `submit` is for one thread (the
    inference thread, which gets the device's context made current); `result` for any.
    """

    def __init__(self, engine: Engine, post: Postprocessor, pad_value: int = 114, device: int = 0) -> None:
        stream = engine.device_stream
        if stream is None:
            raise EngineError(f"{type(engine).__name__} has no CUDA stream for device IO")
        self.engine, self.post, self.stream, self.device = engine, post, stream, device
        spec = engine.input_spec
        if len(spec.shape) != 4 or spec.shape[0] != 1 or spec.shape[1] != 3:
            raise EngineError(f"GPU preprocessing needs an NCHW (1, 3, H, W) input, got {spec.shape}")
        self.height, self.width = int(spec.shape[2]), int(spec.shape[3])
        # runs submitted to the engine's lanes (no launch wait): launch() returns at once
        # (EDGE_AGENT_LANE_SUBMIT=0 launches from the launch thread and waits instead: measurement only)
        self.submits = bool(engine.submits_device_runs) and os.environ.get("EDGE_AGENT_LANE_SUBMIT", "1") != "0"
        # NV12 frames letterboxed by the lane's stream into the lane's input: no input buffer of the
        # camera's, no copy, no events between (EDGE_AGENT_LANE_FILL=0: the copy, for measurement only)
        self.fills = self.submits and os.environ.get("EDGE_AGENT_LANE_FILL", "1") != "0"
        self._lane_launches: dict[tuple[int, int], cuda.Launch] = {}  # (lane output, slot): candidates
        self._lane_lock = threading.Lock()
        self.pad_value = int(pad_value)
        self._owned: list[cuda._Owned] = []
        self._size_state: tuple[tuple[int, int, bool], _SourceSize] | None = None
        self._threads: set[int] = set()
        self._slots: list[_Slot] = []
        self._next = 0
        try:
            with cuda.CAPTURE.shared():  # allocations are CUDA calls: not during another thread's capture
                self.kernels = _kernels(device)
                self.copy_stream = self._own(cuda.Stream())
                levels = np.arange(256, dtype=np.float32) / np.float32(255.0)  # the CPU path's table
                if spec.dtype == np.dtype(np.float32):
                    lut, self._letterbox = levels, "letterbox_f32"
                elif spec.dtype == np.dtype(np.float16):
                    lut, self._letterbox = levels.astype(np.float16).view(np.uint16), "letterbox_u16"
                elif spec.dtype == np.dtype(np.uint8):
                    lut, self._letterbox = np.arange(256, dtype=np.uint8), "letterbox_u8"
                else:
                    raise EngineError(f"GPU preprocessing does not support input dtype {spec.dtype}")
                self._letterbox_nv12 = self._letterbox.replace("letterbox_", "letterbox_nv12_")
                self._lut = self._own(_upload(lut, stream))
                nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
                self.inputs = [self._own(cuda.DeviceBuffer(nbytes)) for _ in range(INPUTS)]
                self.outputs = [self._own(cuda.DeviceBuffer(int(np.prod(o.shape)) * o.dtype.itemsize))
                                for o in engine.output_specs]
                self._bindings = [engine.bind_device(i.ptr, [o.ptr for o in self.outputs]) for i in self.inputs]
                # recorded after each inference: its input buffer may be letterboxed again
                self._input_free = [self._own(cuda.Event(timing=False)) for _ in self.inputs]
                # set once the frame that last used input buffer k was launched (its _input_free[k] is
                # recorded): before that, a stream waiting on _input_free[k] would wait on the frame
                # before it and the letterbox could overwrite the buffer before the inference read it
                self._input_launched = [threading.Event() for _ in self.inputs]
                for ev in self._input_launched:
                    ev.set()
                self._staged = 0
                self._setup_decode()
        except BaseException:
            self.close()
            raise
        log.info("GPU preprocessing on (%s, %s input, %s, %d frames in flight)", self.kernels.arch, spec.dtype,
                 "candidates selected on the device" if self.on_device_decode else "outputs copied back whole",
                 SLOTS)

    def _own(self, obj: _O) -> _O:
        self._owned.append(obj)
        return obj

    def _setup_decode(self) -> None:
        out = self.engine.output_specs[0]
        self.on_device_decode = (self.post.layout == "yolov8" and len(out.shape) == 3 and out.shape[0] == 1
                                 and out.dtype in (np.dtype(np.float32), np.dtype(np.float16)))
        self._thr_state: object = None
        self._thr: cuda.DeviceBuffer | None = None
        self._cand_launch: cuda.Launch | None = None
        if self.on_device_decode:
            self._nc, self._n = int(out.shape[1]) - 4, int(out.shape[2])
            self._candidates = "candidates_f32" if out.dtype == np.dtype(np.float32) else "candidates_f16"
            # the count (int32), then n rows of 7 floats: one buffer, so one copy back per frame
            self._cand = self._own(cuda.DeviceBuffer(4 + self._n * 28))
        for i in range(SLOTS):
            if self.on_device_decode:
                host = [self._own(cuda.PinnedBuffer((1 + self._n * 7,), np.float32))]
            else:
                host = [self._own(cuda.PinnedBuffer(o.shape, o.dtype)) for o in self.engine.output_specs]
            free = threading.Event()
            free.set()
            slot = _Slot(i, self._own(cuda.Event(timing=False)), self._own(cuda.Event(timing=False)), host, free)
            if self.submits and self.on_device_decode:
                slot.candidates = self._own(cuda.DeviceBuffer(4 + self._n * 28))
            self._slots.append(slot)

    def _drain(self, timeout: float = 10.0) -> bool:
        """Wait until every slot's result was collected (before buffers they use are freed)."""
        return all(slot.free.wait(timeout) for slot in self._slots)

    def _size(self, src_w: int, src_h: int, staging: bool = True) -> _SourceSize:
        """Taps for a source size and, for host frames (`staging`), pinned and device frame buffers."""
        if self._size_state is not None and self._size_state[0] == (src_w, src_h, staging):
            return self._size_state[1]
        if self._size_state is not None:  # a camera changed resolution: retire the old buffers
            # (stage() drained every slot first: no result still reads them)
            self._size_state[1].free()
            self._size_state = None
        new_w, new_h, left, top, r = letterbox_geometry(src_w, src_h, self.width, self.height)
        xt = np.stack(linear_taps(src_w, new_w), axis=1).astype(np.int32)  # int4 per column
        yt = np.stack(linear_taps(src_h, new_h), axis=1).astype(np.int32)
        n = SLOTS if staging else 0  # NV12 frames are read where the decoder left them
        s = _SourceSize(pinned=[cuda.PinnedBuffer((src_h, src_w, 3), np.uint8) for _ in range(n)],
                        frames=[cuda.DeviceBuffer(src_h * src_w * 3) for _ in range(n)], letterbox=[],
                        xtaps=_upload(xt, self.stream), ytaps=_upload(yt, self.stream), new_w=new_w, new_h=new_h,
                        left=left, top=top,
                        lb=Letterbox(scale=r, pad_x=float(left), pad_y=float(top), src_w=src_w, src_h=src_h))
        grid = ((self.width + 31) // 32, (self.height + 7) // 8, 1)
        for frame in s.frames:
            s.letterbox.append([self.kernels.prepare(
                self._letterbox, grid, (32, 8, 1),
                [np.uint64(frame.ptr), np.int32(src_w * 3), np.uint64(s.xtaps.ptr), np.uint64(s.ytaps.ptr),
                 np.int32(new_w), np.int32(new_h), np.int32(left), np.int32(top), np.int32(self.width),
                 np.int32(self.height), np.int32(self.pad_value), np.uint64(self._lut.ptr),
                 np.uint64(inp.ptr)]) for inp in self.inputs])
        self._size_state = ((src_w, src_h, staging), s)
        return s

    def _candidates_launch(self) -> cuda.Launch:
        """The candidate kernel with the postprocessor's current thresholds (re-packed after a live reload)."""
        if self.post.thresholds is not self._thr_state or self._cand_launch is None:
            self._new_thresholds()
            self._cand_launch = self._prepare_candidates(self.outputs[0].ptr, self._cand.ptr)
        assert self._cand_launch is not None
        return self._cand_launch

    def _new_thresholds(self) -> None:
        st = self.post.thresholds
        table = st.per_class if st.per_class.size else np.zeros(1, np.float32)
        # a new buffer each time (rare): kernels still queued may read the old one
        self._thr = self._own(_upload(np.ascontiguousarray(table, dtype=np.float32), self.stream))
        self._thr_state = st
        self._lane_launches = {}

    def _prepare_candidates(self, output: int, candidates: int) -> cuda.Launch:
        """The candidate kernel from `output` into a candidates buffer (count at 0, rows from byte 4)."""
        st = self.post.thresholds
        assert self._thr is not None
        lo = float(st.per_class.min()) if st.per_class.size else st.score
        return self.kernels.prepare(
            self._candidates, ((self._n + 255) // 256, 1, 1), (256, 1, 1),
            [np.uint64(output), np.int32(self._nc), np.int32(self._n), np.uint64(self._thr.ptr),
             np.int32(st.per_class.size), np.float32(max(st.score, _TINY)),
             np.float32(max(min(lo, st.score), _TINY)), np.uint64(candidates + 4), np.uint64(candidates),
             np.int32(self._n)])

    def _lane_candidates(self, output: int, slot: _Slot) -> cuda.Launch:
        """The candidate kernel reading a lane's output into the slot's own buffers (lane threads)."""
        with self._lane_lock:
            if self.post.thresholds is not self._thr_state:
                self._new_thresholds()
            key = (output, slot.index)
            launch = self._lane_launches.get(key)
            if launch is None:
                assert slot.candidates is not None
                launch = self._lane_launches[key] = self._prepare_candidates(output, slot.candidates.ptr)
            return launch

    def _on_thread(self) -> None:
        ident = threading.get_ident()
        if ident not in self._threads:  # driver-API launches need the context current on this thread
            cuda.use_device(self.device)
            self._threads.add(ident)

    def _acquire(self) -> tuple[_Slot, int]:
        """The next slot, once its last result was collected, and the input buffer this frame uses."""
        slot = self._slots[self._next]
        if not slot.free.wait(10.0):
            raise EngineError("no free GPU slot in 10 s: results are not being collected")
        slot.free.clear()
        self._next = (self._next + 1) % SLOTS
        return slot, self._staged % INPUTS

    def ready_now(self) -> bool:
        """stage() of a device frame would not wait: the next slot was collected and (unless the lane
        letterboxes into its own input) its input buffer released (a new source size, which drains
        every slot, is not foreseen: it is rare)."""
        return self._slots[self._next].free.is_set() and (
            self.fills or self._input_launched[self._staged % INPUTS].is_set())

    def stage(self, image: np.ndarray | Nv12Frame) -> Staged:
        """Upload and letterbox one frame on the prep stream (no wait for the GPU; only for a free
        slot when SLOTS frames are in flight). Frames must be launched in the order they were staged."""
        if isinstance(image, Nv12Frame):
            if image.width < 2 or image.height < 2 or image.width % 2 or image.height % 2:
                raise SourceError(f"NV12 frame needs an even size, got {image.width}x{image.height}")
            size = (image.width, image.height, False)  # read where the decoder left it: no staging
        else:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise SourceError(f"expected a BGR uint8 HxWx3 frame, got {image.dtype} {image.shape}")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise SourceError(f"empty frame {image.shape}")
            size = (int(image.shape[1]), int(image.shape[0]), True)
        # Waiting for the post thread (a new resolution drains every slot; a full set waits for one)
        # happens outside the capture lock: the post thread needs that lock to collect results.
        if self._size_state is not None and self._size_state[0] != size and not self._drain():
            raise EngineError("GPU results of earlier frames were never collected")
        if self.fills and isinstance(image, Nv12Frame):
            return self._stage_for_lane(image, size)
        slot, k = self._acquire()
        if not self._input_launched[k].wait(10.0):
            slot.free.set()
            raise EngineError("GPU input buffer not released in 10 s: staged frames are not being launched")
        self._input_launched[k].clear()
        try:
            with cuda.CAPTURE.shared():  # no CUDA call of ours while another thread captures a graph
                self._on_thread()
                s = self._size(*size)
                if isinstance(image, Nv12Frame):
                    self._stage_nv12(image, s, slot, k)
                else:
                    self._stage_host(image, s, slot, k)
        except BaseException:
            slot.free.set()
            self._input_launched[k].set()  # nothing was queued on buffer k
            raise
        self._staged += 1
        return Staged(slot, k, s.lb)

    def _stage_for_lane(self, frame: Nv12Frame, size: tuple[int, int, bool]) -> Staged:
        """Nothing queued yet: the lane that runs the frame letterboxes it into its own input."""
        slot, _ = self._acquire()
        try:
            with cuda.CAPTURE.shared():
                self._on_thread()
                s = self._size(*size)
        except BaseException:
            slot.free.set()
            raise
        slot.keep = frame  # its device memory is read by the lane's letterbox, until the result
        return Staged(slot, -1, s.lb, frame, s)

    def _stage_host(self, image: np.ndarray, s: _SourceSize, slot: _Slot, k: int) -> None:
        prep = self.copy_stream
        frame = s.frames[slot.index]
        if image.flags.c_contiguous and cuda.is_pinned(image.ctypes.data):
            cuda.copy_htod_async(frame, image, prep)  # decoded into page-locked memory: DMA only
        else:
            np.copyto(s.pinned[slot.index].array, image)  # the one host copy: pageable -> pinned
            cuda.copy_htod_async(frame, s.pinned[slot.index], prep)
        prep.wait(self._input_free[k])  # the inference that last read buffer k has finished
        s.letterbox[slot.index][k](prep)
        slot.uploaded.record(prep)

    def _stage_nv12(self, frame: Nv12Frame, s: _SourceSize, slot: _Slot, k: int) -> None:
        """Letterbox an NV12 frame already on the device (no upload): the kernel converts colour itself."""
        prep = self.copy_stream
        launch = self._nv12_launch(s, frame, self.inputs[k].ptr)
        if frame.ready is not None:
            prep.wait(frame.ready)  # the decoder's copy into the frame's buffer
        prep.wait(self._input_free[k])
        launch(prep)
        slot.uploaded.record(prep)
        slot.keep = frame  # its device memory is read by the kernel just queued

    def _nv12_launch(self, s: _SourceSize, frame: Nv12Frame, dst: int) -> cuda.Launch:
        """The letterbox kernel from `frame` into the input at `dst`, packed once per such pair."""
        key = (frame.y_ptr, frame.uv_ptr, frame.pitch, dst, frame.matrix, frame.full_range)
        launch = s.nv12.get(key)
        if launch is not None:
            return launch
        with self._lane_lock:  # lane threads (ONNX Runtime's replays) may pack at once
            return self._pack_nv12(s, frame, dst, key)

    def _pack_nv12(self, s: _SourceSize, frame: Nv12Frame, dst: int, key: tuple[object, ...]) -> cuda.Launch:
        if len(s.nv12) >= _NV12_LAUNCHES:  # a decoder that keeps handing out new buffers: start over
            s.nv12.clear()
        cy, cvr, cug, cvg, cub, yoff = nv12_coefficients(frame.matrix, frame.full_range)
        grid = ((self.width + 31) // 32, (self.height + 7) // 8, 1)
        launch = s.nv12[key] = self.kernels.prepare(
            self._letterbox_nv12, grid, (32, 8, 1),
            [np.uint64(frame.y_ptr), np.uint64(frame.uv_ptr), np.int32(frame.pitch), np.int32(frame.pitch),
             np.uint64(s.xtaps.ptr), np.uint64(s.ytaps.ptr), np.int32(s.new_w), np.int32(s.new_h),
             np.int32(s.left), np.int32(s.top), np.int32(self.width), np.int32(self.height),
             np.int32(self.pad_value), np.uint64(self._lut.ptr),
             np.int32(cy), np.int32(cvr), np.int32(cug), np.int32(cvg), np.int32(cub), np.int32(yoff),
             np.uint64(dst)])
        return launch

    def launch(self, staged: Staged, on_queued: Callable[[], None] | None = None) -> Pending:
        """Inference on a staged frame, candidate selection and copy back, on the engine's stream
        (submitted engines: on a lane's, and this returns without waiting for the GPU; `on_queued`
        is called on the lane's thread once the results are queued, or the run failed)."""
        if self.submits:
            return self._submit_to_lane(staged, on_queued)
        self._on_thread()
        slot, k, stream = staged.slot, staged.input, self.stream
        try:
            with cuda.CAPTURE.shared():
                stream.wait(slot.uploaded)
                if self.on_device_decode:
                    cuda.memset_async(self._cand, 0, stream, 4)
            try:
                self.engine.run_device(self._bindings[k])  # guards its own CUDA calls (it may wait on a lane)
                with cuda.CAPTURE.shared():
                    self._input_free[k].record(stream)
            finally:
                self._input_launched[k].set()  # the next frame on buffer k now waits on this one's event
            with cuda.CAPTURE.shared():
                if self.on_device_decode:
                    self._candidates_launch()(stream)
                    # every row slot, not just the kept ones: the count is not known on the host yet,
                    # and the device buffers belong to the next frame once this is queued (~28 B/anchor)
                    cuda.memcpy_async(slot.host_out[0].ptr, self._cand.ptr, self._cand.nbytes, "dtoh", stream)
                else:
                    for host, dev in zip(slot.host_out, self.outputs, strict=True):
                        cuda.copy_dtoh_async(host, dev, stream)
                slot.done.record(stream)
        except BaseException:
            slot.free.set()
            self._input_launched[k].set()
            raise
        return Pending(self, slot, staged.lb)

    def _submit_to_lane(self, staged: Staged, on_queued: Callable[[], None] | None = None) -> Pending:
        """Hand the frame to whichever lane is free; the lane's thread queues the rest (hooks below)."""
        slot, k = staged.slot, staged.input
        slot.error = None
        slot.queued.clear()
        slot.on_queued = on_queued
        frame, size = staged.frame, staged.size

        def input_read(stream: cuda.Stream) -> None:
            self._input_free[k].record(stream)
            self._input_launched[k].set()  # the next frame on buffer k now waits on this copy

        def done(stream: cuda.Stream, outputs: list[cuda.DeviceBuffer]) -> None:
            self._on_thread()
            if self.on_device_decode:
                assert slot.candidates is not None
                cuda.memset_async(slot.candidates, 0, stream, 4)
                self._lane_candidates(outputs[0].ptr, slot)(stream)
                cuda.memcpy_async(slot.host_out[0].ptr, slot.candidates.ptr, slot.candidates.nbytes, "dtoh", stream)
            else:
                for host, dev in zip(slot.host_out, outputs, strict=True):
                    cuda.copy_dtoh_async(host, dev, stream)
            slot.done.record(stream)
            _run_finished(slot)

        def failed(exc: BaseException) -> None:
            slot.error = exc
            if k >= 0:
                self._input_launched[k].set()
            _run_finished(slot)

        def fill(stream: cuda.Stream, input_ptr: int) -> None:
            assert frame is not None and size is not None
            self._on_thread()
            launch = self._nv12_launch(size, frame, input_ptr)
            if frame.ready is not None:
                stream.wait(frame.ready)  # the decoder's copy into the frame's buffer
            launch(stream)

        try:
            if frame is not None:
                self.engine.submit_fill(fill, done, failed)
            else:
                self.engine.submit_device(self._bindings[k], slot.uploaded, input_read, done, failed)
        except BaseException:
            slot.free.set()
            slot.keep = None
            if k >= 0:
                self._input_launched[k].set()
            raise
        return Pending(self, slot, staged.lb)

    def submit(self, image: np.ndarray) -> Pending:
        return self.launch(self.stage(image))

    def _collect(self, slot: _Slot) -> Candidates | list[np.ndarray]:
        if not self.on_device_decode:
            return [h.array.copy() for h in slot.host_out]
        both = slot.host_out[0].array
        n = min(int(both[:1].view(np.int32)[0]), self._n)
        rows = both[1:].reshape(self._n, 7)[:n]
        rows = rows[np.argsort(rows[:, 6], kind="stable")]  # anchor order, as the CPU decoder yields them
        return Candidates(np.ascontiguousarray(rows[:, :4]), np.ascontiguousarray(rows[:, 4]),
                          rows[:, 5].astype(np.int32))

    def __call__(self, image: np.ndarray) -> tuple[Candidates | list[np.ndarray], Letterbox]:
        return self.submit(image).result()

    def close(self) -> None:
        if self._slots and not self._drain(5.0):  # waits for the post thread: not under the capture lock
            log.warning("closing GPU preprocessing with results still in flight")
        with cuda.CAPTURE.shared():  # frees are CUDA calls too: never during another thread's capture
            try:
                self.stream.synchronize()
            except EngineError:
                pass
            if self._size_state is not None:
                self._size_state[1].free()
                self._size_state = None
            for obj in reversed(self._owned):
                try:
                    obj.free()
                except EngineError as exc:
                    log.warning("freeing a GPU preprocessing buffer: %s", exc)
        self._owned.clear()
        self._slots.clear()
