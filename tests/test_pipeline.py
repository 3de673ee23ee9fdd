from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.capture.reader import CaptureThread
from agent.capture.sources.file import FileSource
from agent.config import CameraConfig, EngineConfig, ModelConfig
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.pipeline import Pipeline, build_runtime
from agent.vision.types import Result
from tests.support.models import fixed_yolov8_model


def write_video(path: Path, n: int, w: int = 128, h: int = 96, fps: float = 30.0) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for i in range(n):
        img = np.full((h, w, 3), (i * 5) % 255, np.uint8)
        cv2.putText(img, str(i), (5, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        vw.write(img)
    vw.release()
    return path


def runtime(tmp_path: Path, name: str, box: tuple[float, float, float, float, int, float], version: str):
    model = fixed_yolov8_model(tmp_path / f"{name}.onnx", [box], labels=["part", "dent"], version=version)
    mcfg = ModelConfig(path=model, version=version)
    return build_runtime(OnnxRuntimeEngine(model, EngineConfig(intra_op_threads=1)), mcfg, model)


class Sink:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.target = 0

    def __call__(self, r: Result) -> None:
        with self.lock:
            self.results.append(r)
            if self.target and len(self.results) >= self.target:
                self.event.set()


def test_fast_file_mode_every_frame_once_in_order(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 60)
    rt = runtime(tmp_path, "m", (32, 32, 16, 16, 1, 0.9), "1")
    sink = Sink()
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), rt, sink)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    seqs = [r.frame_seq for r in sink.results]
    assert seqs == list(range(60))
    # The fixed box (cx 32, cy 32, 16x16 in a 64x64 input) maps back to source pixels 128x96:
    # scale 0.5, vertical padding 8 -> x (24-0)/0.5 .. (40-0)/0.5, y (24-8)/0.5 .. (40-8)/0.5.
    det = sink.results[0].detections
    assert len(det) == 1 and det[0].label == "dent" and det[0].score == pytest.approx(0.9)
    assert det[0].box == pytest.approx((48.0, 32.0, 80.0, 64.0), abs=0.5)
    stats = pipe.stats()
    assert stats["frames_processed"] == 60 and stats["frames_dropped"] == 0
    lat = stats["latency_ms"]
    assert isinstance(lat, dict) and {"preprocess", "infer", "postprocess", "e2e"} <= set(lat)


def test_max_frames_stops_early(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 30)
    rt = runtime(tmp_path, "m", (32, 32, 16, 16, 0, 0.8), "1")
    sink = Sink()
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False, loop=True)), rt, sink,
                    max_frames=45)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    assert [r.frame_seq for r in sink.results] == list(range(45))


def two_runtimes(tmp_path: Path) -> tuple[Any, Any]:
    """v1 finds a "part", v2 a "dent": every result says which runtime inferred it."""
    return (runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1"),
            runtime(tmp_path, "v2", (20, 20, 8, 8, 1, 0.7), "2"))


def run_with_swap(tmp_path: Path, old: Any, new: Any, frames: int, after: int,
                  device_frames: bool = False) -> tuple[Pipeline, Sink, Any]:
    """A file of `frames` frames on `old`, swapped to `new` once `after` results are out, run to its end."""
    video = write_video(tmp_path / "v.avi", frames)
    sink = Sink()
    sink.target = after
    capture = device_capture(video) if device_frames else CaptureThread(CameraConfig(source=str(video), pace=False))
    pipe = Pipeline("cam0", capture, old, sink)
    pipe.start()
    assert sink.event.wait(30)
    ticket = pipe.request_swap(new)
    assert ticket.done.wait(30) and ticket.drained.wait(30)
    assert pipe.wait(60)
    pipe.stop()
    assert ticket.old is old and ticket.first_seq is not None and after <= ticket.first_seq < frames
    assert [r.frame_seq for r in sink.results] == list(range(frames)), \
        "a frame was dropped, processed twice or published out of order across the swap"
    for r in sink.results:
        want = "2" if r.frame_seq >= ticket.first_seq else "1"
        assert r.model_version == want and r.detections[0].label == ("dent" if want == "2" else "part")
    return pipe, sink, ticket


