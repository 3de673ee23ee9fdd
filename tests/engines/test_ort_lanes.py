"""CUDA-graph lanes (agent.engines.ort_lanes): the orchestration, on this GPU-less machine.

CUDA and ONNX Runtime's CUDA EP cannot exist here, so the lanes run on a stand-in: device memory
is a dict of numpy byte arrays, and the session imitates the CUDA EP's graph rules that the lanes
must respect (measured or read in ONNX Runtime's source): a graph is captured per calling thread
on the thread's second run with that graph id, capture is global (nothing else may run on the GPU
meanwhile), and a replay runs the captured graph over the bound buffers. The stand-in for the
agent's own graphs (cuda.Graph) records the work a run queues while capturing instead of doing
it, and does it again at each launch; a run that would synchronise inside a capture fails. The
H200 runs the real thing (docs/measurements/).
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from agent.config import EngineConfig, ProviderConfig
from agent.engines import ort_lanes
from agent.engines.base import TensorSpec
from agent.engines.cuda import CAPTURE, CaptureLock
from agent.engines.factory import shared_engine_settings
from agent.engines.ort_lanes import OrtLanes
from agent.errors import EngineError

IN = TensorSpec("images", (1, 4), np.dtype(np.float32))
OUT = [TensorSpec("out", (1, 4), np.dtype(np.float32)), TensorSpec("sum", (1, 1), np.dtype(np.float32))]


class FakeCuda:
    """Stand-in for agent.engines.cuda: device memory as numpy bytes, copies done at once."""

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self._next = itertools.count(0x1000, 0x1000)
        self.capturing: list[Any] | None = None  # work queued while a Graph captures
        self.refuse_capture = ""  # a Graph capture fails with this (e.g. a run that allocates)
        self.corrupt_replays = False  # launches write wrong outputs
        self.graphs: list[Any] = []

    def buffer(self, nbytes: int) -> int:
        ptr = next(self._next)
        self.mem[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def ptr_array(self, ptr: int, spec: TensorSpec) -> np.ndarray:
        return self.mem[ptr].view(spec.dtype).reshape(spec.shape)

    def module(self) -> Any:
        fake = self

        class Stream:
            def __init__(self) -> None:
                self.handle, self.freed = next(fake._next), False

            def synchronize(self) -> None:
                assert not self.freed

            def wait(self, event: Any) -> None:  # copies here are done at once: only the call is checked
                assert not self.freed and event is not None

            def free(self) -> None:
                self.freed = True

        class DeviceBuffer:
            def __init__(self, nbytes: int) -> None:
                self.nbytes, self.ptr = nbytes, fake.buffer(nbytes)

            def free(self) -> None:
                fake.mem.pop(self.ptr)

        def memset_async(buf: Any, value: int, stream: Any) -> None:
            fake.mem[buf.ptr][:] = value

        def memcpy_async(dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
            assert kind == "dtod"
            fake.mem[dst][:nbytes] = fake.mem[src][:nbytes]

        def copy_htod_async(dst: Any, src: np.ndarray, stream: Any) -> None:
            fake.mem[dst.ptr][:] = src.view(np.uint8).reshape(-1)

        def copy_dtoh_async(dst: np.ndarray, src: Any, stream: Any) -> None:
            dst.view(np.uint8).reshape(-1)[:] = fake.mem[src.ptr]

        class Graph:
            def __init__(self, stream: Any, queue_work: Any) -> None:
                assert CAPTURE._writer and CAPTURE._readers == 0, "own capture outside the exclusive lock"
                fake.capturing = []
                try:
                    queue_work()
                finally:
                    self.work, fake.capturing = fake.capturing, None
                if fake.refuse_capture:
                    raise EngineError(fake.refuse_capture)
                self.nodes, self.launches, self.freed = {"kernel": len(self.work)}, 0, False
                fake.graphs.append(self)

            def launch(self, stream: Any) -> None:
                assert not self.freed
                assert CAPTURE._readers >= 1 and not CAPTURE._writer, "launch outside the capture lock"
                self.launches += 1
                for work in self.work:
                    work(fake.corrupt_replays)

            def free(self) -> None:
                self.freed = True

        return type("cuda", (), {"CAPTURE": CAPTURE, "Stream": Stream, "DeviceBuffer": DeviceBuffer, "Graph": Graph,
                                 "memset_async": staticmethod(memset_async),
                                 "memcpy_async": staticmethod(memcpy_async),
                                 "copy_htod_async": staticmethod(copy_htod_async),
                                 "copy_dtoh_async": staticmethod(copy_dtoh_async)})


class FakeBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}

    def bind_input(self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int) -> None:
        assert device == "cuda" and list(shape) == list(IN.shape)
        self.inputs[name] = ptr

    def bind_output(self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int) -> None:
        self.outputs[name] = ptr


class FakeGraphSession:
    """The CUDA EP's graph rules: per thread, capture on the second run of an id, in global mode."""

    def __init__(self, cuda: FakeCuda, log: list[tuple[str, str]], fail_capture: bool = False) -> None:
        self.cuda, self.log, self.fail_capture = cuda, log, fail_capture
        self.runs: dict[tuple[int, str], int] = {}
        self.captured: set[tuple[int, str]] = set()

    def io_binding(self) -> FakeBinding:
        return FakeBinding()

    def run_with_iobinding(self, binding: FakeBinding, options: Any) -> None:
        graph = options.get_run_config_entry("gpu_graph_id")
        if self.cuda.capturing is not None:  # inside the agent's own capture: queued, not run
            assert graph == "-1", "ONNX Runtime's capture inside the agent's"
            if options.get_run_config_entry("disable_synchronize_execution_providers") != "1":
                raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
            self.cuda.capturing.append(lambda corrupt: self._compute(binding, corrupt))
            self.log.append(("own capture", threading.current_thread().name))
            return
        self.plain_runs = getattr(self, "plain_runs", 0) + 1
        # every run counts towards the capture, "-1" ones too (seen on the H200: the first lane, whose
        # session had run once for the placement report, captured on its first lane run)
        self.total = getattr(self, "total", 0) + 1
        key = (threading.get_ident(), graph)
        if graph != "-1" and key not in self.captured and self.total >= 2:
            # a capture while anything else runs on the GPU fails ("operation not permitted when stream is capturing")
            assert CAPTURE._writer and CAPTURE._readers == 0, "capture outside the exclusive capture lock"
            if self.fail_capture:
                raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
            self.captured.add(key)
            self.log.append(("capture", threading.current_thread().name))
        elif key in self.captured:
            assert CAPTURE._readers >= 1 or CAPTURE._writer, "replay outside the capture lock"
            self.log.append(("replay", threading.current_thread().name))
        time.sleep(0.001)  # the GPU's time: other lanes must overlap it
        self._compute(binding)

    def _compute(self, binding: FakeBinding, corrupt: bool = False) -> None:
        x = self.cuda.ptr_array(binding.inputs["images"], IN)
        self.cuda.ptr_array(binding.outputs["out"], OUT[0])[:] = x * (3 if corrupt else 2)
        self.cuda.ptr_array(binding.outputs["sum"], OUT[1])[:] = x.sum()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    cuda = FakeCuda()
    monkeypatch.setattr(ort_lanes, "cuda", cuda.module())
    monkeypatch.setattr(ort_lanes, "_REPLAY", ort_lanes._REPLAY)
    return cuda


