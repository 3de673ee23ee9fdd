"""CUDA-graph lanes: several cameras on one ONNX Runtime model, each inference a graph replay.

ONNX Runtime's CUDA EP keeps its captured graphs per calling thread, captures in global mode
(no other thread of the process may make an unsafe CUDA call meanwhile) and replays on the
session's one stream, synchronising it. So one session cannot replay for several cameras at once,
and a graph per camera costs a graph's activations per camera. A lane is one session on its own
stream with ONE captured graph over its own input / output buffers. Cameras keep their own
buffers (written by their preprocessing, read by their candidate selection); a frame's run is a
job: a lane copies the camera's input in (device to device), replays, and hands its outputs on.

Two ways to replay (chosen at load, said in the log and in `replay`):
- "own" (preferred): the agent captures one plain ONNX Runtime run of the lane (no graph of ONNX
  Runtime's, no synchronise at its end) into a CUDA graph of its own (agent.engines.cuda.Graph),
  checks that the graph's outputs equal a plain run's on a probe input, and from then on a job is
  a handful of driver calls queued by the camera's own thread on the lane's stream: wait for the
  camera's event, copy in, launch the graph, the camera's `done` hook. No thread hand-off, no
  ONNX Runtime call and no wait per frame (measured on the H200: docs/measurements/).
- "onnxruntime": when that capture is refused (a model whose run synchronises, allocates or holds
  host callbacks; no ctypes driver), each lane has a thread that replays ONNX Runtime's own graph
  (its Run blocks until the GPU is done) and takes jobs from a queue.
Lanes are captured one at a time when they are made, under agent.engines.cuda.CAPTURE held
exclusively; replays, the GPU frontends and NVDEC hold it shared, so a later capture (a model swap
while cameras run) never meets another thread's CUDA call (measured on the H200: without that,
the third swap under load failed with cudaErrorStreamCaptureInvalidated).

A job is either waited for (`run_device`, `run_host`: the caller blocks until the lane is done)
or submitted (`submit_device`): the lane's stream waits on the camera's event, copies the input in
and tells the camera (its input buffer may be written again once that copy ends), replays, then
hands its stream and output buffers to the camera's `done`, which queues what it does with them
(candidate selection, copies to the host) on that stream and records its own event. The camera's
thread never waits for the GPU, so one camera keeps several frames on several lanes at once.
A submitted job may instead bring a `fill(stream, input_ptr)` hook (`submit_fill`): the camera's
preprocessing kernel, queued on the lane's stream, writes the lane's own input, so there is no
camera input buffer to copy from and no event between the two streams (the GPU frontend does
this for NVDEC frames).

What a camera costs on top of the first: its own input and output buffers (and its frontend's),
no graph and no session: measured on the H200 (docs/measurements/).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.engines import cuda
from agent.engines.base import TensorSpec
from agent.errors import EngineError

log = logging.getLogger(__name__)

__all__ = ["OrtLanes"]

_GRAPH_ID = "1"  # each lane captures one graph; ids are per session and per thread in ONNX Runtime
_LANE_READY_S = 120.0  # a capture on a cold GPU (cuDNN algorithm search) takes seconds, never minutes
# the agent's own graphs ("own"), or ONNX Runtime's replayed by lane threads ("onnxruntime": for
# measurement, and a way out should a driver misbehave with the former)
_REPLAY = os.environ.get("EDGE_AGENT_GRAPH_REPLAY", "own")

StreamHook = Callable[[cuda.Stream], None]
FillHook = Callable[[cuda.Stream, int], None]  # queues work writing the lane's input (its device pointer)
DoneHook = Callable[[cuda.Stream, list[cuda.DeviceBuffer]], None]
FailHook = Callable[[BaseException], None]


@dataclass
class _Job:
    """One inference: device pointers (a camera's own buffers) or a host tensor (CPU preprocessing).

    Waited for through `future`, or submitted: then the hooks run on the lane's thread (`wait`: an
    event the lane's stream waits on before reading the input)."""

    future: Future[list[np.ndarray] | None] | None
    input_ptr: int = 0
    output_ptrs: list[int] = field(default_factory=list)
    host_input: np.ndarray | None = None
    wait: Any = None
    input_read: StreamHook | None = None
    fill: FillHook | None = None  # writes the lane's input itself (instead of the copy from input_ptr)
    done: DoneHook | None = None
    failed: FailHook | None = None


@dataclass
class _Lane:
    index: int
    session: Any
    stream: cuda.Stream
    input: cuda.DeviceBuffer
    outputs: list[cuda.DeviceBuffer]
    binding: Any = None
    options: Any = None
    plain: Any = None
    unsynced: Any = None  # a plain run that leaves the stream unsynchronised: the one captured as `graph`
    graph: cuda.Graph | None = None  # "own" replays
    lock: threading.Lock = field(default_factory=threading.Lock)  # one job at a time queued on the stream
    thread: threading.Thread | None = None  # "onnxruntime" replays
    ready: threading.Event = field(default_factory=threading.Event)  # "onnxruntime": captured on its thread
    error: BaseException | None = None
    runs: int = 0


SessionMaker = Callable[[cuda.Stream], Any]


class OrtLanes:
    """`count` lanes over sessions made by `make_session(stream)` (the first may be given ready-made)."""

    def __init__(self, make_session: SessionMaker, count: int, input_spec: TensorSpec,
                 output_specs: list[TensorSpec], capture_runs: int = 3,
                 first: tuple[Any, cuda.Stream] | None = None, name: str = "model") -> None:
        if count < 1:
            raise EngineError(f"graph lanes must be >= 1, got {count}")
        self.input_spec, self.output_specs = input_spec, list(output_specs)
        self.capture_runs = max(3, capture_runs)  # one plain run, then the capture and a replay
        self.name = name
        self.replay = "own" if _REPLAY != "onnxruntime" else "onnxruntime"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lanes: list[_Lane] = []
        self._turn = itertools.count()
        self._closed = False
        try:
            for i in range(count):
                with cuda.CAPTURE.shared():  # allocations are CUDA calls: not during another capture
                    if i == 0 and first is not None:
                        session, stream = first
                    else:
                        stream = cuda.Stream()
                        try:
                            session = make_session(stream)
                        except BaseException:
                            stream.free()
                            raise
                    lane = self._lane(i, session, stream)
                self._lanes.append(lane)
                # captured before the next lane is made: one capture at a time
                if self.replay == "own":
                    try:
                        self._capture_own(lane)
                    except EngineError as exc:
                        if i > 0:  # the first lane's capture worked: this one failing is a real fault
                            raise
                        log.warning("%s: the agent's own CUDA graph is not possible (%s); ONNX Runtime's "
                                    "graphs are replayed by lane threads instead", name, exc)
                        self.replay = "onnxruntime"
                if self.replay == "onnxruntime":
                    self._start(lane)
        except BaseException:
            self.close()
            raise
        log.info("%s: %d CUDA-graph lane(s) captured (%s replays)", name, count, self.replay)

    @property
    def count(self) -> int:
        return len(self._lanes)

    def runs_per_lane(self) -> list[int]:
        return [lane.runs for lane in self._lanes]

    def _lane(self, index: int, session: Any, stream: cuda.Stream) -> _Lane:
        import onnxruntime as ort

        spec = self.input_spec
        inp = cuda.DeviceBuffer(_nbytes(spec))
        outs: list[cuda.DeviceBuffer] = []
        try:
            outs = [cuda.DeviceBuffer(_nbytes(o)) for o in self.output_specs]
            binding = session.io_binding()
            binding.bind_input(spec.name, "cuda", 0, spec.dtype.type, list(spec.shape), inp.ptr)
            for o, buf in zip(self.output_specs, outs, strict=True):
                binding.bind_output(o.name, "cuda", 0, o.dtype.type, list(o.shape), buf.ptr)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", _GRAPH_ID)
            plain = ort.RunOptions()
            plain.add_run_config_entry("gpu_graph_id", "-1")  # ONNX Runtime's "no graph" id
            unsynced = ort.RunOptions()
            unsynced.add_run_config_entry("gpu_graph_id", "-1")
            unsynced.add_run_config_entry("disable_synchronize_execution_providers", "1")
        except BaseException:
            for b in [inp, *outs]:
                b.free()
            raise
        return _Lane(index, session, stream, inp, outs, binding, options, plain, unsynced)

    def _capture_own(self, lane: _Lane) -> None:
        """The lane's plain run captured as a graph of the agent's own, checked against a plain run."""
        s, spec = lane.stream, self.input_spec
        probe = (np.arange(int(np.prod(spec.shape)), dtype=np.float64) % 251 / 250).astype(spec.dtype)
        probe = probe.reshape(spec.shape)
        with cuda.CAPTURE.shared():
            # plain runs first, beside the other cameras: memory, cuDNN's algorithm search; then one on
            # the probe, whose outputs the graph's must equal
            cuda.copy_htod_async(lane.input, probe, s)
            for _ in range(self.capture_runs - 1):
                lane.session.run_with_iobinding(lane.binding, lane.plain)
            expected = self._fetch(lane)
        with cuda.CAPTURE.exclusive():
            try:
                graph = cuda.Graph(s, lambda: lane.session.run_with_iobinding(lane.binding, lane.unsynced))
            except EngineError:
                raise
            except Exception as exc:  # ONNX Runtime's run failed inside the capture
                raise EngineError(f"the run failed while captured: {str(exc).strip()[:300]}") from exc
        try:
            with cuda.CAPTURE.shared():
                for buf in lane.outputs:
                    cuda.memset_async(buf, 0, s)
                graph.launch(s)
                got = self._fetch(lane)
            for o, want, have in zip(self.output_specs, expected, got, strict=True):
                scale = max(1.0, float(np.abs(want.astype(np.float64)).max(initial=0.0)))
                if not np.allclose(have, want, rtol=1e-3, atol=1e-3 * scale, equal_nan=True):
                    raise EngineError(f"the graph's output {o.name!r} differs from a plain run's on the same input")
        except BaseException:
            graph.free()
            raise
        lane.graph = graph
        log.debug("%s lane %d: own graph %s", self.name, lane.index, graph.nodes)

    def _fetch(self, lane: _Lane) -> list[np.ndarray]:
        host = [np.empty(o.shape, o.dtype) for o in self.output_specs]
        for h, buf in zip(host, lane.outputs, strict=True):
            cuda.copy_dtoh_async(h, buf, lane.stream)
        lane.stream.synchronize()
        return host

    def _start(self, lane: _Lane) -> None:
        lane.thread = threading.Thread(target=self._loop, args=(lane,), name=f"ort-lane-{lane.index}", daemon=True)
        lane.thread.start()
        if not lane.ready.wait(_LANE_READY_S):
            raise EngineError(f"graph lane {lane.index} of {self.name} not captured within {_LANE_READY_S:.0f} s")
        if lane.error is not None:
            raise EngineError(f"graph lane {lane.index} of {self.name}: capture failed: "
                              f"{str(lane.error).strip()[:300]}") from lane.error

    def _loop(self, lane: _Lane) -> None:
        try:
            # a plain run first (graph id -1: memory, cuDNN's algorithm search), beside the other
            # cameras; then ONNX Runtime captures on one of the next runs, on this thread (which one
            # depends on the session's earlier runs): those alone, so a swap stalls the others briefly
            with cuda.CAPTURE.shared():
                cuda.memset_async(lane.input, 0, lane.stream)
                lane.session.run_with_iobinding(lane.binding, lane.plain)
            with cuda.CAPTURE.exclusive():
                for _ in range(self.capture_runs - 1):
                    lane.session.run_with_iobinding(lane.binding, lane.options)
                lane.stream.synchronize()
        except BaseException as exc:
            lane.error = exc
            lane.ready.set()
            return
        lane.ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.future is None:
                self._run_submitted(lane, job)
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                with cuda.CAPTURE.shared():
                    result = self._run(lane, job)
                lane.runs += 1
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

    def _replay(self, lane: _Lane) -> None:
        if lane.graph is not None:
            lane.graph.launch(lane.stream)  # queued; nothing waits
        else:
            lane.session.run_with_iobinding(lane.binding, lane.options)  # returns when the GPU is done

    def _run(self, lane: _Lane, job: _Job) -> list[np.ndarray] | None:
        s = lane.stream
        if job.host_input is not None:
            cuda.copy_htod_async(lane.input, np.ascontiguousarray(job.host_input), s)
        else:
            cuda.memcpy_async(lane.input.ptr, job.input_ptr, lane.input.nbytes, "dtod", s)
        self._replay(lane)
        if job.host_input is not None:
            host = [np.empty(o.shape, o.dtype) for o in self.output_specs]
            for h, buf in zip(host, lane.outputs, strict=True):
                cuda.copy_dtoh_async(h, buf, s)
            s.synchronize()
            return host
        for ptr, buf in zip(job.output_ptrs, lane.outputs, strict=True):
            cuda.memcpy_async(ptr, buf.ptr, buf.nbytes, "dtod", s)
        s.synchronize()
        return None

    def _run_submitted(self, lane: _Lane, job: _Job) -> None:
        assert job.done is not None and job.failed is not None
        s = lane.stream
        try:
            with cuda.CAPTURE.shared():
                if job.fill is not None:
                    job.fill(s, lane.input.ptr)
                else:
                    if job.wait is not None:
                        s.wait(job.wait)
                    cuda.memcpy_async(lane.input.ptr, job.input_ptr, lane.input.nbytes, "dtod", s)
                    if job.input_read is not None:
                        job.input_read(s)
                self._replay(lane)
                job.done(s, lane.outputs)  # queued on this stream, before the lane's next copy in
            lane.runs += 1
        except BaseException as exc:
            try:
                job.failed(exc)
            except Exception:
                log.exception("graph lane %d: reporting a failed inference", lane.index)

    def submit_device(self, input_ptr: int, wait: Any, input_read: StreamHook | None, done: DoneHook,
                      failed: FailHook) -> None:
        """Queue one inference on a camera's input buffer without waiting for it (see the module
        docstring): `input_read(stream)` once the input copy is queued, `done(stream, outputs)` once
        the replay ran, `failed(exc)` instead when anything failed. The hooks run on a lane's
        thread: they queue work, they never wait."""
        self._queue(_Job(None, input_ptr=int(input_ptr), wait=wait, input_read=input_read, done=done,
                         failed=failed))

    def submit_fill(self, fill: FillHook, done: DoneHook, failed: FailHook) -> None:
        """As submit_device, but `fill(stream, input_ptr)` queues the work that writes the lane's input
        (a preprocessing kernel straight into it): no camera input buffer, no copy, no event between."""
        self._queue(_Job(None, fill=fill, done=done, failed=failed))

    def _queue(self, job: _Job) -> None:
        assert job.failed is not None
        if self._closed:
            raise EngineError(f"graph lanes of {self.name} are closed")
        if self.replay != "own":
            self._jobs.put(job)
            return
        lane = self._next_lane()
        with lane.lock:  # the calling thread queues it all on the lane's stream
            if self._closed:
                job.failed(EngineError(f"graph lanes of {self.name} are closed"))
                return
            self._run_submitted(lane, job)

    def _next_lane(self) -> _Lane:
        """Lanes in turn: frames cost the same, and a busy lane's stream queues the job on the GPU."""
        return self._lanes[next(self._turn) % len(self._lanes)]

    def _submit(self, job: _Job) -> list[np.ndarray] | None:
        if self._closed:
            raise EngineError(f"graph lanes of {self.name} are closed")
        try:
            if self.replay == "own":
                return self._run_here(job)
            self._jobs.put(job)
            assert job.future is not None
            return job.future.result()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"inference failed: {str(exc).strip()[:300]}") from exc

    def _run_here(self, job: _Job) -> list[np.ndarray] | None:
        """A waited-for job on the calling thread: queued on a lane, then the lane's stream synchronised."""
        lane = self._next_lane()
        with lane.lock:
            if self._closed:
                raise EngineError(f"graph lanes of {self.name} are closed")
            with cuda.CAPTURE.shared():
                result = self._run(lane, job)
            lane.runs += 1
        return result

    def run_device(self, input_ptr: int, output_ptrs: list[int]) -> None:
        """One inference on a camera's device buffers; they are final when this returns."""
        if len(output_ptrs) != len(self.output_specs):
            raise EngineError(f"{len(output_ptrs)} output buffers for {len(self.output_specs)} outputs")
        self._submit(_Job(Future(), input_ptr=int(input_ptr), output_ptrs=[int(p) for p in output_ptrs]))

    def run_host(self, tensor: np.ndarray) -> list[np.ndarray]:
        """One inference on a host tensor; the outputs are new host arrays the caller owns."""
        spec = self.input_spec
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise EngineError(f"input {tensor.dtype}{list(tensor.shape)} does not match {spec.dtype}{list(spec.shape)}")
        out = self._submit(_Job(Future(), host_input=tensor))
        assert out is not None
        return out

    def close(self) -> None:
        """Stop the lane threads (after the jobs already queued), then free buffers and streams."""
        self._closed = True
        for _ in self._lanes:
            self._jobs.put(None)
        for lane in self._lanes:
            if lane.thread is not None and lane.thread.is_alive():
                lane.thread.join(10)
                if lane.thread.is_alive():
                    log.warning("graph lane %d of %s did not stop; its buffers are left allocated",
                                lane.index, self.name)
                    continue
            if not lane.lock.acquire(timeout=10):  # a job still being queued on it by a camera's thread
                log.warning("graph lane %d of %s still busy; its buffers are left allocated", lane.index, self.name)
                continue
            lane.lock.release()  # taken by nothing more: _closed is set
            with cuda.CAPTURE.shared():  # frees (and the session's) are CUDA calls: not during a capture
                if lane.graph is not None:
                    try:
                        lane.stream.synchronize()  # launches still running read the buffers freed below
                        lane.graph.free()
                    except EngineError as exc:
                        log.warning("freeing a graph lane's CUDA graph: %s", exc)
                    lane.graph = None
                lane.binding, lane.session = None, None
                for buf in [lane.input, *lane.outputs]:
                    try:
                        buf.free()
                    except EngineError as exc:
                        log.warning("freeing a graph lane buffer: %s", exc)
                try:
                    lane.stream.synchronize()
                    lane.stream.free()
                except EngineError as exc:
                    log.warning("closing a graph lane stream: %s", exc)
        self._lanes = []
        while True:  # a job queued behind the stop markers would wait for ever: fail it
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            closed = EngineError(f"graph lanes of {self.name} are closed")
            if job.future is None:
                assert job.failed is not None
                job.failed(closed)
            elif job.future.set_running_or_notify_cancel():
                job.future.set_exception(closed)


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
