"""Native TensorRT backend (no ONNX Runtime): the runtime half, and the backend's public names.

Data flow: engine bytes (built by agent.engines.trt_build, kept by the engine cache) ->
`TensorRTEngine.load()`: plugins registered, Runtime with its DLA core set BEFORE
deserialize_cuda_engine (an engine built for DLA core 1 otherwise runs on core 0), IO tensors
found by name, input shape fixed at batch 1 (checked), output shapes resolved (a data-dependent -1
is refused), IO contract checked against the ONNX model, one stream plus a pinned host and a
device buffer per tensor (agent.engines.cuda), each bound with set_tensor_address -> `infer()`:
input copied into its pinned buffer, HtoD, execute_async_v3 on the agent's stream, DtoH,
synchronise. Nothing is allocated per frame. It frees only what it owns, explicitly, in close().
Another camera on the same model: `share()` -> another IExecutionContext on the SAME deserialized
engine (one deserialize, weights on the device once), with its own stream, buffers and tensor
addresses; the engine and runtime are dropped when the last context closes.

Written against the TensorRT Python bindings of 8.6 (JetPack 6.0) and 10.3 (JetPack 6.1 / 6.2):
both have the name-based API used here (`num_io_tensors`, `get_tensor_name`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`); what differs is handled in agent.engines.trt_common
and trt_build. The whole control flow runs in CI against a recording fake of the bindings
(tests/support/fake_tensorrt.py); on a real Orin `scripts/jetson_acceptance.py` checks it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.engines.base import Engine, EngineInfo, TensorSpec
from agent.engines.trt_build import ProgressFn, build_engine_bytes, network_from_onnx, progress_monitor
from agent.engines.trt_common import (
    NOT_INSTALLED,
    BuildOptions,
    check_io_contract,
    context_memory_bytes,
    dims_tuple,
    init_plugins,
    logger,
    network_flags,
    numpy_dtype,
    onnx_io_specs,
    parse_version,
    require_tensorrt,
    tensorrt_available,
)
from agent.errors import EngineError, ModelError

if TYPE_CHECKING:
    import tensorrt as trt

    from agent.engines.cuda import DeviceBuffer, PinnedBuffer, Stream

__all__ = [
    "NOT_INSTALLED",
    "BuildOptions",
    "ProgressFn",
    "TensorRTEngine",
    "build_engine_bytes",
    "check_io_contract",
    "network_flags",
    "network_from_onnx",
    "numpy_dtype",
    "onnx_io_specs",
    "parse_version",
    "progress_monitor",
    "tensorrt_available",
]

log = logging.getLogger(__name__)


# ---- the engine ------------------------------------------------------------------------------
class _SharedEngine:
    """One deserialized engine and its runtime, held by every context made on it.

    Ownership is explicit: each open TensorRTEngine (camera) counts once in `open`; the one whose
    close() brings it to 0 drops the engine, then the runtime (TensorRT frees a Python-held object
    when its last reference goes). `lock` serialises context creation and release: TensorRT runs
    different execution contexts concurrently, but nothing else on one object.
    """

    def __init__(self, runtime: trt.Runtime, engine: trt.ICudaEngine, context_bytes: int, plan_bytes: int) -> None:
        self.runtime: trt.Runtime | None = runtime
        self.engine: trt.ICudaEngine | None = engine
        self.context_bytes = context_bytes
        self.plan_bytes = plan_bytes
        self.open = 0
        self.lock = threading.Lock()

    def create_context(self) -> trt.IExecutionContext:
        with self.lock:
            if self.engine is None:
                raise EngineError("the TensorRT engine was freed with its last context")
            context = self.engine.create_execution_context()
            if context is None:
                raise EngineError(
                    "TensorRT could not create an execution context (each one allocates "
                    f"{self.context_bytes} bytes of device memory: out of device memory?)")
            self.open += 1
            return context

    def release(self) -> None:
        with self.lock:
            self.open -= 1
            if self.open <= 0:
                self.engine = None  # engine before runtime
                self.runtime = None


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine at batch 1, run on its own stream.

    Everything is set up once in load(): runtime, engine, execution context, one stream, a pinned
    host and a device buffer per IO tensor, tensor addresses. infer() copies the input into the
    pinned buffer, runs HtoD -> execute_async_v3 -> DtoH on the stream and synchronises. Outputs
    are returned as copies (`copy_outputs=False` returns the pinned buffers themselves, valid until
    the next infer()).

    Several cameras on one engine: share() makes another TensorRTEngine on the SAME deserialized
    engine (weights on the device once) with its own IExecutionContext (create_execution_context
    can be called many times on one engine; each context gets its own activation memory), stream,
    buffers and tensor addresses, so the cameras run concurrently without touching each other's
    state. Each is closed on its own; the engine and runtime go with the last. `info.extra` says
    what one more camera costs on the device: `context_memory_bytes` (TensorRT's per-context
    memory) + `io_bytes` (its IO buffers) = `memory_per_extra_camera_bytes`.
    """

    def __init__(self, engine_path: Path, model_path: Path | None = None, precision: str = "fp32",
                 copy_outputs: bool = True, engine_key: str = "", dla_core: int | None = None) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.model_path = model_path
        self.precision = precision
        self.copy_outputs = copy_outputs
        self.engine_key = engine_key
        self.dla_core = dla_core
        self._version = require_tensorrt()  # fail at construction with a clear message when absent
        self._shared: _SharedEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: Stream | None = None
        self._host: dict[str, PinnedBuffer] = {}
        self._device: dict[str, DeviceBuffer] = {}
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._info: EngineInfo | None = None
        self._device_bindings: list[list[int]] = []  # [input, *outputs] device addresses per binding
        self._active_binding = -1

    def _io_specs(self, engine: trt.ICudaEngine) -> tuple[list[TensorSpec], list[TensorSpec]]:
        import tensorrt as trt

        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = dims_tuple(engine.get_tensor_shape(name))
            spec = TensorSpec(name, shape, numpy_dtype(engine.get_tensor_dtype(name)))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        return inputs, outputs

    def _deserialize(self, data: bytes) -> _SharedEngine:
        import tensorrt as trt

        init_plugins()  # an engine with TensorRT plugin layers needs them registered first
        runtime = trt.Runtime(logger())
        if self.dla_core is not None:
            if self.dla_core >= runtime.num_DLA_cores:
                raise EngineError(f"engine built for DLA core {self.dla_core}; this device has "
                                  f"{runtime.num_DLA_cores} DLA cores")
            runtime.DLA_core = self.dla_core  # before deserialize: the core is chosen there
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(
                f"TensorRT {trt.__version__} cannot deserialize {self.engine_path.name}: built by another "
                "TensorRT version or for another GPU, or damaged"
            )
        return _SharedEngine(runtime, engine, context_memory_bytes(engine, self._version), len(data))

    def _load_impl(self) -> None:
        try:
            data = self.engine_path.read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read engine {self.engine_path}: {exc.strerror or exc}") from exc
        try:
            self._attach(self._deserialize(data))
            if self.model_path is not None:
                want_in, want_out = onnx_io_specs(Path(self.model_path))
                problems = check_io_contract(want_in, want_out, self._inputs, self._outputs)
                if problems:
                    raise ModelError(f"engine {self.engine_path.name} does not match {Path(self.model_path).name}: "
                                     + "; ".join(problems))
            self._allocate()
        except BaseException:
            self._close_impl()
            raise
        extra: dict[str, object] = {"tensorrt": self._version}
        if self.dla_core is not None:
            extra["dla_core"] = self.dla_core
        self._info = self._with_memory(EngineInfo(backend="tensorrt", providers=["TensorRT"], precision=self.precision,
                                                  device="cuda", engine_key=self.engine_key, extra=extra))

    def _attach(self, shared: _SharedEngine) -> None:
        """This camera's execution context on `shared`'s engine, its input fixed at batch 1, and the
        IO specs resolved through it (a data-dependent -1 is refused)."""
        ctx = self._context = shared.create_context()
        self._shared = shared  # counted in shared.open from here: close() releases it
        assert shared.engine is not None  # create_context() raised otherwise
        inputs, outputs = self._io_specs(shared.engine)
        if len(inputs) != 1:
            raise ModelError(f"expected one input tensor, the engine has {len(inputs)}")
        for s in inputs:
            if s.shape and s.shape[0] < 0:  # dynamic batch: the build profile fixed it at 1
                fixed = (1, *s.shape[1:])
                if not ctx.set_input_shape(s.name, fixed):
                    more = "" if shared.open == 1 else (
                        f" on context {shared.open} of this engine (TensorRT may give each optimization profile "
                        "to one context only: export the model with a fixed batch of 1 to share the engine)")
                    raise EngineError(f"TensorRT refused input shape {fixed} for {s.name!r}{more}")
        inputs = [TensorSpec(s.name, dims_tuple(ctx.get_tensor_shape(s.name)), s.dtype) for s in inputs]
        outputs = [TensorSpec(s.name, dims_tuple(ctx.get_tensor_shape(s.name)), s.dtype) for s in outputs]
        for s in (*inputs, *outputs):
            if any(d < 0 for d in s.shape):  # data-dependent: the size is known only after a run
                raise ModelError(f"tensor {s.name!r} has a data-dependent shape {s.shape}: not supported "
                                 "(export the model with fixed output shapes)")
        self._inputs, self._outputs = inputs, outputs

    def _allocate(self) -> None:
        """One stream, and a pinned host and a device buffer per IO tensor, bound to this context."""
        from agent.engines import cuda

        assert self._context is not None
        self._stream = cuda.Stream()
        for s in (*self._inputs, *self._outputs):
            self._host[s.name] = cuda.PinnedBuffer(s.shape, s.dtype)
            self._device[s.name] = cuda.DeviceBuffer(self._host[s.name].nbytes)
            if not self._context.set_tensor_address(s.name, self._device[s.name].ptr):
                raise EngineError(f"set_tensor_address({s.name!r}) failed")

    def _with_memory(self, info: EngineInfo) -> EngineInfo:
        """`info` with what this context holds on the device (telemetry: GPU memory per camera)."""
        assert self._shared is not None
        io = sum(b.nbytes for b in self._host.values())  # each device buffer is its pinned twin's size
        info.extra.update({"plan_bytes": self._shared.plan_bytes,
                           "context_memory_bytes": self._shared.context_bytes, "io_bytes": io,
                           "memory_per_extra_camera_bytes": self._shared.context_bytes + io})
        return info

    # ---- one loaded engine, several cameras -----------------------------------------------------
    def share(self) -> TensorRTEngine:
        """Another camera's context on this engine (see the class docstring); EngineError, with the
        reason, when TensorRT cannot make one (the caller then loads an engine of its own)."""
        self._require_loaded()
        assert self._shared is not None and self._info is not None
        other = TensorRTEngine(self.engine_path, self.model_path, self.precision, self.copy_outputs,
                               self.engine_key, self.dla_core)
        try:
            other._attach(self._shared)
            other._allocate()
        except BaseException as exc:
            other._close_impl()
            if isinstance(exc, (EngineError, ModelError)):
                raise EngineError(f"cannot run another camera on TensorRT engine {self.engine_path.name}: {exc}") \
                    from exc
            raise
        other._info = other._with_memory(self._info.copy())
        other._loaded = True
        return other

    @property
    def contexts(self) -> int:
        """Open contexts (cameras) on this loaded engine, this one included; 0 once closed."""
        return self._shared.open if self._shared is not None else 0

    def _input_spec_impl(self) -> TensorSpec:
        return self._inputs[0]

    def _output_specs_impl(self) -> list[TensorSpec]:
        return list(self._outputs)

    def _info_impl(self) -> EngineInfo:
        assert self._info is not None  # set by _load_impl; load() guards every caller
        return self._info

    def _infer_impl(self, tensor: np.ndarray) -> list[np.ndarray]:
        from agent.engines import cuda

        assert self._stream is not None
        if self._device_bindings:
            raise EngineError("the engine runs on caller-bound device buffers (bind_device); use run_device()")
        inp = self._inputs[0]
        np.copyto(self._host[inp.name].array, tensor)
        cuda.copy_htod_async(self._device[inp.name], self._host[inp.name], self._stream)
        assert self._context is not None
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineError("TensorRT execute_async_v3 failed")
        for s in self._outputs:
            cuda.copy_dtoh_async(self._host[s.name], self._device[s.name], self._stream)
        self._stream.synchronize()
        outs = [self._host[s.name].array for s in self._outputs]
        return [o.copy() for o in outs] if self.copy_outputs else outs

    # ---- device IO: GPU preprocessing writes the input, the outputs stay on the device ----------
    @property
    def device_stream(self) -> Any | None:
        return self._stream

    def bind_device(self, input_ptr: int, output_ptrs: list[int]) -> int:
        self._require_loaded()
        if len(output_ptrs) != len(self._outputs):
            raise EngineError(f"{len(output_ptrs)} output buffers for {len(self._outputs)} outputs")
        self._device_bindings.append([input_ptr, *output_ptrs])
        return len(self._device_bindings) - 1

    def run_device(self, binding: int = 0) -> None:
        self._require_loaded()
        assert self._stream is not None
        if not 0 <= binding < len(self._device_bindings):
            raise EngineError("bind_device() first")
        # addresses are per execution context, not per call: set them when the binding changes
        assert self._context is not None
        if binding != self._active_binding:
            names = [self._inputs[0].name, *(s.name for s in self._outputs)]
            for name, ptr in zip(names, self._device_bindings[binding], strict=True):
                if not self._context.set_tensor_address(name, ptr):
                    raise EngineError(f"set_tensor_address({name!r}) failed")
            self._active_binding = binding
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineError("TensorRT execute_async_v3 failed")

    def _close_impl(self) -> None:
        """Free what this camera allocated, in reverse order, after its stream has drained; then
        give up its share of the engine (the last one out frees engine and runtime)."""
        errors: list[str] = []
        if self._stream is not None:
            try:
                self._stream.synchronize()  # nothing queued may still use the buffers freed below
            except EngineError as exc:
                errors.append(str(exc))
        for buf in (*self._device.values(), *self._host.values()):
            try:
                buf.free()
            except EngineError as exc:
                errors.append(str(exc))
        self._device.clear()
        self._host.clear()
        if self._stream is not None:
            try:
                self._stream.free()
            except EngineError as exc:
                errors.append(str(exc))
            self._stream = None
        self._device_bindings, self._active_binding = [], -1
        self._context = None  # this camera's context before the engine it runs on
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()
        if errors:
            log.warning("TensorRT engine close: %s", "; ".join(errors))
