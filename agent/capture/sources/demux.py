"""Compressed packets of a video file or rtsp:// stream, read by PyAV (FFmpeg), for NVDEC.

Why not PyNvVideoCodec's own demuxer: it keeps the GIL while it waits for data and takes no
timeouts (measured on the H200: a stream that stalled for 4 s stopped every thread of the process
for those 4 s; docs/measurements/h200-2026-12-02-lane-fill). One camera that stops sending would
stop every other camera, the MQTT client and the watchdog. PyAV lets the GIL go while FFmpeg
reads. A network open is bounded by PyAV's interrupt callback (`open_timeout_s`), a read by
FFmpeg's own socket timeout (`read_timeout_s`): either ends in a SourceError and the capture
thread reconnects with backoff. Not PyAV's read timeout: its callback takes the GIL each time
FFmpeg polls it, several times per RTP packet: on the H200 at 24 streams the capture thread spent
2.2-2.7 ms per 1080p frame with it, 0.8-0.9 ms without (docs/measurements/h200-2026-12-02-rtsp).

NVDEC's parser reads elementary streams: H.264 / HEVC in Annex B (start codes, parameter sets in
band). From MP4 / MKV they are length-prefixed, so FFmpeg's mp4toannexb filter converts them.
Where the container keeps the parameter sets (or an MPEG-4 VOL header) in its extradata already
in start-code form (RTSP's SDP, MPEG-4 Part 2 in MP4), that is sent once before the first packet.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from agent.errors import SourceError

__all__ = ["END", "AvDemuxer", "DemuxUnavailable", "bytes_at"]

END = (0, 0, 0, False)  # the packet after the last one: tells the decoder to hand out what it holds

_START_CODES = (b"\x00\x00\x01", b"\x00\x00\x00\x01")


def bytes_at(address: int, size: int) -> bytes:
    """A copy of a packet's bytes (`packets()` yields addresses)."""
    return ctypes.string_at(address, size) if size else b""


class DemuxUnavailable(SourceError):
    """PyAV is not installed: this source cannot be demuxed here."""


def _av() -> Any:
    try:
        return importlib.import_module("av")
    except ImportError as exc:
        raise DemuxUnavailable(f"PyAV is not installed (`pip install edge-agent[nvdec]`): {exc}") from None


class AvDemuxer:
    """One open file or stream: its video stream's properties and its packets, in decode order.

    `packets()` yields each packet as (address, size, pts, keyframe), its bytes valid until the next
    one is asked for, then (0, 0, 0, False) once (END), and stops; a failed or timed-out read raises
    SourceError. Addresses, not arrays: an array per packet cost more host time than the rest of the
    packet's handling (`bytes_at` reads one, for tests and checks)."""

    def __init__(self, target: str, what: str, network: bool, open_timeout_s: float, read_timeout_s: float,
                 transport: str = "tcp") -> None:
        av = _av()
        self.what = what
        options: dict[str, str] = {}
        if target.startswith("rtsp://"):  # RTP over tcp or udp; the I/O timeout (us) bounds reads over either
            options = {"rtsp_transport": transport, "timeout": str(max(1, round(read_timeout_s * 1e6)))}
        # the open only: with no read timeout PyAV's callback returns before taking the GIL
        timeout = (open_timeout_s, None) if network else None
        try:
            self._container = av.open(target, options=options, timeout=timeout)
        except Exception as exc:
            hint = ""
            if options and getattr(exc, "errno", None) == errno.EPROTONOSUPPORT:  # FFmpeg's answer to RTSP's 461
                hint = f" (the camera does not offer RTP over {transport}: rtsp_transport)"
            raise SourceError(f"cannot open {what}: {str(exc)[:200]}{hint}") from None
        try:
            if not self._container.streams.video:
                raise SourceError(f"{what} has no video stream")
            self._stream = self._container.streams.video[0]
            cc = self._stream.codec_context
            self.codec: str = cc.name or "unknown"
            self.width, self.height = int(cc.width or 0), int(cc.height or 0)
            self.pix_fmt: str = cc.pix_fmt or ""
            rate = self._stream.average_rate or self._stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.colorspace, self.color_range = int(cc.colorspace or 0), int(cc.color_range or 0)
            extradata = bytes(cc.extradata or b"")
            self._filter: Any = None
            # parameter sets in start-code form, sent before the first packet (and again by a decoder
            # that starts over at a keyframe: agent.capture.sources.nvdec)
            self.prefix: np.ndarray | None = None
            if self.codec in ("h264", "hevc") and extradata[:1] == b"\x01":  # avcC / hvcC: length-prefixed
                self._filter = importlib.import_module("av.bitstream").BitStreamFilterContext(
                    f"{self.codec}_mp4toannexb", self._stream)
            elif extradata.startswith(_START_CODES):
                self.prefix = np.frombuffer(extradata, np.uint8)
        except BaseException:
            self.close()
            raise

    @property
    def matrix(self) -> str:
        """The colour matrix the stream declares (FFmpeg's AVColorSpace); unspecified: BT.601."""
        return "bt709" if self.colorspace == 1 else "bt601"

    @property
    def full_range(self) -> bool:
        return self.color_range == 2  # AVCOL_RANGE_JPEG

    def packets(self) -> Iterator[tuple[int, int, int, bool]]:
        if self.prefix is not None:
            yield self.prefix.ctypes.data, self.prefix.size, 0, False
        demuxed = self._container.demux(self._stream)
        while True:
            try:
                packet = next(demuxed, None)
            except Exception as exc:  # a timeout, a dropped connection, unreadable data
                raise SourceError(f"reading {self.what}: {str(exc)[:200]}") from None
            last = packet is None or not packet.size  # FFmpeg ends with an empty packet
            if self._filter is not None:
                try:  # the filter takes the packet's data: `last` was read before
                    out = self._filter.filter(None if last else packet)
                except Exception as exc:
                    raise SourceError(f"{self.what}: converting to Annex B: {str(exc)[:200]}") from None
            else:
                out = [] if last else [packet]
            for p in out:  # `p` (and `out`) hold the packet's bytes until the next one is asked for
                if p.size:
                    yield p.buffer_ptr, p.size, int(p.pts or 0), p.is_keyframe
            if last:
                yield END
                return

    def close(self) -> None:
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            try:
                container.close()
            except Exception:
                pass
