"""A small CUDA memory layer: device and pinned buffers, streams, async copies, event timing.

Built on NVIDIA's CUDA Python bindings (`cuda-python` / `cuda-bindings`, module
`cuda.bindings.runtime`; `from cuda import cudart` on older layouts) rather than pycuda, because:
they are maintained by NVIDIA alongside the CUDA toolkit; wheels exist for CUDA 12 and 13,
including aarch64 for Jetson; installing them needs no compiler or CUDA headers (pycuda compiles
against the local toolkit at install time); and the GPU machine we measure on already has them.
They are imported lazily, so this module imports on a machine without CUDA.

The calls made for every frame (async copies, event record / wait, kernel launches, waits) go
straight to the driver (`libcuda.so.1` through ctypes, `_Driver`) when the real bindings are in
use: measured on the H200, a bindings call cost 20-40 us of host time holding the GIL, which at
25 cameras was a fifth of each frame's host CPU. The handles are the bindings' own (a runtime
stream or event is the driver's). `EDGE_AGENT_CUDA_CTYPES=0` keeps every call on the bindings.

Every object frees what it allocated through an explicit `free()` / `close()` (and as a context
manager); nothing is freed in `__del__`. Every CUDA call is checked: a failure raises EngineError
naming the call and the CUDA error (e.g. `cudaMalloc(1048576): cudaErrorMemoryAllocation`).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np

from agent.errors import EngineError

__all__ = [
    "CAPTURE",
    "CaptureLock",
    "DeviceBuffer",
    "Event",
    "Graph",
    "Kernel",
    "Launch",
    "PinnedBuffer",
    "Stream",
    "copy_2d_async",
    "copy_dtoh_async",
    "copy_dtoh_ptr",
    "copy_htod_async",
    "cuda_runtime",
    "current_context",
    "device_count",
    "is_pinned",
    "memcpy_async",
    "memory_used",
    "memset_async",
    "set_sync_mode",
    "use_device",
]

_RT: Any = None


class CaptureLock:
    """Readers-writer lock for CUDA graph captures, which ONNX Runtime makes in global mode: while a
    thread captures, a CUDA call from any other thread (cudaMalloc, a synchronize, a decode) can
    invalidate the capture. Per-frame GPU work holds it shared, a capture holds it alone.

    Shared holders never meet each other: each thread has a lock of its own (re-entrant), which it
    holds while inside; a capture takes every thread's lock, and the registry's, so a thread that
    enters for the first time waits too. With one common lock instead (a condition variable), the
    camera threads queued on it several times per frame: measured on the H200 at 24 cameras, it was
    40 % of the capture threads' GIL time (docs/measurements/h200-2026-12-02-own-graphs).
    Never hold it shared while waiting for another thread that takes it (a capture waiting for
    your lock stops that thread)."""

    def __init__(self) -> None:
        self._registry = threading.Lock()  # held by a capture: no thread registers meanwhile
        self._holders: weakref.WeakSet[_Holder] = weakref.WeakSet()  # a thread's entry goes with the thread
        self._tls = threading.local()
        self._one_capture = threading.Lock()
        self._writer = False
        self._shared = _Shared(self)

    def shared(self) -> _Shared:
        """`with CAPTURE.shared():` (a plain context manager, not a generator: it is taken several
        times per frame on every camera)."""
        return self._shared

    def _enter_shared(self) -> None:
        holder = getattr(self._tls, "holder", None)
        if holder is None:
            holder = _Holder()
            with self._registry:
                self._holders.add(holder)
            self._tls.holder = holder
        holder.lock.acquire()
        holder.depth += 1

    def _exit_shared(self) -> None:
        holder = self._tls.holder
        holder.depth -= 1
        holder.lock.release()

    @property
    def _readers(self) -> int:
        """Threads inside a shared section now (for tests and diagnostics)."""
        if self._writer:
            return 0
        return sum(1 for h in list(self._holders) if h.depth > 0)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._one_capture:
            self._registry.acquire()
            taken: list[_Holder] = []
            try:
                for holder in list(self._holders):  # waits for each thread inside to come out
                    holder.lock.acquire()
                    taken.append(holder)
                self._writer = True
                yield
            finally:
                self._writer = False
                for holder in taken:
                    holder.lock.release()
                self._registry.release()


class _Holder:
    """One thread's entry in a CaptureLock."""

    __slots__ = ("__weakref__", "depth", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0  # shared sections the thread is in (written by that thread only)


class _Shared:
    """CaptureLock.shared(): one object for all holders (it keeps no state of its own)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: CaptureLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock._exit_shared()


CAPTURE = CaptureLock()  # process-wide, as the capture mode is


def cuda_runtime() -> Any:
    """The CUDA runtime bindings module (cuda-python 12/13 layout first, then the older one)."""
    global _RT
    if _RT is None:
        last: Exception | None = None
        for name in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                _RT = importlib.import_module(name)
                break
            except ImportError as exc:
                last = exc
        else:
            raise EngineError(
                "CUDA Python bindings are not installed: `pip install cuda-python` (the [gpu] extra); "
                f"needed for the TensorRT backend's device memory ({last})"
            )
    return _RT


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D (cuda.h): source, then destination, then the extent."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_CU_MEMORYTYPE_DEVICE = 2
_CU_ERROR_INVALID_CONTEXT = 201


class _Driver:
    """The per-frame calls into libcuda through ctypes.

    Calls that only queue work on a stream (async copies between device and pinned memory, event
    record / wait, kernel launches) return in microseconds and keep the GIL (`held`: a PyDLL):
    releasing it for them, as the bindings do, let another of the many camera threads take it
    each time and the caller wait to get it back, which was most of a frame's host time.
    Waits (synchronize) and copies from pageable memory block, and release it (`lib`: a CDLL).
    No callback of ours runs inside the driver, so a thread holding the GIL in a driver call
    never waits on a thread that needs the GIL.

    Driver calls need a context current on the calling thread: the first call on a thread makes
    the device's primary context current (the one ONNX Runtime and the bindings use)."""

    def __init__(self, lib: Any, held: Any) -> None:
        u64, vp, sz, cint, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint
        self._memcpy = self._fn(held, "cuMemcpyAsync", [u64, u64, sz, vp])
        self._memcpy_blocking = self._fn(lib, "cuMemcpyAsync", [u64, u64, sz, vp])
        self._memcpy2d = self._fn(held, "cuMemcpy2DAsync_v2", [ctypes.POINTER(_Memcpy2D), vp])
        self._memset = self._fn(held, "cuMemsetD8Async", [u64, ctypes.c_ubyte, sz, vp])
        self._wait = self._fn(held, "cuStreamWaitEvent", [vp, vp, uint])
        self._record = self._fn(held, "cuEventRecord", [vp, vp])
        self._launch = self._fn(held, "cuLaunchKernel", [vp, uint, uint, uint, uint, uint, uint, uint, vp, vp, vp])
        self._stream_sync = self._fn(lib, "cuStreamSynchronize", [vp])
        self._event_sync = self._fn(lib, "cuEventSynchronize", [vp])
        self._event_query = self._fn(held, "cuEventQuery", [vp])
        self._ctx_current = self._fn(held, "cuCtxGetCurrent", [ctypes.POINTER(ctypes.c_void_p)])
        self._error_name = self._fn(held, "cuGetErrorName", [cint, ctypes.POINTER(ctypes.c_char_p)])
        # CUDA graphs (Graph): made once per lane at load, launched per frame
        self._begin_capture = self._fn(held, "cuStreamBeginCapture_v2", [vp, cint])
        self._end_capture = self._fn(held, "cuStreamEndCapture", [vp, ctypes.POINTER(vp)])
        self._graph_nodes = self._fn(held, "cuGraphGetNodes", [vp, ctypes.POINTER(vp), ctypes.POINTER(sz)])
        self._node_type = self._fn(held, "cuGraphNodeGetType", [vp, ctypes.POINTER(cint)])
        self._instantiate = self._fn(lib, "cuGraphInstantiateWithFlags", [ctypes.POINTER(vp), vp, ctypes.c_ulonglong])
        self._graph_launch = self._fn(held, "cuGraphLaunch", [vp, vp])
        self._graph_destroy = self._fn(held, "cuGraphDestroy", [vp])
        self._exec_destroy = self._fn(lib, "cuGraphExecDestroy", [vp])
        self._tls = threading.local()

    @staticmethod
    def _fn(lib: Any, name: str, argtypes: list[Any]) -> Any:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn

    def _ready(self) -> None:
        if getattr(self._tls, "ready", False):
            return
        ctx = ctypes.c_void_p()
        if self._ctx_current(ctypes.byref(ctx)) != 0 or not ctx.value:
            use_device(_DEVICE[0])  # the bindings make the primary context current on this thread
        self._tls.ready = True

    def _check(self, rc: int, what: str) -> None:
        if rc:
            name = ctypes.c_char_p()
            self._error_name(rc, ctypes.byref(name))
            raise EngineError(f"{what}: {(name.value or b'CUDA error').decode()} ({rc})")

    def memcpy(self, dst: int, src: int, nbytes: int, stream: int, what: str, pageable: bool = False) -> None:
        """`pageable`: a host side in pageable memory (the driver stages it, blocking meanwhile)."""
        self._ready()
        self._check((self._memcpy_blocking if pageable else self._memcpy)(dst, src, nbytes, stream), what)

    def memcpy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, stream: int) -> None:
        self._ready()
        c = _Memcpy2D(srcMemoryType=_CU_MEMORYTYPE_DEVICE, srcDevice=src, srcPitch=spitch,
                      dstMemoryType=_CU_MEMORYTYPE_DEVICE, dstDevice=dst, dstPitch=dpitch, WidthInBytes=width,
                      Height=rows)
        self._check(self._memcpy2d(ctypes.byref(c), stream), f"cuMemcpy2DAsync({width}x{rows})")

    def memset(self, dst: int, value: int, nbytes: int, stream: int) -> None:
        self._ready()
        self._check(self._memset(dst, value, nbytes, stream), "cuMemsetD8Async")

    def wait(self, stream: int, event: int) -> None:
        self._ready()
        self._check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def record(self, event: int, stream: int) -> None:
        self._ready()
        self._check(self._record(event, stream), "cuEventRecord")

    def stream_sync(self, stream: int) -> None:
        self._ready()
        self._check(self._stream_sync(stream), "cuStreamSynchronize")

    def event_sync(self, event: int) -> None:
        """Asks first, keeping the GIL: the post thread mostly finds its results already there, and
        releasing the GIL only to find that out made it queue to get it back."""
        self._ready()
        rc = self._event_query(event)
        if rc == _CUDA_ERROR_NOT_READY:
            self._check(self._event_sync(event), "cuEventSynchronize")
        else:
            self._check(rc, "cuEventQuery")

    def launch(self, function: int, grid: tuple[int, int, int], block: tuple[int, int, int], stream: int,
               params: int, name: str) -> None:
        self._ready()
        self._check(self._launch(function, *grid, *block, 0, stream, params, None), f"cuLaunchKernel({name})")

    def begin_capture(self, stream: int) -> None:
        self._ready()
        self._check(self._begin_capture(stream, _CAPTURE_THREAD_LOCAL), "cuStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        graph = ctypes.c_void_p()
        self._check(self._end_capture(stream, ctypes.byref(graph)), "cuStreamEndCapture")
        if not graph.value:
            raise EngineError("cuStreamEndCapture: no graph")
        return int(graph.value)

    def node_types(self, graph: int) -> list[int]:
        n = ctypes.c_size_t(0)
        self._check(self._graph_nodes(graph, None, ctypes.byref(n)), "cuGraphGetNodes")
        nodes = (ctypes.c_void_p * max(1, n.value))()
        self._check(self._graph_nodes(graph, nodes, ctypes.byref(n)), "cuGraphGetNodes")
        types = []
        for i in range(n.value):
            t = ctypes.c_int()
            self._check(self._node_type(nodes[i], ctypes.byref(t)), "cuGraphNodeGetType")
            types.append(t.value)
        return types

    def instantiate(self, graph: int) -> int:
        exe = ctypes.c_void_p()
        self._check(self._instantiate(ctypes.byref(exe), graph, 0), "cuGraphInstantiateWithFlags")
        if not exe.value:
            raise EngineError("cuGraphInstantiateWithFlags: no executable graph")
        return int(exe.value)

    def graph_launch(self, exe: int, stream: int) -> None:
        self._ready()
        self._check(self._graph_launch(exe, stream), "cuGraphLaunch")

    def graph_destroy(self, graph: int) -> None:
        self._check(self._graph_destroy(graph), "cuGraphDestroy")

    def exec_destroy(self, exe: int) -> None:
        self._check(self._exec_destroy(exe), "cuGraphExecDestroy")


_CUDA_ERROR_NOT_READY = 600  # cuEventQuery: the work before the event has not finished
# CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: a call of the capturing thread that is not capture-safe (an
# allocation, a synchronize) fails the capture instead of slipping out of the graph
_CAPTURE_THREAD_LOCAL = 1
# CUgraphNodeType (cuda.h) by name, and the ones a replayed inference may hold: a host callback or an
# allocation in the graph would run again at every replay
_NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
               7: "event_record", 8: "semaphore_signal", 9: "semaphore_wait", 10: "mem_alloc", 11: "mem_free",
               12: "batch_mem_op", 13: "conditional"}
