"""Reconnect waits, one rule for the cameras, the MQTT client and the Sparkplug node."""

from __future__ import annotations

import random
import threading

from agent.config import BackoffConfig

__all__ = ["Backoff"]


class Backoff:
    """`initial_s`, doubling up to `max_s`, each moved by up to +/- `jitter` of itself, then kept
    within [`floor_s`, `max_s`] (the floor wins: a broker client never busy-loops). `reset()` after
    a success starts again at `initial_s`.

    Thread-safe (paho's thread asks for the next wait while the connect callback resets it), and
    an iterator: `next(backoff)` is `backoff.next_delay()`."""

    def __init__(self, cfg: BackoffConfig, rng: random.Random | None = None, floor_s: float = 0.0) -> None:
        self.cfg = cfg
        self._rng = rng or random.Random()
        self._floor = floor_s
        self._lock = threading.Lock()
        self._attempt = 0

    def next_delay(self) -> float:
        c = self.cfg
        with self._lock:
            base = min(c.initial_s * (2 ** min(self._attempt, 30)), c.max_s)
            self._attempt += 1
        jitter = self._rng.uniform(-c.jitter, c.jitter) if c.jitter > 0 else 0.0
        return max(self._floor, min(c.max_s, base * (1.0 + jitter)))

    def reset(self) -> None:
        with self._lock:
            self._attempt = 0

    def __iter__(self) -> Backoff:
        return self

    def __next__(self) -> float:
        return self.next_delay()
