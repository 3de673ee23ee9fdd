"""Native TensorRT backend (no ONNX Runtime): ONNX -> serialized engine bytes -> TensorRTEngine.

Written against the documented TensorRT 10 Python API, which TensorRT 8.6 (JetPack 6.0) also has
in its name-based form (`num_io_tensors`, `get_tensor_name`, `set_tensor_address`,
`execute_async_v3`). The code branches on the version only where the API differs: the
EXPLICIT_BATCH network flag (required on 8.x, implied and deprecated on 10.x). Optional features
(IProgressMonitor, builder optimisation level) are used where the module has them.

INT8 follows explicit quantization: the ONNX model carries Q/DQ nodes (see agent.engines.quantize)
and the builder only gets the INT8 flag, no calibrator (implicit calibrators are deprecated since
10.1).

`tensorrt` is imported lazily, so this module imports without it. `tensorrt-stubs` makes
`import tensorrt` succeed with nothing inside: the real module is told apart by `__version__`.

Steps, each small and testable: `network_from_onnx` -> `engine_bytes_from_network` (inside
`build_engine_bytes`), `TensorRTEngine(engine_path)` loads bytes, checks the IO contract against
the ONNX model, allocates pinned host + device buffers and one stream once, and runs
`execute_async_v3` with no per-frame allocation. It frees only what it owns, explicitly, in close().
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineInfo, TensorSpec
from agent.engines.fingerprint import tensorrt_version
from agent.errors import EngineError, ModelError

if TYPE_CHECKING:
    from agent.cache.store import EngineCache
    from agent.engines.cuda import DeviceBuffer, PinnedBuffer, Stream

__all__ = [
    "BuildOptions",
    "TensorRTEngine",
    "build_engine_bytes",
    "check_io_contract",
    "network_flags",
    "numpy_dtype",
    "onnx_io_specs",
    "parse_version",
    "tensorrt_available",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]  # (fraction done 0..1, what is happening)

NOT_INSTALLED = (
    "TensorRT not installed (no real `tensorrt` Python module with a __version__; the tensorrt-stubs "
    "package holds type hints only). On a Jetson it comes with JetPack (`python3-libnvinfer`); "
    "elsewhere use engine.backend: onnxruntime"
)

# TensorRT DataType names -> numpy. BF16 / FP8 / INT4 have no numpy dtype: unsupported as IO.
_TRT_TO_NUMPY: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}
_ONNX_TO_NUMPY: dict[int, np.dtype] = {1: np.dtype(np.float32), 10: np.dtype(np.float16), 3: np.dtype(np.int8),
                                        6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
                                        2: np.dtype(np.uint8)}


# ---- pure helpers (no TensorRT needed) ---------------------------------------------------------
def tensorrt_available() -> str | None:
    """The real TensorRT's version string, or None when it is not installed (stubs do not count)."""
    return tensorrt_version()


def parse_version(version: str) -> tuple[int, int, int]:
    """'10.3.0.30' -> (10, 3, 0); '8.6.2.3' -> (8, 6, 2)."""
    nums = [int(x) for x in re.findall(r"\d+", version)[:3]]
    if not nums:
        raise EngineError(f"cannot parse TensorRT version {version!r}")
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def network_flags(version: str, explicit_batch_bit: int) -> int:
    """Network creation flags: EXPLICIT_BATCH on 8.x (where it must be asked for); 0 on 10.x, where
    every network is explicit-batch and the flag is deprecated."""
    major = parse_version(version)[0]
    if major < 8 or (major == 8 and parse_version(version)[1] < 6):
        raise EngineError(f"TensorRT {version} is too old: 8.6 (JetPack 6.0) or newer is needed")
    return 1 << explicit_batch_bit if major < 10 else 0


