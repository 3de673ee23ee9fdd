"""Network streams through OpenCV's FFmpeg backend: RTSP over TCP (or NVDEC on a Jetson), HTTP(S) MJPEG."""

from __future__ import annotations

import os

from agent.capture.sources.base import _cv2, _CvSource, ffmpeg_available, redact
from agent.capture.sources.gstreamer import _require_gstreamer, jetson_decode_pipeline
from agent.errors import SourceError


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
