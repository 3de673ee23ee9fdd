"""A wake-up the GPU rings: a host thread sleeps until the work queued on a CUDA stream is done.

    reader:    bell.wait(timeout)          sem_timedwait, with the GIL released
    GPU work:  bell.ring_after(stream)     cuLaunchHostFunc(stream, sem_post, bell): the driver's own
                                           thread posts the semaphore once the work before it is done
    the rest:  bell.ring()                 sem_post from Python

Why: a camera's post thread woke twice per frame, once when the frame was handed to it (its run
queued on the GPU) and once more when the run's CUDA event completed; every wake-up of a Python
thread costs a GIL hand-over among dozens of camera threads. Rung by the GPU, it wakes once, when
the results are in host memory. The host function is libc's own sem_post, a C function: nothing
runs Python, or takes the GIL, inside the driver.

A POSIX semaphore counts: a ring before the wait is not lost, and an extra ring only makes a wait
return early (the reader looks, finds nothing new, and waits again).
"""

from __future__ import annotations

import ctypes
import threading
import time

from agent.engines import cuda

__all__ = ["Doorbell"]

_SEM_BYTES = 64  # sizeof(sem_t) is 32 with 64-bit glibc (x86-64, aarch64): room to spare


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Semaphores:
    """libc's POSIX semaphores through ctypes (found in the process's own symbols: libc is loaded)."""

    def __init__(self) -> None:
        held = ctypes.PyDLL(None)  # sem_init / sem_post never block: the caller keeps the GIL
        released = ctypes.CDLL(None, use_errno=True)  # sem_timedwait sleeps: the GIL is released
        self.init = held.sem_init
        self.init.argtypes, self.init.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint], ctypes.c_int
        self.post = held.sem_post
        self.post.argtypes, self.post.restype = [ctypes.c_void_p], ctypes.c_int
        self.timedwait = released.sem_timedwait
        self.timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        self.timedwait.restype = ctypes.c_int
        address = ctypes.cast(released.sem_post, ctypes.c_void_p).value
        if not address:
            raise OSError("no address for sem_post")
        self.post_address: int = address  # what the driver's thread calls: void fn(void *userData)


_LIB: list[_Semaphores] = []
_LOCK = threading.Lock()
# Every bell ever made. A host function queued on a stream may still post a bell whose reader is
# gone (a pipeline stopped with a run in flight): its semaphore must never be freed. One per
# camera pipeline, 64 bytes each.
_BELLS: list[Doorbell] = []


def _semaphores() -> _Semaphores:
    with _LOCK:
        if not _LIB:
            _LIB.append(_Semaphores())
        return _LIB[0]


class Doorbell:
    """A counting wake-up for one reader thread (see the module docstring)."""

    def __init__(self) -> None:
        """OSError (or AttributeError, without POSIX semaphores) when it cannot be made."""
        self._lib = _semaphores()
        self._sem = ctypes.create_string_buffer(_SEM_BYTES)
        self.address = ctypes.addressof(self._sem)
        if self._lib.init(self.address, 0, 0) != 0:
            raise OSError("sem_init failed")
        with _LOCK:
            _BELLS.append(self)

    def ring(self) -> None:
        self._lib.post(self.address)

    @staticmethod
    def can_ring_after() -> bool:
        """The GPU can ring it: CUDA's driver is reached through ctypes (agent.engines.cuda._Driver)."""
        return cuda._driver() is not None

    def ring_after(self, stream: cuda.Stream) -> None:
        """Ring once the work queued on `stream` so far is done (call only when can_ring_after())."""
        drv = cuda._driver()
        if drv is None:
            raise RuntimeError("the doorbell needs CUDA's driver through ctypes")
        drv.launch_host_func(stream.ptr, self._lib.post_address, self.address)

    def wait(self, timeout: float) -> bool:
        """True once rung (one ring taken), False after `timeout` seconds (or a signal) without."""
        deadline = time.time() + max(0.0, timeout)  # sem_timedwait takes CLOCK_REALTIME
        sec = int(deadline)
        ts = _Timespec(sec, int((deadline - sec) * 1e9))
        return bool(self._lib.timedwait(self.address, ctypes.byref(ts)) == 0)
