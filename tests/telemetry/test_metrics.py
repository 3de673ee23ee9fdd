"""RateMeter: events per second from the timestamps in its window (the fps of telemetry, STATUS and
the ready line)."""

from __future__ import annotations

import pytest

from agent.telemetry.metrics import RateMeter


def _meter(stamps: list[float]) -> RateMeter:
    m = RateMeter(window_s=5.0)
    for t in stamps:
        m.tick(t)
    return m


@pytest.mark.parametrize("n", [2, 3, 5, 15, 75, 300])
def test_rate_of_a_steady_stream_is_its_rate(n: int) -> None:
    """Two frames of a 15 fps video are one interval: 15, not 30 (n / span read 31 and 21 at start)."""
    stamps = [i / 15 for i in range(n)]
    now = stamps[-1] + 0.01  # between two frames
    assert _meter(stamps).rate(now) == pytest.approx(15.0, rel=0.02)


def test_rate_falls_when_frames_stop() -> None:
    stamps = [i / 15 for i in range(30)]
    m = _meter(stamps)
    rates = [m.rate(stamps[-1] + dt) for dt in (0.01, 1.0, 2.0, 4.0)]
    assert rates[0] == pytest.approx(15.0, rel=0.02)
    assert rates == sorted(rates, reverse=True) and rates[2] < 10.0, rates
    assert m.rate(stamps[-1] + 6.0) == 0.0  # nothing left in the window


def test_rate_needs_two_frames() -> None:
    assert _meter([]).rate(1.0) == 0.0
    assert _meter([0.5]).rate(1.0) == 0.0