def test_swap_at_frame_boundary_loses_nothing(tmp_path: Path) -> None:
    run_with_swap(tmp_path, *two_runtimes(tmp_path), frames=200, after=40)


def test_old_runtime_is_drained_before_it_may_be_closed(tmp_path: Path) -> None:
    """`drained` comes only after the post thread published every frame of the old runtime (the update
    host closes the old runtime on it: closing earlier frees buffers the post thread still reads)."""
    video = write_video(tmp_path / "v.avi", 120)
    old = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    new = runtime(tmp_path, "v2", (20, 20, 8, 8, 1, 0.7), "2")

    class SlowSink(Sink):
        def __call__(self, r: Result) -> None:
            time.sleep(0.01)  # a slow publisher: frames of the old runtime queue up behind it
            super().__call__(r)

    sink = SlowSink()
    sink.target = 20
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), old, sink)
    pipe.start()
    assert sink.event.wait(30)
    ticket = pipe.request_swap(new)
    assert ticket.drained.wait(30)
    with sink.lock:
        published_old = [r.frame_seq for r in sink.results if r.model_version == "1"]
    assert ticket.first_seq is not None
    assert published_old == list(range(ticket.first_seq)), "the old runtime was called drained too early"
    assert pipe.wait(60)
    pipe.stop()
    assert [r.frame_seq for r in sink.results] == list(range(120))


