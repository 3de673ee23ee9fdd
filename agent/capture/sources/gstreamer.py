"""GStreamer sources: raw `gst:` pipelines, Jetson CSI cameras, and the Jetson NVDEC decode pipelines."""

from __future__ import annotations

from fractions import Fraction

from agent.capture.sources.base import _cv2, _CvSource, gstreamer_available, redact
from agent.config import CameraConfig
from agent.errors import SourceError


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
    return (f'rtspsrc location="{cfg.source}" protocols={cfg.rtsp_transport} latency={latency_ms} '
            f"drop-on-latency=true ! rtp{cfg.codec}depay ! {cfg.codec}parse ! nvv4l2decoder ! {_JETSON_TAIL}"
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
