"""`edge-agent bench --streams N`: N live cameras through the real service on one device.

Data flow: the demo clip, scaled to --size and encoded by PyAV (libx264 / libx265) into an MP4 at
--fps -> N live sources, either RTSP mounts on a loopback GStreamer server (agent.streams_rtsp,
paced by the server) or the file itself paced at its frame rate and looped -> the service with N
cameras on one shared engine (MQTT off: results go to the publisher's JSON and no further) ->
per stream, over a measuring window after a warm-up: fps, frames dropped, end-to-end latency
p50 / p99 (capture time stamp -> published), and for the run host CPU ms per frame (process CPU
time / frames), split by thread kind (agent.telemetry.threads: capture / infer / launch / post /
ort-run / ..., "native" for threads Python did not start) with the kernel's counters per kind
(wake-ups and preemptions per frame, the system share of its CPU), and GPU memory in use.

In the same run, the limit rows: the engine alone with N concurrent contexts on one loaded model
(each thread its own context, as the cameras have), and, with --decode nvdec, NVDEC alone with N
decoders. --find-max searches the largest N at which every stream holds its rate (>= 95 % of
--fps), drops nothing and keeps p99 <= 100 ms, and prints it beside the limit / rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import DEMO_VIDEO, AgentConfig, load_config, parse_config
from agent.streams_procs import barrier, mps_running
from agent.streams_procs import measure as measure_procs
from agent.telemetry.threads import TaskDelta

log = logging.getLogger(__name__)

P99_GOAL_MS = 100.0
_Fig = dict[str, Any]  # one run's figures, as JSON
RATE_HELD = 0.95  # a stream holds its rate at >= 95 % of the source's frame rate over the window


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The --streams options on the bench parser (agent.cli)."""
    p.add_argument("--streams", type=int, default=None, metavar="N",
                   help="N live streams through the service on one engine (see agent.streams_bench)")
    p.add_argument("--codec", choices=["h264", "hevc"], default="h264", help="--streams: the streams' codec")
    p.add_argument("--decode", choices=["cpu", "nvdec", "auto"], default="cpu",
                   help="--streams, and bench's live row: where to decode")
    p.add_argument("--source", choices=["file", "rtsp"], default="file",
                   help="--streams: paced looping files, or RTSP from a loopback GStreamer server")
    p.add_argument("--rtsp-transport", choices=["tcp", "udp"], default="tcp",
                   help="--streams --source rtsp: the cameras' rtsp_transport (RTP interleaved over TCP, or UDP)")
    p.add_argument("--fps", type=float, default=30.0, help="--streams, and bench's live row: the frame rate")
    p.add_argument("--seconds", type=float, default=10.0, help="--streams: measuring window per run")
    p.add_argument("--find-max", action="store_true", help="--streams: search the largest N that holds the goal")
    p.add_argument("--find-from", type=int, default=1, metavar="N",
                   help="--find-max: the first N tried (default 1; with --processes K at least K), doubling "
                        "from it, or halving below it when N itself misses: a search near a known N_max takes "
                        "fewer runs")
    p.add_argument("--clip", default=None, help="--streams, and bench's live row: read this H.264 / HEVC file "
                   "instead of encoding one")
    p.add_argument("--processes", type=int, default=1, metavar="K",
                   help="--streams: split the streams over K agent processes run at once (agent.streams_procs; "
                        "on a discrete GPU start MPS first)")


