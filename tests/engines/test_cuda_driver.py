"""The per-frame driver calls (agent.engines.cuda._Driver): what reaches libcuda, and when it is used.

libcuda.so.1 cannot exist here (no GPU, no driver), so `RecordingLibcuda` stands in for it: it
records every call with its arguments as ctypes passes them, and answers with a CUresult. What
the real driver does with them is checked on the GPU machine (tests/engines/test_cuda.py, marked
gpu, and scripts/streams_check.py's detection checks, which run through this path).
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import pytest

from agent.engines import cuda
from agent.errors import EngineError


class RecordingLibcuda:
    """Test double for libcuda: each entry point records (name, args) and returns `rc[name]` (0)."""

    NAMES = ("cuMemcpyAsync", "cuMemcpy2DAsync_v2", "cuMemsetD8Async", "cuStreamWaitEvent", "cuEventRecord",
             "cuStreamSynchronize", "cuEventSynchronize", "cuEventQuery", "cuLaunchKernel", "cuCtxGetCurrent",
             "cuGetErrorName", "cuStreamBeginCapture_v2", "cuStreamEndCapture", "cuGraphGetNodes",
             "cuGraphNodeGetType", "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphDestroy",
             "cuGraphExecDestroy")
    GRAPH, EXEC = 0x6A00, 0x6E00

    def __init__(self, context: int = 0x1000) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.rc: dict[str, int] = {"cuEventQuery": 600}  # CUDA_ERROR_NOT_READY: event_sync waits
        self.context = context
        self.node_types = [0, 0, 2]  # what the captured graph holds (CUgraphNodeType)
        for name in self.NAMES:
            setattr(self, name, self._entry(name))

    def _entry(self, name: str) -> Any:
        def call(*args: Any) -> int:
            self.calls.append((name, args))
            if name == "cuCtxGetCurrent":
                args[0]._obj.value = self.context
            if name == "cuGetErrorName":
                args[1]._obj.value = b"CUDA_ERROR_INVALID_VALUE"
            if name == "cuStreamEndCapture":
                args[1]._obj.value = self.GRAPH
            if name == "cuGraphInstantiateWithFlags":
                args[0]._obj.value = self.EXEC
            if name == "cuGraphGetNodes":
                if args[1] is not None:
                    for i in range(len(self.node_types)):
                        args[1][i] = 0x100 + i
                args[2]._obj.value = len(self.node_types)
            if name == "cuGraphNodeGetType":
                args[1]._obj.value = self.node_types[args[0] - 0x100]
            return self.rc.get(name, 0)

        return call

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [a for n, a in self.calls if n == name]


@pytest.fixture
def lib() -> RecordingLibcuda:
    return RecordingLibcuda()


def test_entry_points_are_typed_for_ctypes(lib: RecordingLibcuda) -> None:
    cuda._Driver(lib, lib)
    assert lib.cuMemcpyAsync.argtypes == [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    assert lib.cuLaunchKernel.argtypes[1:7] == [ctypes.c_uint] * 6 and len(lib.cuLaunchKernel.argtypes) == 11
    assert all(getattr(lib, n).restype is ctypes.c_int for n in RecordingLibcuda.NAMES)


def _every_call(drv: cuda._Driver) -> None:
    """Each entry point once (a pinned copy, a pageable one, a 2D copy, ...), in this order."""
    drv.memcpy(0xD000, 0xE000, 4096, 0x51, "copy")
    drv.memcpy(0xD000, 0xE000, 8, 0x51, "pageable", pageable=True)
    drv.memcpy_2d(0xA000, 64, 0xB000, 128, 64, 2, 0x51)
    drv.memset(0xD000, 0, 4, 0x51)
    drv.wait(0x51, 0xEE)
    drv.record(0xEE, 0x52)
    drv.launch(0xF0, (60, 80, 1), (32, 8, 1), 0x52, 0xAA, "letterbox")
    drv.stream_sync(0x52)
    drv.event_sync(0xEE)


def test_calls_reach_the_driver_with_their_arguments(lib: RecordingLibcuda) -> None:
    _every_call(cuda._Driver(lib, lib))
    assert lib.named("cuMemcpyAsync") == [(0xD000, 0xE000, 4096, 0x51), (0xD000, 0xE000, 8, 0x51)]
    assert lib.named("cuMemsetD8Async") == [(0xD000, 0, 4, 0x51)]
    assert lib.named("cuStreamWaitEvent") == [(0x51, 0xEE, 0)]
    assert lib.named("cuEventRecord") == [(0xEE, 0x52)]
    assert lib.named("cuLaunchKernel") == [(0xF0, 60, 80, 1, 32, 8, 1, 0, 0x52, 0xAA, None)]
    assert lib.named("cuStreamSynchronize") == [(0x52,)] and lib.named("cuEventSynchronize") == [(0xEE,)]
    # the thread's context was looked up once, not per call
    assert len(lib.named("cuCtxGetCurrent")) == 1


def test_queueing_calls_keep_the_gil_and_waits_release_it() -> None:
    """Calls that only queue work go through the PyDLL handle (the GIL stays with the caller);
    waits, and copies whose host side is pageable (the driver stages them), through the CDLL."""
    released, held = RecordingLibcuda(), RecordingLibcuda()
    _every_call(cuda._Driver(released, held))
    assert [n for n, _ in held.calls if n != "cuCtxGetCurrent"] == [
        "cuMemcpyAsync", "cuMemcpy2DAsync_v2", "cuMemsetD8Async", "cuStreamWaitEvent", "cuEventRecord",
        "cuLaunchKernel", "cuEventQuery"]
    assert [n for n, _ in released.calls] == ["cuMemcpyAsync", "cuStreamSynchronize", "cuEventSynchronize"]
    assert released.named("cuMemcpyAsync") == [(0xD000, 0xE000, 8, 0x51)]


def test_an_event_already_complete_is_not_waited_for_and_the_gil_stays(lib: RecordingLibcuda) -> None:
    released, held = RecordingLibcuda(), RecordingLibcuda()
    held.rc["cuEventQuery"] = 0  # CUDA_SUCCESS: the work before it is done
    cuda._Driver(released, held).event_sync(0xEE)
    assert held.named("cuEventQuery") == [(0xEE,)] and released.calls == []
    held.rc["cuEventQuery"] = 700  # a failure is reported, not waited on
    with pytest.raises(EngineError, match=r"cuEventQuery: CUDA_ERROR_INVALID_VALUE \(700\)"):
        cuda._Driver(released, held).event_sync(0xEE)
    assert released.calls == []


def test_a_2d_copy_fills_cuda_memcpy2d_for_device_to_device(lib: RecordingLibcuda) -> None:
    cuda._Driver(lib, lib).memcpy_2d(0xA000, 1920, 0xB000, 2048, 1920, 1080, 0x51)
    (args,) = lib.named("cuMemcpy2DAsync_v2")
    c = args[0]._obj
    assert (c.srcMemoryType, c.srcDevice, c.srcPitch) == (2, 0xB000, 2048)
    assert (c.dstMemoryType, c.dstDevice, c.dstPitch) == (2, 0xA000, 1920)
    assert (c.WidthInBytes, c.Height, c.srcXInBytes, c.srcY, c.dstXInBytes, c.dstY) == (1920, 1080, 0, 0, 0, 0)
    assert args[1] == 0x51
    # cuda.h's layout on 64-bit Linux: 16 fields, enums padded to 8 bytes
    assert ctypes.sizeof(cuda._Memcpy2D) == 128 and cuda._Memcpy2D.WidthInBytes.offset == 112


def test_a_failed_call_names_the_call_and_the_error(lib: RecordingLibcuda) -> None:
    lib.rc["cuMemcpyAsync"] = 1
    with pytest.raises(EngineError, match=r"cuMemcpyAsync\(dtoh, 8\): CUDA_ERROR_INVALID_VALUE \(1\)"):
        cuda._Driver(lib, lib).memcpy(1, 2, 8, 3, "cuMemcpyAsync(dtoh, 8)")


def test_a_thread_without_a_context_gets_the_primary_one(lib: RecordingLibcuda,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lib.context = 0
    made: list[int] = []
    monkeypatch.setattr(cuda, "use_device", made.append)
    drv = cuda._Driver(lib, lib)
    drv.record(1, 2)
    drv.record(1, 2)
    assert made == [cuda._DEVICE[0]]


def test_the_driver_path_only_with_the_real_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_FAST", [])
    monkeypatch.setattr(cuda, "_RT", types.SimpleNamespace(__name__="tests.fake_cudart"))
    assert cuda._driver() is None and cuda._FAST == []  # a test double: never decided, never cached
    monkeypatch.setattr(cuda, "_RT", types.ModuleType("cuda.bindings.runtime"))
    monkeypatch.setenv("EDGE_AGENT_CUDA_CTYPES", "0")
    assert cuda._driver() is None and cuda._FAST == [None]
    monkeypatch.setattr(cuda, "_FAST", [])
    monkeypatch.delenv("EDGE_AGENT_CUDA_CTYPES")
    monkeypatch.setattr(cuda.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found")))
    assert cuda._driver() is None  # no driver library: the bindings' calls as before


def test_handles_are_read_from_the_bindings_objects() -> None:
    class Handle:
        def __int__(self) -> int:
            return 0x77

    class OldHandle:
        def getPtr(self) -> int:  # the bindings' own name
            return 0x78

    assert cuda._handle(Handle()) == 0x77 and cuda._handle(OldHandle()) == 0x78


def graph_driver(lib: RecordingLibcuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_FAST", [cuda._Driver(lib, lib)])


class Stream:
    ptr = 0x51


def test_a_graph_is_captured_from_the_work_queued_then_launched_with_one_call(
        lib: RecordingLibcuda, monkeypatch: pytest.MonkeyPatch) -> None:
    graph_driver(lib, monkeypatch)
    queued: list[str] = []
    g = cuda.Graph(Stream(), lambda: queued.append("run"))  # type: ignore[arg-type]
    assert queued == ["run"] and g.nodes == {"kernel": 2, "memset": 1}
    begin, end = lib.named("cuStreamBeginCapture_v2"), lib.named("cuStreamEndCapture")
    assert begin == [(0x51, 1)] and len(end) == 1 and end[0][0] == 0x51  # thread-local mode
    assert lib.named("cuGraphInstantiateWithFlags")[0][1:] == (lib.GRAPH, 0)
    assert lib.named("cuGraphDestroy") == [(lib.GRAPH,)]  # the executable graph does not need it
    g.launch(Stream())  # type: ignore[arg-type]
    assert lib.named("cuGraphLaunch") == [(lib.EXEC, 0x51)]
    g.free()
    assert lib.named("cuGraphExecDestroy") == [(lib.EXEC,)]
    with pytest.raises(EngineError, match="after free"):
        g.launch(Stream())  # type: ignore[arg-type]


def test_a_graph_a_replay_must_not_repeat_is_refused(lib: RecordingLibcuda, monkeypatch: pytest.MonkeyPatch) -> None:
    graph_driver(lib, monkeypatch)
    lib.node_types = [0, 3, 10]  # a host callback, an allocation
    with pytest.raises(EngineError, match="host, mem_alloc nodes, which a replay would run again"):
        cuda.Graph(Stream(), lambda: None)  # type: ignore[arg-type]
    assert lib.named("cuGraphInstantiateWithFlags") == [] and lib.named("cuGraphDestroy") == [(lib.GRAPH,)]
    lib.node_types = []
    with pytest.raises(EngineError, match="queued nothing"):
        cuda.Graph(Stream(), lambda: None)  # type: ignore[arg-type]


def test_work_that_fails_inside_the_capture_still_ends_it(lib: RecordingLibcuda,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    graph_driver(lib, monkeypatch)
    lib.rc["cuStreamEndCapture"] = 901  # CUDA_ERROR_STREAM_CAPTURE_INVALIDATED

    def run() -> None:
        raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="stream is capturing"):
        cuda.Graph(Stream(), run)  # type: ignore[arg-type]
    assert len(lib.named("cuStreamEndCapture")) == 1  # the stream left capture mode
    monkeypatch.setattr(cuda, "_FAST", [None])
    with pytest.raises(EngineError, match="needs libcuda through ctypes"):
        cuda.Graph(Stream(), lambda: None)  # type: ignore[arg-type]