_REPLAYABLE_NODES = {"kernel", "memcpy", "memset", "graph", "empty"}
_DEVICE = [0]  # the device use_device() last made current: the one a new thread's driver calls use
_FAST: list[_Driver | None] = []  # decided once the real bindings are loaded: [driver] or [None]


def _driver() -> _Driver | None:
    """The ctypes driver path, or None: no libcuda, test doubles in place of the bindings, or
    EDGE_AGENT_CUDA_CTYPES=0."""
    if _FAST:
        return _FAST[0]
    if not getattr(_RT, "__name__", "").startswith("cuda."):  # not loaded yet, or a test double
        return None
    drv: _Driver | None = None
    if os.environ.get("EDGE_AGENT_CUDA_CTYPES", "1") != "0":
        try:
            drv = _Driver(ctypes.CDLL("libcuda.so.1"), ctypes.PyDLL("libcuda.so.1"))
        except (OSError, AttributeError):
            drv = None
    _FAST.append(drv)
    return drv


def _handle(obj: Any) -> int:
    """The address behind a bindings handle (cudaStream_t, cudaEvent_t, CUfunction)."""
    try:
        return int(obj)
    except TypeError:
        return int(obj.getPtr())


def _error_name(rt: Any, err: Any) -> str:
    try:
        res = rt.cudaGetErrorName(err)
        name = res[1] if isinstance(res, tuple) else res
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def check(result: Any, what: str) -> Any:
    """Unpack a bindings result `(err, *values)`: the value(s), or EngineError with the error name."""
    rt = cuda_runtime()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        raise EngineError(f"{what}: {_error_name(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_count() -> int:
    """Visible CUDA devices; 0 when there is no driver, no device or no bindings."""
    try:
        rt = cuda_runtime()
        err, n = rt.cudaGetDeviceCount()
    except Exception:
        return 0
    return int(n) if err == rt.cudaError_t.cudaSuccess else 0


class _Owned:
    """Explicit lifetime: free() once, context manager; `closed` after."""

    _freed = False

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self._free_impl()

    close = free

    @property
    def closed(self) -> bool:
        return self._freed

    def _free_impl(self) -> None:
        raise NotImplementedError

    def _alive(self) -> None:
        if self._freed:
            raise EngineError(f"{type(self).__name__} used after free()")

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.free()


class DeviceBuffer(_Owned):
    """`nbytes` of device memory (cudaMalloc)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise EngineError(f"device buffer size must be positive, got {nbytes}")
        rt = cuda_runtime()
        self.nbytes = int(nbytes)
        self.ptr = int(check(rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def _free_impl(self) -> None:
        check(cuda_runtime().cudaFree(self.ptr), "cudaFree")
        self.ptr = 0


class PinnedBuffer(_Owned):
    """Page-locked host memory (cudaMallocHost) seen as a numpy array `.array` of `shape`, `dtype`.

    The array is a view of memory this object owns: do not use it after free().
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        rt = cuda_runtime()
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if self.nbytes <= 0:
            raise EngineError(f"pinned buffer of shape {self.shape} holds nothing")
        self.ptr = int(check(rt.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self._array: np.ndarray | None = np.frombuffer(memoryview(raw).cast("B"), dtype=self.dtype).reshape(self.shape)

    @property
    def array(self) -> np.ndarray:
        self._alive()
        assert self._array is not None  # set until free()
        return self._array

    def _free_impl(self) -> None:
        self._array = None
        check(cuda_runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
        self.ptr = 0


class _Handled(_Owned):
    """An object holding one bindings handle (`_bindings_handle()`), whose address the driver path
    takes: read once, at the first driver call (a test double's handle need not have one)."""

    _ptr: int | None = None

    def _bindings_handle(self) -> Any:
        raise NotImplementedError

    @property
    def ptr(self) -> int:
        """The handle's address (the driver's CUstream / CUevent)."""
        self._alive()
        if self._ptr is None:
            self._ptr = _handle(self._bindings_handle())
        return self._ptr


class Stream(_Handled):
    """A non-blocking CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        rt = cuda_runtime()
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def raw(self) -> Any:
        self._alive()
        return self._stream

    @property
    def handle(self) -> int:
        return int(self.raw)

    def _bindings_handle(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        drv = _driver()
        if drv is not None:
            drv.stream_sync(self.ptr)
            return
        check(cuda_runtime().cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def wait(self, event: Event) -> None:
        """Work queued on this stream from now on starts after `event` (recorded on another stream)."""
        event._alive()
        drv = _driver()
        if drv is not None:
            drv.wait(self.ptr, event.ptr)
            return
        check(cuda_runtime().cudaStreamWaitEvent(self.raw, event._event, 0), "cudaStreamWaitEvent")

    def _free_impl(self) -> None:
        check(cuda_runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")


class Event(_Handled):
    """A CUDA event: timing work on a stream (`end.elapsed_ms(start)`), or, with `timing=False`, a
    cheap marker one stream waits on (`Stream.wait`) or a host thread synchronises with."""

    def __init__(self, timing: bool = True) -> None:
        rt = cuda_runtime()
        if timing:
            self._event = check(rt.cudaEventCreate(), "cudaEventCreate")
        else:  # a host waiting on it sleeps instead of spinning a core
            flags = rt.cudaEventDisableTiming | rt.cudaEventBlockingSync
            self._event = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")

    def _bindings_handle(self) -> Any:
        return self._event

    def record(self, stream: Stream) -> None:
        self._alive()
        drv = _driver()
        if drv is not None:
            drv.record(self.ptr, stream.ptr)
            return
        check(cuda_runtime().cudaEventRecord(self._event, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        self._alive()
        drv = _driver()
        if drv is not None:
            drv.event_sync(self.ptr)
            return
        check(cuda_runtime().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds between `start` and this event (waits for this one to complete)."""
        self.synchronize()
        return float(check(cuda_runtime().cudaEventElapsedTime(start._event, self._event), "cudaEventElapsedTime"))

    def _free_impl(self) -> None:
        check(cuda_runtime().cudaEventDestroy(self._event), "cudaEventDestroy")


class Graph(_Owned):
    """The work `queue_work()` queues on `stream`, captured once (stream capture, thread-local mode)
    and instantiated: `launch(stream)` queues all of it again, over the same device addresses, with
    one driver call. Refused (EngineError) when the work is not capture-safe (it synchronises or
    allocates: the capture fails) or holds nodes a replay must not repeat (host callbacks,
    allocations). `nodes`: how many of each kind the graph holds. Needs the ctypes driver path."""

    def __init__(self, stream: Stream, queue_work: Callable[[], object]) -> None:
        drv = _driver()
        if drv is None:
            raise EngineError("capturing a CUDA graph needs libcuda through ctypes (no driver, or "
                              "EDGE_AGENT_CUDA_CTYPES=0)")
        self._drv, s = drv, stream.ptr
        drv.begin_capture(s)
        try:
            queue_work()
        except BaseException:
            try:  # a failed capture still has to end, or the stream stays in capture mode
                drv.graph_destroy(drv.end_capture(s))
            except EngineError:
                pass
            raise
        graph = drv.end_capture(s)
        try:
            kinds = [_NODE_TYPES.get(t, f"type {t}") for t in drv.node_types(graph)]
            self.nodes = {k: kinds.count(k) for k in sorted(set(kinds))}
            refused = sorted(set(kinds) - _REPLAYABLE_NODES)
            if refused:
                raise EngineError(f"the captured work holds {', '.join(refused)} nodes, which a replay would "
                                  f"run again ({self.nodes})")
            if not kinds:
                raise EngineError("the captured work queued nothing on the stream")
            self._exec = drv.instantiate(graph)
        finally:
            drv.graph_destroy(graph)  # the executable graph does not need it

    def launch(self, stream: Stream) -> None:
        self._alive()
        self._drv.graph_launch(self._exec, stream.ptr)

    def _free_impl(self) -> None:
        self._drv.exec_destroy(self._exec)


def _host_ptr(host: PinnedBuffer | np.ndarray, nbytes: int, what: str) -> int:
    if isinstance(host, PinnedBuffer):
        host._alive()
        if host.nbytes != nbytes:
            raise EngineError(f"{what}: host buffer holds {host.nbytes} bytes, device buffer {nbytes}")
        return host.ptr
    if not host.flags.c_contiguous:
        raise EngineError(f"{what}: host array must be C-contiguous")
    if host.nbytes != nbytes:
        raise EngineError(f"{what}: host array holds {host.nbytes} bytes, device buffer {nbytes}")
    return int(host.ctypes.data)


def copy_htod_async(dst: DeviceBuffer, src: PinnedBuffer | np.ndarray, stream: Stream) -> None:
    """Host -> device on `stream` (asynchronous only from pinned memory; pageable arrays stage)."""
    dst._alive()
    ptr = _host_ptr(src, dst.nbytes, "copy_htod_async")
    drv = _driver()
    if drv is not None:
        drv.memcpy(dst.ptr, ptr, dst.nbytes, stream.ptr, "cuMemcpyAsync(HtoD)", not isinstance(src, PinnedBuffer))
        return
    rt = cuda_runtime()
    check(rt.cudaMemcpyAsync(dst.ptr, ptr, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw),
          "cudaMemcpyAsync(HtoD)")


def copy_dtoh_async(dst: PinnedBuffer | np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
    """Device -> host on `stream`; synchronise the stream before reading `dst`."""
    src._alive()
    ptr = _host_ptr(dst, src.nbytes, "copy_dtoh_async")
    drv = _driver()
    if drv is not None:
        drv.memcpy(ptr, src.ptr, src.nbytes, stream.ptr, "cuMemcpyAsync(DtoH)", not isinstance(dst, PinnedBuffer))
        return
    rt = cuda_runtime()
    check(rt.cudaMemcpyAsync(ptr, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw),
          "cudaMemcpyAsync(DtoH)")


def copy_dtoh_ptr(dst: np.ndarray, src: int) -> None:
    """Synchronous copy of dst.nbytes from device address `src` into the contiguous host array `dst`."""
    if not dst.flags.c_contiguous:
        raise EngineError("copy_dtoh_ptr needs a contiguous host array")
    rt = cuda_runtime()
    check(rt.cudaMemcpy(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost),
          f"cudaMemcpy(dtoh, {dst.nbytes})")


def copy_2d_async(dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, stream: Stream) -> None:
    """Device-to-device copy of `rows` rows of `width` bytes between pitched buffers, on `stream`."""
    drv = _driver()
    if drv is not None:
        drv.memcpy_2d(dst, dpitch, src, spitch, width, rows, stream.ptr)
        return
    rt = cuda_runtime()
    check(rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                               stream.raw), f"cudaMemcpy2DAsync({width}x{rows})")


def current_context() -> int | None:
    """The driver context current on this thread, as an integer handle (None without one or without bindings)."""
    try:
        drv = _import_first("cuda.bindings.driver", "cuda.cuda")
        ctx = _check_driver(drv, drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        handle = int(ctx) if ctx is not None else 0
    except Exception:
        return None
    return handle or None


def memcpy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """Raw-pointer copy of `nbytes` on `stream`; kind is "htod", "dtoh" or "dtod"."""
    drv = _driver()
    if drv is not None:  # the driver reads the direction from the addresses (unified addressing)
        if kind not in ("htod", "dtoh", "dtod"):
            raise EngineError(f"memcpy_async: unknown kind {kind!r}")
        # raw host pointers here are pinned buffers' (the frontends' results)
        drv.memcpy(dst, src, nbytes, stream.ptr, f"cuMemcpyAsync({kind}, {nbytes})")
        return
    rt = cuda_runtime()
    k = {"htod": rt.cudaMemcpyKind.cudaMemcpyHostToDevice, "dtoh": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
         "dtod": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
    check(rt.cudaMemcpyAsync(dst, src, nbytes, k, stream.raw), f"cudaMemcpyAsync({kind}, {nbytes})")


def memset_async(dst: DeviceBuffer, value: int, stream: Stream, nbytes: int | None = None) -> None:
    """Set the buffer's bytes (its first `nbytes`, when given) to `value` on `stream`."""
    dst._alive()
    n = dst.nbytes if nbytes is None else min(int(nbytes), dst.nbytes)
    drv = _driver()
    if drv is not None:
        drv.memset(dst.ptr, value, n, stream.ptr)
        return
    check(cuda_runtime().cudaMemsetAsync(dst.ptr, value, n, stream.raw), "cudaMemsetAsync")


def memory_used(device: int = 0) -> int | None:
    """Bytes in use on `device` (every process: cudaMemGetInfo), None without a GPU or bindings."""
    if device_count() == 0:
        return None
    try:
        use_device(device)
        free, total = check(cuda_runtime().cudaMemGetInfo(), "cudaMemGetInfo")
    except EngineError:
        return None
    return int(total) - int(free)


def use_device(device: int = 0) -> None:
    """Make `device`'s primary context current on the calling thread (driver-API launches need one)."""
    rt = cuda_runtime()
    check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
    check(rt.cudaFree(0), "cudaFree(0)")  # forces the context to exist on this thread
    _DEVICE[0] = device


def _import_first(*names: str) -> Any:
    last: Exception | None = None
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            last = exc
    raise EngineError(f"CUDA Python bindings lack {names[0]}: `pip install cuda-python` ({last})")


def _check_nvrtc(nvrtc: Any, result: Any, what: str, prog: Any = None) -> Any:
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        detail = ""
        if prog is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            detail = ": " + buf.decode(errors="replace").strip()[:2000]
        raise EngineError(f"{what}: {err}{detail}")
    return values[0] if len(values) == 1 else (values or None)


def _check_driver(drv: Any, result: Any, what: str) -> Any:
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != drv.CUresult.CUDA_SUCCESS:
        raise EngineError(f"{what}: {err}")
    return values[0] if len(values) == 1 else (values or None)


class Kernel(_Owned):
    """CUDA C source compiled at run time by NVRTC for this GPU (a cubin, so the driver does no JIT).

    `prepare(name, grid, block, args)` takes numpy scalars (np.int32(3), np.uint64(ptr), ...)
    whose dtype is the kernel parameter's type. Launching needs the device's context current on the
    calling thread: call `use_device()` once per thread first.
    """

    def __init__(self, source: str, names: list[str], device: int = 0) -> None:
        rt = cuda_runtime()
        nvrtc = _import_first("cuda.bindings.nvrtc", "cuda.nvrtc")
        self._drv = _import_first("cuda.bindings.driver", "cuda.cuda")
        use_device(device)
        major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device),
                      "cudaDeviceGetAttribute")
        minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device),
                      "cudaDeviceGetAttribute")
        self.arch = f"sm_{major}{minor}"
        prog = _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), b"agent.cu", 0, [], []),
                            "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture={self.arch}".encode(), b"--std=c++14"]
            _check_nvrtc(nvrtc, nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "nvrtcCompileProgram", prog)
            size = _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            cubin = b" " * size
            _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        self._module = _check_driver(self._drv, self._drv.cuModuleLoadData(cubin), "cuModuleLoadData")
        self._functions = {n: _check_driver(self._drv, self._drv.cuModuleGetFunction(self._module, n.encode()),
                                            f"cuModuleGetFunction({n})") for n in names}

    def prepare(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                args: list[np.generic]) -> Launch:
        """A launch with fixed arguments, packed once: calling it costs one driver call per frame."""
        self._alive()
        return Launch(self, self._functions[name], name, grid, block, args)

    def _free_impl(self) -> None:
        self._functions = {}
        _check_driver(self._drv, self._drv.cuModuleUnload(self._module), "cuModuleUnload")


