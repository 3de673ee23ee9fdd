"""Frame sources: where a camera's frames come from, chosen from its `source` URI.

Every source follows `FrameSource`: `open()` (raises SourceError with a reason a person can act on),
`read()` (one BGR uint8 HxWx3 image, or None when the source ended or failed), `close()`, and the
properties `live`, `fps` and `describe()`. A source does not reconnect by itself: the capture
thread (`agent.capture.reader`) closes it and opens it again with backoff.

The implementation is picked by an explicit registry, scheme -> class (`SOURCES`):

| URI | class | live |
| --- | --- | --- |
| `path/to/video.mp4`, `file:///abs/video.mp4` | `FileSource` (OpenCV, any backend; `decode: jetson`: NVDEC) | no |
| `synthetic:`, `synthetic:WxH`, `synthetic:WxH@FPS` | `SyntheticSource` (procedural, deterministic) | yes |
| `/dev/videoN`, `v4l2:///dev/videoN` | `V4L2Source` (cv2.CAP_V4L2) | yes |
| `rtsp://` | `RtspSource` (FFmpeg backend over TCP; `decode: jetson`: NVDEC via GStreamer) | yes |
| `http://`, `https://` | `HttpSource` (FFmpeg backend; MJPEG multipart) | yes |
| `csi://N` | `CsiSource` (nvarguscamerasrc GStreamer pipeline) | yes |
| `gst:PIPELINE` | `GstSource` (raw GStreamer pipeline ending in appsink) | yes |

Blocking reads: the network sources pass `open_timeout_s` / `read_timeout_s` to OpenCV's FFmpeg
backend (CAP_PROP_OPEN_TIMEOUT_MSEC / CAP_PROP_READ_TIMEOUT_MSEC: its interrupt callback aborts a
stalled read, which then returns None), so a camera that stops sending without closing the
connection is noticed after `read_timeout_s`. V4L2 reads are bounded by OpenCV's own select()
timeout. GStreamer reads are not bounded by OpenCV on every version; a stalled pipeline shows up
in the capture thread's `last_progress`, which the service watchdog checks.

HTTP MJPEG goes through OpenCV's FFmpeg backend (its `mpjpeg` demuxer) rather than a hand-written
multipart parser: on loopback tests it opened at once, delivered each part as it arrived (no
frame held back), honoured the read timeout on a stalled stream and reported a closed one at
once, and the same path serves non-multipart HTTP streams too.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import CameraConfig
from agent.errors import SourceError

_CRED_RE = re.compile(r"(://)[^/\s]*@")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_SYNTH_RE = re.compile(r"^(?:(\d+)x(\d+))?(?:@(\d+(?:\.\d+)?))?$")


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SourceError(
            "OpenCV (cv2) is not installed: install the `cpu` extra on a PC, or JetPack's python3-opencv on a Jetson"
        ) from e
    return cv2


def redact(uri: str) -> str:
    """`uri` with every `user:password@` after a `://` removed (also inside GStreamer pipelines)."""
    return _CRED_RE.sub(r"\1", uri)


@lru_cache(maxsize=1)
def _build_info() -> str:
    return str(_cv2().getBuildInformation())


def _has_backend(name: str) -> bool:
    m = re.search(rf"^\s*{name}:\s*(\S+)", _build_info(), re.MULTILINE | re.IGNORECASE)
    return bool(m) and m.group(1).upper().startswith("YES")  # type: ignore[union-attr]


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's opencv-python is not)."""
    return _has_backend("GStreamer")


def ffmpeg_available() -> bool:
    return _has_backend("FFMPEG")


