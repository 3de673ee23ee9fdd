"""Per-stage timings in fixed-size rings (bounded memory) and the percentiles telemetry reports."""

from __future__ import annotations

import threading
import time

import numpy as np

PERCENTILES = (50, 95, 99)


class Ring:
    """The last `size` samples of one figure, kept in a preallocated array."""

    def __init__(self, size: int = 2048) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, value: float) -> None:
        self._buf[self._n % len(self._buf)] = value
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def values(self) -> np.ndarray:
        return self._buf[: min(self._n, len(self._buf))].copy()

    def summary(self) -> dict[str, float]:
        v = self.values()
        if v.size == 0:
            return {}
        p = np.percentile(v, PERCENTILES)
        return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3),
                "max": round(float(v.max()), 3), "n": int(v.size)}


class StageTimes:
    """Milliseconds per stage ("preprocess", "infer", ...) plus "e2e"; thread-safe."""

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._rings: dict[str, Ring] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            ring = self._rings.get(stage)
            if ring is None:
                ring = self._rings[stage] = Ring(self._size)
            ring.add(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {stage: ring.summary() for stage, ring in self._rings.items()}

    def values(self, stage: str) -> np.ndarray:
        with self._lock:
            ring = self._rings.get(stage)
            return ring.values() if ring is not None else np.zeros(0)


class RateMeter:
    """Events per second over a sliding window of timestamps."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._stamps = Ring(4096)
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        with self._lock:
            self._stamps.add(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            v = self._stamps.values()
        recent = v[v >= now - self.window_s]
        if recent.size < 2:
            return 0.0
        # n stamps are n - 1 intervals (n / span read 30 fps off two frames of a 15 fps video); the
        # span ends at the newest stamp while frames keep coming, and runs on to `now` when they stop
        first, last = float(recent.min()), float(recent.max())
        period = (last - first) / (recent.size - 1)
        span = max(max(last, now - period) - first, 1e-6)
        return round(float((recent.size - 1) / span), 2)
