"""Network streams through OpenCV's FFmpeg backend: RTSP (RTP over TCP unless the camera's
`rtsp_transport` says udp; or NVDEC on a Jetson), HTTP(S) MJPEG."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

from agent.capture.sources.base import _cv2, _CvSource, ffmpeg_available, redact
from agent.capture.sources.gstreamer import _require_gstreamer, jetson_decode_pipeline
from agent.errors import SourceError

log = logging.getLogger(__name__)

OPTIONS_VAR = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


class _FfmpegOptions:
    """OpenCV's FFmpeg backend reads its options from one environment variable, at each open.

    Opens that need the value now set go together; one that needs another value waits until they
    are done (an open can take open_timeout_s), and opens that come after it wait their turn behind
    it, so cameras reconnecting with one value never keep a camera with the other out. When the
    last open is done the variable is removed again: nothing of it stays for later opens or child
    processes. A value the operator set before is left as it is (it wins; said once in the log)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ours: str | None = None  # the value set for the opens in progress
        self._opening = 0
        self._queue: collections.deque[tuple[object, str]] = collections.deque()  # waiting opens, in turn

    def _operators(self) -> str | None:
        value = os.environ.get(OPTIONS_VAR)
        return value if value is not None and value != self._ours else None

    def _may_enter(self, ticket: object, value: str) -> bool:
        for waiting, wanted in self._queue:  # everyone ahead wants this value too
            if waiting is ticket:
                break
            if wanted != value:
                return False
        return not self._opening or self._ours == value

    @contextlib.contextmanager
    def use(self, value: str) -> Iterator[None]:
        ticket = object()
        with self._cond:
            operators = self._operators()
            if operators is not None:
                if operators != value and operators not in _said:
                    _said.add(operators)
                    log.warning("%s=%r set before the agent started: it wins over the cameras' rtsp_transport",
                                OPTIONS_VAR, operators)
                self._opening += 1
            else:
                self._queue.append((ticket, value))
                try:
                    while not self._may_enter(ticket, value):
                        self._cond.wait()
                finally:
                    self._queue.remove((ticket, value))
                if self._ours != value:
                    os.environ[OPTIONS_VAR] = self._ours = value
                self._opening += 1
        try:
            yield
        finally:
            with self._cond:
                self._opening -= 1
                if not self._opening and self._ours is not None:
                    if os.environ.get(OPTIONS_VAR) == self._ours:
                        del os.environ[OPTIONS_VAR]
                    self._ours = None
                self._cond.notify_all()


_said: set[str] = set()


FFMPEG_OPTIONS = _FfmpegOptions()


class _FfmpegNetSource(_CvSource):
    kind = "stream"

    def _options(self) -> AbstractContextManager[None]:
        """What OpenCV's FFmpeg backend must see in its environment during the open (nothing by default)."""
        return contextlib.nullcontext()

    def _also(self) -> str:
        """More reasons an open may fail, for its error message ("" or ending in ", ")."""
        return ""

    def open(self) -> None:
        cv2 = _cv2()
        if not ffmpeg_available():
            raise SourceError(f"this OpenCV was built without FFmpeg: it cannot read {self.kind} sources")
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000),
        ]
        with self._options():
            cap = self._open_capture(self.cfg.source, cv2.CAP_FFMPEG, params)
        if cap is None:
            raise SourceError(
                f"cannot open {self.kind} {self.describe()} within {self.cfg.open_timeout_s:g} s "
                f"(unreachable, refused, wrong path or credentials, {self._also()}or not a video stream)"
            )
        self._cap = cap


class RtspSource(_FfmpegNetSource):
    """An RTSP camera through FFmpeg: RTP interleaved over TCP (no UDP loss / NAT trouble) unless
    the camera's `rtsp_transport` is udp."""

    kind = "RTSP stream"

    def _options(self) -> AbstractContextManager[None]:
        return FFMPEG_OPTIONS.use(f"rtsp_transport;{self.cfg.rtsp_transport}")

    def _also(self) -> str:
        return f"RTP over {self.cfg.rtsp_transport} (rtsp_transport) not offered, "

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
