"""Frame sources: where a camera's frames come from, chosen from its `source` URI.

Every source follows `FrameSource`: `open()` (raises SourceError with a reason a person can act on),
`read()` (one BGR uint8 HxWx3 image, or None when the source ended or failed), `close()`, and the
properties `live`, `fps` and `describe()`. A source does not reconnect by itself: the capture
thread (`agent.capture.reader`) closes it and opens it again with backoff.

One module per kind of source (base, file, synthetic, v4l2, network, gstreamer, nvdec); this
package re-exports them, so `from agent.capture.sources import ...` names any of them. The
implementation is picked by an explicit registry, scheme -> class (`SOURCES`); `decode: nvdec`
and `decode: auto` (nvdec on a discrete GPU with PyNvVideoCodec, jetson on a Jetson, else cpu)
are resolved in `open_source`, and each source's `decode_path` says what it really does:

| URI | class | live |
| --- | --- | --- |
| `path/to/video.mp4`, `file:///abs/video.mp4` | `FileSource` (OpenCV; `jetson`: NVDEC; `nvdec`: `NvdecSource`) | no |
| `synthetic:`, `synthetic:WxH`, `synthetic:WxH@FPS` | `SyntheticSource` (procedural, deterministic) | yes |
| `/dev/videoN`, `v4l2:///dev/videoN` | `V4L2Source` (cv2.CAP_V4L2) | yes |
| `rtsp://` | `RtspSource` (FFmpeg, RTP over `rtsp_transport`; `jetson`: GStreamer; `nvdec`: `NvdecSource`) | yes |
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

from collections.abc import Callable

from agent.capture.sources.base import (
    _SCHEME_RE,
    FrameSource,
    _as_bgr,
    _cv2,
    _CvSource,
    _Pacer,
    ffmpeg_available,
    gstreamer_available,
    redact,
)
from agent.capture.sources.file import FileSource
from agent.capture.sources.gstreamer import (
    CsiSource,
    GstSource,
    _require_gstreamer,
    jetson_decode_pipeline,
    pipeline_for,
)
from agent.capture.sources.network import HttpSource, RtspSource
from agent.capture.sources.nvdec import NvdecSource, choose_decode
from agent.capture.sources.synthetic import SyntheticSource
from agent.capture.sources.v4l2 import V4L2Source
from agent.config import CameraConfig
from agent.errors import SourceError

__all__ = [
    "SOURCES",
    "CsiSource",
    "FileSource",
    "FrameSource",
    "GstSource",
    "HttpSource",
    "NvdecSource",
    "RtspSource",
    "SyntheticSource",
    "V4L2Source",
    "_CvSource",
    "_Pacer",
    "_as_bgr",
    "_cv2",
    "_require_gstreamer",
    "choose_decode",
    "ffmpeg_available",
    "gstreamer_available",
    "jetson_decode_pipeline",
    "open_source",
    "pipeline_for",
    "redact",
    "scheme_of",
]

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
    if cfg.decode in ("nvdec", "auto"):
        if scheme not in ("file", "rtsp"):
            if cfg.decode == "nvdec":
                raise SourceError(f"decode 'nvdec' is for rtsp:// and file sources, not {redact(cfg.source)!r}")
            return cls(cfg.model_copy(update={"decode": "cpu"}))
        chosen, why = choose_decode(cfg)
        if chosen == "nvdec":
            return NvdecSource(cfg, cls)
        src = cls(cfg.model_copy(update={"decode": chosen}))
        src.decode_path = f"{chosen} ({why})"
        return src
    return cls(cfg)
