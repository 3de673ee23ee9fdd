"""`edge-agent bench`: the agent pipeline against the bare engine, side by side in one run.

Measured on one model and one execution provider:
  bare            session.run in a tight loop on a ready input (numpy in / out)
  bare_iobinding  the same through IO binding with preallocated input / output (where the EP allows)
  bare_iobinding_live  the same, one run per frame period of --fps (idle in between)
  pipeline_memory the whole agent pipeline (threads, letterbox, engine, decode, NMS, JSON) on frames
                  already decoded in memory
  pipeline_paced  the same at half the throughput just measured, frames from memory, newest only
  pipeline_live   one live camera: an H.264 / HEVC clip read at its frame rate, decoded as --decode
                  says (nvdec: on the GPU), latency from the frame's capture to its payload
  pipeline_file   the same reading the video file as fast as possible (decode included)
  ultralytics     Ultralytics `predict` on the same ONNX, when the optional package is installed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.capture.reader import CaptureThread
from agent.capture.sources import FrameSource
from agent.config import DEMO_MODEL, DEMO_VIDEO, AgentConfig, CameraConfig, EngineConfig, load_config, parse_config
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.pipeline import Pipeline, build_runtime
from agent.publish import detections_payload, dumps
from agent.vision.types import Result

log = logging.getLogger(__name__)


def _latency(ms: np.ndarray) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3), "max": round(float(ms.max()), 3)}


def load_frames(video: Path, n: int) -> list[np.ndarray]:
    """Decode up to `n` frames (looping the file) into memory."""
    import cv2

    frames: list[np.ndarray] = []
    cap = cv2.VideoCapture(str(video))
    try:
        while len(frames) < n:
            ok, img = cap.read()
            if not ok:
                if not frames:
                    raise SystemExit(f"bench: cannot decode {video}")
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            frames.append(img)
    finally:
        cap.release()
    return frames


class MemorySource(FrameSource):
    """Frames already in memory, delivered losslessly as fast as they are taken (for benchmarks)."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self._frames = frames
        self._i = 0

    def open(self) -> None:
        self._i = 0

    def read(self) -> np.ndarray | None:
        if self._i >= len(self._frames):
            return None
        img = self._frames[self._i]
        self._i += 1
        return img

    def close(self) -> None:
        pass

    @property
    def live(self) -> bool:
        return False

    @property
    def fps(self) -> float | None:
        return None

    def describe(self) -> str:
        return f"memory ({len(self._frames)} frames)"