class DeviceFrame:
    """Stands for a frame NVDEC left on the GPU (agent.vision.gpu.Nv12Frame; CUDA cannot exist here):
    not a host array, so the pipeline hands it to the GPU frontend as it is."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.shape = host.shape


class DeviceFrameSource(FileSource):
    """The real file source (OpenCV decoding), its frames wrapped as device frames; `live` as given."""

    def __init__(self, cfg: CameraConfig, live: bool) -> None:
        super().__init__(cfg)
        self._live = live

    def read(self) -> Any:
        img = super().read()
        return None if img is None else DeviceFrame(img)

    @property
    def live(self) -> bool:
        return self._live


def device_capture(video: Path, live: bool = False) -> CaptureThread:
    cfg = CameraConfig(source=str(video), pace=False, loop=live)
    return CaptureThread(cfg, source_factory=lambda c: DeviceFrameSource(c, live))


class StandInFrontend:
    """Stand-in for agent.vision.gpu.GpuFrontend (CUDA cannot exist here): the runtime's real CPU
    letterbox and ONNX Runtime session, run on worker threads that finish in random order, as frames
    submitted to CUDA-graph lanes do (`submits`), or launched one at a time by the launch thread."""

    def __init__(self, rt: Any, submits: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.rt, self.submits = rt, submits
        self.pool = ThreadPoolExecutor(3)
        self.rng = np.random.default_rng(7)
        self.launch_threads: set[str] = set()
        self.stage_threads: list[str] = []

    ready = True  # ready_now(): a GPU slot is free (False sends live frames through the mailbox)

    def ready_now(self) -> bool:
        return self.ready

    def stage(self, image: np.ndarray | DeviceFrame) -> Any:
        from agent.vision.gpu import Staged

        self.stage_threads.append(threading.current_thread().name)
        tensor, lb = self.rt.letterbox(image.host if isinstance(image, DeviceFrame) else image)
        return Staged(tensor.copy(), 0, lb)  # type: ignore[arg-type]  # the tensor stands for the GPU slot

    def launch(self, staged: Any, on_queued: Any = None) -> Any:
        self.launch_threads.add(threading.current_thread().name)
        delay = float(self.rng.uniform(0, 0.004))

        def run(tensor: np.ndarray) -> list[np.ndarray]:
            time.sleep(delay)  # frames overtake one another on the "GPU"
            return self.rt.engine.infer(tensor)

        future = self.pool.submit(run, staged.slot)
        if on_queued is not None:  # as the lane's thread does once the results are queued
            future.add_done_callback(lambda _: on_queued())

        class Pending:
            def queued(self) -> bool:
                return future.done()

            def result(self) -> tuple[list[np.ndarray], Any]:
                return future.result(), staged.lb
        return Pending()

    def close(self) -> None:
        self.pool.shutdown()


@pytest.mark.parametrize("first_submits, second_submits", [(True, True), (True, False), (False, True)])
def test_submitted_frames_publish_in_order_across_swaps(tmp_path: Path, first_submits: bool,
                                                       second_submits: bool) -> None:
    """Runs submitted without waiting (lanes) finish out of order; the post thread still publishes every
    frame once, in order, on the runtime that inferred it, also across a swap to or from such a runtime.
    Submitted frames bypass the launch thread."""
    old, new = two_runtimes(tmp_path)
    old.frontend, new.frontend = StandInFrontend(old, first_submits), StandInFrontend(new, second_submits)
    pipe, _, _ = run_with_swap(tmp_path, old, new, frames=150, after=40)
    for fe in (old.frontend, new.frontend):
        assert fe.launch_threads == ({"infer-cam0"} if fe.submits else {"launch-cam0"})
        fe.close()
    assert pipe.errors == 0


def test_a_submitted_run_that_fails_is_an_inference_error_and_the_camera_goes_on(tmp_path: Path) -> None:
    from agent.errors import EngineError

    video = write_video(tmp_path / "v.avi", 40)
    rt = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    fe = StandInFrontend(rt, True)
    real_infer = rt.engine.infer

    def flaky(tensor: np.ndarray) -> list[np.ndarray]:
        if flaky.calls == 10:  # type: ignore[attr-defined]
            flaky.calls += 1  # type: ignore[attr-defined]
            raise EngineError("inference failed: lane replay failed")
        flaky.calls += 1  # type: ignore[attr-defined]
        return real_infer(tensor)
    flaky.calls = 0  # type: ignore[attr-defined]
    rt.engine.infer = flaky  # type: ignore[method-assign]
    rt.frontend = fe
    events: list[str] = []
    sink = Sink()
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), rt, sink,
                    on_event=lambda name, data: events.append(name))
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    fe.close()
    seqs = [r.frame_seq for r in sink.results]
    assert len(seqs) == 39 and seqs == sorted(seqs) and pipe.errors == 1
    assert events == ["inference_error"]


@pytest.mark.parametrize("first_submits, second_submits", [(True, True), (True, False), (False, True)])
def test_the_capture_thread_submits_its_device_frames_in_order_across_swaps(
        tmp_path: Path, first_submits: bool, second_submits: bool) -> None:
    """Device frames (NVDEC's) on a runtime that submits its runs are staged and submitted by the
    capture thread itself; the inference thread takes only what it could not. Every frame is still
    published once, in order, on the runtime that inferred it. A runtime that does not submit gets
    every frame through the inference and launch threads, and so does any runtime after it (the
    launch thread's FIFO keeps the order)."""
    old, new = two_runtimes(tmp_path)
    old.frontend, new.frontend = StandInFrontend(old, first_submits), StandInFrontend(new, second_submits)
    pipe, _, _ = run_with_swap(tmp_path, old, new, frames=150, after=40, device_frames=True)
    for fe in (old.frontend, new.frontend):
        fe.close()
        threads = set(fe.stage_threads)
        if fe.submits and first_submits:  # the inference thread only when it held the lock (a swap)
            assert fe.stage_threads.count("capture-cam0") >= 0.8 * len(fe.stage_threads), fe.stage_threads
            assert threads <= {"capture-cam0", "infer-cam0"}
        else:
            assert threads == {"infer-cam0"}
            assert fe.launch_threads == ({"infer-cam0"} if fe.submits else {"launch-cam0"})
    assert pipe.errors == 0


def test_a_live_device_frame_without_a_free_slot_goes_through_the_mailbox(tmp_path: Path) -> None:
    """Live: when the frontend has no free slot now, the capture thread does not wait for one (the
    camera would fall behind); the frame takes the latest-wins mailbox to the inference thread."""
    video = write_video(tmp_path / "v.avi", 30)
    rt = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    fe = StandInFrontend(rt, True)
    calls = 0

    def every_other() -> bool:
        nonlocal calls
        calls += 1
        return calls % 2 == 0
    fe.ready_now = every_other  # type: ignore[method-assign]
    rt.frontend = fe
    sink = Sink()
    pipe = Pipeline("cam0", device_capture(video, live=True), rt, sink, max_frames=60)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    fe.close()
    seqs = [r.frame_seq for r in sink.results]
    assert len(seqs) == 60 and seqs == sorted(set(seqs)) and pipe.errors == 0
    assert {"capture-cam0", "infer-cam0"} <= set(fe.stage_threads)
    assert all(r.model_version == "1" and r.detections[0].label == "part" for r in sink.results)


def test_without_capture_submits_every_device_frame_takes_the_inference_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGE_AGENT_CAPTURE_SUBMIT=0 (for measuring the hand-off): the capture thread submits nothing."""
    from agent import pipeline

    monkeypatch.setattr(pipeline, "_CAPTURE_SUBMITS", False)
    video = write_video(tmp_path / "v.avi", 30)
    rt = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    rt.frontend = fe = StandInFrontend(rt, True)
    sink = Sink()
    pipe = Pipeline("cam0", device_capture(video), rt, sink)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    fe.close()
    assert [r.frame_seq for r in sink.results] == list(range(30))
    assert set(fe.stage_threads) == {"infer-cam0"}


class RunOnLane:
    """Stands for agent.vision.gpu.Pending of a run submitted to a CUDA-graph lane (no CUDA here)."""

    def __init__(self) -> None:
        self.done = False

    def queued(self) -> bool:
        return self.done


def lane_item(seq: int, run: RunOnLane) -> Any:
    from agent.pipeline import _Item
    from agent.vision.types import Frame, Letterbox

    return _Item(Frame(image=np.zeros((2, 2, 3), np.uint8), ts=0.0, seq=seq, mono=0.0), run,
                 Letterbox(1.0, 0.0, 0.0, 2, 2), None, {})  # type: ignore[arg-type]


def test_the_post_handoff_keeps_order_and_wakes_when_the_head_run_is_queued() -> None:
    import queue as queue_mod

    from agent.pipeline import _Handoff

    h = _Handoff(4, wait_for_runs=True)
    first, second = RunOnLane(), RunOnLane()
    h.put(lane_item(0, first))
    h.put(lane_item(1, second))
    second.done = True
    with pytest.raises(queue_mod.Empty):  # the later run is done, the head is not: nothing is handed on
        h.get(0.05)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(h.get(30.0)))
    reader.start()
    time.sleep(0.05)  # the reader is waiting on the head
    first.done = True
    h.wake()  # as the lane's thread does: without it the reader would sleep its 30 s
    reader.join(5)
    assert not reader.is_alive() and got[0].frame.seq == 0
    assert h.get(0.05).frame.seq == 1
    h.put("marker")  # anything but a submitted run is ready at once
    assert h.get(0.05) == "marker"


def test_the_post_handoff_hands_on_a_run_never_queued_and_bounds_its_producer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import pipeline

    monkeypatch.setattr(pipeline, "RESULT_WAIT_S", 0.1)
    h = pipeline._Handoff(2, wait_for_runs=True)
    h.put(lane_item(0, RunOnLane()))  # its lane never runs it: Pending.result reports that
    assert h.get(5.0).frame.seq == 0
    h.put(1)
    h.put(2)
    third = threading.Thread(target=h.put, args=(3,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # full: the producer waits for the post thread
    assert h.get(1.0) == 1
    third.join(5)
    assert not third.is_alive() and [h.get(1.0), h.get(1.0)] == [2, 3]
    plain = pipeline._Handoff(2, wait_for_runs=False)  # EDGE_AGENT_POST_WAKE=0: FIFO as it comes
    plain.put(lane_item(5, RunOnLane()))
    assert plain.get(0.05).frame.seq == 5