class FrameSource(ABC):
    """One camera or video. Not thread-safe: the capture thread is its only user."""

    @abstractmethod
    def open(self) -> None:
        """Open the source; raise SourceError saying why it cannot be opened."""

    @abstractmethod
    def read(self) -> np.ndarray | None:
        """The next frame (BGR uint8, HxWx3), or None when the source ended or failed."""

    @abstractmethod
    def close(self) -> None:
        """Release the device / connection; safe to call twice or before open()."""

    @property
    @abstractmethod
    def live(self) -> bool:
        """True for cameras and streams (the newest frame matters), False for files (every frame does)."""

    @property
    @abstractmethod
    def fps(self) -> float | None:
        """The nominal frame rate, when known."""

    @abstractmethod
    def describe(self) -> str:
        """A human description without credentials."""


def _as_bgr(img: np.ndarray | None) -> np.ndarray | None:
    """Normalise what a backend returned to BGR uint8 HxWx3 (None stays None)."""
    if img is None or img.size == 0:
        return None
    cv2 = _cv2()
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


class _Pacer:
    """Sleeps so that frame i is handed out at start + i / fps (monotonic clock).

    When the caller falls more than `max_lag` frames behind (a slow consumer holding up a lossless
    file, a stalled camera), the schedule restarts from now instead of bursting to catch up.
    """

    def __init__(self, fps: float, max_lag: int = 5) -> None:
        self.period = 1.0 / fps
        self.max_lag = max_lag
        self._t0: float | None = None
        self._i = 0

    def wait(self) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._i * self.period
        if now - due > self.max_lag * self.period:
            self._t0, self._i, due = now, 0, now
        if due > now:
            time.sleep(due - now)
        self._i += 1


