"""Does the loopback GStreamer RTSP server pace its streams at the clip's rate on this machine?

N PyAV readers (the agent's AvDemuxer, as `decode: nvdec` reads rtsp://), one thread each, read
packets for SECONDS: per stream the packets in the first second (the server's start-up burst) and
the rate after it, and any read error. usage: python3 rtsp_rate.py CLIP N [SECONDS]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from agent.capture.sources.demux import AvDemuxer
from agent.streams_rtsp import RtspStreams


def main() -> None:
    clip, n = Path(sys.argv[1]), int(sys.argv[2])
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 8.0
    rows: dict[str, str] = {}

    def read(url: str) -> None:
        times: list[float] = []
        err = ""
        try:
            dmx = AvDemuxer(url, url, True, 10.0, 5.0)
            t0 = time.monotonic()
            for _data, _pts in dmx.packets():
                times.append(time.monotonic() - t0)
                if times[-1] > seconds:
                    break
            dmx.close()
        except Exception as exc:
            err = f" ERROR after {len(times)} packets: {exc}"
        burst = sum(1 for t in times if t < 1.0)
        after = [t for t in times if t >= 2.0]
        rate = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else 0.0
        rows[url] = f"first 1 s {burst:4d} packets, from 2 s on {rate:6.2f} packets/s{err}"

    with RtspStreams(clip, "h264", n) as server:
        threads = [threading.Thread(target=read, args=(u,)) for u in server.urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for url in sorted(rows, key=lambda u: int(u.rsplit("s", 1)[1])):
        print(url.rsplit("/", 1)[1], rows[url])


if __name__ == "__main__":
    main()
