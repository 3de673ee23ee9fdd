"""Network streams through OpenCV's FFmpeg backend: RTSP (RTP over TCP unless the camera's
`rtsp_transport` says udp; or NVDEC on a Jetson), HTTP(S) MJPEG."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

from agent.capture.sources.base import _cv2, _CvSource, ffmpeg_available, redact
from agent.capture.sources.gstreamer import _require_gstreamer, jetson_decode_pipeline
from agent.errors import SourceError

OPTIONS_VAR = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


class _FfmpegOptions:
    """OpenCV's FFmpeg backend reads its options from one environment variable, at each open.

    Cameras that need the value now set open together; one that needs another value waits until
    those opens are done (an open can take open_timeout_s), so no open reads a value meant for
    another camera. A value the operator set before the agent ran is left as it is: it wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ours: str | None = None  # the value this process last set
        self._opening = 0

    def _operators(self) -> bool:
        value = os.environ.get(OPTIONS_VAR)
        return value is not None and value != self._ours

    @contextlib.contextmanager
    def use(self, value: str) -> Iterator[None]:
        with self._cond:
            while self._opening and self._ours != value and not self._operators():
                self._cond.wait()
            if not self._operators():
                os.environ[OPTIONS_VAR] = self._ours = value
            self._opening += 1
        try:
            yield
        finally:
            with self._cond:
                self._opening -= 1
                self._cond.notify_all()


FFMPEG_OPTIONS = _FfmpegOptions()


class _FfmpegNetSource(_CvSource):
    kind = "stream"

    def _options(self) -> AbstractContextManager[None]:
        """What OpenCV's FFmpeg backend must see in its environment during the open (nothing by default)."""
        return contextlib.nullcontext()

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
                "(unreachable, refused, wrong path or credentials, or not a video stream)"
            )
        self._cap = cap


class RtspSource(_FfmpegNetSource):
    """An RTSP camera through FFmpeg: RTP interleaved over TCP (no UDP loss / NAT trouble) unless
    the camera's `rtsp_transport` is udp."""

    kind = "RTSP stream"

    def _options(self) -> AbstractContextManager[None]:
        return FFMPEG_OPTIONS.use(f"rtsp_transport;{self.cfg.rtsp_transport}")

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