def numpy_dtype(trt_dtype: object) -> np.dtype:
    """numpy dtype of a TensorRT DataType (given as the enum or its name)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    dtype = _TRT_TO_NUMPY.get(str(name).upper())
    if dtype is None:
        raise EngineError(f"TensorRT tensor type {name} has no numpy equivalent; export IO as float32/float16")
    return dtype


def onnx_io_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX model at batch 1: a dynamic first axis becomes 1."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model {model_path}: {str(exc)[:300]}") from exc
    init = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        dims: list[int] = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif axis == 0:
                dims.append(1)
            else:
                dims.append(-1)
        dtype = _ONNX_TO_NUMPY.get(tt.elem_type)
        if dtype is None:
            raise ModelError(f"tensor {vi.name!r} has ONNX element type {tt.elem_type}, not supported as IO")
        return TensorSpec(vi.name, tuple(dims), dtype)

    inputs = [spec(v) for v in model.graph.input if v.name not in init]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def check_io_contract(expected_in: list[TensorSpec], expected_out: list[TensorSpec],
                      engine_in: list[TensorSpec], engine_out: list[TensorSpec]) -> list[str]:
    """Differences between the ONNX model's IO and the engine's ("" when they agree). Dimensions
    that are -1 in the ONNX model match anything."""
    problems: list[str] = []
    for kind, want, got in (("input", expected_in, engine_in), ("output", expected_out, engine_out)):
        want_by, got_by = {s.name: s for s in want}, {s.name: s for s in got}
        for name in sorted(set(want_by) - set(got_by)):
            problems.append(f"{kind} {name!r} of the model is missing from the engine")
        for name in sorted(set(got_by) - set(want_by)):
            problems.append(f"engine has an extra {kind} {name!r}")
        for name in sorted(set(want_by) & set(got_by)):
            w, g = want_by[name], got_by[name]
            if len(w.shape) != len(g.shape) or any(a not in (-1, b) for a, b in zip(w.shape, g.shape, strict=False)):
                problems.append(f"{kind} {name!r}: shape {g.shape} in the engine, {w.shape} in the model")
            if w.dtype != g.dtype:
                problems.append(f"{kind} {name!r}: dtype {g.dtype} in the engine, {w.dtype} in the model")
    return problems


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """Every builder option that changes the engine (each one is part of the cache key)."""

    precision: str = "fp32"  # fp32 | fp16 | int8 (int8 = explicit Q/DQ model, no calibrator)
    workspace_mb: int = 1024
    optimization_level: int = 3
    dla_core: int | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> BuildOptions:
        return cls(cfg.precision, cfg.workspace_mb, cfg.optimization_level, cfg.dla_core)

    def key_fields(self) -> dict[str, str]:
        return {"precision": self.precision, "workspace_mb": str(self.workspace_mb),
                "optimization_level": str(self.optimization_level),
                "dla_core": "none" if self.dla_core is None else str(self.dla_core),
                "int8_calibration": "explicit-qdq-in-model" if self.precision == "int8" else "none",
                "hardware_compat": "none", "version_compat": "false"}


# ---- TensorRT access -----------------------------------------------------------------------
def _trt() -> Any:
    if tensorrt_available() is None:
        raise EngineError(NOT_INSTALLED)
    return importlib.import_module("tensorrt")


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One process-wide TensorRT logger (TensorRT requires it to outlive builders and runtimes)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _progress_monitor(trt: Any, progress: ProgressFn) -> Any | None:
    """An IProgressMonitor reporting the top-level phase's fraction, where the module has one.
    Called from TensorRT's threads: `progress` must be thread-safe (sd_notify is)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.steps: dict[str, int] = {}
            self.top = ""

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(1, int(num_steps))
            if not parent_phase:
                self.top = phase_name
                progress(0.0, phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name == self.top:
                progress(min(1.0, (step + 1) / self.steps.get(phase_name, 1)), phase_name)
            return True

        def phase_finish(self, phase_name: str) -> None:
            if phase_name == self.top:
                progress(1.0, phase_name)

    return _Monitor()


def network_from_onnx(trt: Any, builder: Any, model_path: Path) -> tuple[Any, Any]:
    """(network, parser) from an ONNX file; external data is found beside the model."""
    flags = network_flags(trt.__version__, int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse {model_path.name}: " + "; ".join(errors[:5]))
    return network, parser


def build_engine_bytes(model_path: Path, options: BuildOptions, cache: EngineCache | None = None,
                       progress: ProgressFn | None = None) -> bytes:
    """Build a serialized engine from an ONNX model. The cache's timing cache, when given, is read
    before the build and merged back after it under its lock."""
    trt = _trt()
    builder = trt.Builder(_logger(trt))
    network, parser = network_from_onnx(trt, builder, Path(model_path))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = options.optimization_level
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "int8":
        # Explicit quantization: the scales come from the model's Q/DQ nodes. FP16 lets the
        # layers TensorRT leaves unquantised run in half precision.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if options.dla_core is not None:
        if options.precision == "fp32":
            raise EngineError("a DLA core needs precision fp16 or int8 (DLA has no fp32)")
        if options.dla_core >= builder.num_DLA_cores:
            raise EngineError(f"DLA core {options.dla_core} requested, this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    # batch 1: a dynamic first axis gets a profile fixed at 1; other dynamic axes are refused
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ModelError(f"input {tensor.name!r} has dynamic dimensions {shape}; export with a fixed size")
        if shape and shape[0] < 0:
            profile = profile or builder.create_optimization_profile()
            fixed = (1, *shape[1:])
            profile.set_shape(tensor.name, fixed, fixed, fixed)
    if profile is not None:
        config.add_optimization_profile(profile)
    timing = None
    if cache is not None:
        timing = config.create_timing_cache(cache.read_timing_cache() or b"")
        config.set_timing_cache(timing, False)
    monitor = _progress_monitor(trt, progress) if progress is not None else None
    if monitor is not None and hasattr(config, "progress_monitor"):
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {Path(model_path).name} (see its log above)")
    data = bytes(serialized)
    if cache is not None and timing is not None:
        ours = config.get_timing_cache()

        def merge(current: bytes | None) -> bytes:
            if current:
                disk = config.create_timing_cache(current)
                disk.combine(ours, True)
                return bytes(disk.serialize())
            return bytes(ours.serialize())

        cache.merge_timing_cache(merge)
    del parser, network  # the parser must outlive the network's use above
    return data


# ---- the engine ------------------------------------------------------------------------------
class TensorRTEngine(Engine):
    """A deserialized TensorRT engine at batch 1, run on its own stream.

    Everything is set up once in load(): runtime, engine, execution context, one stream, a pinned
    host and a device buffer per IO tensor, tensor addresses. infer() copies the input into the
    pinned buffer, runs HtoD -> execute_async_v3 -> DtoH on the stream and synchronises. Outputs
    are returned as copies (`copy_outputs=False` returns the pinned buffers themselves, valid until
    the next infer()).
    """

    def __init__(self, engine_path: Path, model_path: Path | None = None, precision: str = "fp32",
                 copy_outputs: bool = True, engine_key: str = "") -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.model_path = model_path
        self.precision = precision
        self.copy_outputs = copy_outputs
        self.engine_key = engine_key
        self._trt: Any = _trt()  # fail at construction with a clear message when TensorRT is absent
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Stream | None = None
        self._host: dict[str, PinnedBuffer] = {}
        self._device: dict[str, DeviceBuffer] = {}
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._info: EngineInfo | None = None
        self._device_bindings: list[list[int]] = []  # [input, *outputs] device addresses per binding
        self._active_binding = -1

    def _io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        trt, engine = self._trt, self._engine
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name, shape, numpy_dtype(engine.get_tensor_dtype(name)))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        return inputs, outputs

    def _load_impl(self) -> None:
        from agent.engines import cuda

        trt = self._trt
        try:
            data = self.engine_path.read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read engine {self.engine_path}: {exc.strerror or exc}") from exc
        try:
            self._runtime = trt.Runtime(_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise EngineError(
                    f"TensorRT {trt.__version__} cannot deserialize {self.engine_path.name}: built by another "
                    "TensorRT version or for another GPU, or damaged"
                )
            inputs, outputs = self._io_specs()
            if len(inputs) != 1:
                raise ModelError(f"expected one input tensor, the engine has {len(inputs)}")
            ctx = self._context_or_create()
            for s in inputs:
                if s.shape and s.shape[0] < 0:  # dynamic batch: the build profile fixed it at 1
                    ctx.set_input_shape(s.name, (1, *s.shape[1:]))
            inputs = [TensorSpec(s.name, tuple(int(d) for d in ctx.get_tensor_shape(s.name)), s.dtype)
                      for s in inputs]
            outputs = [TensorSpec(s.name, tuple(int(d) for d in ctx.get_tensor_shape(s.name)), s.dtype)
                       for s in outputs]
            if self.model_path is not None:
                want_in, want_out = onnx_io_specs(Path(self.model_path))
                problems = check_io_contract(want_in, want_out, inputs, outputs)
                if problems:
                    raise ModelError(f"engine {self.engine_path.name} does not match {Path(self.model_path).name}: "
                                     + "; ".join(problems))
            self._stream = cuda.Stream()
            for s in (*inputs, *outputs):
                self._host[s.name] = cuda.PinnedBuffer(s.shape, s.dtype)
                self._device[s.name] = cuda.DeviceBuffer(self._host[s.name].nbytes)
                if not ctx.set_tensor_address(s.name, self._device[s.name].ptr):
                    raise EngineError(f"set_tensor_address({s.name!r}) failed")
        except BaseException:
            self._close_impl()
            raise
        self._inputs, self._outputs = inputs, outputs
        self._info = EngineInfo(backend="tensorrt", providers=["TensorRT"], precision=self.precision,
                                device="cuda", engine_key=self.engine_key,
                                extra={"tensorrt": str(trt.__version__)})

    def _context_or_create(self) -> Any:
        if self._context is None:
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError("TensorRT could not create an execution context (out of device memory?)")
        return self._context

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
        assert self._stream is not None
        if not 0 <= binding < len(self._device_bindings):
            raise EngineError("bind_device() first")
        # addresses are per execution context, not per call: set them when the binding changes
        if binding != self._active_binding:
            names = [self._inputs[0].name, *(s.name for s in self._outputs)]
            for name, ptr in zip(names, self._device_bindings[binding], strict=True):
                if not self._context.set_tensor_address(name, ptr):
                    raise EngineError(f"set_tensor_address({name!r}) failed")
            self._active_binding = binding
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineError("TensorRT execute_async_v3 failed")

    def _close_impl(self) -> None:
        """Free what this object allocated, in reverse order; the engine and runtime are owned too."""
        errors: list[str] = []
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
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime = None
        if errors:
            log.warning("TensorRT engine close: %s", "; ".join(errors))