class _CvSource(FrameSource):
    """Common part of the sources read through cv2.VideoCapture."""

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        self._cap: Any = None
        self._fps: float | None = None

    def _open_capture(self, target: str | int, api: int, params: list[int] | None = None) -> Any:
        cv2 = _cv2()
        cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            return None
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._fps = fps if 0.0 < fps < 1000.0 else self.cfg.fps
        return cap

    def _grab(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, img = self._cap.read()
        return _as_bgr(img) if ok else None

    def read(self) -> np.ndarray | None:
        return self._grab()

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None

    @property
    def live(self) -> bool:
        return True

    @property
    def fps(self) -> float | None:
        return self._fps

    def describe(self) -> str:
        return redact(self.cfg.source)


class FileSource(_CvSource):
    """A video file. Lossless (`live` False). `pace`: frames are handed out at the file's own rate,
    as a camera would, but none is skipped; `loop`: it starts again at the end instead of ending."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        src = cfg.source
        if src.startswith("file:"):
            parsed = urllib.parse.urlparse(src)
            # file:///abs/path, and the common file://relative/path slip
            src = urllib.parse.unquote((parsed.netloc + parsed.path) if parsed.netloc else parsed.path)
        self.path = Path(src).expanduser()
        self._pacer: _Pacer | None = None
        self.frames_read = 0

    def _target(self) -> tuple[str, int]:
        """What OpenCV opens: the path (any backend), or the Jetson hardware-decoding pipeline."""
        cv2 = _cv2()
        if self.cfg.decode == "jetson":
            return jetson_decode_pipeline(self.cfg, str(self.path)), cv2.CAP_GSTREAMER
        return str(self.path), cv2.CAP_ANY

    def open(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        if self.cfg.decode == "jetson":
            _require_gstreamer(f"hardware decoding of {self.path}")
        cap = self._open_capture(*self._target())
        if cap is None:
            raise SourceError(f"cannot decode video file {self.path} (unsupported container or codec?)")
        self._cap = cap
        fps = self._fps or 30.0
        self._pacer = _Pacer(fps) if self.cfg.pace else None
        self.frames_read = 0

    def _rewind(self) -> bool:
        cv2 = _cv2()
        if self._cap is not None and self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            return True
        # some containers (and GStreamer pipelines) do not seek: open it again
        self.close()
        self._cap = self._open_capture(*self._target())
        return self._cap is not None

    def read(self) -> np.ndarray | None:
        img = self._grab()
        if img is None and self.cfg.loop and self.frames_read > 0 and self._rewind():
            self.frames_read = 0
            img = self._grab()
        if img is None:
            return None
        self.frames_read += 1
        if self._pacer is not None:
            self._pacer.wait()
        return img

    @property
    def live(self) -> bool:
        return False

    def describe(self) -> str:
        return f"file {self.path}" + (" (paced)" if self.cfg.pace else "") + (" (loop)" if self.cfg.loop else "")


class SyntheticSource(FrameSource):
    """Procedural frames: a gradient background, a moving box and disc, and the frame number.

    Deterministic: frame i depends only on i and the size. `synthetic:WxH@FPS` overrides the
    config's width / height / fps (defaults 640x480 at 30). Paced at fps unless `pace` is False.
    Counted as live: it behaves like a camera (newest frame wins).
    """

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        spec = cfg.source.split(":", 1)[1]
        m = _SYNTH_RE.match(spec)
        if m is None:
            raise SourceError(
                f"bad synthetic source {cfg.source!r}: expected synthetic:[WxH][@FPS], e.g. synthetic:640x480@30"
            )
        w, h, f = m.groups()
        self.width = int(w) if w else (cfg.width or 640)
        self.height = int(h) if h else (cfg.height or 480)
        self._fps = float(f) if f else (cfg.fps or 30.0)
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192) or not 0 < self._fps <= 1000:
            raise SourceError(f"bad synthetic source {cfg.source!r}: size 16..8192, fps 0..1000")
        self._i = 0
        self._pacer: _Pacer | None = None
        self._bg: np.ndarray | None = None

    def open(self) -> None:
        self._i = 0
        self._pacer = _Pacer(self._fps) if self.cfg.pace else None
        x = np.linspace(0, 255, self.width, dtype=np.float32)
        y = np.linspace(0, 255, self.height, dtype=np.float32)
        bg = np.empty((self.height, self.width, 3), np.uint8)
        bg[..., 0] = (x[None, :] * 0.5).astype(np.uint8)
        bg[..., 1] = (y[:, None] * 0.5).astype(np.uint8)
        bg[..., 2] = 64
        self._bg = bg

    @staticmethod
    def render(i: int, width: int, height: int, bg: np.ndarray | None = None) -> np.ndarray:
        cv2 = _cv2()
        img = bg.copy() if bg is not None else np.full((height, width, 3), 64, np.uint8)
        s = max(8, min(width, height) // 6)
        span_x, span_y = max(1, width - s), max(1, height - s)
        bx = (i * 4) % (2 * span_x)
        bx = bx if bx < span_x else 2 * span_x - bx
        by = (i * 3) % (2 * span_y)
        by = by if by < span_y else 2 * span_y - by
        cv2.rectangle(img, (bx, by), (bx + s, by + s), (0, 200, 255), -1)
        cx = int(width / 2 + (width / 3) * np.cos(i * 0.05))
        cy = int(height / 2 + (height / 3) * np.sin(i * 0.05))
        cv2.circle(img, (cx, cy), s // 2, (255, 80, 0), -1)
        scale = max(0.4, height / 480)
        cv2.putText(img, f"#{i}", (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
        return img

    def read(self) -> np.ndarray | None:
        if self._bg is None:
            return None
        if self._pacer is not None:
            self._pacer.wait()
        img = self.render(self._i, self.width, self.height, self._bg)
        self._i += 1
        return img

    def close(self) -> None:
        self._bg = None

    @property
    def live(self) -> bool:
        return True

    @property
    def fps(self) -> float | None:
        return self._fps

    def describe(self) -> str:
        return f"synthetic {self.width}x{self.height}@{self._fps:g}"


class V4L2Source(_CvSource):
    """A V4L2 device (USB / MIPI camera through the kernel driver). Width, height, fps and fourcc
    from the config are requested; the driver may pick the nearest mode it supports."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        src = cfg.source
        self.device = urllib.parse.urlparse(src).path if src.startswith("v4l2:") else src

    def open(self) -> None:
        if not os.path.exists(self.device):
            raise SourceError(f"V4L2 device {self.device} does not exist (camera unplugged? wrong index?)")
        cv2 = _cv2()
        params: list[int] = []
        if self.cfg.fourcc:
            params += [cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.cfg.fourcc)]
        if self.cfg.width:
            params += [cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width]
        if self.cfg.height:
            params += [cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height]
        if self.cfg.fps:
            params += [cv2.CAP_PROP_FPS, round(self.cfg.fps)]
        cap = self._open_capture(self.device, cv2.CAP_V4L2, params or None)
        if cap is None:
            raise SourceError(
                f"cannot open V4L2 device {self.device} (busy, no permission (video group?), or mode unsupported)"
            )
        self._cap = cap


