#!/usr/bin/env python3
"""Service figures, measured on real processes: start to READY and to the first detection with an
empty and with a warm engine cache (same run), SIGTERM to exit, and CPU share / RSS at the demo
video's rate (optionally a longer soak: RSS growth, threads, open files, latency per window).

    python scripts/measure_service.py [--model M] [--video V] [--steady 60] [--soak 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import DEMO_MODEL, DEMO_VIDEO  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.mqtt import Collector  # noqa: E402


class Notify:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.seen: dict[str, float] = {}
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536).decode()
            except (TimeoutError, OSError):
                continue
            for line in data.splitlines():
                key = line.split("=")[0]
                self.seen.setdefault(key, time.monotonic())

    def close(self) -> None:
        self._stop = True
        self._t.join(1)
        self.sock.close()


def config(work: Path, port: int, model: Path, video: Path, cache: Path) -> Path:
    cfg = {"device_id": "bench", "log_level": "warning",
           "cameras": [{"id": "cam0", "source": str(video), "pace": True, "loop": True}],
           "model": {"path": str(model)}, "mqtt": {"port": port}, "cache": {"dir": str(cache)},
           "updates": {"enabled": False, "models_dir": str(work / "models")},
           "telemetry": {"period_s": 10}}
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def latency_windows(messages: list[Any], t0: float, window_s: float) -> list[dict[str, Any]]:
    """Capture-to-publish latency (the agent's own `latency_ms`) percentiles per window of the hold."""
    buckets: dict[int, list[float]] = {}
    for m in messages:
        try:
            ms = float(json.loads(m.payload)["latency_ms"])
        except (ValueError, KeyError, TypeError):
            continue
        buckets.setdefault(int((m.at - t0) // window_s), []).append(ms)
    out = []
    for k in sorted(buckets):
        v = sorted(buckets[k])
        def pct(q: float, v: list[float] = v) -> float:
            return round(v[min(len(v) - 1, int(q * len(v)))], 2)
        out.append({"from_s": k * window_s, "frames": len(v), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                    "max_ms": round(v[-1], 2)})
    return out


def one_start(cfg: Path, broker: Broker, work: Path, hold_s: float, window_s: float = 600.0) -> dict[str, Any]:
    sock = work / f"notify-{time.monotonic_ns()}.sock"
    notify = Notify(sock)
    col = Collector(broker.host, broker.port, ["edge/bench/cam0/detections"])
    env = {**os.environ, "NOTIFY_SOCKET": str(sock), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        col.wait_for(lambda m: len(m) > 0, timeout=600)
        first = col.messages[0].at - t0
        deadline = time.monotonic() + 30
        while "READY" not in notify.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        ready = notify.seen.get("READY", float("nan")) - t0
        samples = []
        p = psutil.Process(proc.pid)
        p.cpu_percent(None)
        start_frames = len(col.messages)
        t_hold = time.monotonic()
        while time.monotonic() - t_hold < hold_s:
            time.sleep(min(5.0, hold_s))
            samples.append({"t": round(time.monotonic() - t_hold, 1), "cpu_percent": p.cpu_percent(None),
                             "rss_mb": round(p.memory_info().rss / 2**20, 1), "threads": p.num_threads(),
                             "fds": p.num_fds(), "frames": len(col.messages) - start_frames})
        windows = latency_windows(col.messages[start_frames:], t_hold, window_s)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        stop = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
        notify.close()
    return {"first_detection_s": round(first, 3), "ready_s": round(ready, 3), "sigterm_to_exit_s": round(stop, 3),
            "exit_code": code, "samples": samples, "latency_windows": windows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--video", type=Path, default=DEMO_VIDEO)
    ap.add_argument("--steady", type=float, default=60.0, help="seconds of CPU / RSS sampling at the video rate")
    ap.add_argument("--soak", type=float, default=0.0, help="extra soak seconds (RSS growth); 3600 for an hour")
    ap.add_argument("--window", type=float, default=600.0, help="latency percentile window, seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-measure-"))
    broker = Broker(work).start()
    cache = work / "cache"
    try:
        cfg = config(work, broker.port, args.model, args.video, cache)
        cold = one_start(cfg, broker, work, 0)
        warm = one_start(cfg, broker, work, args.steady + args.soak, args.window)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    s = warm["samples"]
    out: dict[str, Any] = {
        "model": str(args.model), "video": str(args.video), "cpus": os.cpu_count(), "ts": round(time.time()),
        "cold": {k: v for k, v in cold.items() if k != "samples"},
        "warm": {k: v for k, v in warm.items() if k != "samples"},
        "warm_vs_cold_first_detection": round(warm["first_detection_s"] / cold["first_detection_s"], 3),
        "samples": s,
        "latency_windows": warm["latency_windows"],
    }
    if s:
        steady = [x for x in s if x["t"] <= args.steady] or s
        out["cpu_percent_mean"] = round(sum(x["cpu_percent"] for x in steady) / len(steady), 1)
        out["rss_mb_start"], out["rss_mb_end"] = s[0]["rss_mb"], s[-1]["rss_mb"]
        out["rss_growth_mb"] = round(s[-1]["rss_mb"] - s[0]["rss_mb"], 1)
        out["threads_start_end"] = [s[0]["threads"], s[-1]["threads"]]
        out["fds_start_end"] = [s[0]["fds"], s[-1]["fds"]]
        out["fps"] = round(s[-1]["frames"] / max(s[-1]["t"], 1e-3), 2)
    print(f"{'start':<8}{'first detection s':>19}{'READY s':>10}{'SIGTERM->exit s':>17}")
    for name in ("cold", "warm"):
        r = out[name]
        print(f"{name:<8}{r['first_detection_s']:>19.3f}{r['ready_s']:>10.3f}{r['sigterm_to_exit_s']:>17.3f}")
    print(f"warm / cold first detection: {out['warm_vs_cold_first_detection']}")
    if s:
        print(f"steady state at the video rate: {out['fps']} fps, CPU {out['cpu_percent_mean']} % of one core, "
              f"RSS {out['rss_mb_start']} -> {out['rss_mb_end']} MB ({out['rss_growth_mb']:+} MB), "
              f"threads {out['threads_start_end']}, fds {out['fds_start_end']}")
    for w in out["latency_windows"]:
        print(f"  from {w['from_s']:>6.0f} s: {w['frames']} frames, latency p50 {w['p50_ms']} ms, "
              f"p99 {w['p99_ms']} ms, max {w['max_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
