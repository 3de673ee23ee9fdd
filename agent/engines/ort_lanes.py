"""CUDA-graph lanes: several cameras on one ONNX Runtime model, each inference a graph replay.

ONNX Runtime's CUDA EP keeps its captured graphs per calling thread, captures in global mode
(no other thread of the process may make an unsafe CUDA call meanwhile) and replays on the
session's one stream, synchronising it. So one session cannot replay for several cameras at once,
and a graph per camera costs a graph's activations per camera. A lane is one session on its own
stream with ONE captured graph over its own input / output buffers, driven by its own thread.
Cameras keep their own buffers (written by their preprocessing, read by their candidate
selection); a frame's run is a job: whichever lane is free copies the camera's input in (device
to device), replays, copies the outputs back, and synchronises its stream. Lanes are captured one
at a time when they are made, under agent.engines.cuda.CAPTURE held exclusively; replays, the GPU
frontends and NVDEC hold it shared, so a later capture (a model swap while cameras run) never
meets another thread's CUDA call (measured on the H200: without that, the third swap under load
failed with cudaErrorStreamCaptureInvalidated).

A job is either waited for (`run_device`, `run_host`: the caller blocks until the lane is done)
or submitted (`submit_device`): the lane's stream waits on the camera's event, copies the input in
and tells the camera (its input buffer may be written again once that copy ends), replays, then
hands its stream and output buffers to the camera's `done`, which queues what it does with them
(candidate selection, copies to the host) on that stream and records its own event. The camera's
thread never waits for the GPU, so one camera keeps several frames on several lanes at once, and
the per-frame hand-off costs no thread of its own (measured: docs/measurements/h200-2026-12-01-async).

What a camera costs on top of the first: its own input and output buffers (and its frontend's),
no graph and no session: measured on the H200 (docs/measurements/).
"""

from __future__ import annotations

import logging
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

StreamHook = Callable[[cuda.Stream], None]
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
    thread: threading.Thread | None = None
    ready: threading.Event = field(default_factory=threading.Event)
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
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lanes: list[_Lane] = []
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
                self._start(lane)  # captured before the next lane is made: one capture at a time
        except BaseException:
            self.close()
            raise
        log.info("%s: %d CUDA-graph lane(s) captured", name, count)

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
        except BaseException:
            for b in [inp, *outs]:
                b.free()
            raise
        # the replay synchronises the lane's stream itself; the copies after it are synchronised by the lane
        return _Lane(index, session, stream, inp, outs, binding, options, plain)

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

    def _run(self, lane: _Lane, job: _Job) -> list[np.ndarray] | None:
        s = lane.stream
        if job.host_input is not None:
            cuda.copy_htod_async(lane.input, np.ascontiguousarray(job.host_input), s)
        else:
            cuda.memcpy_async(lane.input.ptr, job.input_ptr, lane.input.nbytes, "dtod", s)
        lane.session.run_with_iobinding(lane.binding, lane.options)  # replay; returns when the GPU is done
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
                if job.wait is not None:
                    s.wait(job.wait)
                cuda.memcpy_async(lane.input.ptr, job.input_ptr, lane.input.nbytes, "dtod", s)
                if job.input_read is not None:
                    job.input_read(s)
                lane.session.run_with_iobinding(lane.binding, lane.options)  # replay; returns when the GPU is done
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
        if self._closed:
            raise EngineError(f"graph lanes of {self.name} are closed")
        self._jobs.put(_Job(None, input_ptr=int(input_ptr), wait=wait, input_read=input_read, done=done,
                            failed=failed))

    def _submit(self, job: _Job) -> list[np.ndarray] | None:
        if self._closed:
            raise EngineError(f"graph lanes of {self.name} are closed")
        self._jobs.put(job)
        assert job.future is not None
        try:
            return job.future.result()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"inference failed: {str(exc).strip()[:300]}") from exc

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
            with cuda.CAPTURE.shared():  # frees (and the session's) are CUDA calls: not during a capture
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