def _size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return default
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def make_clip(path: Path, codec: str, width: int, height: int, fps: float, frames: int,
              video: Path = DEMO_VIDEO) -> Path:
    """The demo clip scaled to width x height and encoded as H.264 / HEVC (PyAV), `frames` long (looped)."""
    import av
    import cv2

    src: list[np.ndarray] = []
    cap = cv2.VideoCapture(str(video))
    while True:
        ok, img = cap.read()
        if not ok:
            break
        src.append(cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR))
    cap.release()
    if not src:
        raise SystemExit(f"bench: cannot decode {video}")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if codec == "h264" else "libx265", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # a key frame every second: an RTSP client joining mid-stream starts within 1 s
        gop = str(round(fps))
        stream.options = {"preset": "ultrafast", "g": gop} if codec == "h264" else \
            {"preset": "ultrafast", "x265-params": f"keyint={gop}:log-level=error"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(src[i % len(src)], format="bgr24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


_RTSP_STARTUP_S = 35.0  # an RTSP run's start-up, warm-up and settling before its window


def loop_clip(src: Path, dst: Path, min_seconds: float) -> tuple[Path, int]:
    """`src` played as many times in a row as it takes to last `min_seconds`, as one file, without
    re-encoding (PyAV remux): (the clip to serve, times played). A clip that lasts already is `src`."""
    import av

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        seconds = float(stream.duration * stream.time_base) if stream.duration else \
            float(inp.duration or 0) / 1e6
    if seconds <= 0:
        raise SystemExit(f"bench: --clip: cannot read the length of {src}")
    times = int(np.ceil(min_seconds / seconds))
    if times <= 1:
        return src, 1
    with av.open(str(dst), "w") as out:
        ostream: Any = None
        offset = 0
        for _ in range(times):
            with av.open(str(src)) as inp:
                stream = inp.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(stream)
                end = offset
                for packet in inp.demux(stream):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    packet.pts = (packet.pts if packet.pts is not None else packet.dts) + offset
                    packet.dts += offset
                    end = max(end, packet.pts + (packet.duration or 0))
                    packet.stream = ostream
                    out.mux(packet)
                offset = end
    return dst, times


def _config(base: AgentConfig, sources: list[str], decode: str, work: Path, file: bool,
            transport: str = "tcp") -> AgentConfig:
    cams = [{"id": f"s{i}", "source": src, "pace": True, "loop": file, "decode": decode,
             "rtsp_transport": transport, "reconnect": {"initial_s": 0.1, "max_s": 0.5}}
            for i, src in enumerate(sources)]
    data = base.model_dump(mode="json")
    data.update({"cameras": cams, "mqtt": {"enabled": False},
                 "updates": {"enabled": False, "models_dir": str(work / "models")},
                 "cache": {**data["cache"], "dir": str(work / "cache")},
                 "service": {**data["service"], "watchdog": False}})
    return AgentConfig.model_validate(data)


def _gpu_used() -> int | None:
    try:
        from agent.engines import cuda

        return cuda.memory_used()
    except Exception:
        return None


def wait_steady(counts: Callable[[], list[int]], fps: float, timeout_s: float, step_s: float = 1.0,
                slack: float = 1.15) -> tuple[float, bool]:
    """Wait until no stream gets more than `slack` x its rate over `step_s`: (seconds waited, settled).

    Why: an RTSP server whose client fell behind while the service started (decoders created, lanes
    captured) does not drop what it could not send; it sends it late, faster than the clip's rate,
    until it has caught up. On the H200 at 24 RTSP streams that was 45-60 frames/s per stream for
    the 5 s window after a 3 s warm-up (docs/measurements/h200-2026-12-02-rtsp): a window there
    measures a burst, not a camera."""
    t0 = time.monotonic()
    prev = counts()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(step_s)
        now = counts()
        if all(b - a <= slack * fps * step_s for a, b in zip(prev, now, strict=True)):
            return time.monotonic() - t0, True
        prev = now
    return time.monotonic() - t0, False


def _grew(before: dict[str, object], after: dict[str, object], key: str) -> int:
    """How much a capture counter grew between two `stats()` readings."""
    return int(after.get(key, 0)) - int(before.get(key, 0))  # type: ignore[call-overload]


def run_service(cfg: AgentConfig, seconds: float, fps: float, warmup_s: float = 3.0,
                settle_s: float = 15.0) -> dict[str, Any]:
    """The service with cfg's cameras: per-stream figures over `seconds` after a warm-up."""
    from agent.service import Service
    from agent.telemetry.metrics import StageTimes
    from agent.telemetry.threads import ThreadCpuWindow

    svc = Service(cfg, use_cache=True)
    gpu0 = _gpu_used()
    try:
        svc.start()
        gpu1 = _gpu_used()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(p.processed > 0 for p in svc.pipelines):
            time.sleep(0.1)
        barrier("window")  # --processes: every process's cameras run before any window starts
        time.sleep(warmup_s)
        settled: tuple[float, bool] | None = None
        if any(c.source.startswith("rtsp://") for c in cfg.cameras):
            settled = wait_steady(lambda: [p.processed for p in svc.pipelines], fps, settle_s)
            if not settled[1]:
                print(f"bench: the RTSP streams still ran faster than {fps:g} fps after {settled[0]:.0f} s: "
                      "the window holds a server catching up", file=sys.stderr)
            barrier("steady")
        for p in svc.pipelines:
            p.times = StageTimes()  # the window's latencies only
        start = [(p.processed, p.errors, p.capture.stats()) for p in svc.pipelines]
        cpu_window, t0 = ThreadCpuWindow(), time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
        by_thread, cpu = cpu_window.stop(), cpu_window.process_s or 0.0
        streams: list[dict[str, Any]] = []
        for p, (n0, e0, s0) in zip(svc.pipelines, start, strict=True):
            e2e = p.times.values("e2e")
            s1 = p.capture.stats()
            streams.append({"camera": p.camera_id, "fps": round((p.processed - n0) / wall, 2),
                            "frames": p.processed - n0,
                            "dropped": _grew(s0, s1, "frames_dropped"),
                            "errors": p.errors - e0,
                            # a reconnect in the window: a live stream starts again (RTSP: with a burst)
                            "reconnects": _grew(s0, s1, "reconnects"),
                            # pictures the decoder refused (NVDEC then starts over at a keyframe)
                            "decode_errors": _grew(s0, s1, "decode_errors"),
                            "p50_ms": round(float(np.percentile(e2e, 50)), 2) if e2e.size else None,
                            "p99_ms": round(float(np.percentile(e2e, 99)), 2) if e2e.size else None,
                            "state": p.capture.state})
        gpu2 = _gpu_used()
        frames = sum(s["frames"] for s in streams)
        tele = svc.telemetry()
    finally:
        svc.shutdown()
    held = all(s["fps"] >= RATE_HELD * fps and s["dropped"] == 0 and s["errors"] == 0
               and s["p99_ms"] is not None and s["p99_ms"] <= P99_GOAL_MS for s in streams)
    return {"streams": len(streams), "per_stream": streams, "total_fps": round(frames / wall, 2),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / max(frames, 1), 3),
            # the same window split by thread kind (agent.telemetry.threads); "native" = the rest
            "host_cpu_ms_per_frame_by_thread": {g: round(s * 1e3 / max(frames, 1), 3) for g, s in by_thread.items()},
            # the kernel's view of the same window (Linux): how often each kind of thread slept and was
            # woken per frame, was preempted per frame, and what share of its CPU was system time
            **_task_figures(cpu_window.tasks, frames),
            "worst_p99_ms": max((s["p99_ms"] or 0.0) for s in streams),
            "min_fps": min(s["fps"] for s in streams), "max_fps": max(s["fps"] for s in streams),
            "dropped": sum(s["dropped"] for s in streams), "reconnects": sum(s["reconnects"] for s in streams),
            "decode_errors": sum(s["decode_errors"] for s in streams),
            "gpu_mem_mb": None if gpu0 is None or gpu2 is None else round((gpu2 - gpu0) / 2**20, 1),
            "gpu_mem_at_start_mb": None if gpu0 is None or gpu1 is None else round((gpu1 - gpu0) / 2**20, 1),
            "settle_s": None if settled is None else round(settled[0], 1),
            "settled": None if settled is None else settled[1],
            "model_loads": tele["engine"].get("model_loads"), "preprocess": tele["engine"].get("preprocess"),
            "decode": [c.get("decode") for c in tele["cameras"]],
            "goal_held": held}


def engine_limit(cfg: AgentConfig, n: int, width: int, height: int, seconds: float = 3.0,
                 nv12: bool = False) -> dict[str, Any]:
    """The engine alone: n threads, each on its own context of ONE loaded model, as fast as it goes.

    `nv12`: the frames are NV12 already on the GPU, as NVDEC leaves them (no upload, no staging
    buffers), else BGR host frames uploaded each time."""
    from agent.engines.factory import create_engine, shared_engine_settings
    from agent.pipeline import ModelRuntime, build_runtime

    overrides, _ = shared_engine_settings(cfg.engine, n)  # as the service arranges n cameras
    ecfg = cfg.engine.model_copy(update=overrides)
    frame: Any = np.full((height, width, 3), 114, np.uint8)
    device_frame = None
    if nv12 and cfg.engine.preprocess != "cpu":
        from agent.engines import cuda
        from agent.vision.gpu import Nv12Frame

        device_frame = cuda.DeviceBuffer(width * height * 3 // 2)
        with cuda.Stream() as stream:
            cuda.copy_htod_async(device_frame, np.full(width * height * 3 // 2, 120, np.uint8), stream)
            stream.synchronize()
        frame = Nv12Frame(device_frame.ptr, device_frame.ptr + width * height, width, width, height)
    gpu0 = _gpu_used()
    try:
        first = create_engine(cfg.model.path, ecfg, None)
    except BaseException:
        if device_frame is not None:
            device_frame.free()
        raise
    runtimes: list[ModelRuntime] = []
    try:
        # GPU memory of the engine alone (no decoders): the first context after a few frames, then all
        runtimes = [build_runtime(first, cfg.model, cfg.model.path, preprocess=cfg.engine.preprocess)]
        runtimes[0].warmup(3)
        gpu1 = _gpu_used()
        for _ in range(n - 1):
            runtimes.append(build_runtime(first.share(), cfg.model, cfg.model.path, preprocess=cfg.engine.preprocess))
        counts = [0] * n
        stop = threading.Event()

        def work(i: int, rt: ModelRuntime) -> None:
            if rt.frontend is not None:
                for _ in range(3):
                    rt.frontend(frame)
                while not stop.is_set():
                    rt.frontend(frame)
                    counts[i] += 1
            else:
                tensor, _ = rt.letterbox(frame if isinstance(frame, np.ndarray) else frame.to_bgr())
                tensor = tensor.copy()
                while not stop.is_set():
                    rt.engine.infer(tensor)
                    counts[i] += 1

        threads = [threading.Thread(target=work, args=(i, rt), daemon=True) for i, rt in enumerate(runtimes)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        c0, t0 = sum(counts), time.perf_counter()
        time.sleep(seconds)
        done = sum(counts) - c0
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(10)
        gpu2 = _gpu_used()
        mem: dict[str, Any] = {}
        if gpu0 is not None and gpu1 is not None and gpu2 is not None:
            mem = {"engine_mem_first_mb": round((gpu1 - gpu0) / 2**20, 1)}
            if n > 1:
                mem["engine_mem_per_extra_context_mb"] = round((gpu2 - gpu1) / 2**20 / (n - 1), 1)
        return {"contexts": n, "inferences_per_s": round(done / wall, 1), "preprocess": runtimes[0].preprocess,
                "graph_lanes": ecfg.graph_lanes, **mem}
    finally:
        for rt in runtimes:
            rt.close()
        if not runtimes:
            first.close()
        if device_frame is not None:
            device_frame.free()


def nvdec_limit(clip: Path, n: int, seconds: float = 3.0) -> dict[str, Any]:
    """NVDEC alone: n decoders on n threads, each decoding the clip in a loop."""
    try:
        from agent.capture.sources.nvdec import decode_rate
    except ImportError as exc:
        return {"error": f"no NVDEC source in this build ({exc})"}
    try:
        return decode_rate(clip, n, seconds)
    except Exception as exc:  # a report row, never the reason the bench fails
        return {"error": str(exc)[:300]}


def find_max(n: int, trial: Callable[[int], bool], start: int = 1, least: int = 1) -> int:
    """The largest k in [least, n] for which trial(k) holds (0 if none): from `start`, doubling until it
    breaks, then halving between the last pass and the first failure; when `start` itself fails, halving
    between `least` and it (a start set too high still finds the N below it)."""
    lo, hi, k = least - 1, n + 1, start
    while k <= n:
        if not trial(k):
            hi = k
            break
        lo, k = k, k * 2
    if hi == n + 1 and lo < n:
        lo, hi = (n, hi) if trial(n) else (lo, n)
    while hi - lo > 1 and lo < n:
        k = (lo + hi) // 2
        lo, hi = (k, hi) if trial(k) else (lo, k)
    return lo if lo >= least else 0


def run_streams(args: argparse.Namespace) -> int:
    n = int(args.streams)
    if n < 1:
        print("bench: --streams must be >= 1", file=sys.stderr)
        return 2
    k = int(getattr(args, "processes", 1))  # 0 is refused below, not taken for 1
    if not 1 <= k <= n:
        print(f"bench: --processes must be between 1 and --streams ({n}), got {k}", file=sys.stderr)
        return 2
    start = int(getattr(args, "find_from", 1))
    if not 1 <= start <= n:
        print(f"bench: --find-from must be between 1 and --streams ({n}), got {start}", file=sys.stderr)
        return 2
    base = load_config(args.config) if args.config else parse_config({"cameras": [{"source": "synthetic:"}]})
    if args.model:
        base.model.path = Path(args.model)
    width, height = _size(getattr(args, "size", None), (1920, 1080))
    if getattr(args, "clip", None) and not Path(args.clip).is_file():
        print(f"bench: --clip: no such file: {args.clip}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edge-agent-streams-"))
    try:
        return _run_streams_in(work, args, base, n, width, height)
    finally:  # the encoded clips and per-run configs go, whatever happened
        shutil.rmtree(work, ignore_errors=True)


def _run_streams_in(work: Path, args: argparse.Namespace, base: AgentConfig, n: int, width: int,
                    height: int) -> int:
    fps = float(args.fps)
    ext = "mp4"
    seconds = float(args.seconds)
    # RTSP: every client's stream starts at the clip's start and must not end within start-up, warm-up,
    # settling (up to 15 s: run_service) and the window; K processes start slower
    rtsp_s = seconds + _RTSP_STARTUP_S
    clip_frames = int(fps * rtsp_s) if args.source == "rtsp" else int(fps * 4)
    t0 = time.perf_counter()
    if getattr(args, "clip", None):
        clip = Path(args.clip)
        if args.source == "rtsp":  # a stream that ends mid-run would count as lost: serve the clip looped
            need = rtsp_s + 10 * int(getattr(args, "processes", 1) or 1)
            clip, times = loop_clip(clip, work / f"looped{clip.suffix}", need)
            if times > 1:
                print(f"bench: --clip served {times} times in a row ({need:.0f} s needed for start-up, "
                      "settling and the window)", file=sys.stderr)
    else:
        clip = make_clip(work / f"clip-{args.codec}.{ext}", args.codec, width, height, fps, clip_frames)
        print(f"bench: {clip_frames} frames {width}x{height} {args.codec} encoded in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results: dict[str, Any] = {"streams": n, "codec": args.codec, "decode": args.decode, "source": args.source,
                               "rtsp_transport": getattr(args, "rtsp_transport", "tcp"),
                               "size": [width, height], "fps": fps, "seconds": seconds,
                               "model": str(base.model.path), "engine": base.engine.model_dump(mode="json"),
                               "ts": round(time.time(), 3)}
    processes = int(getattr(args, "processes", 1) or 1)
    if processes > 1:
        return _run_processes(args, results, clip, n, processes, work)

    def measure(k: int) -> dict[str, Any]:
        if args.source == "rtsp":
            from agent.streams_rtsp import RtspStreams

            with RtspStreams(clip, args.codec, k) as server:
                cfg = _config(base, server.urls, args.decode, work, False, getattr(args, "rtsp_transport", "tcp"))
                return run_service(cfg, seconds, fps)
        return run_service(_config(base, [str(clip)] * k, args.decode, work, True), seconds, fps)

    try:
        runs, best = _search(n, measure, args.find_max, start=_find_from(args, 1))
    except RuntimeError as exc:  # the RTSP server cannot start here: say why (and what to install)
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    n_limit = n
    if best is not None:
        results["n_max"] = best
        n_limit = max(best, 1)
    results["runs"] = {str(k): v for k, v in sorted(runs.items())}
    if 1 in runs and n_limit > 1 and n_limit in runs:
        a, b = runs[1].get("gpu_mem_mb"), runs[n_limit].get("gpu_mem_mb")
        if a is not None and b is not None:
            results["gpu_mem_per_extra_camera_mb"] = round((b - a) / (n_limit - 1), 1)
            results["gpu_mem_first_camera_mb"] = a
    barrier("limits")  # --processes: the limit rows of every process at once
    results["engine_limit"] = engine_limit(base, n_limit, width, height, nv12=args.decode == "nvdec")
    if args.decode in ("nvdec", "auto"):
        results["nvdec_limit"] = nvdec_limit(clip, n_limit)
    return _report(results, args)


def _find_from(args: argparse.Namespace, least: int) -> int:
    return max(int(getattr(args, "find_from", 1) or 1), least)


def _search(n: int, measure: Callable[[int], _Fig], find: bool, start: int = 1, least: int = 1,
            row: Callable[[_Fig], _Fig] = lambda r: r) -> tuple[dict[int, _Fig], int | None]:
    """measure(n) once, or (`find`) the find-max search up to n, each run's row printed as it ends:
    (the results by N, N_max or None). `row` picks a result's row (its goal_held)."""
    runs: dict[int, _Fig] = {}
    if not find:
        runs[n] = measure(n)
        return runs, None

    def trial(k: int) -> bool:
        if k not in runs:
            runs[k] = measure(k)
            print(_row(row(runs[k])), file=sys.stderr)
            print(_thread_row(row(runs[k])), file=sys.stderr)
        return bool(row(runs[k])["goal_held"])

    return runs, find_max(n, trial, start, least)


def _report(results: dict[str, Any], args: argparse.Namespace) -> int:
    """The streams a limit row stands for, then the table on stdout and the JSON file."""
    lim = results["engine_limit"].get("inferences_per_s")
    if lim:
        results["streams_at_engine_limit"] = round(lim / float(args.fps), 1)
    print(format_streams(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _run_processes(args: argparse.Namespace, results: dict[str, Any], clip: Path, n: int, k: int,
                   work: Path) -> int:
    """--processes K: each run is K children with the streams split between them (agent.streams_procs)."""
    mps = mps_running()
    results.update({"processes": k, "mps": mps})
    print(f"bench: {k} processes, MPS {'running' if mps else 'NOT running (the processes time-slice the GPU)'}",
          file=sys.stderr)
    try:
        merged, best = _search(n, lambda total: measure_procs(args, clip, total, k, work), args.find_max,
                               start=_find_from(args, k), least=k,
                               row=lambda m: m["run"])
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    at = n
    if best is not None:
        results["n_max"] = best
        at = best if best in merged else min(merged)
    results["runs"] = {str(t): m["run"] for t, m in sorted(merged.items())}
    results["engine_limit"] = merged[at]["engine_limit"]
    if "nvdec_limit" in merged[at]:
        results["nvdec_limit"] = merged[at]["nvdec_limit"]
    return _report(results, args)


def _row(r: dict[str, Any]) -> str:
    gpu = "-" if r["gpu_mem_mb"] is None else r["gpu_mem_mb"]  # None: several processes (each sees the others)
    return (f"N={r['streams']:<3} total {r['total_fps']:>8.1f} fps  min/stream {r['min_fps']:>6.1f}  "
            f"worst p99 {r['worst_p99_ms']:>7.1f} ms  dropped {r['dropped']:>4}  "
            f"cpu {r['host_cpu_ms_per_frame']:>6.2f} ms/f  gpu {gpu} MB  loads {r['model_loads']}  "
            f"{'held' if r['goal_held'] else 'MISSED'}"
            + (f"  reconnects {r['reconnects']}" if r.get("reconnects") else "")
            + (f"  decode errors {r['decode_errors']}" if r.get("decode_errors") else "")
            + (f"  max/stream {r['max_fps']:.1f}" if r.get("max_fps", 0) > 1.2 * r["min_fps"] else "")
            + ("  (server still catching up)" if r.get("settled") is False else ""))


def _task_figures(tasks: dict[str, TaskDelta], frames: int) -> dict[str, Any]:
    """Per frame wake-ups (voluntary context switches) and preemptions (involuntary ones) by thread
    kind, and each kind's system share of its CPU; {} where the kernel's counters are not readable."""
    if not tasks:
        return {}
    n = max(frames, 1)
    return {"wakeups_per_frame_by_thread": {g: round(d.voluntary / n, 3) for g, d in tasks.items()},
            "preempted_per_frame_by_thread": {g: round(d.involuntary / n, 3) for g, d in tasks.items()},
            "system_share_by_thread": {g: round(d.system_s / (d.user_s + d.system_s), 3)
                                       for g, d in tasks.items() if d.user_s + d.system_s > 0}}


def _task_rows(r: dict[str, Any], top: int = 6) -> list[str]:
    """Wake-ups per frame and the system share by thread kind, the kinds that wake most first."""
    wakes = r.get("wakeups_per_frame_by_thread") or {}
    if not wakes:
        return []
    items = sorted(wakes.items(), key=lambda kv: -kv[1])[:top]
    shares = r.get("system_share_by_thread") or {}
    preempted = sum((r.get("preempted_per_frame_by_thread") or {}).values())
    rows = ["       wake-ups/f by thread: " + ", ".join(f"{g} {w:.2f}" for g, w in items)
            + f" (preempted/f, all threads: {preempted:.3f})"]
    shown = [f"{g} {shares[g]:.0%}" for g, _ in items if g in shares]
    if shown:
        rows.append("       system share of cpu: " + ", ".join(shown))
    return rows


def _thread_row(r: dict[str, Any], top: int = 6) -> str:
    """The host CPU ms per frame by thread kind, largest first (the row's `cpu` figure split)."""
    groups = r.get("host_cpu_ms_per_frame_by_thread") or {}
    items = sorted(groups.items(), key=lambda kv: -kv[1])
    shown = [f"{g} {ms:.2f}" for g, ms in items[:top]]
    if len(items) > top:
        shown.append(f"rest {sum(ms for _, ms in items[top:]):.2f}")
    return "       cpu ms/f by thread: " + ", ".join(shown)


def format_streams(r: dict[str, Any]) -> str:
    lines = [f"streams: {r['size'][0]}x{r['size'][1]} {r['codec']} @ {r['fps']} fps, {r['source']} sources, "
             f"decode {r['decode']}, model {Path(r['model']).name}, window {r['seconds']} s"]
    for run in r["runs"].values():
        lines.append(_row(run))
        if run.get("host_cpu_ms_per_frame_by_thread"):
            lines.append(_thread_row(run))
        lines.extend(_task_rows(run))
        if len(r["runs"]) == 1:
            for s in run["per_stream"]:
                lines.append(f"  {s['camera']:<5} {s['fps']:>7.2f} fps  dropped {s['dropped']:>3}  "
                             f"p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  errors {s['errors']}  {s['state']}")
    el = r.get("engine_limit", {})
    if r.get("processes", 1) > 1:
        lines.append(f"processes: {r['processes']} (streams split between them), MPS "
                     f"{'running' if r.get('mps') else 'not running'}; the limit rows: every process at once, summed")
    where = f"in {r['processes']} processes" if r.get("processes", 1) > 1 else "on one model"
    lines.append(f"limit: engine alone, {el.get('contexts')} contexts {where}: {el.get('inferences_per_s')} "
                 f"inferences/s ({el.get('preprocess')} preprocessing, {el.get('graph_lanes') or 'no'} graph lanes) "
                 f"= {r.get('streams_at_engine_limit')} streams")
    if "engine_mem_first_mb" in el:
        lines.append(f"GPU memory of the engine alone: first context {el['engine_mem_first_mb']} MB, each extra "
                     f"{el.get('engine_mem_per_extra_context_mb', '-')} MB")
    if "nvdec_limit" in r:
        nl = r["nvdec_limit"]
        lines.append(f"limit: NVDEC alone: {nl.get('frames_per_s', nl.get('error'))}"
                     + (f" frames/s with {nl.get('decoders')} decoders" if "frames_per_s" in nl else ""))
    if "gpu_mem_per_extra_camera_mb" in r:
        lines.append(f"GPU memory: first camera {r['gpu_mem_first_camera_mb']} MB, "
                     f"each extra camera {r['gpu_mem_per_extra_camera_mb']} MB")
    if "n_max" in r:
        lines.append(f"N_max {r['n_max']} (every stream >= {RATE_HELD:.0%} of {r['fps']} fps, 0 drops, "
                     f"p99 <= {P99_GOAL_MS:.0f} ms); engine limit / rate {r.get('streams_at_engine_limit')}")
    return "\n".join(lines)