@contextlib.contextmanager
def pinned_copies(frames: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """The frames copied once into page-locked host memory (freed on exit)."""
    from agent.engines import cuda

    bufs = [cuda.PinnedBuffer(f.shape, f.dtype) for f in frames]
    try:
        for b, f in zip(bufs, frames, strict=True):
            np.copyto(b.array, f)
        yield [b.array for b in bufs]
    finally:
        for b in bufs:
            b.free()


class PacedMemorySource(MemorySource):
    """The frames as a live camera delivering `fps` (newest-frame semantics): latency without queueing."""

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        super().__init__(frames)
        self._period = 1.0 / fps
        self._next = 0.0

    def open(self) -> None:
        super().open()
        self._next = time.monotonic()

    def read(self) -> np.ndarray | None:
        self._next += self._period
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        img = self._frames[self._i % len(self._frames)]
        self._i += 1
        return img

    @property
    def live(self) -> bool:
        return True

    @property
    def fps(self) -> float | None:
        return 1.0 / self._period


def bench_bare(engine: OnnxRuntimeEngine, tensor: np.ndarray, n: int) -> dict[str, Any]:
    sess = engine.session
    name = engine.input_spec.name
    outs = [o.name for o in engine.output_specs]
    ro = engine.run_options(-1)  # plain runs never replay a CUDA graph (their buffers move)
    for _ in range(10):
        sess.run(outs, {name: tensor}, ro)
    ms = np.empty(n)
    cpu0, t_all = time.process_time(), time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        sess.run(outs, {name: tensor}, ro)
        ms[i] = (time.perf_counter() - t0) * 1e3
    wall = time.perf_counter() - t_all
    return {"fps": round(n / wall, 2), "latency_ms": _latency(ms), "frames": n,
            "host_cpu_ms_per_frame": round((time.process_time() - cpu0) * 1e3 / n, 3),
            "latencies_ms": [round(float(x), 3) for x in ms]}


def iobinding_rows(engine: OnnxRuntimeEngine, tensor: np.ndarray, n: int, live_fps: float) -> dict[str, Any]:
    """`bare_iobinding` (tight loop) and `bare_iobinding_live` (one run per frame period at
    `live_fps`: the engine alone idling between frames, as at a live camera's rate). Each row is
    an error of its own: IO binding is optional per EP, and a failed paced run leaves the other."""
    rows: dict[str, Any] = {}
    try:
        rows["bare_iobinding"] = bench_iobinding(engine, tensor, n)
    except Exception as exc:
        rows["bare_iobinding"] = {"error": str(exc)[:200]}
        return rows
    try:
        rows["bare_iobinding_live"] = bench_iobinding(engine, tensor, min(n, int(live_fps * 10)), live_fps)
        rows["bare_iobinding_live"]["source_fps"] = live_fps
    except Exception as exc:
        rows["bare_iobinding_live"] = {"error": str(exc)[:200]}
    return rows


def bench_iobinding(engine: OnnxRuntimeEngine, tensor: np.ndarray, n: int,
                    pace_fps: float | None = None) -> dict[str, Any]:
    """Runs on bound device buffers; `pace_fps`: one run per frame period (idle between, as at a
    live camera's rate: the GPU and the host threads are not kept busy), the idle time not counted."""
    import onnxruntime as ort

    sess = engine.session
    provider = engine.info.providers[0]
    device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
    binding = sess.io_binding()
    x = ort.OrtValue.ortvalue_from_numpy(tensor, device, 0)
    binding.bind_ortvalue_input(engine.input_spec.name, x)
    for spec in engine.output_specs:
        y = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), spec.dtype.type, device, 0)
        binding.bind_ortvalue_output(spec.name, y)
    ro = engine.run_options(3)  # its own CUDA graph id: these buffers are bound nowhere else
    for _ in range(10):
        sess.run_with_iobinding(binding, ro)
    ms = np.empty(n)
    period = 1.0 / pace_fps if pace_fps else 0.0
    idle = 0.0
    cpu0, t_all = time.process_time(), time.perf_counter()
    due = t_all
    for i in range(n):
        if period:
            due += period
            t_idle = time.perf_counter()
            time.sleep(max(0.0, due - t_idle))
            idle += time.perf_counter() - t_idle
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding, ro)
        binding.synchronize_outputs()
        ms[i] = (time.perf_counter() - t0) * 1e3
    wall = time.perf_counter() - t_all - idle
    return {"fps": round(n / wall, 2), "latency_ms": _latency(ms), "frames": n, "device": device,
            "host_cpu_ms_per_frame": round((time.process_time() - cpu0) * 1e3 / n, 3),
            "latencies_ms": [round(float(x), 3) for x in ms]}


