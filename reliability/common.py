"""What every reliability scenario shares: its result record, sizes, percentiles and a work folder.

A scenario is a function `run(ctx) -> ScenarioResult`. It drives real processes (the agent,
mosquitto, HTTP / MJPEG servers) and reports what was lost and how long recovery took per cycle.
A missed goal is reported, never tuned away; `hard` marks the safety invariants (a corrupt engine
served, an incomplete model, an attack accepted, a fuzz crash) whose failure fails the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """What the runner hands a scenario."""

    work: Path  # a fresh folder the scenario owns (removed after the run unless --keep)
    quick: bool  # CI size: few cycles, seconds not minutes
    seed: int
    log: Callable[[str], None]  # one progress line (the runner prefixes the scenario's name)
    params: dict[str, str] = field(default_factory=dict)  # `--set key=value` from the command line

    def cycles(self, full: int, quick: int) -> int:
        """Cycle count for this size; `--set cycles=N` overrides both (for a shorter release rehearsal)."""
        if "cycles" in self.params:
            return int(self.params["cycles"])
        return quick if self.quick else full

    def param(self, key: str, default: float) -> float:
        return float(self.params.get(key, default))


@dataclass
class ScenarioResult:
    name: str
    cycles: int
    goal: str  # the goal in words, e.g. "0 lost; reconnect <= 2 s"
    met: bool | None  # None: nothing to judge (a figure only)
    lost: str  # what was lost, in words: "0 of 12000 messages", "0 corrupt engines loaded"
    recovery_s: list[float] = field(default_factory=list)  # one per cycle where recovery applies
    hard: bool = False  # a safety invariant: not met fails the run
    note: str = ""  # why a goal was missed, or what the figure means
    details: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def recovery(self) -> dict[str, float | None]:
        return {"p50": percentile(self.recovery_s, 50), "p99": percentile(self.recovery_s, 99),
                "max": max(self.recovery_s) if self.recovery_s else None}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recovery"] = self.recovery()
        return d


Scenario = Callable[[Context], ScenarioResult]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every figure is one that was measured)."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> float | None:
    """Seconds until `pred()` held, or None on timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)