class _FfmpegNetSource(_CvSource):
    kind = "stream"

    def _prepare(self) -> None:
        """Set up the environment before the FFmpeg open (nothing by default)."""

    def open(self) -> None:
        cv2 = _cv2()
        if not ffmpeg_available():
            raise SourceError(f"this OpenCV was built without FFmpeg: it cannot read {self.kind} sources")
        self._prepare()
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000),
        ]
        cap = self._open_capture(self.cfg.source, cv2.CAP_FFMPEG, params)
        if cap is None:
            raise SourceError(
                f"cannot open {self.kind} {self.describe()} within {self.cfg.open_timeout_s:g} s "
                "(unreachable, refused, wrong path or credentials, or not a video stream)"
            )
        self._cap = cap


class RtspSource(_FfmpegNetSource):
    """An RTSP camera through FFmpeg, RTP over TCP (interleaved): no UDP loss / NAT trouble."""

    kind = "RTSP stream"

    def _prepare(self) -> None:
        # read by OpenCV's FFmpeg backend at each open; a value the operator set wins
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")

    def open(self) -> None:
        if self.cfg.decode != "jetson":
            super().open()
            return
        _require_gstreamer(f"hardware decoding of {self.describe()}")
        pipeline = jetson_decode_pipeline(self.cfg)
        cap = self._open_capture(pipeline, _cv2().CAP_GSTREAMER)
        if cap is None:
            raise SourceError(f"GStreamer could not start hardware decoding of {self.describe()}: {redact(pipeline)}")
        self._cap = cap


class HttpSource(_FfmpegNetSource):
    """An HTTP(S) stream through FFmpeg: MJPEG `multipart/x-mixed-replace` cameras, and plain streams."""

    kind = "HTTP stream"


def _gst_fraction(fps: float) -> str:
    f = Fraction(fps).limit_denominator(1001)
    return f"{f.numerator}/{f.denominator}"


def pipeline_for(cfg: CameraConfig) -> str:
    """The GStreamer pipeline OpenCV is given for a `csi://N` or `gst:PIPELINE` source."""
    src = cfg.source
    if src.startswith("csi:"):
        sensor = src.split(":", 1)[1].lstrip("/") or "0"
        if not sensor.isdigit():
            raise SourceError(f"bad CSI source {src!r}: expected csi://N with N the sensor id, e.g. csi://0")
        w, h, fps = cfg.width or 1920, cfg.height or 1080, cfg.fps or 30.0
        return (
            f"nvarguscamerasrc sensor-id={int(sensor)} ! "
            f"video/x-raw(memory:NVMM),width={w},height={h},framerate={_gst_fraction(fps)} ! "
            "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=true max-buffers=1"
        )
    if src.startswith("gst:"):
        pipe = src[4:].strip()
        last = pipe.rsplit("!", 1)[-1].strip()
        if (last.split() or [""])[0] != "appsink":
            raise SourceError(
                "a gst: pipeline must end in an appsink element (e.g. '... ! appsink drop=true max-buffers=1')"
            )
        return pipe
    raise SourceError(f"no GStreamer pipeline for source {redact(src)!r}: expected csi://N or gst:PIPELINE")


