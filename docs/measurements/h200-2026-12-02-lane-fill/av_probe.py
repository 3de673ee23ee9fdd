"""PyAV (FFmpeg) demuxing feeding PyNvVideoCodec's decoder, instead of PyNvVideoCodec's own demuxer:
- the names PyNvVideoCodec 2.2 gives its packet and enum types (printed);
- the frames decoded from PyAV's packets (Annex B through FFmpeg's mp4toannexb filter) against
  those from PyNvVideoCodec's demuxer: same count, same pixels;
- whether a stream that stalls holds the GIL while PyAV waits for it, and what its read timeout
  raises (a FIFO fed by another process stands in for a camera that stops sending).

    python3 av_probe.py CLIP.mp4 RAW.h264
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import av
import av.bitstream
import numpy as np
import PyNvVideoCodec as nvc

from agent.capture.sources.nvdec import _geometry
from agent.engines import cuda
from agent.vision.gpu import Nv12Frame


def digest(frame: Any, w: int, h: int) -> str:
    cuda.cuda_runtime().cudaDeviceSynchronize()
    yp, ypitch, uvp, _, fw, fh = _geometry(frame, w, h)
    y, uv = Nv12Frame(yp, uvp, ypitch, fw, fh).planes()
    return hashlib.sha1(np.ascontiguousarray(y).tobytes() + np.ascontiguousarray(uv).tobytes()).hexdigest()[:12]


def own(clip: str) -> list[str]:
    dmx = nvc.CreateDemuxer(filename=clip)
    dec = nvc.CreateDecoder(gpuid=0, codec=dmx.GetNvCodecId(), usedevicememory=True)
    out = []
    for packet in dmx:
        for f in dec.Decode(packet):
            out.append(digest(f, dmx.Width(), dmx.Height()))
    return out


def with_av(clip: str, codec: Any) -> tuple[list[str], float]:
    c = av.open(clip)
    s = c.streams.video[0]
    bsf = av.bitstream.BitStreamFilterContext(f"{s.codec_context.name}_mp4toannexb", s)
    dec = nvc.CreateDecoder(gpuid=0, codec=codec, usedevicememory=True)
    out: list[str] = []
    t_demux = 0.0
    n = 0
    packets = c.demux(s)
    while True:
        t = time.perf_counter()
        p = next(packets, None)
        last = p is None or not p.size  # read before the filter: it takes the packet's data
        chunk = bsf.filter(None if last else p)
        t_demux += time.perf_counter() - t
        for q in chunk:
            buf = np.frombuffer(q, np.uint8)
            pd = nvc.PacketData()
            pd.bsl_data, pd.bsl = int(buf.ctypes.data), int(buf.size)
            if q.pts is not None:
                pd.pts = int(q.pts)
            n += 1
            for f in dec.Decode(pd):
                out.append(digest(f, s.codec_context.width, s.codec_context.height))
        if last:
            break
    flush = nvc.PacketData()
    flush.bsl_data, flush.bsl = 0, 0
    for f in dec.Decode(flush):
        out.append(digest(f, s.codec_context.width, s.codec_context.height))
    return out, t_demux * 1e6 / max(n, 1)


def count_for(seconds: float) -> float:
    n, start = 0, time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        n += 1
    return n / (now - start)


def stall(raw: str, read_timeout: float) -> None:
    fifo = os.path.join(tempfile.mkdtemp(), "stall.h264")
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        f"d = open({raw!r}, 'rb').read(); o = open({fifo!r}, 'wb')\n"
        "o.write(d[:1_000_000]); o.flush(); time.sleep(6.0); o.write(d[1_000_000:]); o.close()\n")])
    got: dict[str, Any] = {"packets": 0}
    t0 = time.perf_counter()

    def demux() -> None:
        try:
            c = av.open(fifo, timeout=(10.0, read_timeout))
            for _ in c.demux(c.streams.video[0]):
                got["packets"] += 1
            got["end"] = "eof"
        except Exception as exc:
            got["end"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        got["t"] = time.perf_counter() - t0

    t = threading.Thread(target=demux, daemon=True)
    t.start()
    time.sleep(1.0)
    woke = time.perf_counter() - t0
    rate = count_for(1.0)
    print(f"read timeout {read_timeout:g} s: main thread woke {woke:.2f} s after open (asked 1.00), "
          f"counter {rate / 1e6:.2f} M/s beside the waiting demuxer")
    t.join(20)
    writer.kill()
    print(f"  demuxer: {got.get('end')} after {got.get('t', 0):.2f} s, {got['packets']} packets")


def main() -> None:
    clip, raw = sys.argv[1], sys.argv[2]
    print("PacketData:", [a for a in dir(nvc.PacketData) if not a.startswith("_")])
    for name in ("cudaVideoCodec", "cudaVideoChromaFormat"):
        e = getattr(nvc, name, None)
        print(name, list(getattr(e, "__members__", {})) if e is not None else None)
    dmx = nvc.CreateDemuxer(filename=clip)
    print("demuxer:", repr(dmx.GetNvCodecId()), repr(dmx.ChromaFormat()), dmx.BitDepth(),
          repr(dmx.ColorSpace()), repr(dmx.ColorRange()))
    c = av.open(clip)
    cc = c.streams.video[0].codec_context
    print("pyav:", av.__version__, cc.name, cc.pix_fmt, cc.colorspace, cc.color_range)
    a = own(clip)
    b, us = with_av(clip, dmx.GetNvCodecId())
    same = sum(x == y for x, y in zip(a, b, strict=False))
    print(f"frames: own demuxer {len(a)}, PyAV {len(b)}, equal {same}; PyAV demux + filter {us:.1f} us/packet")
    stall(raw, 30.0)
    stall(raw, 2.0)


if __name__ == "__main__":
    main()
