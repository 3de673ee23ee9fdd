"""agent/backoff.py: the one reconnect rule of the cameras, the MQTT client and the Sparkplug node."""

from __future__ import annotations

import random
import threading

from agent.backoff import Backoff
from agent.config import BackoffConfig


def test_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(BackoffConfig(initial_s=0.5, max_s=3.0, jitter=0.0), random.Random(1))
    assert [next(b) for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_jitter_stays_within_its_share_and_never_above_the_cap() -> None:
    cfg = BackoffConfig(initial_s=1.0, max_s=10.0, jitter=0.3)
    b = Backoff(cfg, random.Random(7))
    got = [b.next_delay() for _ in range(200)]
    bases = [min(1.0 * 2**i, 10.0) for i in range(200)]
    assert all(base * 0.7 - 1e-9 <= g <= min(base * 1.3, 10.0) + 1e-9 for g, base in zip(got, bases, strict=True))
    assert max(got) <= 10.0
    assert len({round(g, 6) for g in got[10:]}) > 50  # jittered, not a constant at the cap
    again = Backoff(cfg, random.Random(7))  # the rng is injectable: same seed, same waits
    assert [next(again) for _ in range(200)] == got


def test_the_floor_wins_over_a_smaller_cap() -> None:
    tiny = Backoff(BackoffConfig(initial_s=0.01, max_s=0.01, jitter=0.0), floor_s=0.05)
    assert tiny.next_delay() == 0.05  # an MQTT client never busy-loops against a dead broker


def test_many_attempts_stay_at_the_cap_and_threads_share_one_count() -> None:
    b = Backoff(BackoffConfig(initial_s=0.5, max_s=10.0, jitter=0.0))
    assert [b.next_delay() for _ in range(100)][-1] == 10.0
    b.reset()
    got: list[float] = []
    threads = [threading.Thread(target=lambda: got.extend(b.next_delay() for _ in range(50))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got)[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]  # each attempt counted once
