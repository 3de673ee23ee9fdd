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
    window.tasks                        # {"post": TaskDelta(user_s, system_s, voluntary, involuntary), ...}

Where the CPU goes inside a group is the kernel's to say too (`task_counters`, Linux): every thread
of the process, native ones included, from /proc/self/task: user and system time (system is the
system calls: socket reads, driver ioctls) and context switches (voluntary: the thread slept and was
woken, once per wake-up; involuntary: the scheduler took the core away). Per frame, these say how
many times each kind of thread wakes for a frame and how much of its time is the kernel's.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
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


class TaskCounters(NamedTuple):
    """One thread's kernel counters since it started: CPU split into user and system, context switches."""

    name: str  # the Python thread's name; NATIVE for a thread Python did not start
    user_s: float
    system_s: float
    voluntary: int
    involuntary: int
    started: int = 0  # clock ticks after boot: a TID with another start is another thread


class TaskDelta(NamedTuple):
    """The same counters over a window, summed over a group of threads."""

    user_s: float = 0.0
    system_s: float = 0.0
    voluntary: int = 0
    involuntary: int = 0

    def add(self, other: TaskDelta) -> TaskDelta:
        return TaskDelta(self.user_s + other.user_s, self.system_s + other.system_s,
                         self.voluntary + other.voluntary, self.involuntary + other.involuntary)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_TASKS = Path("/proc/self/task")


def _read_task(tid: str, name: str) -> TaskCounters | None:
    try:
        stat = (_TASKS / tid / "stat").read_text()
        status = (_TASKS / tid / "status").read_text()
        # the command name in parentheses may hold spaces: the fields start after its last ")";
        # utime, stime and starttime are fields 14, 15 and 22 (proc(5)): the 12th, 13th and 20th after it
        fields = stat[stat.rfind(")") + 2:].split()
        switches = {k: int(v) for k, _, v in (line.partition(":\t") for line in status.splitlines())
                    if k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")}
        return TaskCounters(name, int(fields[11]) / _TICKS, int(fields[12]) / _TICKS,
                            switches.get("voluntary_ctxt_switches", 0),
                            switches.get("nonvoluntary_ctxt_switches", 0), int(fields[19]))
    except (OSError, IndexError, ValueError):  # the thread ended meanwhile (a file gone or cut short)
        return None


def task_counters() -> dict[int, TaskCounters]:
    """Every thread of this process, native ones included, keyed by its TID; {} without /proc."""
    try:
        tids = [e.name for e in os.scandir(_TASKS)]
    except OSError:
        return {}
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[int, TaskCounters] = {}
    for tid in tids:
        counters = _read_task(tid, names.get(int(tid), NATIVE))
        if counters is not None:
            out[int(tid)] = counters
    return out


def tasks_by_group(before: dict[int, TaskCounters], after: dict[int, TaskCounters]) -> dict[str, TaskDelta]:
    """The counters' growth between two readings, per group (GROUPS; NATIVE for native threads).

    As with cpu_delta: a thread started inside the window counts from 0; one that ended is left out."""
    groups: dict[str, TaskDelta] = {}
    for tid, read in after.items():
        was = before.get(tid)
        if was is not None and was.started != read.started:
            was = None  # the TID was reused by a thread started inside the window
        # a Python thread ending (joined, its TID not yet gone) has lost its name, not its counters
        now = read._replace(name=was.name) if was is not None and read.name == NATIVE else read
        if was is None or was.name != now.name:
            was = TaskCounters(now.name, 0.0, 0.0, 0, 0)  # started inside the window: counts from 0
        g = NATIVE if now.name == NATIVE else group_of(now.name)
        d = TaskDelta(now.user_s - was.user_s, now.system_s - was.system_s,
                      now.voluntary - was.voluntary, now.involuntary - was.involuntary)
        groups[g] = groups.get(g, TaskDelta()).add(d)
    return groups


class ThreadCpuWindow:
    """Process and per-thread CPU from construction to `stop()`: seconds per group, with NATIVE;
    after it, `tasks` (the kernel's counters per group, native threads included; {} without /proc)."""

    def __init__(self) -> None:
        self._tasks = task_counters()
        self._threads = thread_cpu_times()
        self._process = time.process_time()
        self.process_s: float | None = None  # the process CPU over the window, once stopped
        self.tasks: dict[str, TaskDelta] = {}

    def stop(self) -> dict[str, float]:
        self.process_s = time.process_time() - self._process
        groups = by_group(cpu_delta(self._threads, thread_cpu_times()), self.process_s)
        self.tasks = tasks_by_group(self._tasks, task_counters())
        return groups