def bench_pipeline(cfg: AgentConfig, camera: CameraConfig, n: int, frames: list[np.ndarray] | None = None,
                   preprocess: str | None = None, paced_fps: float | None = None, skip: int = 0) -> dict[str, Any]:
    """The agent's pipeline on one camera for `n` frames; the latencies of the first `skip` frames
    (a live source's start: buffers sized, kernels packed) are left out."""
    from agent.engines.factory import shared_engine_settings

    update, _ = shared_engine_settings(cfg.engine, 1)  # one camera, as the service arranges it
    if preprocess:
        update["preprocess"] = preprocess
    ecfg = cfg.engine.model_copy(update=update)
    engine = OnnxRuntimeEngine(cfg.model.path, ecfg)
    rt = build_runtime(engine, cfg.model, cfg.model.path, preprocess=ecfg.preprocess)
    rt.warmup(10)
    e2e: list[float] = []

    def sink(result: Result) -> None:
        # What the service does per frame minus the socket: the payload is built and serialised.
        dumps(detections_payload(result, camera.id))
        e2e.append((time.monotonic() - result.mono) * 1e3)

    factory: Any = None
    if frames is not None:

        def factory(_cfg: CameraConfig) -> FrameSource:
            return PacedMemorySource(frames, paced_fps) if paced_fps else MemorySource(frames)
    capture = CaptureThread(camera, source_factory=factory) if factory else CaptureThread(camera)
    pipe = Pipeline(camera.id, capture, rt, sink, max_frames=n)
    cpu0, t0 = time.process_time(), time.perf_counter()
    pipe.start()
    pipe.wait(600)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    pipe.stop()
    used = rt.preprocess
    rt.close()
    stages = pipe.times.summary()
    decode = pipe.capture.stats().get("decode", "cpu")
    published, e2e = len(e2e), e2e[skip:]
    return {"fps": round(pipe.processed / wall, 2), "frames": pipe.processed, "published": published,
            "preprocess": used, "decode": decode, "frames_dropped": pipe.capture.stats().get("frames_dropped", 0),
            "latency_ms": _latency(np.array(e2e)) if e2e else {}, "stages_ms": stages,
            "host_cpu_ms_per_frame": round(cpu * 1e3 / max(pipe.processed, 1), 3),
            "latencies_ms": [round(x, 3) for x in e2e]}


def bench_live(cfg: AgentConfig, args: argparse.Namespace, video: Path, frames: list[np.ndarray], n: int,
               work: Path, fps: float) -> dict[str, Any]:
    """One live camera: `--clip` (or the bench's frames encoded as `--codec` with PyAV at `fps`) read
    at its frame rate, decoded as `--decode` says; up to `n` frames, the first second's latencies left out."""
    clip = Path(args.clip) if getattr(args, "clip", None) else None
    count = max(min(n, int(fps * 20)), int(fps) + 10)
    if clip is None:
        try:
            from agent.streams_bench import make_clip

            h, w = frames[0].shape[:2]
            codec = getattr(args, "codec", "h264")
            clip = make_clip(work / f"live-{codec}.mp4", codec, w, h, fps, min(count, int(fps * 4)), video=video)
        except ImportError as exc:
            return {"error": f"needs PyAV (pip install 'edge-agent[streams]') or --clip: {exc}"}
    decode = getattr(args, "decode", "cpu") or "cpu"
    cam = CameraConfig(id="bench", source=str(clip), pace=True, loop=True, decode=decode)
    row = bench_pipeline(cfg, cam, count, skip=int(fps))
    row["source_fps"], row["clip"] = fps, str(clip)
    return row


def bench_ultralytics(model: Path, frames: list[np.ndarray], n: int, imgsz: int) -> dict[str, Any] | None:
    try:
        from ultralytics import YOLO  # optional `bench` extra, never a runtime dependency
    except ImportError:
        return None
    yolo = YOLO(str(model), task="detect")
    for f in frames[:10]:
        yolo.predict(f, imgsz=imgsz, verbose=False)
    ms = np.empty(n)
    cpu0, t_all = time.process_time(), time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        yolo.predict(frames[i % len(frames)], imgsz=imgsz, verbose=False)
        ms[i] = (time.perf_counter() - t0) * 1e3
    return {"fps": round(n / (time.perf_counter() - t_all), 2), "latency_ms": _latency(ms), "frames": n,
            "host_cpu_ms_per_frame": round((time.process_time() - cpu0) * 1e3 / n, 3),
            "latencies_ms": [round(float(x), 3) for x in ms]}