def make_lanes(fake: FakeCuda, count: int, log: list[tuple[str, str]], fail_capture: bool = False,
               replay: str = "onnxruntime") -> tuple[OrtLanes, list[FakeGraphSession]]:
    """Lanes replaying ONNX Runtime's graphs on lane threads, or (replay="own") the agent's own."""
    ort_lanes._REPLAY = replay  # restored by the `fake` fixture
    sessions: list[FakeGraphSession] = []

    def make_session(stream: Any) -> FakeGraphSession:
        s = FakeGraphSession(fake, log, fail_capture)
        sessions.append(s)
        return s

    return OrtLanes(make_session, count, IN, OUT, capture_runs=3, name="m.onnx"), sessions


def test_each_lane_captures_once_on_its_own_thread_one_at_a_time(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, sessions = make_lanes(fake, 3, log)
    try:
        assert lanes.count == 3
        assert [e for e in log if e[0] == "capture"] == [("capture", f"ort-lane-{i}") for i in range(3)]
        assert all(len(s.captured) == 1 for s in sessions)
    finally:
        lanes.close()
    assert fake.mem == {}  # every lane buffer freed


def test_cameras_get_their_own_results_through_whichever_lane_is_free(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, sessions = make_lanes(fake, 2, log)
    cams = []
    for _ in range(6):  # each camera: its own input and output buffers
        inp = fake.buffer(16)
        outs = [fake.buffer(16), fake.buffer(4)]
        cams.append((inp, outs))

    def camera(c: int) -> int:
        inp, outs = cams[c]
        for k in range(20):
            x = np.arange(4, dtype=np.float32) + 100 * c + k
            fake.ptr_array(inp, IN)[:] = x
            lanes.run_device(inp, outs)
            np.testing.assert_array_equal(fake.ptr_array(outs[0], OUT[0])[0], x * 2)
            assert float(fake.ptr_array(outs[1], OUT[1])[0, 0]) == float(x.sum())
        return c

    try:
        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(camera, range(6))) == list(range(6))
        runs = lanes.runs_per_lane()
        assert sum(runs) == 120 and all(r > 0 for r in runs)  # both lanes served
        replays = [name for kind, name in log if kind == "replay"]
        assert len(replays) == 120 + 2  # and the replay after each capture
        assert set(replays) == {"ort-lane-0", "ort-lane-1"}
        assert all(len(s.captured) == 1 for s in sessions)  # no camera thread ever captured
        host = lanes.run_host(np.full(IN.shape, 3, np.float32))
        np.testing.assert_array_equal(host[0], np.full(IN.shape, 6, np.float32))
        with pytest.raises(EngineError, match="does not match"):
            lanes.run_host(np.zeros((1, 3), np.float32))
        with pytest.raises(EngineError, match="output buffers"):
            lanes.run_device(cams[0][0], cams[0][1][:1])
    finally:
        lanes.close()
    with pytest.raises(EngineError, match="closed"):
        lanes.run_device(cams[0][0], cams[0][1])


def test_a_failed_capture_is_a_clear_error_and_frees_everything(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    with pytest.raises(EngineError, match=r"graph lane 0 of m\.onnx: capture failed: .*stream is capturing"):
        make_lanes(fake, 2, log, fail_capture=True)
    assert fake.mem == {}
    assert not CAPTURE._writer and CAPTURE._readers == 0  # the lock is free again


def test_a_failing_replay_reaches_the_camera_as_an_engine_error(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, sessions = make_lanes(fake, 1, log)
    try:
        def broken(binding: Any, options: Any) -> None:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")

        sessions[0].run_with_iobinding = broken  # type: ignore[method-assign]
        with pytest.raises(EngineError, match="inference failed: CUDA failure 700"):
            lanes.run_device(fake.buffer(16), [fake.buffer(16), fake.buffer(4)])
    finally:
        lanes.close()


def test_capture_lock_excludes_replays_and_a_waiting_capture_goes_first() -> None:
    lock = CaptureLock()
    order: list[str] = []
    with lock.shared():
        with lock.shared():  # replays overlap each other
            pass
        got = threading.Event()

        def capture() -> None:
            with lock.exclusive():
                order.append("capture")
                got.set()

        t = threading.Thread(target=capture)
        t.start()
        time.sleep(0.05)
        assert not got.is_set()  # waits for the replay in flight

        def replay() -> None:
            with lock.shared():
                order.append("replay")

        r = threading.Thread(target=replay)
        r.start()
        time.sleep(0.05)
        assert order == []  # a new replay waits behind the waiting capture
    t.join(2)
    r.join(2)
    assert order == ["capture", "replay"]


def test_capture_lock_shared_sections_nest_and_a_capture_waits_for_every_thread_inside() -> None:
    lock = CaptureLock()
    inside = threading.Event()
    leave = threading.Event()

    def camera() -> None:
        with lock.shared(), lock.shared():  # nested on one thread: no deadlock
            inside.set()
            leave.wait(5)

    cams = [threading.Thread(target=camera) for _ in range(3)]
    for t in cams:
        t.start()
    assert inside.wait(5)
    time.sleep(0.05)
    assert lock._readers == 3
    captured = threading.Event()

    def capture() -> None:
        with lock.exclusive():
            assert lock._readers == 0 and lock._writer
            captured.set()

    c = threading.Thread(target=capture)
    c.start()
    time.sleep(0.05)
    assert not captured.is_set()  # the cameras are still inside
    leave.set()
    c.join(5)
    assert captured.is_set()
    for t in cams:
        t.join(5)
    del cams, t
    import gc
    gc.collect()
    assert len(lock._holders) == 0  # threads that ended are forgotten


def gpu(**kw: Any) -> EngineConfig:
    return EngineConfig(providers=[ProviderConfig(name="CUDAExecutionProvider")], **kw)


@pytest.mark.parametrize(("cfg", "cameras", "overrides", "event"), [
    (gpu(cuda_graph=True), 1, {}, None),
    # one camera on lanes only when asked for with >= 2 (its frames overlap on them)
    (gpu(cuda_graph=True, graph_lanes=2), 1, {"graph_lanes": 2}, "cuda_graph_lanes"),
    (gpu(cuda_graph=True, graph_lanes=1), 1, {"graph_lanes": 0}, None),
    (gpu(cuda_graph=True, graph_lanes=2, preprocess="cpu"), 1, {"graph_lanes": 0}, None),
    (gpu(cuda_graph=True), 8, {"graph_lanes": 4}, "cuda_graph_lanes"),
    (gpu(cuda_graph=True), 3, {"graph_lanes": 3}, "cuda_graph_lanes"),
    (gpu(cuda_graph=True, graph_lanes=6), 8, {"graph_lanes": 6}, "cuda_graph_lanes"),
    (gpu(cuda_graph=True, preprocess="cpu"), 2, {"graph_lanes": 0, "cuda_graph": False}, "cuda_graph_off"),
    (gpu(cuda_graph=False), 2, {"graph_lanes": 0}, None),
    (EngineConfig(cuda_graph=True), 2, {"graph_lanes": 0, "cuda_graph": False}, "cuda_graph_off"),
    (EngineConfig(backend="tensorrt", cuda_graph=True), 2, {}, None),
])
def test_shared_engine_settings(cfg: EngineConfig, cameras: int, overrides: dict[str, object],
                                event: str | None) -> None:
    got, ev = shared_engine_settings(cfg, cameras)
    providers = got.pop("providers", None)
    assert got == overrides
    assert (ev[0] if ev else None) == event
    own_streams = cameras > 1 and cfg.providers[0].name == "CUDAExecutionProvider" and "graph_lanes" in got \
        and got["graph_lanes"] == 0
    if own_streams:  # no lanes on a GPU EP: ONNX Runtime takes a stream per run so the cameras overlap
        assert providers is not None and providers[0].options["has_user_compute_stream"] == "0"
    else:
        assert providers is None


def test_a_threads_first_graph_runs_hold_the_gpu_alone_later_runs_share_it(tmp_path: Any) -> None:
    # the single-camera CUDA-graph path: ONNX Runtime captures on one of a thread's first runs (per
    # thread, global mode), so those runs exclude every other CUDA call of the process
    from agent.engines.base import EngineInfo
    from agent.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(tmp_path / "m.onnx", gpu(cuda_graph=True))
    engine._graphs = True
    engine._info = EngineInfo(backend="onnxruntime", providers=["CUDAExecutionProvider"], precision="fp32",
                              device="cuda")
    alone = []
    for _ in range(5):
        with engine._capture_guard():
            alone.append(CAPTURE._writer)
    assert alone == [True, True, True, False, False]
    other: list[bool] = []

    def another_thread() -> None:
        with engine._capture_guard():  # a new thread captures again: alone again
            other.append(CAPTURE._writer)

    t = threading.Thread(target=another_thread)
    t.start()
    t.join(5)
    assert other == [True]
    engine._info = EngineInfo(backend="onnxruntime", providers=["CPUExecutionProvider"], precision="fp32",
                              device="cpu")
    with engine._capture_guard():  # the CPU EP takes no lock at all
        assert not CAPTURE._writer and CAPTURE._readers == 0


def test_a_job_queued_as_the_lanes_close_fails_instead_of_waiting_for_ever(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, _ = make_lanes(fake, 1, log)
    lanes.close()
    late = ort_lanes._Job(ort_lanes.Future(), input_ptr=1, output_ptrs=[2, 3])
    lanes._jobs.put(late)  # as if put between the closed check and the stop markers
    lanes.close()
    with pytest.raises(EngineError, match="closed"):
        assert late.future is not None
        late.future.result(timeout=1)


def test_submitted_jobs_run_on_the_lanes_and_hand_over_their_outputs_without_a_wait(fake: FakeCuda) -> None:
    """submit_device returns at once; on a lane's thread the input is copied, `input_read` runs
    before the replay, `done` gets the lane's stream and outputs (this frame's) before the lane
    takes another job; several frames of one camera are on several lanes at once."""
    log: list[tuple[str, str]] = []
    lanes, _ = make_lanes(fake, 3, log)
    inputs = [fake.buffer(16) for _ in range(12)]  # one camera, a buffer per frame in flight
    got: dict[int, tuple[np.ndarray, float]] = {}
    order: list[tuple[str, int, str]] = []
    finished = threading.Semaphore(0)
    busy = threading.Semaphore(0)
    try:
        for k, inp in enumerate(inputs):
            fake.ptr_array(inp, IN)[:] = np.arange(4, dtype=np.float32) + 10 * k

            def input_read(stream: Any, k: int = k) -> None:
                order.append(("input_read", k, threading.current_thread().name))

            def done(stream: Any, outputs: list[Any], k: int = k) -> None:
                order.append(("done", k, threading.current_thread().name))
                got[k] = (fake.ptr_array(outputs[0].ptr, OUT[0])[0].copy(),
                          float(fake.ptr_array(outputs[1].ptr, OUT[1])[0, 0]))
                busy.release()
                time.sleep(0.005)  # this lane stays busy: the next frames go to the others
                finished.release()

            t0 = time.perf_counter()
            lanes.submit_device(inp, object(), input_read, done, lambda exc: pytest.fail(str(exc)))
            assert time.perf_counter() - t0 < 0.05  # queued, not run
        for _ in inputs:
            assert finished.acquire(timeout=10)
        for k in range(len(inputs)):
            x = np.arange(4, dtype=np.float32) + 10 * k
            np.testing.assert_array_equal(got[k][0], x * 2)
            assert got[k][1] == float(x.sum())
            read = order.index(("input_read", k, next(t for e, j, t in order if j == k)))
            assert order[read + 1:].count(("done", k, order[read][2])) == 1  # same lane, after the copy
        assert len({t for _, _, t in order}) == 3  # every lane took frames of this one camera
    finally:
        lanes.close()


def test_a_submitted_job_that_fails_or_meets_closed_lanes_reports_through_failed(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, sessions = make_lanes(fake, 1, log)
    failures: list[str] = []
    reported = threading.Event()

    def failed(exc: BaseException) -> None:
        failures.append(str(exc))
        reported.set()

    def never(*args: Any) -> None:
        pytest.fail("done after a failed replay")

    try:
        def broken(binding: Any, options: Any) -> None:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")

        sessions[0].run_with_iobinding = broken  # type: ignore[method-assign]
        lanes.submit_device(fake.buffer(16), None, None, never, failed)
        assert reported.wait(10)
        assert "CUDA failure 700" in failures[0]
    finally:
        lanes.close()
    with pytest.raises(EngineError, match="closed"):
        lanes.submit_device(fake.buffer(16), None, None, never, failed)
    late = ort_lanes._Job(None, input_ptr=1, done=never, failed=failed)
    lanes._jobs.put(late)  # as if put between the closed check and the stop markers
    lanes.close()
    assert "closed" in failures[-1]


# ---- the agent's own graphs ---------------------------------------------------------------------

def test_own_graphs_are_captured_one_lane_at_a_time_and_frames_need_no_thread_and_no_session_run(
        fake: FakeCuda) -> None:
    """Each lane: plain runs, then one unsynchronised run captured (under the exclusive lock) and
    checked against a plain run; frames are then queued by the camera's thread itself (its `done`
    runs there, before submit_device returns), with no ONNX Runtime call and no lane thread."""
    log: list[tuple[str, str]] = []
    lanes, sessions = make_lanes(fake, 3, log, replay="own")
    try:
        assert lanes.replay == "own" and lanes.count == 3
        assert [e[0] for e in log] == ["own capture"] * 3
        assert all(lane.thread is None for lane in lanes._lanes)
        assert all(len(s.captured) == 0 for s in sessions)  # no graph of ONNX Runtime's
        runs_before = [s.plain_runs for s in sessions]
        inputs = [fake.buffer(16) for _ in range(9)]
        seen: list[tuple[int, str, np.ndarray]] = []
        me = threading.current_thread().name
        for k, inp in enumerate(inputs):
            fake.ptr_array(inp, IN)[:] = np.arange(4, dtype=np.float32) + 10 * k

            def done(stream: Any, outputs: list[Any], k: int = k) -> None:
                seen.append((k, threading.current_thread().name, fake.ptr_array(outputs[0].ptr, OUT[0])[0].copy()))

            read: list[int] = []
            lanes.submit_device(inp, object(), lambda stream, k=k, read=read: read.append(k), done,
                                lambda exc: pytest.fail(str(exc)))
            assert read == [k] and seen[-1][0] == k  # all queued before submit_device returned
        for k, name, out in seen:
            assert name == me
            np.testing.assert_array_equal(out, (np.arange(4, dtype=np.float32) + 10 * k) * 2)
        assert lanes.runs_per_lane() == [3, 3, 3]  # in turn
        assert [s.plain_runs for s in sessions] == runs_before  # no ONNX Runtime run per frame
        assert [g.launches for g in fake.graphs] == [4, 4, 4]  # the check at capture, then 3 frames each
        host = lanes.run_host(np.full(IN.shape, 3, np.float32))
        np.testing.assert_array_equal(host[0], np.full(IN.shape, 6, np.float32))
        outs = [fake.buffer(16), fake.buffer(4)]
        fake.ptr_array(inputs[0], IN)[:] = 5
        lanes.run_device(inputs[0], outs)
        assert float(fake.ptr_array(outs[1], OUT[1])[0, 0]) == 20.0
    finally:
        lanes.close()
    assert all(g.freed for g in fake.graphs) and fake.mem == {k: v for k, v in fake.mem.items()
                                                               if k in inputs or k in outs}
    with pytest.raises(EngineError, match="closed"):
        lanes.submit_device(inputs[0], None, None, lambda *a: None, lambda exc: None)


@pytest.mark.parametrize("fault", ["refused", "differs"])
def test_an_own_graph_refused_or_wrong_falls_back_to_onnxruntime_replays(
        fake: FakeCuda, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    if fault == "refused":
        fake.refuse_capture = "the captured work holds host nodes, which a replay would run again"
    else:
        fake.corrupt_replays = True  # the graph's outputs differ from a plain run's
    log: list[tuple[str, str]] = []
    with caplog.at_level("WARNING"):
        lanes, _ = make_lanes(fake, 2, log, replay="own")
    try:
        assert lanes.replay == "onnxruntime"
        assert ("host nodes" if fault == "refused" else "differs from a plain run") in caplog.text
        assert all(g.freed for g in fake.graphs)
        assert [e for e in log if e[0] == "capture"] == [("capture", f"ort-lane-{i}") for i in range(2)]
        outs = [fake.buffer(16), fake.buffer(4)]
        inp = fake.buffer(16)
        fake.ptr_array(inp, IN)[:] = 1
        lanes.run_device(inp, outs)
        np.testing.assert_array_equal(fake.ptr_array(outs[0], OUT[0]), np.full(IN.shape, 2, np.float32))
    finally:
        lanes.close()


def test_an_own_replay_that_fails_reaches_the_camera_through_failed(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, _ = make_lanes(fake, 1, log, replay="own")
    failures: list[str] = []
    try:
        def broken(stream: Any) -> None:
            raise EngineError("cuGraphLaunch: CUDA_ERROR_LAUNCH_FAILED (719)")

        lanes._lanes[0].graph.launch = broken  # type: ignore[method-assign,union-attr]
        lanes.submit_device(fake.buffer(16), None, None, lambda *a: pytest.fail("done after a failure"),
                            lambda exc: failures.append(str(exc)))
        assert failures and "CUDA_ERROR_LAUNCH_FAILED" in failures[0]
        with pytest.raises(EngineError, match="LAUNCH_FAILED"):
            lanes.run_device(fake.buffer(16), [fake.buffer(16), fake.buffer(4)])
    finally:
        lanes.close()


@pytest.mark.parametrize("replay", ["own", "onnxruntime"])
def test_a_filled_job_writes_the_lanes_own_input_on_its_stream_then_runs(fake: FakeCuda, replay: str) -> None:
    """submit_fill: the camera's preprocessing writes straight into the lane's input (no copy from a
    buffer of the camera's), on the stream the replay then runs on, before it; each frame's outputs
    are its own, whichever lane took it."""
    log: list[tuple[str, str]] = []
    lanes, _ = make_lanes(fake, 2, log, replay=replay)
    lane_inputs = {lane.input.ptr: lane.stream for lane in lanes._lanes}
    got: dict[int, np.ndarray] = {}
    filled: list[tuple[int, int]] = []
    finished = threading.Semaphore(0)
    try:
        for k in range(6):
            def fill(stream: Any, input_ptr: int, k: int = k) -> None:
                assert lane_inputs[input_ptr] is stream  # the lane's own input, on its own stream
                filled.append((k, input_ptr))
                fake.ptr_array(input_ptr, IN)[:] = np.arange(4, dtype=np.float32) + 10 * k

            def done(stream: Any, outputs: list[Any], k: int = k) -> None:
                got[k] = fake.ptr_array(outputs[0].ptr, OUT[0])[0].copy()
                finished.release()

            lanes.submit_fill(fill, done, lambda exc: pytest.fail(str(exc)))
        for _ in range(6):
            assert finished.acquire(timeout=10)
        for k in range(6):
            np.testing.assert_array_equal(got[k], (np.arange(4, dtype=np.float32) + 10 * k) * 2)
        assert sorted(k for k, _ in filled) == list(range(6)) and len({p for _, p in filled}) == 2
    finally:
        lanes.close()
    with pytest.raises(EngineError, match="closed"):
        lanes.submit_fill(lambda s, p: None, lambda *a: None, lambda exc: None)


def test_a_fill_that_fails_reaches_the_camera_through_failed_and_the_lane_goes_on(fake: FakeCuda) -> None:
    log: list[tuple[str, str]] = []
    lanes, _ = make_lanes(fake, 1, log, replay="own")
    failures: list[str] = []
    outs: list[float] = []
    try:
        def bad_fill(stream: Any, input_ptr: int) -> None:
            raise EngineError("cuLaunchKernel: CUDA_ERROR_INVALID_VALUE (1)")

        lanes.submit_fill(bad_fill, lambda *a: pytest.fail("done after a failed fill"),
                          lambda exc: failures.append(str(exc)))
        assert failures == ["cuLaunchKernel: CUDA_ERROR_INVALID_VALUE (1)"]

        def fill(stream: Any, input_ptr: int) -> None:
            fake.ptr_array(input_ptr, IN)[:] = 1

        lanes.submit_fill(fill, lambda s, o: outs.append(float(fake.ptr_array(o[1].ptr, OUT[1])[0, 0])),
                          lambda exc: pytest.fail(str(exc)))
        assert outs == [4.0]
    finally:
        lanes.close()
