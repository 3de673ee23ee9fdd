"""Host CPU time per Python thread, grouped by what the thread does.

`time.process_time()` says how much CPU the process used, not where. Every thread the agent
starts carries a name that says its job (agent.pipeline: infer- / launch- / post-<camera>,
agent.capture.reader: capture-<camera>, ONNX Runtime's run workers ort-run_<i> / ort-lane-<i>, paho's
paho-mqtt-client-..., the service's telemetry and sd-watchdog threads), so reading each live
Python thread's CPU clock at the start and the end of a window and grouping by name prefix splits
the process figure. What no Python thread accounts for is "native": threads started by ONNX
Runtime (its intra-op pool), OpenCV / FFmpeg (decoder threads), the CUDA driver and NVDEC, plus
the CPU of Python threads that exited inside the window (their clock cannot be read any more).

    window = ThreadCpuWindow()          # at the window's start
    ...                                 # the work
    seconds = window.stop()             # {"post": 0.41, "infer": 0.12, ..., "native": 1.3}
"""

from __future__ import annotations

import sys
import threading
import time
from typing import NamedTuple

NATIVE = "native"
OTHER = "other python"

# Name prefix -> group, first match wins. The names are set where the threads are created.
GROUPS: tuple[tuple[str, str], ...] = (
    ("capture-", "capture"),
    ("infer-", "infer"),
    ("launch-", "launch"),
    ("post-", "post"),
    ("ort-run", "ort-run"),
    ("ort-lane", "ort-lane"),  # agent.engines.ort_lanes
    ("paho-mqtt-client", "mqtt"),
    ("mqtt-", "mqtt"),
    ("telemetry", "telemetry"),
    ("sd-", "watchdog"),
    ("MainThread", "main"),
)


class ThreadCpu(NamedTuple):
    name: str
    seconds: float


def _cpu_clock(t: threading.Thread) -> int | None:
    """The thread's CPU clock id, or None when it has none (not started, or gone)."""
    if sys.platform.startswith("linux") and t.native_id is not None:
        # The kernel's id for a thread's CPU clock, computed from its TID (include/linux/posix-timers.h:
        # MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)); glibc's pthread_getcpuclockid returns the same.
        # Asking glibc would read the thread's pthread descriptor, which a detached thread frees
        # when it exits: a thread that ends between enumerate() and the read is a use-after-free
        # there, while the kernel answers EINVAL for a TID that is gone (and ignores TIDs of
        # other processes).
        return (~t.native_id << 3) | 6
    if t.ident is None or not t.is_alive():
        return None
    try:
        return time.pthread_getcpuclockid(t.ident)
    except (AttributeError, OSError):  # no per-thread clocks on this platform, or it just exited
        return None


def thread_cpu_times() -> dict[int, ThreadCpu]:
    """CPU seconds each live Python thread has used since it started, keyed by its native id.

    Keyed by id rather than name: names repeat (a model swap builds a second ort-run pool).
    A thread that ends while this runs is left out.
    """
    out: dict[int, ThreadCpu] = {}
    for t in threading.enumerate():
        clock = _cpu_clock(t)
        if clock is None:
            continue
        try:
            seconds = time.clock_gettime(clock)
        except OSError:  # exited after enumerate()
            continue
        out[t.native_id if t.native_id is not None else id(t)] = ThreadCpu(t.name, seconds)
    return out


def cpu_delta(before: dict[int, ThreadCpu], after: dict[int, ThreadCpu]) -> dict[int, ThreadCpu]:
    """CPU seconds each thread used between two `thread_cpu_times()` readings.

    A thread that started inside the window has used all its CPU inside it (it counts from 0);
    one that ended inside it is missing from `after` and its share stays in the process remainder.
    """
    out: dict[int, ThreadCpu] = {}
    for key, now in after.items():
        was = before.get(key)
        # a different name or a clock that went back: the id was reused by a new thread
        start = was.seconds if was is not None and was.name == now.name and was.seconds <= now.seconds else 0.0
        out[key] = ThreadCpu(now.name, now.seconds - start)
    return out


def group_of(name: str) -> str:
    """The group a thread name belongs to (GROUPS), OTHER when no prefix matches."""
    for prefix, group in GROUPS:
        if name.startswith(prefix):
            return group
    return OTHER


def by_group(delta: dict[int, ThreadCpu], process_s: float | None = None) -> dict[str, float]:
    """Seconds per group, largest first; with `process_s` (the process CPU over the same window)
    the rest is NATIVE (never below 0: the readings are not taken at the very same instant)."""
    groups: dict[str, float] = {}
    for t in delta.values():
        g = group_of(t.name)
        groups[g] = groups.get(g, 0.0) + t.seconds
    if process_s is not None:
        groups[NATIVE] = max(0.0, process_s - sum(groups.values()))
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


class ThreadCpuWindow:
    """Process and per-thread CPU from construction to `stop()`: seconds per group, with NATIVE."""

    def __init__(self) -> None:
        self._threads = thread_cpu_times()
        self._process = time.process_time()
        self.process_s: float | None = None  # the process CPU over the window, once stopped

    def stop(self) -> dict[str, float]:
        self.process_s = time.process_time() - self._process
        return by_group(cpu_delta(self._threads, thread_cpu_times()), self.process_s)
