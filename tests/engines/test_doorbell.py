"""The post thread's doorbell (agent.engines.doorbell): libc's real POSIX semaphores; the CUDA driver
that rings it after GPU work cannot exist here, so a recording stand-in takes cuLaunchHostFunc's
arguments and, as the driver's own thread would, calls the function pointer natively with them."""

from __future__ import annotations

import ctypes
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from agent.engines import cuda
from agent.engines.doorbell import Doorbell
from tests.engines.test_cuda_driver import RecordingLibcuda


def test_a_ring_before_the_wait_is_not_lost_and_rings_count() -> None:
    bell = Doorbell()
    bell.ring()
    bell.ring()
    assert bell.wait(1.0) and bell.wait(1.0)  # two rings: two waits return at once
    t0 = time.monotonic()
    assert not bell.wait(0.1)  # none left: it waits its timeout
    assert 0.08 <= time.monotonic() - t0 < 2.0
    assert not bell.wait(0.0) and not bell.wait(-1.0)


def test_a_ring_from_another_thread_wakes_the_waiter_and_the_wait_releases_the_gil() -> None:
    bell = Doorbell()
    spins = [0]
    stop = threading.Event()

    def spin() -> None:  # Python work: it only runs while the waiter has let go of the GIL
        while not stop.is_set():
            spins[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    threading.Timer(0.2, bell.ring).start()
    t0 = time.monotonic()
    try:
        assert bell.wait(10.0)
    finally:
        stop.set()
        spinner.join(5)
    assert 0.15 <= time.monotonic() - t0 < 5.0
    assert spins[0] > 1000


class HostFuncDriver(RecordingLibcuda):
    """cuLaunchHostFunc recorded, then run as the driver's thread runs a host function: natively."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.native_calls: list[tuple[int, int, int]] = []

        def launch_host_func(stream: Any, fn: Any, data: Any) -> int:
            self.calls.append(("cuLaunchHostFunc", (stream, fn, data)))
            self.native_calls.append((stream, fn, data))
            host_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(fn)
            threading.Timer(self.delay_s, host_fn, args=(data,)).start()  # once "the GPU" is done
            return 0

        self.cuLaunchHostFunc = launch_host_func


def test_the_gpu_rings_through_a_host_function_that_is_libcs_sem_post(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = HostFuncDriver(delay_s=0.15)
    monkeypatch.setattr(cuda, "_FAST", [cuda._Driver(lib, lib)])
    bell = Doorbell()
    assert bell.can_ring_after()
    stream = SimpleNamespace(ptr=0x5EA)
    t0 = time.monotonic()
    bell.ring_after(stream)  # type: ignore[arg-type]  # the stand-in stream has the one field used
    assert not bell.wait(0.0)  # not before "the work" is done
    assert bell.wait(10.0) and time.monotonic() - t0 >= 0.1
    (s, fn, data), = lib.native_calls
    assert s == 0x5EA and data == bell.address
    assert fn == ctypes.cast(ctypes.CDLL(None).sem_post, ctypes.c_void_p).value


def test_without_the_ctypes_driver_the_gpu_cannot_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_FAST", [None])
    bell = Doorbell()
    assert not bell.can_ring_after()
    with pytest.raises(RuntimeError, match="driver"):
        bell.ring_after(SimpleNamespace(ptr=1))  # type: ignore[arg-type]
    bell.ring()  # Python can still ring it
    assert bell.wait(1.0)
