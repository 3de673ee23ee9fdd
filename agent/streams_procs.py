"""`edge-agent bench --streams N --processes K`: the N streams split over K agent processes.

Why: one process spends ~1.3 ms of host CPU per 1080p frame, most of it Python holding the GIL,
so one process stops near 30 streams of 1080p30 while the GPU would serve more. K processes,
each the service with its share of the cameras (what K agent instances run:
systemd/edge-agent@.service), run side by side. On a discrete GPU their CUDA contexts share
the GPU at once only under MPS (`nvidia-cuda-mps-control -d`); without it they time-slice it
(measured on the H200: docs/measurements/). The output says whether MPS was running.

Data flow: the parent makes the clip once -> K children `python -m agent.cli bench --streams n_i
--clip CLIP --json FILE`, started together; each waits at a barrier (files in a shared folder,
`EDGE_AGENT_BENCH_BARRIER`) once its cameras run and again before its limit rows, so the
measuring windows and the limit rows overlap -> the parent merges: total fps, the worst stream,
host CPU per frame (frame-weighted), and the limits summed (measured at once: what the GPU gives
K processes together). --find-max searches N (>= K) the same way as one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_BARRIER_ENV = "EDGE_AGENT_BENCH_BARRIER"  # "FOLDER:K", set by the parent for its children
_BARRIER_WAIT_S = 240.0  # a child that died never arrives: the others go on after this
_CHILD_WAIT_S = 600.0  # one run of a child: start, warm-up, window, limit rows


def mps_running(proc: Path = Path("/proc")) -> bool:
    """True when an MPS control daemon runs on this host (its pipe files outlive it: not a sign)."""
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith("nvidia-cuda-mps"):  # nvidia-cuda-mps-control, as the kernel cuts it
                return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def barrier(name: str) -> None:
    """Wait until every child of the parent's run reached `name` (no-op outside such a run)."""
    spec = os.environ.get(_BARRIER_ENV)
    if not spec:
        return
    folder, _, count = spec.rpartition(":")
    here = Path(folder)
    (here / f"{name}.{os.getpid()}").touch()
    deadline = time.monotonic() + _BARRIER_WAIT_S
    while len(list(here.glob(f"{name}.*"))) < int(count):
        if time.monotonic() > deadline:
            print(f"bench: barrier {name}: not every process arrived in {_BARRIER_WAIT_S:.0f} s; going on",
                  file=sys.stderr)
            return
        time.sleep(0.05)


