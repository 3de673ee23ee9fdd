"""What every frame source shares: the FrameSource contract, OpenCV access, pacing, credentials redaction.

Data flow: a source's `read()` hands one BGR uint8 frame (or, from NVDEC, an Nv12Frame on the GPU)
to the capture thread (agent.capture.reader), which stamps and queues it.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import CameraConfig
from agent.errors import SourceError

_CRED_RE = re.compile(r"(://)[^/\s]*@")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

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


def file_path(source: str) -> Path:
    """A file camera's path: a plain path, or file:///abs/path (and the common file://relative/path slip)."""
    if source.startswith("file:"):
        parsed = urllib.parse.urlparse(source)
        source = urllib.parse.unquote((parsed.netloc + parsed.path) if parsed.netloc else parsed.path)
    return Path(source).expanduser()


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
    """One camera or video. Not thread-safe: the capture thread is its only user (but interrupt())."""

    decode_path = "cpu"  # where frames are decoded: cpu, jetson, nvdec (and why, when it was chosen)
    decode_errors = 0  # pictures the decoder refused while the stream went on (nvdec starts over at a keyframe)

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

    def interrupt(self) -> None:
        """Any thread: the capture is stopping; a read waiting on its frame rate returns now (and later
        reads are no longer paced)."""
        pacer = getattr(self, "_pacer", None)
        if isinstance(pacer, _Pacer):
            pacer.stopped.set()


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
        self.stopped = threading.Event()  # set when the capture stops: no more waiting (a 0.2 fps file
        # would otherwise hold its thread up to 5 s at shutdown)

    def wait(self) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._i * self.period
        if now - due > self.max_lag * self.period:
            self._t0, self._i, due = now, 0, now
        if due > now:
            self.stopped.wait(due - now)
        self._i += 1


class _CvSource(FrameSource):
    """Common part of the sources read through cv2.VideoCapture."""

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        self._cap: Any = None
        self._fps: float | None = None
        self.decode_path = "jetson" if cfg.decode == "jetson" else "cpu"

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
