"""The NV12 letterbox kernel's arithmetic (agent/vision/gpu.py), in numpy, against libswscale and OpenCV.

The kernel runs only on a GPU (scripts/streams_check.py compares it with `nv12_letterbox_reference`
there, pixel for pixel); here its arithmetic is held to the CPU decode path: libswscale's yuv420p
-> bgr24 (what cv2.VideoCapture's FFmpeg backend converts with; PyAV runs the same code through
`VideoFrame.reformat`), exactly, for BT.601 / BT.709 and limited / full range, on real H.264
decodes too; then the CPU letterbox, with the BGR kernel's tolerance rules (equal when
downscaling, within one level when upscaling, and the normalised tensor within 1/255).
"""

from __future__ import annotations

import platform
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
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


def swscale_bgr(nv12: np.ndarray, matrix: str = "bt601", full: bool = False) -> np.ndarray:
    """libswscale's yuv420p -> bgr24 of these planes (through PyAV, with OpenCV's scaler flag)."""
    y, uv = planes(nv12)
    h, w = y.shape
    i420 = np.concatenate([y.ravel(), uv[..., 0].ravel(), uv[..., 1].ravel()]).reshape(h * 3 // 2, w)
    frame = av.VideoFrame.from_ndarray(i420, format="yuv420p")
    return frame.reformat(format="bgr24", src_colorspace="ITU709" if matrix == "bt709" else "ITU601",
                          src_color_range="JPEG" if full else "MPEG", interpolation="BICUBIC").to_ndarray()


# libswscale's x86 (SSSE3) conversion is the one matched; its ARM (NEON) code is another, unchecked
X86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="nv12_to_bgr reproduces libswscale's x86 arithmetic")


@X86
@pytest.mark.parametrize(("w", "h"), [(1920, 1080), (640, 360), (64, 48), (2, 2)])
def test_colour_conversion_equals_libswscale(w: int, h: int) -> None:
    # random planes reach every corner (saturation, the most negative products); demo frames are real content
    for nv in (random_nv12(w, h, seed=w), demo_nv12(max(w, 16), max(h, 16))):
        for matrix in ("bt601", "bt709"):
            for full in (False, True):
                got = nv12_to_bgr(*planes(nv), matrix, full)
                assert np.array_equal(got, swscale_bgr(nv, matrix, full)), (matrix, full)


def write_h264(path: Path, pix_fmt: str, colorspace: int | None, frames: int = 3) -> None:
    """A short real H.264 clip of the demo scene (320x180, libx264) in `pix_fmt`, tagged with `colorspace`."""
    cap = cv2.VideoCapture(str(DEMO))
    images: list[npt.NDArray[np.uint8]] = []
    for _ in range(frames):
        ok, img = cap.read()
        assert ok
        images.append(np.asarray(cv2.resize(img, (320, 180)), dtype=np.uint8))
    cap.release()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = 320, 180, pix_fmt
        stream.options = {"preset": "ultrafast"}
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        for img in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format=pix_fmt)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@X86
@pytest.mark.parametrize(("pix_fmt", "colorspace", "matrix", "full"),
                         [("yuv420p", None, "bt601", False), ("yuvj420p", None, "bt601", True),
                          ("yuv420p", 1, "bt709", False)])
def test_real_h264_decode_equals_opencv_videocapture(tmp_path: Path, pix_fmt: str, colorspace: int | None,
                                                     matrix: str, full: bool) -> None:
    """PyAV's decoded planes (what NVDEC returns: H.264 decoding is bit-exact) through nv12_to_bgr
    equal cv2.VideoCapture's BGR of the same file, pixel for pixel (x86 libswscale in both wheels)."""
    clip = tmp_path / "clip.mp4"
    write_h264(clip, pix_fmt, colorspace)
    cap = cv2.VideoCapture(str(clip))
    n = 0
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            # the stream's declaration, read as the NVDEC source reads it (unspecified: BT.601, limited)
            assert (frame.colorspace == 1, frame.color_range == 2) == (matrix == "bt709", full)
            a = frame.to_ndarray(format=frame.format.name)  # I420 planes, stacked
            h, w = frame.height, frame.width
            u = a[h:h + h // 4].reshape(h // 2, w // 2)
            v = a[h + h // 4:].reshape(h // 2, w // 2)
            ok, bgr = cap.read()
            assert ok
            assert np.array_equal(nv12_to_bgr(a[:h], np.stack([u, v], axis=-1), matrix, full), bgr)
            n += 1
    cap.release()
    assert n == 3


@pytest.mark.parametrize(("src", "dst"), [((1920, 1080), (640, 640)), ((1280, 720), (320, 320)),
                                          ((640, 360), (320, 320)), ((640, 360), (640, 384))])
def test_letterbox_equals_conversion_then_cpu_letterbox_when_downscaling(src: tuple[int, int],
                                                                         dst: tuple[int, int]) -> None:
    nv = demo_nv12(*src)
    got = nv12_letterbox_reference(*planes(nv), dst[0], dst[1])
    bgr = nv12_to_bgr(*planes(nv))  # the colour itself is held to libswscale above
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
    bgr = nv12_to_bgr(*planes(nv))  # the colour itself is held to libswscale above
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
    # libswscale truncates each of its (13-bit) products: up to 3 levels under the exact formula, never over 1
    err = got - float_reference(nv, kr, kb, full)
    assert err.min() > -3.0 and err.max() < 1.0


def test_bt709_differs_from_bt601_and_pad_is_kept() -> None:
    nv = demo_nv12(640, 360)
    a = nv12_letterbox_reference(*planes(nv), 320, 320, "bt601")
    b = nv12_letterbox_reference(*planes(nv), 320, 320, "bt709")
    assert not np.array_equal(a, b)
    assert (a[:40] == 114).all() and (a[-40:] == 114).all()  # 640x360 -> 320x180 centred in 320x320


def test_unknown_matrix_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="unsupported colour matrix"):
        nv12_coefficients("bt2020", False)