def split(n: int, k: int) -> list[int]:
    """n streams over k processes, as evenly as they go (the first ones take the remainder)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _child_command(args: argparse.Namespace, clip: Path, n: int, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "agent.cli", "bench", "--streams", str(n), "--clip", str(clip),
           "--codec", args.codec, "--decode", args.decode, "--source", args.source, "--fps", str(args.fps),
           "--rtsp-transport", getattr(args, "rtsp_transport", "tcp"),
           "--seconds", str(args.seconds), "--json", str(out)]
    for flag, value in (("-c", args.config), ("--model", args.model), ("--size", getattr(args, "size", None))):
        if value:
            cmd += [flag, str(value)]
    return cmd


def measure(args: argparse.Namespace, clip: Path, n: int, k: int, work: Path) -> dict[str, Any]:
    """One run of n streams over k processes; the merged figures (agent.streams_bench's row keys)."""
    trial = work / f"procs-{n}x{k}-{time.monotonic_ns()}"
    trial.mkdir(parents=True)
    env = {**os.environ, _BARRIER_ENV: f"{trial}:{k}"}
    procs, logs = [], []
    for i, share in enumerate(split(n, k)):
        log = open(trial / f"p{i}.log", "wb")  # noqa: SIM115 - closed below, after the child ends
        logs.append(log)
        procs.append(subprocess.Popen(_child_command(args, clip, share, trial / f"p{i}.json"), env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    _wait_all(procs, _CHILD_WAIT_S)
    parts: list[dict[str, Any]] = []
    failed: list[str] = []
    for i, p in enumerate(procs):
        rc = p.returncode
        logs[i].close()
        out = trial / f"p{i}.json"
        if rc != 0 or not out.is_file():
            tail = (trial / f"p{i}.log").read_text(errors="replace").strip().splitlines()[-5:]
            failed.append(f"process {i} exited {rc}: " + " | ".join(tail))
            continue
        parts.append(json.loads(out.read_text()))
    if failed:
        raise RuntimeError("; ".join(failed))
    return merge(parts)


def _wait_all(procs: list[subprocess.Popen[bytes]], limit_s: float) -> None:
    """Wait for every child; once one fails (or the limit passes) stop the others at once: they
    would otherwise wait out the barrier for the one that is gone."""
    deadline = time.monotonic() + limit_s
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return
        time.sleep(0.1)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The K processes' results as one run plus the limits summed."""
    runs = [p["runs"][str(p["streams"])] for p in parts]
    total = sum(r["total_fps"] for r in runs) or 1.0

    def weighted(key: str) -> float:
        return round(sum(r[key] * r["total_fps"] for r in runs) / total, 3)

    def per_kind(key: str) -> dict[str, float]:
        """A per-frame figure by thread kind over all the processes' frames."""
        sums: dict[str, float] = {}
        for r in runs:
            for g, v in (r.get(key) or {}).items():
                sums[g] = sums.get(g, 0.0) + v * r["total_fps"]
        return {g: round(v / total, 3) for g, v in sums.items()}

    def share_by_kind(key: str) -> dict[str, float]:
        """A share of a kind's CPU over the processes, each weighted by its CPU in that kind."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for r in runs:
            cpu = r.get("host_cpu_ms_per_frame_by_thread") or {}
            for g, v in (r.get(key) or {}).items():
                w = cpu.get(g, 0.0) * r["total_fps"] or r["total_fps"]  # CPU per second (frames when unknown)
                sums[g] = sums.get(g, 0.0) + v * w
                weights[g] = weights.get(g, 0.0) + w
        return {g: round(v / weights[g], 3) for g, v in sums.items() if weights[g] > 0}

    threads = per_kind("host_cpu_ms_per_frame_by_thread")
    streams = [{**s, "camera": f"p{i}.{s['camera']}"} for i, r in enumerate(runs) for s in r["per_stream"]]
    row = {"streams": sum(r["streams"] for r in runs), "per_stream": streams,
           "total_fps": round(sum(r["total_fps"] for r in runs), 2),
           "host_cpu_ms_per_frame": weighted("host_cpu_ms_per_frame"),
           "host_cpu_ms_per_frame_by_thread": threads,
           # the kernel's counters, per frame (agent.streams_bench._task_figures)
           **{k: per_kind(k) for k in ("wakeups_per_frame_by_thread", "preempted_per_frame_by_thread")
              if any(r.get(k) for r in runs)},
           **({"system_share_by_thread": share_by_kind("system_share_by_thread")}
              if any(r.get("system_share_by_thread") for r in runs) else {}),
           "worst_p99_ms": max(r["worst_p99_ms"] for r in runs), "min_fps": min(r["min_fps"] for r in runs),
           "max_fps": max(r.get("max_fps", r["min_fps"]) for r in runs),
           "dropped": sum(r["dropped"] for r in runs), "reconnects": sum(r.get("reconnects", 0) for r in runs),
           "decode_errors": sum(r.get("decode_errors", 0) for r in runs),
           # each process sees the others' allocations too: a per-process figure would mislead
           "gpu_mem_mb": None, "model_loads": sum(r.get("model_loads") or 0 for r in runs),
           "goal_held": all(r["goal_held"] for r in runs), "processes": len(runs)}
    settles = [r for r in runs if r.get("settle_s") is not None]  # RTSP: each process waited for its streams
    if settles:
        row["settle_s"] = max(r["settle_s"] for r in settles)
        row["settled"] = all(r.get("settled") is not False for r in settles)
    limits = [p.get("engine_limit") or {} for p in parts]
    engine = {"contexts": sum(e.get("contexts") or 0 for e in limits),
              "inferences_per_s": round(sum(e.get("inferences_per_s") or 0.0 for e in limits), 1),
              "preprocess": limits[0].get("preprocess"), "graph_lanes": limits[0].get("graph_lanes"),
              "per_process": [e.get("inferences_per_s") for e in limits], "measured": "in every process at once"}
    nvdec = [p["nvdec_limit"] for p in parts if "nvdec_limit" in p]
    merged: dict[str, Any] = {"run": row, "engine_limit": engine}
    if nvdec:
        merged["nvdec_limit"] = {"decoders": sum(d.get("decoders") or 0 for d in nvdec),
                                 "frames_per_s": round(sum(d.get("frames_per_s") or 0.0 for d in nvdec), 1)}
    return merged
