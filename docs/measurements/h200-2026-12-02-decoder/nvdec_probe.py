"""Where the host CPU of NVDEC decoding goes, and how many frames the decoder holds back.

Usage (GPU machine, PYTHONPATH with PyNvVideoCodec, PyAV and the CUDA bindings):
  python3 nvdec_probe.py CLIP [--streams 24] [--seconds 8] [--variants native,low,zero,...]

Each variant runs in its own process (the CUDA wait mode is process-wide): N threads, each demuxing
CLIP and feeding one decoder paced at the clip's rate (30 fps), as N cameras would. Per variant:
host CPU per frame (all threads), the decoder's hold-back (packets fed minus frames out, in steady
state, and the age of each frame when it came out), the wall time of one Decode call (the GIL is
held throughout it: PyNvVideoCodec does not release it), and how late a 1 ms ticker thread woke
(the GIL contention the other threads saw).

Variant names: LATENCY[-WAIT][-DEMUX]: LATENCY native | low | zero (PyNvVideoCodec's
DisplayDecodeLatencyType), WAIT block (default) | spin, DEMUX nvc (default: its own demuxer) |
pyav (agent.capture.sources.demux, the rtsp:// path). LATENCY "ffmpeg": PyAV's FFmpeg demuxes and
decodes on NVDEC (its CUDA hwaccel, frames left on the device) instead of PyNvVideoCodec.
"agent-LATENCY" reads through the agent's NvdecSource (its pool copy and Nv12Frame included) with
that latency (EDGE_AGENT_NVDEC_LATENCY). (The H200 run of 2026-12-02 also had "agent-ffmpeg", the
0.5.7 commit's FFmpeg backend, since removed: see README.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class _Frame:
    """A PyAV hardware frame read as the agent reads one (its planes' pointers and pitch)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def cuda(self) -> tuple[int, int, int]:
        y, uv = self.f.planes[0], self.f.planes[1]
        return y.buffer_ptr, uv.buffer_ptr, y.line_size

    def getPTS(self) -> int:
        return int(self.f.pts or 0)


def one(clip: str, variant: str, streams: int, seconds: float) -> dict[str, Any]:
    import PyNvVideoCodec as nvc

    from agent.engines import cuda

    parts = variant.split("-")
    agent_path = parts[0] == "agent"
    if agent_path:
        parts = parts[1:]
    latency = parts[0]
    ffmpeg = latency == "ffmpeg"  # PyAV's FFmpeg decodes on NVDEC (its CUDA hwaccel), frames on the device
    if agent_path:  # read when agent.capture.sources.nvdec is imported (in the threads)
        os.environ["EDGE_AGENT_NVDEC_LATENCY"] = latency
    wait = "spin" if "spin" in parts else "block"
    demux = "pyav" if "pyav" in parts else "nvc"
    cuda.set_sync_mode(wait)
    cuda.use_device(0)
    lat_enum = getattr(nvc, "DisplayDecodeLatencyType", None)
    lat = getattr(lat_enum, latency.upper(), None) if lat_enum is not None else None
    if lat is None and not ffmpeg:
        return {"variant": variant, "error": f"no DisplayDecodeLatencyType.{latency.upper()} in this PyNvVideoCodec"}
    fps = 30.0
    stop = threading.Event()
    counting = threading.Event()
    frames = [0] * streams
    calls: list[list[float]] = [[] for _ in range(streams)]
    holds: list[list[int]] = [[] for _ in range(streams)]
    ages: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def bare(i: int) -> None:
        from agent.capture.sources.demux import AvDemuxer

        cuda.use_device(0)
        stream = cuda.Stream()
        dec = None
        fed = out = 0
        t0 = time.monotonic()
        fed_at: dict[int, float] = {}
        while not stop.is_set():
            if ffmpeg:  # as the 0.5.7 commit's backend opened it (PyAV >= 17, FFmpeg's CUDA hwaccel)
                import av
                from av.codec.hwaccel import HWAccel

                hw = HWAccel("cuda", device="0", allow_software_fallback=False, is_hw_owned=True)  # primary ctx
                container = av.open(clip, hwaccel=hw)
                vstream = container.streams.video[0]
                packets = container.demux(vstream)  # FFmpeg's last packet is empty: it flushes the decoder

                class _Dec:
                    def Decode(self, packet: Any, ctx: Any = vstream.codec_context) -> list[Any]:
                        return [_Frame(f) for f in ctx.decode(packet if packet.size else None)]
                dec = _Dec()
            elif demux == "nvc":
                dmx = nvc.CreateDemuxer(filename=clip)
                codec = dmx.GetNvCodecId()
                packets: Any = iter(dmx)
            else:
                av_dmx = AvDemuxer(clip, clip, False, 10.0, 10.0)
                codec = nvc.cudaVideoCodec.H264

                def made(av_dmx: AvDemuxer = av_dmx) -> Any:
                    for data, pts in av_dmx.packets():
                        p = nvc.PacketData()
                        p.bsl_data, p.bsl, p.pts = data.ctypes.data if data.size else 0, data.size, pts
                        yield p
                packets = made()
            if dec is None and not ffmpeg:
                dec = nvc.CreateDecoder(gpuid=0, codec=codec, usedevicememory=True, cudacontext=cuda.current_context(),
                                        cudastream=stream.handle, latency=lat)
            for packet in packets:
                if stop.is_set():
                    break
                due = t0 + fed / fps
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                elif now - due > 0.2:
                    t0, fed = now, 0  # fell behind: restart the schedule
                fed_at[int(getattr(packet, 'pts', 0) or 0)] = time.monotonic()
                fed += 1
                c0 = time.perf_counter()
                got = dec.Decode(packet)
                c1 = time.perf_counter()
                for f in got:
                    f.cuda()  # what the agent reads of each frame (its planes' geometry)
                    out += 1
                    if counting.is_set():
                        frames[i] += 1
                        t_fed = fed_at.pop(int(f.getPTS()), None)
                        if t_fed is not None:
                            ages[i].append((time.monotonic() - t_fed) * 1e3)
                if counting.is_set():
                    calls[i].append((c1 - c0) * 1e3)
                    holds[i].append(len(fed_at))
                if len(fed_at) > 64:
                    fed_at.clear()

    def agent(i: int) -> None:
        from agent.capture.sources.nvdec import NvdecSource
        from agent.config import CameraConfig

        cfg = CameraConfig(id=f"s{i}", source=clip, decode="nvdec", fps=fps, loop=True, pace=True)
        src = NvdecSource(cfg, lambda c: None)  # type: ignore[arg-type,return-value]
        src.open()
        while not stop.is_set():
            c0 = time.perf_counter()
            frame = src.read()
            c1 = time.perf_counter()
            if frame is None:
                break
            if counting.is_set():
                frames[i] += 1
                calls[i].append((c1 - c0) * 1e3)
            del frame
        src.close()

    def safe(fn: Any, i: int) -> None:
        try:
            fn(i)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    late: list[float] = []

    def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            if counting.is_set():
                late.append((time.perf_counter() - t) * 1e3 - 1.0)

    threads = [threading.Thread(target=safe, args=(agent if agent_path else bare, i), daemon=True)
               for i in range(streams)]
    threads.append(threading.Thread(target=ticker, daemon=True))
    for t in threads:
        t.start()
    time.sleep(3.0)
    counting.set()
    cpu0, w0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - w0
    counting.clear()
    stop.set()
    for t in threads:
        t.join(5)
    n = sum(frames)
    all_calls = [c for cs in calls for c in cs]
    all_holds = [h for hs in holds for h in hs]
    all_ages = [a for a_s in ages for a in a_s]
    return {"variant": variant, "streams": streams, "frames_per_s": round(n / wall, 1),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / max(n, 1), 3),
            "call_ms_p50": _pct(all_calls, 0.5), "call_ms_p99": _pct(all_calls, 0.99),
            "held_packets_mean": round(sum(all_holds) / max(len(all_holds), 1), 2),
            "frame_age_ms_p50": _pct(all_ages, 0.5), "frame_age_ms_p99": _pct(all_ages, 0.99),
            "ticker_late_ms_p50": _pct(late, 0.5), "ticker_late_ms_p99": _pct(late, 0.99),
            "errors": errors[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clip")
    ap.add_argument("--streams", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--variants", default="native,low,zero,ffmpeg,native-spin,ffmpeg-spin,native-pyav,low-pyav,"
                    "agent-native,agent-low")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.clip, args.one, args.streams, args.seconds)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, args.clip, "--one", variant, "--streams", str(args.streams),
               "--seconds", str(args.seconds)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"variant": variant, "error": proc.stderr[-400:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
