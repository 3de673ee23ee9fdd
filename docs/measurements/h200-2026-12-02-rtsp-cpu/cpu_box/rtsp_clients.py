"""RTSP clients side by side on this CPU box: host CPU per frame to receive N live 1080p30 H.264
streams from the bench's GStreamer RTSP server on loopback, demux only (no decoding).

Clients: FFmpeg through PyAV (RTP interleaved over TCP, over UDP, RTSP tunnelled over HTTP) and
GStreamer's rtspsrc ! rtph264depay [! h264parse] ! appsink (through ctypes, as agent/streams_rtsp.py
calls the server). Each client runs in its own process, one thread per stream; CPU is the process's
user + system time over the frames received in a window after a warm-up; voluntary context
switches per frame beside it.

    python rtsp_clients.py CLIP [--streams 4] [--seconds 8] [--reps 2]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[4]
MODES = ["ffmpeg-tcp", "ffmpeg-udp", "ffmpeg-http", "gst-depay", "gst-parse"]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def switches() -> int:
    total = 0
    for status in glob.glob(f"/proc/{os.getpid()}/task/*/status"):
        try:
            with open(status) as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except OSError:
            pass
    return total


def ffmpeg_reader(transport: str) -> Any:
    import av

    def read(url: str, counts: list[int], i: int, stop: threading.Event) -> None:
        with av.open(url, options={"rtsp_transport": transport, "timeout": "5000000"}) as c:
            for packet in c.demux(c.streams.video[0]):
                if packet.size:
                    counts[i] += 1
                if stop.is_set():
                    return
    return read


def gst_reader(parse: bool) -> Any:
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    gst, app = ctypes.CDLL("libgstreamer-1.0.so.0"), ctypes.CDLL("libgstapp-1.0.so.0")
    for lib, name, res, args in [
            (gst, "gst_init", None, [vp, vp]), (gst, "gst_parse_launch", vp, [cp, vp]),
            (gst, "gst_bin_get_by_name", vp, [vp, cp]),
            (gst, "gst_element_set_state", ctypes.c_int, [vp, ctypes.c_int]),
            (app, "gst_app_sink_try_pull_sample", vp, [vp, ctypes.c_uint64]), (gst, "gst_sample_get_buffer", vp, [vp]),
            (gst, "gst_buffer_map", ctypes.c_int, [vp, vp, ctypes.c_int]), (gst, "gst_buffer_unmap", None, [vp, vp]),
            (gst, "gst_mini_object_unref", None, [vp])]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    gst.gst_init(None, None)

    def read(url: str, counts: list[int], i: int, stop: threading.Event) -> None:
        line = (f"rtspsrc location={url} protocols=tcp latency=0 ! rtph264depay{' ! h264parse' if parse else ''} ! "
                "video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=s sync=false max-buffers=8")
        pipe = gst.gst_parse_launch(line.encode(), None)
        sink = gst.gst_bin_get_by_name(pipe, b"s")
        gst.gst_element_set_state(pipe, 4)  # PLAYING
        info = ctypes.create_string_buffer(128)  # GstMapInfo
        while not stop.is_set():
            sample = app.gst_app_sink_try_pull_sample(sink, 1_000_000_000)
            if not sample:
                continue
            buf = gst.gst_sample_get_buffer(sample)
            if gst.gst_buffer_map(buf, info, 1):  # the bytes, as a decoder would read them
                gst.gst_buffer_unmap(buf, info)
            gst.gst_mini_object_unref(sample)
            counts[i] += 1
        gst.gst_element_set_state(pipe, 1)  # NULL
    return read


def child(mode: str, urls: list[str], seconds: float) -> None:
    read = ffmpeg_reader(mode.split("-")[1]) if mode.startswith("ffmpeg") else gst_reader(mode == "gst-parse")
    counts, stop = [0] * len(urls), threading.Event()
    for i, url in enumerate(urls):
        threading.Thread(target=read, args=(url, counts, i, stop), daemon=True).start()
    time.sleep(4)  # warm-up: connected, streaming
    c0, n0, v0, t0 = cpu_s(), sum(counts), switches(), time.monotonic()
    time.sleep(seconds)
    c1, n1, v1, t1 = cpu_s(), sum(counts), switches(), time.monotonic()
    frames = max(1, n1 - n0)
    print(json.dumps({"client": mode, "streams": len(urls), "fps": round(frames / (t1 - t0), 1),
                      "cpu_ms_per_frame": round(1e3 * (c1 - c0) / frames, 3),
                      "voluntary_switches_per_frame": round((v1 - v0) / frames, 2)}), flush=True)
    os._exit(0)  # GStreamer's threads need no orderly end here


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clip", nargs="?", type=Path)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "URLS", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1].split(","), float(args.child[2]))
    if args.clip is None:
        ap.error("CLIP is required")
    sys.path.insert(0, str(ROOT))
    from agent.streams_bench import loop_clip
    from agent.streams_rtsp import RtspStreams

    clip, _ = loop_clip(args.clip, Path("/tmp/rtsp_clients_looped.mp4"), 30 + args.reps * len(MODES) * 14)
    with RtspStreams(clip, "h264", args.streams) as server:
        for _ in range(args.reps):
            for mode in MODES:
                r = subprocess.run([sys.executable, __file__, "--child", mode, ",".join(server.urls),
                                    str(args.seconds)], capture_output=True, text=True, timeout=120, check=False)
                print(r.stdout.strip() or f"{mode}: failed: {r.stderr.strip()[-300:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
