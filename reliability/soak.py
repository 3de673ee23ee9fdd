"""Soak: the service on the demo video at its own rate for an hour (`--set soak_s=28800`: 8 hours).

Reuses scripts/measure_service.py (`config`, `one_start`, `latency_windows`): one agent process
with a warm-up to its first detection, then `soak_s` of sampling every 5 s (RSS, open fds,
threads, CPU, frames) and the agent's own `latency_ms` percentiles per window (600 s; 20 s quick).
RSS "start" is the first sample, 5 s after the first detection (the engine is loaded, its
arenas are warm), "end" the last one. Progress lines come from this thread, reading the same
process with psutil, once per window.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil

from agent.config import DEMO_MODEL, DEMO_VIDEO
from reliability.common import Context, ScenarioResult
from scripts.measure_service import config, one_start
from tests.support.broker import Broker

RSS_GROWTH_MB = 5.0
GOAL = f"RSS growth < {RSS_GROWTH_MB:g} MB; no fd / thread growth"


def _agent_of(cfg: str) -> psutil.Process | None:
    """The agent process this scenario started (our child running with `cfg`), if alive."""
    for p in psutil.Process().children(recursive=False):
        try:
            if cfg in p.cmdline():
                return p
        except psutil.Error:
            continue
    return None


def soak(ctx: Context) -> ScenarioResult:
    soak_s = ctx.param("soak_s", 60 if ctx.quick else 3600)
    window_s = ctx.param("window_s", 20 if ctx.quick else 600)
    bdir = ctx.work / "broker"
    bdir.mkdir()
    broker = Broker(bdir).start()
    cfg = config(ctx.work, broker.port, DEMO_MODEL, DEMO_VIDEO, ctx.work / "cache")
    box: dict[str, Any] = {}
    # not Thread.is_alive(): a join() cut short by Ctrl-C can leave it False while the thread runs (3.11)
    done = threading.Event()

    def run() -> None:
        try:
            box["result"] = one_start(cfg, broker, ctx.work, soak_s, window_s)
        except BaseException as exc:  # reported by the scenario, not lost in a thread
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=run, name="soak", daemon=True)
    t0 = time.monotonic()
    try:
        worker.start()
        ctx.log(f"soak {soak_s:g} s on the demo video, latency windows of {window_s:g} s")
        while not done.wait(window_s):
            p = _agent_of(str(cfg))
            if p is not None:
                try:
                    ctx.log(f"{time.monotonic() - t0:.0f} s: RSS {p.memory_info().rss / 2**20:.1f} MB, "
                            f"fds {p.num_fds()}, threads {p.num_threads()}")
                except psutil.Error:
                    pass
    finally:
        if not done.is_set():  # interrupted (Ctrl-C): end the agent we started, by its pid
            p = _agent_of(str(cfg))
            if p is not None:
                p.kill()
            done.wait(10)
        broker.stop()
    if "error" in box:
        raise box["error"]
    r: dict[str, Any] = box["result"]
    s = r["samples"]
    if not s:
        raise RuntimeError("the soak took no samples (soak_s under 5 s?)")
    first, last = s[0], s[-1]
    growth = round(last["rss_mb"] - first["rss_mb"], 1)
    # a short soak's growth is mostly warm-up (allocator arenas, caches): the rate is a figure, not the goal
    per_h = round(growth / max(last["t"] - first["t"], 1e-3) * 3600, 1)
    fd_growth, thread_growth = last["fds"] - first["fds"], last["threads"] - first["threads"]
    fps = round(last["frames"] / max(last["t"], 1e-3), 2)
    windows = r["latency_windows"]
    met = growth < RSS_GROWTH_MB and fd_growth <= 0 and thread_growth <= 0 and r["exit_code"] == 0
    misses = []
    if growth >= RSS_GROWTH_MB:
        misses.append(f"RSS grew {growth:+} MB (peak {max(x['rss_mb'] for x in s)} MB)")
    if fd_growth > 0 or thread_growth > 0:
        misses.append("fds or threads grew")
    if r["exit_code"] != 0:
        misses.append(f"agent exit status {r['exit_code']} at SIGTERM")
    p99s = [w["p99_ms"] for w in windows]
    cpu = round(sum(x["cpu_percent"] for x in s) / len(s), 1)
    summary = (f"{soak_s:g} s at {fps} fps, CPU {cpu} % of a core: RSS {first['rss_mb']} -> {last['rss_mb']} MB "
               f"({growth:+} MB; {per_h:+} MB/h if linear), fds {first['fds']} -> {last['fds']}, threads "
               f"{first['threads']} -> {last['threads']}, latency p99 per {window_s:g} s window "
               f"{min(p99s, default=0)}-{max(p99s, default=0)} ms")
    notes = [*misses, summary]
    return ScenarioResult(
        name="soak", cycles=len(windows), goal=GOAL, met=met, lost="-", note="; ".join(notes),
        details={"soak_s": soak_s, "window_s": window_s, "fps": fps, "rss_mb_start": first["rss_mb"],
                 "rss_mb_end": last["rss_mb"], "rss_growth_mb": growth, "rss_growth_mb_per_h": per_h,
                 "rss_mb_peak": max(x["rss_mb"] for x in s), "fds_start_end": [first["fds"], last["fds"]],
                 "threads_start_end": [first["threads"], last["threads"]],
                 "cpu_percent_mean": cpu,
                 "first_detection_s": r["first_detection_s"], "ready_s": r["ready_s"],
                 "sigterm_to_exit_s": r["sigterm_to_exit_s"], "exit_code": r["exit_code"],
                 "latency_windows": windows, "samples": s},
    )


SCENARIOS = {"soak": soak}
