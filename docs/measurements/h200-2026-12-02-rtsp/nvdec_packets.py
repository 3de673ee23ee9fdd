"""Frames NVDEC gives per packet, for the same clip read three ways: PyNvVideoCodec's demuxer on
the file, PyAV on the file (Annex B filter), PyAV on rtsp:// from the loopback GStreamer server
(as `decode: nvdec` reads them: agent.capture.sources.nvdec). Prints per way the packets, the
frames, and the first packets' NAL unit types, sizes, pts and frame counts; then the RTSP
packets again with every pts 0, and the agent's NVDEC source on rtsp:// (frames read per
second after the server's start-up burst).  usage: python3 nvdec_packets.py CLIP [PACKETS]
"""

from __future__ import annotations

import ctypes
import re
import sys
import time
from pathlib import Path
from typing import Any

import PyNvVideoCodec as nvc

from agent.capture.sources.nvdec import _FileDemuxer, _NetDemuxer
from agent.streams_rtsp import RtspStreams


def nal_types(data: bytes) -> list[int]:
    return [data[m.end()] & 0x1F for m in re.finditer(b"\x00\x00\x01", data) if m.end() < len(data)]


def run(name: str, dmx: Any, limit: int, zero_pts: bool = False) -> None:
    dec = nvc.CreateDecoder(gpuid=0, codec=dmx.codec, usedevicememory=True)
    packets = frames = 0
    rows = []
    for packet in dmx.packets():
        if zero_pts:
            packet.pts = 0
        n = len(dec.Decode(packet))
        packets += 1
        frames += n
        if packets <= 12 and hasattr(packet, "bsl") and packet.bsl:
            data = ctypes.string_at(packet.bsl_data, min(packet.bsl, 64))
            rows.append(f"  #{packets} size {packet.bsl} pts {packet.pts} nal {nal_types(data)} frames {n}")
        if packets >= limit:
            break
    dmx.close()
    print(f"{name}: {packets} packets -> {frames} frames")
    print("\n".join(rows))


def source_rate(url: str, seconds: float = 6.0) -> None:
    from agent.capture.sources import open_source
    from agent.config import CameraConfig

    src = open_source(CameraConfig(source=url, decode="nvdec"))
    src.open()
    t0 = time.monotonic()
    times = []
    while time.monotonic() - t0 < seconds:
        if src.read() is None:
            break
        times.append(time.monotonic() - t0)
    src.close()
    after = [t for t in times if t >= 2.0]
    rate = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else 0.0
    print(f"agent NVDEC source, rtsp: {len(times)} frames in {seconds} s, {rate:.2f} frames/s from 2 s on")


def main() -> None:
    clip = Path(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    run("pynvvideocodec demuxer, file", _FileDemuxer(nvc, str(clip), "file"), limit)
    run("pyav, file", _NetDemuxer(nvc, str(clip), "file", False, 10.0, 10.0), limit)
    with RtspStreams(clip, "h264", 2) as server:
        run("pyav, rtsp", _NetDemuxer(nvc, server.urls[0], "rtsp", True, 10.0, 5.0), limit)
        run("pyav, rtsp, pts 0", _NetDemuxer(nvc, server.urls[1], "rtsp", True, 10.0, 5.0), limit, zero_pts=True)
    with RtspStreams(clip, "h264", 1) as server:
        source_rate(server.urls[0])


if __name__ == "__main__":
    main()
