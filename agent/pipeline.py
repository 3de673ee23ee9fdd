"""One camera's pipeline: capture thread -> inference thread -> launch thread -> post/publish thread.

The inference thread takes the newest frame (live) or every frame (files). On the CPU path it
letterboxes it into the engine's preallocated input and runs the engine; on the GPU path it only
queues the upload and the letterbox kernel (agent.vision.gpu), and the launch thread runs the
engine on the frame before (ONNX Runtime's call blocks while the GPU infers, so the two overlap).
CPU frames pass the launch thread untouched. An engine that submits its runs (CUDA-graph lanes:
agent.engines.ort_lanes) needs no launch thread: the inference thread stages the frame and hands
it to a lane without waiting, and the frame goes straight to the post thread. Frames NVDEC left
on the GPU (NV12) go to the GPU frontend as they are; on the CPU path they are fetched to the
host first. With such an engine, the capture thread stages and submits its own NVDEC frames
(`_infer_direct`): staging them only queues GPU work, cheaper than waking another thread for it.
The inference thread then takes only the frames the capture thread could not (a live frame while
no GPU slot is free, anything after a swap to an engine that does not submit). Decoding, NMS and
publishing happen on the post thread, so a slow broker or a burst of detections never stalls
inference; a submitted frame wakes it once its results are queued on the GPU (`_Handoff`). Every
hand-off is a FIFO: frames keep their order. A model swap happens between two frames, on the
thread taking the next frame: the old runtime serves until the new one takes the next frame, and
every result carries the runtime that produced it.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.capture.reader import CaptureThread
from agent.config import ModelConfig
from agent.engines.base import Engine
from agent.errors import AgentError
from agent.telemetry.metrics import RateMeter, StageTimes
from agent.vision.decoders import Candidates
from agent.vision.gpu import RESULT_WAIT_S, GpuFrontend, Staged
from agent.vision.labels import load_labels
from agent.vision.postprocess import Postprocessor
from agent.vision.preprocess import Letterboxer
from agent.vision.types import Frame, Letterbox, Result

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, object]], None]
ResultSink = Callable[[Result], None]


@dataclass
class ModelRuntime:
    """A loaded model with everything needed to turn a frame into detections."""

    name: str
    version: str
    path: Path
    engine: Engine
    letterbox: Letterboxer
    post: Postprocessor
    labels: list[str]
    frontend: Any = None  # agent.vision.gpu.GpuFrontend when preprocessing runs on the GPU

    @property
    def preprocess(self) -> str:
        return "gpu" if self.frontend is not None else "cpu"

    def warmup(self, runs: int = 3) -> None:
        """A few inferences on a blank frame through the path frames will take (GPU kernels included)."""
        if self.frontend is None:
            self.engine.warmup(runs)
            return
        blank = np.zeros((self.letterbox.height, self.letterbox.width, 3), np.uint8)
        for _ in range(runs):
            self.frontend(blank)

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        self.engine.close()


def build_runtime(engine: Engine, model_cfg: ModelConfig, path: Path, name: str | None = None,
                  version: str | None = None, preprocess: str = "auto") -> ModelRuntime:
    """Wrap a loaded engine with its letterbox and postprocessor (labels from config or metadata).

    `preprocess`: "gpu" requires the GPU frontend, "auto" uses it when the engine offers device IO
    (and says in the log when it cannot), "cpu" never does.
    """
    engine.load()
    spec = engine.input_spec
    outputs = engine.output_specs
    meta = dict(getattr(engine, "metadata", {}) or {})
    num_classes = _num_classes(outputs[0].shape) if outputs else None
    labels = load_labels(model_cfg.labels, meta, num_classes)
    post = Postprocessor.from_config(model_cfg, labels, [o.shape for o in outputs])
    frontend = None
    if preprocess != "cpu" and (engine.device_stream is not None or preprocess == "gpu"):
        try:
            frontend = GpuFrontend(engine, post)
        except AgentError as exc:
            if preprocess == "gpu":
                raise
            log.warning("GPU preprocessing unavailable, using the CPU path: %s", exc)
    return ModelRuntime(name=name or model_cfg.name, version=version or model_cfg.version, path=path,
                        engine=engine, letterbox=Letterboxer(spec.shape, spec.dtype), post=post, labels=labels,
                        frontend=frontend)


def _num_classes(shape: tuple[int, ...]) -> int | None:
    """Class count implied by a YOLO output shape, when the layout makes it unambiguous."""
    if len(shape) != 3:
        return None
    a, b = shape[1], shape[2]
    if b == 6 and a > 6:
        return None  # end-to-end [1, K, 6]: classes are ids, not columns
    return a - 4 if a < b else b - 5


@dataclass
class SwapTicket:
    runtime: ModelRuntime
    applied: threading.Event = field(default_factory=threading.Event)  # the new runtime takes the next frame
    done: threading.Event = field(default_factory=threading.Event)  # the first frame on it was inferred
    # every frame of the old runtime has been published: only now may the old runtime be closed (its
    # outputs may sit on the GPU until the post thread collects them)
    drained: threading.Event = field(default_factory=threading.Event)
    first_seq: int | None = None
    old: ModelRuntime | None = None


@dataclass
class _Item:
    frame: Frame
    outputs: list[np.ndarray] | Candidates | Any  # Any: agent.vision.gpu.Pending (collected by the post thread)
    letterbox: Letterbox
    runtime: ModelRuntime
    stage_ms: dict[str, float]


_STOP = object()
# the GIL switch interval the pipelines set; the variable is for measurement only (many cameras)
_SWITCH_INTERVAL_S = float(os.environ.get("EDGE_AGENT_SWITCH_INTERVAL_MS", "1") or 1) / 1000
# the capture thread submits its own device frames (0: every frame through the inference thread; measurement only)
_CAPTURE_SUBMITS = os.environ.get("EDGE_AGENT_CAPTURE_SUBMIT", "1") != "0"
# results wake the post thread when they are queued on the GPU (0: when submitted, then again for
# the run, as before; measurement only)
_WAKE_ON_RESULTS = os.environ.get("EDGE_AGENT_POST_WAKE", "1") != "0"


def _ready(item: object) -> bool:
    """The post thread can take `item` without waiting for a lane: anything but a submitted run not
    yet queued on the GPU."""
    if not isinstance(item, _Item):
        return True
    queued = getattr(item.outputs, "queued", None)  # agent.vision.gpu.Pending of a submitted run
    return queued is None or bool(queued())


class _Handoff:
    """The FIFO to the post thread. An item whose run is still waiting for a lane stays at the head
    until the lane queued its results (`wake()`, from the lane's thread): the post thread wakes once
    per frame, when there is work, not once for the item and once more for its run. A bounded put
    waits while `maxsize` items are queued (backpressure on the frames' producer)."""

    def __init__(self, maxsize: int, wait_for_runs: bool) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._q: deque[tuple[object, float]] = deque()
        self._max = max(1, maxsize)
        self._wait_for_runs = wait_for_runs

    def put(self, item: object) -> None:
        with self._cond:
            while len(self._q) >= self._max:
                self._cond.wait()
            self._q.append((item, time.monotonic()))
            if len(self._q) == 1:
                self._cond.notify_all()

    def wake(self) -> None:
        if not self._q:  # nothing queued waits for a run (a lane that queues on the caller's thread
            return       # finishes before the frame is put here): no lock, no wake-up
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout: float) -> object:
        """The head once it is ready, or once it waited the frontend's RESULT_WAIT_S (Pending.result then
        reports the run that never came); queue.Empty after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._q:
                    item, since = self._q[0]
                    if not self._wait_for_runs or _ready(item) or time.monotonic() - since > RESULT_WAIT_S:
                        self._q.popleft()
                        self._cond.notify_all()  # a producer waiting for room
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._cond.wait(left)


def _submits(runtime: ModelRuntime) -> bool:
    """The runtime's frontend hands frames to CUDA-graph lanes without waiting (agent.vision.gpu)."""
    return runtime.frontend is not None and bool(getattr(runtime.frontend, "submits", False))


class Pipeline:
    """Runs one camera; results go to `on_result` on the post thread."""

    def __init__(self, camera_id: str, capture: CaptureThread, runtime: ModelRuntime, on_result: ResultSink,
                 on_event: EventSink | None = None, max_frames: int | None = None,
                 handoff_size: int = 4) -> None:
        self.camera_id = camera_id
        self.capture = capture
        self.runtime = runtime
        self.on_result = on_result
        self.on_event = on_event or (lambda name, data: None)
        self.max_frames = max_frames
        self.times = StageTimes()
        self.fps = RateMeter()
        self.processed = 0
        self.submitted = 0
        self.errors = 0
        self.publish_errors = 0
        self.recent_frames: deque[np.ndarray] = deque(maxlen=8)
        self.infer_progress = time.monotonic()
        self.post_progress = time.monotonic()
        self.finished = threading.Event()
        self._handoff = _Handoff(handoff_size, _WAKE_ON_RESULTS)
        self._launch_q: queue.Queue[object] = queue.Queue(maxsize=2)
        self.launch_progress = time.monotonic()
        self._stop = threading.Event()
        self._frozen = threading.Event()  # test hook: simulates a stuck inference thread
        self._swap: SwapTicket | None = None
        self._new_ticket: SwapTicket | None = None
        self._swap_lock = threading.Lock()
        # one frame at a time into the runtime, from the inference thread or the capture thread (_infer_direct);
        # frames leave the mailbox under it, so the two never reorder frames
        self._infer_lock = threading.Lock()
        self._infer_done = False  # the inference thread has ended: the capture thread submits nothing more
        self._infer_thread = threading.Thread(target=self._infer_loop, name=f"infer-{camera_id}", daemon=True)
        self._launch_thread = threading.Thread(target=self._launch_loop, name=f"launch-{camera_id}", daemon=True)
        # frames (and swap markers) go straight to the post thread while the runtime submits its runs;
        # a swap to one that does not turns this off for good (FIFO order through the launch thread)
        self._direct = _submits(runtime)
        self._post_thread = threading.Thread(target=self._post_loop, name=f"post-{camera_id}", daemon=True)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        # Four Python threads share the GIL; at the default 5 ms switch interval a thread woken by
        # its queue may wait that long behind a busy one. 1 ms bounds that; on the H200 bench 0.1,
        # 0.25 and 1 ms gave the same throughput and p99 (docs/measurements/h200-2026-11-30).
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S or "EDGE_AGENT_SWITCH_INTERVAL_MS" in os.environ:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        if _CAPTURE_SUBMITS and hasattr(self.capture, "set_direct"):
            self.capture.set_direct(self._infer_direct)
        self.capture.start()
        self._infer_thread.start()
        self._launch_thread.start()
        self._post_thread.start()

    def request_stop(self) -> None:
        """Tell every thread to stop, without waiting (a service stops all cameras at once, then joins).

        The inference thread takes no new frame after this: frames still waiting in the capture queue
        (a file's next few, up to FILE_QUEUE) are dropped, so "every frame" holds for files while the
        pipeline runs, not across a stop. Every frame already taken is inferred and published."""
        self._stop.set()
        self._frozen.clear()
        self.capture.request_stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capture, finish the frame in flight, publish what was inferred, join the threads.

        `timeout` bounds the whole stop, capture and the three threads together (it was each of the
        four): a thread still blocked after it (a wedged read) is a daemon and is left behind."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        self.capture.stop(timeout)
        threads = (self._infer_thread, self._launch_thread, self._post_thread)
        for t in threads:
            if t.ident is not None:  # a service failing at start stops pipelines never started
                t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            log.warning("pipeline %s did not stop within %.1f s", self.camera_id, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the source ended (or max_frames reached) and every result was handed on."""
        return self.finished.wait(timeout)

    def freeze(self) -> None:
        """Test hook: the inference thread stops making progress (the watchdog must notice)."""
        log.warning("pipeline %s frozen on request (test hook)", self.camera_id)
        self._frozen.set()

    # ---- model swap -----------------------------------------------------------------------
    def request_swap(self, runtime: ModelRuntime) -> SwapTicket:
        """Ask the inference thread to switch to `runtime` before its next frame."""
        ticket = SwapTicket(runtime)
        with self._swap_lock:
            self._swap = ticket
        return ticket

    def _apply_swap(self) -> None:
        with self._swap_lock:
            ticket, self._swap = self._swap, None
        if ticket is None:
            return
        ticket.old, self.runtime = self.runtime, ticket.runtime
        self._new_ticket = ticket  # completed by the first frame the new runtime infers
        self._direct = self._direct and _submits(ticket.runtime)
        self._next_q.put(ticket)  # a FIFO marker: the post thread sets `drained` when it gets there
        ticket.applied.set()
        log.info("camera %s: now on model %s %s", self.camera_id, ticket.runtime.name, ticket.runtime.version)

    # ---- threads --------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self._frozen.is_set():  # a stuck stage: no heartbeat
                    time.sleep(0.05)
                    continue
                self.infer_progress = time.monotonic()
                if self._swap is not None:
                    with self._infer_lock:
                        self._apply_swap()
                if self.max_frames is not None and self.submitted >= self.max_frames:
                    break
                if not self.capture.wait_frame(timeout=0.1):
                    if self.capture.ended:
                        break
                    continue
                with self._infer_lock:
                    if self.max_frames is not None and self.submitted >= self.max_frames:
                        break  # the capture thread submitted the last one meanwhile
                    frame = self.capture.take()
                    if frame is not None:
                        self._infer_one(frame)
        finally:
            with self._infer_lock:  # after any frame the capture thread is submitting: _STOP comes last
                self._infer_done = True
                self._launch_q.put(_STOP)

    def _infer_direct(self, frame: Frame, live: bool) -> bool:
        """On the capture thread: stage and submit a device frame at once, when the runtime submits its
        runs, nothing waits in the mailbox before it, and (live) a GPU slot is free now; False leaves the
        frame to the mailbox and the inference thread. Never raises (the capture thread must go on)."""
        if not self._direct or isinstance(frame.image, np.ndarray) or not self._infer_lock.acquire(blocking=False):
            return False
        try:
            if (self._infer_done or self._stop.is_set() or self._frozen.is_set() or self.capture.queued
                    or (self.max_frames is not None and self.submitted >= self.max_frames)):
                return False
            if self._swap is not None:
                self._apply_swap()
                if not self._direct:  # the new runtime does not submit: frames go through the launch thread
                    return False
            if live and not self.runtime.frontend.ready_now():  # it would wait: latest-wins in the mailbox
                return False
            self.infer_progress = time.monotonic()
            self._infer_one(frame)
            return True
        except Exception as exc:  # _infer_one reports engine errors itself; anything else is a bug
            log.exception("camera %s frame %d: submitting from the capture thread failed", self.camera_id, frame.seq)
            self.errors += 1
            self.on_event("inference_error", {"camera": self.camera_id, "error": str(exc)[:300]})
            return True  # the frame is lost, counted; a second try could submit it twice
        finally:
            self._infer_lock.release()

    def _items(self, q: queue.Queue[object] | _Handoff, progress: str,
               on_marker: Callable[[SwapTicket], None]) -> Iterator[_Item]:
        """Items from `q` until _STOP; swap markers go to `on_marker`; `progress` (an attribute name) is
        stamped on every wait, for the watchdog."""
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                setattr(self, progress, time.monotonic())
                continue
            setattr(self, progress, time.monotonic())
            if item is _STOP:
                return
            if isinstance(item, SwapTicket):
                on_marker(item)
                continue
            assert isinstance(item, _Item)
            yield item

    def _inference_failed(self, seq: int, exc: AgentError) -> None:
        self.errors += 1
        log.error("camera %s frame %d: %s", self.camera_id, seq, exc)
        self.on_event("inference_error", {"camera": self.camera_id, "error": str(exc)[:300]})

    @property
    def _next_q(self) -> queue.Queue[object] | _Handoff:
        """Where the inference thread's frames go: the launch thread, or straight to the post thread."""
        return self._handoff if self._direct else self._launch_q

    def _launch_loop(self) -> None:
        """GPU frames: run the engine on each staged frame, in order (its call blocks while the GPU
        infers, so staging the next frame happens on the inference thread meanwhile). CPU frames
        arrive already inferred and pass straight on, as do frames already submitted."""
        try:
            for item in self._items(self._launch_q, "launch_progress", self._handoff.put):
                if isinstance(item.outputs, Staged):  # only a GPU frontend stages
                    try:
                        item.outputs = item.runtime.frontend.launch(item.outputs)
                    except AgentError as exc:
                        self._inference_failed(item.frame.seq, exc)
                        continue
                self._handoff.put(item)
        finally:
            self._handoff.put(_STOP)

    def _infer_one(self, frame: Frame) -> None:
        rt = self.runtime
        t0 = time.perf_counter()
        image = frame.image
        try:
            if rt.frontend is None:
                if not isinstance(image, np.ndarray):  # an NV12 frame on the GPU, CPU preprocessing: fetch it
                    image = image.to_bgr()
                tensor, lb = rt.letterbox(image)
                t1 = time.perf_counter()
                outputs: list[np.ndarray] | Candidates | Any = rt.engine.infer(tensor)
            else:  # uploaded and letterboxed on the GPU; the launch thread runs the engine on it
                staged = rt.frontend.stage(image)
                outputs, lb = staged, staged.lb
                if rt.frontend.submits:  # handed to a lane at once: nothing for the launch thread
                    outputs = rt.frontend.launch(staged, on_queued=self._handoff.wake)
                t1 = t0
            t2 = time.perf_counter()
        except AgentError as exc:
            self._inference_failed(frame.seq, exc)
            return
        # on the GPU path "infer" is the host time to queue upload and letterbox; the GPU time shows in gpu_wait
        stage = {"wait": (t0 - frame.mono) * 1e3 if frame.mono else 0.0,
                 "preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3}
        if isinstance(image, np.ndarray):  # host frames only: device frames would pin decoder buffers
            self.recent_frames.append(image)
        self.submitted += 1
        self._next_q.put(_Item(frame, outputs, lb, rt, stage))
        if self._new_ticket is not None:
            self._new_ticket.first_seq = frame.seq
            self._new_ticket.done.set()
            self._new_ticket = None

    def _post_loop(self) -> None:
        try:
            for item in self._items(self._handoff, "post_progress", lambda ticket: ticket.drained.set()):
                self._post_one(item)
        finally:
            self.finished.set()

    def _post_one(self, item: _Item) -> None:
        t0 = time.perf_counter()
        rt = item.runtime
        try:
            outputs = item.outputs
            if not isinstance(outputs, (list, Candidates)):  # a frame still on the GPU: wait for it
                try:
                    outputs, _ = outputs.result()
                except AgentError as exc:  # a submitted run that failed on its lane
                    self._inference_failed(item.frame.seq, exc)
                    return
                t0b = time.perf_counter()
                item.stage_ms["gpu_wait"] = (t0b - t0) * 1e3
                t0 = t0b
            detections = rt.post(outputs, item.letterbox)
        except Exception as exc:  # a decoder bug must not kill the thread: count, report, go on
            self.errors += 1
            log.exception("camera %s frame %d: postprocess failed", self.camera_id, item.frame.seq)
            self.on_event("postprocess_error", {"camera": self.camera_id, "error": str(exc)[:300]})
            return
        t1 = time.perf_counter()
        item.stage_ms["postprocess"] = (t1 - t0) * 1e3
        f = item.frame
        result = Result(frame_seq=f.seq, ts=f.ts, mono=f.mono, frame_w=f.width, frame_h=f.height,
                        detections=detections, model_name=rt.name, model_version=rt.version,
                        stage_ms=item.stage_ms)
        try:
            self.on_result(result)
        except Exception:
            self.publish_errors += 1
            log.exception("camera %s: result sink failed", self.camera_id)
        t2 = time.perf_counter()
        for name, ms in item.stage_ms.items():
            self.times.add(name, ms)
        self.times.add("publish", (t2 - t1) * 1e3)
        if f.mono:
            self.times.add("e2e", (time.monotonic() - f.mono) * 1e3)
        self.processed += 1
        self.fps.tick()

    def progress_probes(self) -> dict[str, Callable[[], float]]:
        """Monotonic time of each stage's last progress, for the watchdog."""
        return {f"infer-{self.camera_id}": lambda: self.infer_progress,
                f"launch-{self.camera_id}": lambda: self.launch_progress,
                f"post-{self.camera_id}": lambda: self.post_progress,
                f"capture-{self.camera_id}": self._capture_progress}

    def _capture_progress(self) -> float:
        # A capture waiting on a lost camera is not stuck (reconnects have their own backoff):
        # only a stream that stopped delivering while "streaming" counts as stalled.
        if self.capture.state != "streaming":
            return time.monotonic()
        return float(self.capture.last_progress)

    # ---- figures --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        cap = self.capture.stats()
        return {
            "camera": self.camera_id,
            "frames_in": cap.get("frames_in", 0),
            "frames_processed": self.processed,
            "frames_dropped": cap.get("frames_dropped", 0),
            "errors": self.errors,
            "fps": self.fps.rate(),
            "latency_ms": self.times.summary(),
            "camera_state": cap.get("state"),
            "decode": cap.get("decode", "cpu"),
            "reconnects": cap.get("reconnects", 0),
            "decode_errors": cap.get("decode_errors", 0),
            "model": {"name": self.runtime.name, "version": self.runtime.version},
        }