def profile_nodes(model: Path, ecfg: EngineConfig, tensor: np.ndarray, runs: int = 50) -> list[dict[str, Any]]:
    """Per-node times from ONNX Runtime's profiler, slowest first."""
    import onnxruntime as ort

    engine = OnnxRuntimeEngine(model, ecfg)
    engine.load()
    import tempfile

    so = engine._session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="edge-agent-profile-")) / "profile")
    providers = engine.info.providers
    sess = ort.InferenceSession(str(model), sess_options=so, providers=providers)
    name = sess.get_inputs()[0].name
    for _ in range(runs):
        sess.run(None, {name: tensor})
    trace_file = Path(sess.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink(missing_ok=True)
    trace_file.parent.rmdir()
    totals: dict[str, dict[str, Any]] = {}
    for ev in trace:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        t = totals.setdefault(node, {"node": node, "op": ev.get("args", {}).get("op_name", ""),
                                     "provider": ev.get("args", {}).get("provider", ""), "us": 0.0})
        t["us"] += float(ev.get("dur", 0))
    rows = sorted(totals.values(), key=lambda r: -r["us"])
    for r in rows:
        r["us_per_run"] = round(r.pop("us") / runs, 1)
    engine.close()
    return rows[:10]


def _resized(frames: list[np.ndarray], size: str, work: Path) -> tuple[list[np.ndarray], Path]:
    """Frames scaled to `size` ("WxH"), and the same frames written as a video file for the file path."""
    import cv2

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench: --size takes WxH, e.g. 1920x1080, got {size!r}") from None
    out = [cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in frames]
    video = work / f"bench-{w}x{h}.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 15.0, (w, h))
    for f in out:
        writer.write(f)
    writer.release()
    return out, video


def run_bench(args: argparse.Namespace) -> int:
    import tempfile

    import onnxruntime as ort

    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = parse_config({"cameras": [{"source": str(DEMO_VIDEO)}], "mqtt": {"enabled": False}})
    if args.model:
        cfg.model.path = Path(args.model)
    model = cfg.model.path if args.model or args.config else DEMO_MODEL
    cfg.model.path = model
    video = Path(args.video) if args.video else DEMO_VIDEO
    n = args.frames
    frames = load_frames(video, min(n, 300))
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    if getattr(args, "size", None):
        frames, video = _resized(frames, args.size, work)

    engine = OnnxRuntimeEngine(model, cfg.engine.model_copy(update={"graph_lanes": 0}))  # the bare limit: one session
    engine.load()
    tensor, _ = build_runtime(engine, cfg.model, model, preprocess="cpu").letterbox(frames[0])
    tensor = tensor.copy()
    info = engine.info
    imgsz = int(engine.input_spec.shape[-1])
    results: dict[str, Any] = {
        "model": str(model), "video": str(video), "frame_size": list(frames[0].shape[1::-1]), "frames": n,
        "onnxruntime": ort.__version__, "providers": info.providers,
        "intra_op_threads": info.extra.get("intra_op_threads"), "placement": info.extra.get("placement", {}),
        "cuda_graph": info.extra.get("cuda_graph", False), "input_shape": list(engine.input_spec.shape),
        "ts": round(time.time(), 3),
    }
    print(f"bench: {model.name} on {info.providers[0]}, {n} frames per run", file=sys.stderr)
    results["bare"] = bench_bare(engine, tensor, n)
    live_fps = float(getattr(args, "fps", 30.0) or 30.0)
    results.update(iobinding_rows(engine, tensor, n, live_fps))
    engine.close()
    mem_cam = CameraConfig(id="bench", source="memory:", pace=False)
    results["pipeline_memory"] = bench_pipeline(cfg, mem_cam, n, frames)
    if results["pipeline_memory"]["preprocess"] == "gpu":
        # frames a capture decoded straight into page-locked memory (as a pinned buffer pool or an
        # NVMM pipeline delivers them): the upload is a DMA, with no host copy first
        with pinned_copies(frames) as pinned:
            results["pipeline_memory_pinned"] = bench_pipeline(cfg, mem_cam, n, pinned)
        # the CPU letterbox on the same EP, side by side
        results["pipeline_memory_cpu_pre"] = bench_pipeline(cfg, mem_cam, n, frames, preprocess="cpu")
    # latency without queueing: a live source at half the throughput just measured (newest frame only)
    best = max(results[k]["fps"] for k in ("pipeline_memory", "pipeline_memory_pinned") if k in results)
    rate = round(best / 2, 1)
    with pinned_copies(frames) if results["pipeline_memory"]["preprocess"] == "gpu" else \
            contextlib.nullcontext(frames) as paced_frames:
        results["pipeline_paced"] = bench_pipeline(cfg, mem_cam, min(n, int(rate * 10) + 1), paced_frames,
                                                   paced_fps=rate)
    results["pipeline_paced"]["source_fps"] = rate
    results["pipeline_live"] = bench_live(cfg, args, video, frames, n, work, live_fps)
    file_cam = CameraConfig(id="bench", source=str(video), pace=False, loop=True)
    results["pipeline_file"] = bench_pipeline(cfg, file_cam, n)
    ultra = bench_ultralytics(model, frames, n, imgsz)
    results["ultralytics"] = ultra if ultra is not None else {"error": "ultralytics not installed (bench extra)"}
    bare_fps = results["bare"]["fps"]
    ratios = {
        "pipeline_memory_vs_bare": round(results["pipeline_memory"]["fps"] / bare_fps, 3),
        "pipeline_file_vs_bare": round(results["pipeline_file"]["fps"] / bare_fps, 3),
    }
    io = results["bare_iobinding"]
    if "fps" in io:
        for key in ("pipeline_memory", "pipeline_memory_pinned"):
            if key in results:
                ratios[f"{key}_vs_bare_iobinding"] = round(results[key]["fps"] / io["fps"], 3)
        p99 = results["pipeline_paced"]["latency_ms"].get("p99")
        if p99:  # end-to-end latency of one frame (no queueing) against the engine alone
            ratios["pipeline_paced_p99_vs_bare_iobinding_p50"] = round(p99 / io["latency_ms"]["p50"], 3)
        live = results["pipeline_live"].get("latency_ms", {}).get("p99")
        if live:  # a live camera at its own rate, from its capture time stamp to the payload
            ratios["pipeline_live_p99_vs_bare_iobinding_p50"] = round(live / io["latency_ms"]["p50"], 3)
            paced_bare = results["bare_iobinding_live"].get("latency_ms", {}).get("p50")
            if paced_bare:
                ratios["pipeline_live_p99_vs_bare_iobinding_live_p50"] = round(live / paced_bare, 3)
    if ultra is not None:
        for key in ("pipeline_memory", "pipeline_memory_pinned"):
            if key in results:
                ratios[f"{key}_vs_ultralytics"] = round(results[key]["fps"] / ultra["fps"], 3)
    results["ratios"] = ratios
    if args.profile:
        results["profile_top10"] = profile_nodes(model, cfg.engine, tensor)
    print(format_table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


def format_table(r: dict[str, Any]) -> str:
    pl = r.get("placement") or {}
    lines = [f"model {Path(r['model']).name}  EP {r['providers'][0]}  threads {r['intra_op_threads']}  "
             f"input {r['input_shape']}  frames {'x'.join(str(v) for v in r.get('frame_size', []))}  "
             f"cuda_graph {r.get('cuda_graph', False)}",
             f"placement: nodes {pl.get('nodes', {})}, copies between devices {pl.get('memcpy_nodes', '-')}",
             f"{'path':<24}{'fps':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'cpu ms/f':>10}"]
    for key in ("bare", "bare_iobinding", "bare_iobinding_live", "pipeline_memory", "pipeline_memory_pinned",
                "pipeline_memory_cpu_pre",
                "pipeline_paced", "pipeline_live", "pipeline_file", "ultralytics"):
        if key not in r:
            continue
        row = r[key]
        if "error" in row:
            lines.append(f"{key:<24}  ({row['error']})")
            continue
        lat = row.get("latency_ms", {})
        lines.append(f"{key:<24}{row['fps']:>9.1f}{lat.get('p50', 0):>9.2f}{lat.get('p95', 0):>9.2f}"
                     f"{lat.get('p99', 0):>9.2f}{row.get('host_cpu_ms_per_frame', 0):>10.2f}")
    live = r.get("pipeline_live", {})
    if "decode" in live:
        lines.append(f"pipeline_live: {Path(live['clip']).name} at {live['source_fps']:g} fps, "
                     f"decode {live['decode']}, {live.get('frames_dropped', 0)} dropped")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items()))
    for row in r.get("profile_top10", []):
        lines.append(f"  {row['us_per_run']:>9.1f} us  {row['op']:<16} {row['provider']:<24} {row['node']}")
    return "\n".join(lines)