# NVDEC decodes into NVMM (device) buffers; nvvidconv (the VIC engine) writes BGRx into system
# memory, the one transfer off the device (Orin's memory is shared: a blit, not a bus copy);
# videoconvert drops the 4th byte on the CPU; the agent then uploads BGR to its letterbox kernel.
_JETSON_TAIL = "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "


def jetson_decode_pipeline(cfg: CameraConfig, path: str | None = None) -> str:
    """The hardware-decoding GStreamer pipeline for an rtsp:// source, or for the video file `path`."""
    if path is not None:  # decodebin picks nvv4l2decoder on a Jetson (its rank beats the software ones)
        return f'filesrc location="{path}" ! decodebin ! {_JETSON_TAIL}appsink max-buffers=4 sync=false'
    if not cfg.source.startswith("rtsp://"):
        raise SourceError(f"decode 'jetson' is for rtsp:// and file sources, not {redact(cfg.source)!r}")
    latency_ms = 200  # rtspsrc's jitter buffer: enough for a factory network, far below a frame period x 10
    return (f'rtspsrc location="{cfg.source}" protocols=tcp latency={latency_ms} drop-on-latency=true ! '
            f"rtp{cfg.codec}depay ! {cfg.codec}parse ! nvv4l2decoder ! {_JETSON_TAIL}"
            "appsink drop=true max-buffers=1 sync=false")


def _require_gstreamer(what: str) -> None:
    if not gstreamer_available():
        raise SourceError(
            f"this OpenCV has no GStreamer support (cv2.getBuildInformation(): GStreamer NO), so {what} "
            "cannot be opened. On a Jetson, a pip-installed opencv-python has probably replaced JetPack's "
            "GStreamer-enabled OpenCV: `pip uninstall opencv-python opencv-python-headless` (see README)"
        )


class GstSource(_CvSource):
    """A raw GStreamer pipeline ending in appsink (cv2.CAP_GSTREAMER)."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self.pipeline = pipeline_for(cfg)

    def open(self) -> None:
        _require_gstreamer(self.describe())
        cv2 = _cv2()
        cap = self._open_capture(self.pipeline, cv2.CAP_GSTREAMER)
        if cap is None:
            raise SourceError(f"GStreamer could not start the pipeline for {self.describe()}: {redact(self.pipeline)}")
        self._cap = cap

    def describe(self) -> str:
        return "gst " + redact(self.pipeline)


class CsiSource(GstSource):
    """A Jetson CSI camera through nvarguscamerasrc (Argus ISP) and nvvidconv."""

    def describe(self) -> str:
        return f"csi {self.cfg.source.split(':', 1)[1].lstrip('/')}"


# scheme -> class; "file" also covers plain paths, "v4l2" also /dev/videoN
SOURCES: dict[str, Callable[[CameraConfig], FrameSource]] = {
    "file": FileSource,
    "synthetic": SyntheticSource,
    "v4l2": V4L2Source,
    "rtsp": RtspSource,
    "http": HttpSource,
    "https": HttpSource,
    "csi": CsiSource,
    "gst": GstSource,
}


def scheme_of(uri: str) -> str:
    """The registry key for `uri`: its scheme, "v4l2" for /dev/video*, "file" for a plain path."""
    if uri.startswith("/dev/video"):
        return "v4l2"
    m = _SCHEME_RE.match(uri)
    if m is None or len(m.group(1)) == 1:  # no scheme, or a Windows drive letter
        return "file"
    return m.group(1).lower()


def open_source(cfg: CameraConfig) -> FrameSource:
    """The FrameSource for `cfg.source`, not opened yet (the capture thread calls open())."""
    scheme = scheme_of(cfg.source)
    cls = SOURCES.get(scheme)
    if cls is None:
        supported = ", ".join(sorted(SOURCES))
        raise SourceError(
            f"unknown camera source scheme {scheme!r} in {redact(cfg.source)!r}; supported: {supported} "
            "(plain paths are files, /dev/videoN is v4l2)"
        )
    return cls(cfg)
