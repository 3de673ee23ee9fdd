"""Does PyNvVideoCodec hold the GIL while it demuxes and decodes, and while its demuxer waits for
data (a camera that stalls)? A pure-Python counter thread runs beside a decoding thread; its rate
against the counter alone says how much of the time the GIL was taken from it.

    python3 gil_probe.py CLIP.mp4 RAW.h264     (RAW: an Annex-B H.264 stream, fed through a FIFO)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import PyNvVideoCodec as nvc


def count_for(seconds: float) -> float:
    """Counter increments per second of a pure-Python loop run for at least `seconds` (the elapsed
    time, which a thread holding the GIL stretches, is what the rate is taken over)."""
    n, start = 0, time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        n += 1
    elapsed = now - start
    if elapsed > seconds * 1.2:
        print(f"  (the counter ran {elapsed:.2f} s for {seconds:.2f}: held off the GIL meanwhile)")
    return n / elapsed


def decode(source: str, stop: threading.Event, frames: list[int]) -> None:
    dmx = nvc.CreateDemuxer(filename=source)
    dec = nvc.CreateDecoder(gpuid=0, codec=dmx.GetNvCodecId(), usedevicememory=True)
    while not stop.is_set():
        for packet in dmx:
            frames[0] += len(dec.Decode(packet))
            if stop.is_set():
                return
        if source.endswith(".h264"):
            return
        dmx = nvc.CreateDemuxer(filename=source)


def main() -> None:
    clip, raw = sys.argv[1], sys.argv[2]
    alone = count_for(1.0)
    print(f"counter alone: {alone / 1e6:.2f} M/s")

    stop, frames = threading.Event(), [0]
    t = threading.Thread(target=decode, args=(clip, stop, frames), daemon=True)
    t.start()
    time.sleep(0.3)
    f0 = frames[0]
    busy = count_for(2.0)
    print(f"beside a decoding thread: {busy / 1e6:.2f} M/s ({busy / alone:.2f} of alone), "
          f"{(frames[0] - f0) / 2.0:.0f} frames/s decoded")
    stop.set()
    t.join(5)

    fifo = os.path.join(tempfile.mkdtemp(), "stall.h264")
    os.mkfifo(fifo)
    # a writer process: 1 MB of the stream, then nothing for 4 s (a stalled camera), then the rest
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        f"d = open({raw!r}, 'rb').read(); o = open({fifo!r}, 'wb')\n"
        "o.write(d[:1_000_000]); o.flush(); time.sleep(4.0); o.write(d[1_000_000:]); o.close()\n")])
    stop2, frames2 = threading.Event(), [0]
    t2 = threading.Thread(target=decode, args=(fifo, stop2, frames2), daemon=True)
    t0 = time.perf_counter()
    t2.start()
    time.sleep(1.0)  # the first MB is decoded; the demuxer now waits for data
    before = frames2[0]
    stalled = count_for(2.0)
    print(f"  counting ended {time.perf_counter() - t0:.2f} s after the stream was opened (data resumes after ~4 s)")
    during = frames2[0] - before
    print(f"beside a demuxer waiting for data: {stalled / 1e6:.2f} M/s ({stalled / alone:.2f} of alone), "
          f"{during} frames decoded meanwhile, {before} before")
    writer.wait(20)
    stop2.set()
    t2.join(20)
    print(f"stream done: {frames2[0]} frames in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