class Launch:
    """A kernel launch whose arguments were packed once (kernelParams: pointers to each value)."""

    def __init__(self, kernel: Kernel, function: Any, name: str, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: list[np.generic]) -> None:
        self._kernel, self._function, self.name, self.grid, self.block = kernel, function, name, grid, block
        self._holders = [np.array([a]) for a in args]  # kept alive as long as the launch
        self._params = np.array([h.ctypes.data for h in self._holders], dtype=np.uint64)
        self._params_ptr = int(self._params.ctypes.data)
        self._function_ptr: int | None = None  # read at the first driver launch

    def __call__(self, stream: Stream) -> None:
        self._kernel._alive()
        fast = _driver()
        if fast is not None:
            if self._function_ptr is None:
                self._function_ptr = _handle(self._function)
            fast.launch(self._function_ptr, self.grid, self.block, stream.ptr, self._params_ptr, self.name)
            return
        drv = self._kernel._drv
        _check_driver(drv, drv.cuLaunchKernel(self._function, *self.grid, *self.block, 0, stream.raw,
                                              self._params_ptr, 0), f"cuLaunchKernel({self.name})")


def set_sync_mode(mode: str, device: int = 0) -> None:
    """How a host thread waits for the GPU: "block" (sleeps; frees the CPU, a few us later), "spin"
    (busy-waits: lowest latency, burns a core), "auto" (CUDA's choice). Process-wide; set before
    the first context is used, or CUDA may keep its earlier choice (said in the log, not fatal).
    """
    import logging

    rt = cuda_runtime()
    flags = {"block": rt.cudaDeviceScheduleBlockingSync, "spin": rt.cudaDeviceScheduleSpin,
             "auto": rt.cudaDeviceScheduleAuto}[mode]
    try:
        check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        check(rt.cudaSetDeviceFlags(flags), f"cudaSetDeviceFlags({mode})")
    except EngineError as exc:
        logging.getLogger(__name__).warning("GPU wait mode %r not applied: %s", mode, exc)


def is_pinned(ptr: int) -> bool:
    """True when host address `ptr` lies in page-locked memory CUDA knows (a DMA can read it directly)."""
    rt = cuda_runtime()
    err, attrs = rt.cudaPointerGetAttributes(ptr)
    if err != rt.cudaError_t.cudaSuccess:
        return False
    return bool(attrs.type == rt.cudaMemoryType.cudaMemoryTypeHost)
