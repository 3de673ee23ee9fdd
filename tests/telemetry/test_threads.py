"""CPU time per thread kind: real threads doing real work, read through the kernel's per-thread clocks."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from agent.telemetry.threads import (
    NATIVE,
    OTHER,
    TaskCounters,
    TaskDelta,
    ThreadCpu,
    ThreadCpuWindow,
    _cpu_clock,
    by_group,
    cpu_delta,
    group_of,
    task_counters,
    tasks_by_group,
    thread_cpu_times,
)


def _spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += sum(range(200))


def _start(name: str, target: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the TID-based clock id is Linux's")
def test_the_clock_is_the_one_pthread_getcpuclockid_gives() -> None:
    assert _cpu_clock(threading.current_thread()) == time.pthread_getcpuclockid(threading.get_ident())


def test_a_busy_thread_shows_more_cpu_than_an_idle_one() -> None:
    stop = threading.Event()
    busy = _start("post-x", _spin, stop)
    idle = _start("infer-x", stop.wait)
    try:
        window = ThreadCpuWindow()
        before = thread_cpu_times()
        time.sleep(0.5)
        delta = cpu_delta(before, thread_cpu_times())
        groups = window.stop()
    finally:
        stop.set()
        busy.join(5)
        idle.join(5)
    spent = {t.name: t.seconds for t in delta.values()}
    # 2 shared cores: the spinning thread gets far less than 0.5 s when others load the box, but
    # it still runs; the waiting one wakes never
    assert spent["post-x"] > 0.05
    assert spent["infer-x"] < 0.01
    assert spent["post-x"] > 10 * spent["infer-x"]
    assert groups["post"] > 0.05 and groups["post"] > 10 * groups.get("infer", 0.0)
    assert window.process_s is not None and groups["post"] <= window.process_s + 0.01


def test_groups_and_the_native_remainder() -> None:
    names = {"capture-cam1": "capture", "infer-cam1": "infer", "launch-cam1": "launch", "post-cam1": "post",
             "ort-run_0": "ort-run", "ort-lane-1": "ort-lane", "paho-mqtt-client-agent": "mqtt",
             "mqtt-sender": "mqtt", "telemetry": "telemetry", "sd-watchdog": "watchdog", "sd-status": "watchdog",
             "MainThread": "main", "Thread-3": OTHER, "Thread-4 (serve_forever)": OTHER, "updates": OTHER}
    for name, group in names.items():
        assert group_of(name) == group, name
    delta = {1: ThreadCpu("post-a", 0.3), 2: ThreadCpu("post-b", 0.2), 3: ThreadCpu("Thread-9", 0.1),
             4: ThreadCpu("capture-a", 0.05)}
    groups = by_group(delta, process_s=1.0)
    assert groups["post"] == pytest.approx(0.5) and groups[OTHER] == pytest.approx(0.1)
    assert groups[NATIVE] == pytest.approx(0.35)
    assert list(groups) == ["post", NATIVE, OTHER, "capture"]  # largest first
    assert by_group(delta, process_s=0.5)[NATIVE] == 0.0  # readings a hair apart: never negative
    assert NATIVE not in by_group(delta)


def test_a_reused_id_counts_as_a_new_thread() -> None:
    before = {7: ThreadCpu("post-a", 2.0), 8: ThreadCpu("infer-a", 1.0)}
    after = {7: ThreadCpu("ort-run_0", 0.25), 8: ThreadCpu("infer-a", 1.5)}
    delta = cpu_delta(before, after)
    assert delta[7] == ThreadCpu("ort-run_0", 0.25)
    assert delta[8].seconds == pytest.approx(0.5)


def test_threads_that_end_or_start_inside_the_window() -> None:
    stop_early, stop_late = threading.Event(), threading.Event()
    early = _start("capture-gone", _spin, stop_early)
    window = ThreadCpuWindow()
    before = thread_cpu_times()
    assert any(t.name == "capture-gone" for t in before.values())
    time.sleep(0.1)
    stop_early.set()
    early.join(5)
    assert not early.is_alive()
    late = _start("launch-new", _spin, stop_late)
    time.sleep(0.3)
    try:
        after = thread_cpu_times()
        groups = window.stop()
    finally:
        stop_late.set()
        late.join(5)
    delta = cpu_delta(before, after)
    names = {t.name for t in delta.values()}
    assert "capture-gone" not in names  # gone: its CPU stays in the process remainder
    # started inside the window: all of its CPU is the window's
    assert groups["launch"] > 0.02
    # the exited thread spun ~0.1 s inside the window with the GIL to itself: that lands in the rest
    assert window.process_s is not None and groups[NATIVE] > 0.01
    assert sum(groups.values()) == pytest.approx(window.process_s)


def _sleep_often(done: threading.Event, stop: threading.Event) -> None:
    for _ in range(150):  # each sleep is a wake-up: one voluntary context switch
        time.sleep(0.002)
    done.set()
    stop.wait()


def _system_calls(done: threading.Event, stop: threading.Event) -> None:
    for _ in range(150_000):  # a fixed amount of work, not a time: the threads share the GIL and 2 cores
        os.stat("/")  # mostly kernel time
    done.set()
    stop.wait()


def _python_only(done: threading.Event, stop: threading.Event) -> None:
    for _ in range(40_000):
        sum(range(500))  # user time only
    done.set()
    stop.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="the kernel's per-thread counters are Linux's /proc")
def test_the_kernel_counts_each_kinds_wakeups_and_system_time() -> None:
    stop = threading.Event()
    window = ThreadCpuWindow()
    work = {"post-w": _sleep_often, "capture-s": _system_calls, "infer-u": _python_only}
    done = {name: threading.Event() for name in work}
    threads = [_start(name, fn, done[name], stop) for name, fn in work.items()]
    try:
        assert all(d.wait(60) for d in done.values())
        window.stop()  # the threads still live: their counters are read
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    tasks = window.tasks
    assert tasks["post"].voluntary >= 100  # 150 sleeps (a sleep the scheduler cut short may not count)
    for g in ("capture", "infer"):
        assert tasks[g].user_s + tasks[g].system_s >= 0.05, tasks  # enough clock ticks to compare
    sys_share = {g: tasks[g].system_s / (tasks[g].user_s + tasks[g].system_s) for g in ("capture", "infer")}
    assert sys_share["capture"] > sys_share["infer"] + 0.2, (sys_share, tasks)
    assert all(d.voluntary >= 0 and d.involuntary >= 0 for d in tasks.values())
    assert "main" in tasks
    assert task_counters()[threading.main_thread().native_id].name == "MainThread"  # type: ignore[index]


def test_task_counters_by_group() -> None:
    before = {1: TaskCounters("post-a", 1.0, 0.5, 100, 3, 10), 2: TaskCounters("capture-a", 2.0, 1.0, 50, 1, 11),
              3: TaskCounters(NATIVE, 0.1, 0.1, 10, 0, 12), 4: TaskCounters("infer-a", 1.0, 0.0, 40, 0, 13),
              6: TaskCounters("launch-a", 1.0, 0.5, 10, 5, 14)}
    after = {1: TaskCounters("post-a", 1.5, 0.75, 160, 4, 10),
             2: TaskCounters(NATIVE, 2.5, 1.5, 70, 1, 11),  # a Python thread ending: joined, TID still listed
             3: TaskCounters(NATIVE, 0.3, 0.2, 15, 2, 12),
             4: TaskCounters("ort-run_0", 0.2, 0.1, 5, 0, 90),  # the TID reused by a new thread: counts from 0
             5: TaskCounters("post-b", 0.1, 0.0, 7, 0, 91),  # started inside the window
             6: TaskCounters(NATIVE, 0.1, 0.0, 20, 0, 92)}  # reused by a native thread: never negative
    groups = tasks_by_group(before, after)
    assert groups["post"] == TaskDelta(pytest.approx(0.6), pytest.approx(0.25), 67, 1)
    assert groups["capture"] == TaskDelta(pytest.approx(0.5), pytest.approx(0.5), 20, 0)
    assert groups[NATIVE] == TaskDelta(pytest.approx(0.3), pytest.approx(0.1), 25, 2)
    assert groups["ort-run"] == TaskDelta(0.2, 0.1, 5, 0)
    assert "infer" not in groups and "launch" not in groups
