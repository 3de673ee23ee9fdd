"""A recording fake of the TensorRT Python bindings (and of the CUDA runtime memory they use).

TEST DOUBLE: TensorRT cannot be installed in this workplace (DESIGN.md, "What runs where"), so the
native backend's control flow is run in CI against this fake. It lives in the tests, never in the
package. What it is faithful to:

- Names and signatures follow the real bindings (NVIDIA/TensorRT python/src/infer/pyCore.cpp and
  parsers/pyOnnx.cpp). The tensorrt-stubs package (10.13) is their machine-readable copy:
  tests/engines/test_fake_tensorrt.py checks every member, parameter name and enum value defined
  here against it. The 8.6-only members below were read in an 8.x pyCore.cpp; that 8.6 already
  has the name-based API used (num_io_tensors, set_input_shape, set_tensor_address,
  execute_async_v3, builder_optimization_level) is from NVIDIA's 8.6 documentation, not
  machine-checked here (no 8.6 stubs exist).
- Every class has `__slots__` and no `__getattr__`: reading or setting anything the real API lacks
  raises AttributeError, so a misspelt or removed call fails CI.
- The version switch (`make_tensorrt("8.6.2.3")` vs `"10.3.0.26"`): 8.6 has no IProgressMonitor and
  no IBuilderConfig.progress_monitor, still has the binding-index API (num_bindings,
  get_binding_index, execute_async_v2), max_workspace_size and Builder.build_engine, and needs
  NetworkDefinitionCreationFlag.EXPLICIT_BATCH for an ONNX network; 10.x has none of those
  removed members and records a read of the deprecated EXPLICIT_BATCH in `state.deprecated`.
- The ONNX parser reads the real model file (onnx): network IO from the graph; it rejects
  DequantizeLinear inputs that are not INT8 (10.x: INT8 / FP8 / INT4) or have a non-zero zero
  point (onnx-tensorrt's rule, the reason for QuantizeBias=False), and ops named in `unsupported_ops`.
- A plan is a header (TensorRT version, GPU, DLA core, flags, IO) + the ONNX bytes + a sha256 over
  both: deserialize_cuda_engine returns None for another TensorRT version or GPU, or any damaged
  byte (as the real one refuses a plan it cannot read). Execution runs the embedded model on ONNX
  Runtime's CPU EP, reading inputs from and writing outputs to the addresses given by
  set_tensor_address, in the memory of `FakeCudart` (ctypes buffers standing in for device memory).
- Timing caches are JSON tagged with the TensorRT version and GPU: set_timing_cache and combine
  return False on a mismatch, create_timing_cache returns None for bytes it cannot parse.
- Several execution contexts on one engine (pyCore.cpp: create_execution_context keeps its engine
  alive, `py::keep_alive<0, 1>`; the default ExecutionContextAllocationStrategy.STATIC gives each
  context its own `device_memory_size` of activation memory, so `max_contexts` makes the next one
  return None, as the bindings do for the C++ nullptr). Each context has its own tensor addresses
  and shapes. `device_memory_size` is deprecated from 10.1 (a read is recorded in
  `state.deprecated`), where `device_memory_size_v2` replaces it; 8.6 has only the former.
  `profile_per_context` plays the rule the TensorRT developer guide states for engines with a
  dynamic input ("each execution context must use a separate optimization profile"): a second live
  context on such an engine gets no profile, and set_input_shape fails on it. Live engines and
  contexts (the Python objects, freed when the last reference goes) are in `state.engines` and
  `state.contexts`.

Everything called is appended to `state.calls` as (name, args) for the tests to read.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

__all__ = ["FakeCudart", "FakeState", "make_tensorrt", "plan_header"]

_PLAN_MAGIC = b"FAKEPLAN1\n"
_ONNX_DTYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}


@dataclass
class FakeState:
    """Knobs (what the fake should do) and records (what was called)."""

    version: str
    gpu: str = "Orin"
    dla_cores: int = 0
    unsupported_ops: tuple[str, ...] = ()
    build_returns_none: bool = False
    plugins_ok: bool = True
    set_input_shape_ok: bool = True
    data_dependent_output: bool = False  # engine outputs report -1 dims (NonZero-like)
    context_memory: int = 3 << 20  # ICudaEngine.device_memory_size: activation memory per context
    max_contexts: int | None = None  # live contexts the device memory holds; the next one is None
    profile_per_context: bool = False  # a dynamic-input engine's profile 0 serves one context only
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    deprecated: list[str] = field(default_factory=list)
    plugins_registered: bool = False
    engines: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)  # live ICudaEngine objects
    contexts: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)  # live IExecutionContext objects

    def rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def index(self, name: str) -> int:
        return self.names().index(name)


def plan_header(plan: bytes) -> dict[str, Any]:
    """The JSON header of a fake plan (for tests that look inside)."""
    end = plan.index(b"\n", len(_PLAN_MAGIC))
    return json.loads(plan[len(_PLAN_MAGIC):end])


# ---- CUDA runtime memory (the part of cuda-python agent.engines.cuda uses) --------------------
class FakeCudart:
    """cuda.bindings.runtime, as far as agent.engines.cuda uses it: results are (err, value)
    tuples; device and pinned memory are ctypes buffers (so the fake engine can read and write
    them by address); streams are integers. Leaks are visible in `live`."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self.live: dict[int, Any] = {}  # address -> ctypes buffer (device and pinned)
        self.device: set[int] = set()
        self.streams: set[int] = set()
        self._next_stream = 0x5000
        self.calls: list[str] = []

    def _alloc(self, n: int) -> int:
        buf = ctypes.create_string_buffer(max(1, int(n)))
        addr = ctypes.addressof(buf)
        self.live[addr] = buf
        return addr

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, f"cudaError{err}".encode()

    def cudaMalloc(self, n: int) -> tuple[int, int]:
        self.calls.append("cudaMalloc")
        addr = self._alloc(n)
        self.device.add(addr)
        return 0, addr

    def cudaMallocHost(self, n: int) -> tuple[int, int]:
        self.calls.append("cudaMallocHost")
        return 0, self._alloc(n)

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.device.discard(ptr)
        return (0,) if self.live.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        self._next_stream += 1
        self.streams.add(self._next_stream)
        return 0, self._next_stream

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,) if int(stream) in self.streams else (self.cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.streams.discard(int(stream))
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        if int(stream) not in self.streams:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, n)
        return (0,)


# ---- the TensorRT module -------------------------------------------------------------------------
class _EnumValue(int):
    """A member of a fake enum: an int with a `.name` (each enum subclasses it for its repr)."""

    name: str


class _EnumType(type):
    """The metaclass of a fake enum (each enum subclasses it to record deprecated reads)."""

    __members__: dict[str, _EnumValue]

    if TYPE_CHECKING:
        # the members are class attributes made at run time, one per name given to _enum
        def __getattr__(cls, attr: str) -> _EnumValue: ...


def _enum(state: FakeState, name: str, members: dict[str, int], deprecated: tuple[str, ...] = ()) -> _EnumType:
    """An enum like pybind11's: members are ints with a `.name`; reading a deprecated one is recorded."""

    class _Value(_EnumValue):
        def __repr__(self) -> str:
            return f"<{name}.{self.name}: {int(self)}>"

    class _Meta(_EnumType):
        def __getattribute__(cls, attr: str) -> Any:
            if attr in deprecated:
                state.deprecated.append(f"{name}.{attr}")
            return type.__getattribute__(cls, attr)

    values = {}
    for key, number in members.items():
        v = _Value(number)
        v.name = key
        values[key] = v
    return _Meta(name, (), {"__slots__": (), **values, "__members__": dict(values)})


def _onnx_io(path: str) -> tuple[list[tuple[str, list[int], str]], list[tuple[str, list[int], str]], Any]:
    import onnx

    model = onnx.load(path)
    init = {t.name for t in model.graph.initializer}

    def spec(vi: Any) -> tuple[str, list[int], str]:
        tt = vi.type.tensor_type
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        return vi.name, dims, _ONNX_DTYPES.get(tt.elem_type, "UNKNOWN")

    return ([spec(v) for v in model.graph.input if v.name not in init], [spec(v) for v in model.graph.output],
            model)


def _qdq_problems(model: Any, v10: bool) -> list[str]:
    """onnx-tensorrt's rule for explicit quantization: DequantizeLinear inputs INT8 (10.x: also FP8 /
    INT4), zero points 0."""
    from onnx import TensorProto, numpy_helper

    allowed = {TensorProto.INT8} | ({TensorProto.FLOAT8E4M3FN, TensorProto.INT4} if v10 else set())
    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        x = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and x is not None and x.data_type not in allowed:
            problems.append(f"{node.name}: DequantizeLinear input of type {TensorProto.DataType.Name(x.data_type)} "
                            "(only INT8" + (", FP8, INT4" if v10 else "") + " supported)")
        if len(node.input) > 2 and node.input[2] in inits:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype != np.int8 and node.op_type == "QuantizeLinear":
                problems.append(f"{node.name}: zero point of type {zp.dtype} (INT8 only)")
            if np.any(zp != 0):
                problems.append(f"{node.name}: non-zero zero point (TensorRT quantization is symmetric)")
    return problems


def make_tensorrt(version: str = "10.3.0.26", **knobs: Any) -> types.ModuleType:
    """A fresh fake `tensorrt` module; its FakeState is `module._state`."""
    state = FakeState(version=version, **knobs)
    major, minor = (int(x) for x in version.split(".")[:2])
    v10 = major >= 10
    v10_1 = (major, minor) >= (10, 1)  # the V2 device-memory queries (NvInferImpl.h: "Added in TensorRT 10.1")
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version  # type: ignore[attr-defined]
    mod._state = state  # type: ignore[attr-defined]

    severity = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
    builder_flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5,
                     "TF32": 6, "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
                     "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12,
                     "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15}
    if v10:
        builder_flags.update({"ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "WEIGHT_STREAMING": 21, "INT4": 22})
    net_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if v10 else {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}
    dtypes = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6}
    if v10:
        dtypes.update({"BF16": 7, "INT64": 8, "INT4": 9})
    BuilderFlag = _enum(state, "BuilderFlag", builder_flags)
    NetworkDefinitionCreationFlag = _enum(state, "NetworkDefinitionCreationFlag", net_flags,
                                          ("EXPLICIT_BATCH",) if v10 else ())
    DataType = _enum(state, "DataType", dtypes)
    TensorIOMode = _enum(state, "TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    MemoryPoolType = _enum(state, "MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1,
                                                     "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4})
    DeviceType = _enum(state, "DeviceType", {"GPU": 0, "DLA": 1})
    Severity = _enum(state, "Severity", severity)

    class Dims:
        __slots__ = ("_d",)

        def __init__(self, shape: list[int] | tuple[int, ...] = ()) -> None:
            self._d = [int(x) for x in shape]

        def __len__(self) -> int:
            return len(self._d)

        def __getitem__(self, i: int) -> int:
            return self._d[i]

        def __eq__(self, other: object) -> bool:
            # the real Dims iterates by __getitem__ alone (no __iter__, as here), so compare the lists
            if isinstance(other, Dims):
                return self._d == other._d
            return self._d == list(other) if isinstance(other, (list, tuple)) else NotImplemented

        __hash__ = None  # type: ignore[assignment]

        def __repr__(self) -> str:
            return f"Dims({self._d})"

    class ILogger:
        __slots__ = ()
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (getattr(Severity, k) for k in severity)

        def log(self, severity: Any, msg: str) -> None:
            state.rec("ILogger.log", severity, msg)

    class Logger(ILogger):
        __slots__ = ("min_severity",)

        def __init__(self, min_severity: Any = ILogger.WARNING) -> None:
            self.min_severity = min_severity
            state.rec("Logger", min_severity)

    def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
        assert isinstance(logger, ILogger), "init_libnvinfer_plugins needs an ILogger"
        state.rec("init_libnvinfer_plugins", namespace)
        state.plugins_registered = state.plugins_ok
        return state.plugins_ok

    class IHostMemory:
        __slots__ = ("_data",)

        def __init__(self, data: bytes) -> None:
            self._data = bytes(data)

        def __bytes__(self) -> bytes:
            return self._data

        @property
        def nbytes(self) -> int:
            return len(self._data)

        @property
        def dtype(self) -> Any:
            return DataType.UINT8

    class ITimingCache:
        __slots__ = ("_entries", "_tag")

        def __init__(self, tag: str, entries: list[str]) -> None:
            self._tag, self._entries = tag, list(entries)

        def serialize(self) -> IHostMemory:
            state.rec("ITimingCache.serialize")
            return IHostMemory(json.dumps({"fake_timing_cache": self._tag, "entries": sorted(set(self._entries))})
                               .encode())

        def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
            state.rec("ITimingCache.combine", input_cache._tag, ignore_mismatch)
            if input_cache._tag != self._tag and not ignore_mismatch:
                return False
            self._entries = sorted(set(self._entries) | set(input_cache._entries))
            return True

        def reset(self) -> bool:
            self._entries = []
            return True

    this_tag = f"{version}|{state.gpu}"

    class ITensor:
        __slots__ = ("dtype", "name", "shape")

        def __init__(self, name: str, shape: list[int], dtype: Any) -> None:
            self.name, self.shape, self.dtype = name, Dims(shape), dtype

        @property
        def is_network_input(self) -> bool:
            return True

    class INetworkDefinition:
        __slots__ = ("_flags", "_inputs", "_model", "_outputs", "name")

        def __init__(self, flags: int) -> None:
            self._flags = flags
            self._inputs: list[ITensor] = []
            self._outputs: list[ITensor] = []
            self._model: bytes = b""
            self.name = "network"

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class ParserError:
        __slots__ = ("_desc", "_node")

        def __init__(self, desc: str, node: int = -1) -> None:
            self._desc, self._node = desc, node

        def desc(self) -> str:
            return self._desc

        def node(self) -> int:
            return self._node

        def code(self) -> int:
            return 1

        def __str__(self) -> str:
            return f"In node {self._node} with name: ... (parse): {self._desc}"

    class OnnxParser:
        __slots__ = ("_errors", "_network")

        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            assert isinstance(network, INetworkDefinition) and isinstance(logger, ILogger)
            self._network = network
            self._errors: list[ParserError] = []
            state.rec("OnnxParser")

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def clear_errors(self) -> None:
            self._errors.clear()

        def parse_from_file(self, model: str) -> bool:
            state.rec("OnnxParser.parse_from_file", model)
            net = self._network
            if not v10 and not net._flags & (1 << 0):
                self._errors.append(ParserError("Network must have explicit batch dimension (EXPLICIT_BATCH)"))
                return False
            try:
                inputs, outputs, proto = _onnx_io(model)
            except Exception as exc:
                self._errors.append(ParserError(f"failed to load the model: {exc}"))
                return False
            for i, node in enumerate(proto.graph.node):
                if node.op_type in state.unsupported_ops:
                    self._errors.append(ParserError(f"No importer registered for op: {node.op_type}", i))
            self._errors += [ParserError(p) for p in _qdq_problems(proto, v10)]
            if self._errors:
                return False
            net._inputs = [ITensor(n, s, getattr(DataType, t)) for n, s, t in inputs]
            net._outputs = [ITensor(n, s, getattr(DataType, t)) for n, s, t in outputs]
            net._model = Path(model).read_bytes()
            return True

    class IOptimizationProfile:
        __slots__ = ("_shapes",)

        def __init__(self) -> None:
            self._shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            state.rec("IOptimizationProfile.set_shape", input, list(min), list(opt), list(max))
            self._shapes[input] = (list(min), list(opt), list(max))

        def get_shape(self, input: str) -> list[Any]:
            return [Dims(s) for s in self._shapes.get(input, ())]

    class IBuilderConfig:
        __slots__ = ("DLA_core", "_flags", "_pools", "_profiles", "_timing", "builder_optimization_level",
                     "default_device_type", *(("progress_monitor",) if v10 else ()))
        # the public slots, set through object.__setattr__ below (annotations only: no class attribute)
        DLA_core: int
        builder_optimization_level: int
        default_device_type: _EnumValue
        progress_monitor: Any  # 10.x only (an IProgressMonitor or None); 8.6 has no such slot

        def __init__(self) -> None:
            self._flags = {int(BuilderFlag.TF32)}  # on by default, as in TensorRT
            self._pools: dict[int, int] = {}
            self._profiles: list[IOptimizationProfile] = []
            self._timing: ITimingCache | None = None
            object.__setattr__(self, "builder_optimization_level", 3)
            object.__setattr__(self, "default_device_type", DeviceType.GPU)
            object.__setattr__(self, "DLA_core", -1)
            if v10:
                object.__setattr__(self, "progress_monitor", None)

        def __setattr__(self, name: str, value: Any) -> None:
            if not name.startswith("_"):
                state.rec(f"IBuilderConfig.{name}=", value)
            object.__setattr__(self, name, value)

        def set_flag(self, flag: Any) -> None:
            state.rec("IBuilderConfig.set_flag", flag.name)
            self._flags.add(int(flag))

        def clear_flag(self, flag: Any) -> None:
            state.rec("IBuilderConfig.clear_flag", flag.name)
            self._flags.discard(int(flag))

        def get_flag(self, flag: Any) -> bool:
            return int(flag) in self._flags

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            state.rec("IBuilderConfig.set_memory_pool_limit", pool.name, pool_size)
            self._pools[int(pool)] = int(pool_size)

        def get_memory_pool_limit(self, pool: Any) -> int:
            return self._pools.get(int(pool), 0)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
            data = bytes(serialized_timing_cache)
            state.rec("IBuilderConfig.create_timing_cache", len(data))
            if not data:
                return ITimingCache(this_tag, [])
            try:
                obj = json.loads(data)
                return ITimingCache(str(obj["fake_timing_cache"]), list(obj["entries"]))
            except (ValueError, KeyError, TypeError):
                return None  # TensorRT logs an error and returns nullptr

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            state.rec("IBuilderConfig.set_timing_cache", cache._tag, ignore_mismatch)
            if cache._tag != this_tag and not ignore_mismatch:
                return False
            self._timing = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._timing

        if not v10:
            @property
            def max_workspace_size(self) -> int:
                return self._pools.get(int(MemoryPoolType.WORKSPACE), 0)

    class IExecutionContext:
        __slots__ = ("__weakref__", "_addr", "_engine", "_profile", "_session", "_shapes")
        _session: Any  # an onnxruntime.InferenceSession, made on the first execute_async_v3

        def __init__(self, engine: ICudaEngine, profile: int) -> None:
            self._engine = engine  # the bindings' keep_alive: a context keeps its engine alive
            self._addr: dict[str, int] = {}
            self._shapes: dict[str, list[int]] = {}
            self._session = None
            self._profile = profile  # -1: "Could not set default profile 0 for execution context"
            state.contexts.add(self)

        @property
        def engine(self) -> ICudaEngine:
            return self._engine

        def set_input_shape(self, name: str, shape: Any) -> bool:
            state.rec("IExecutionContext.set_input_shape", name, list(shape))
            io = self._engine._io[name]
            ok = (state.set_input_shape_ok and self._profile >= 0 and io["mode"] == "INPUT"
                  and len(shape) == len(io["shape"])
                  and all(d in (-1, s) for d, s in zip(io["shape"], shape, strict=True)))
            if ok:
                self._shapes[name] = [int(s) for s in shape]
            return ok

        def get_tensor_shape(self, name: str) -> Dims:
            io = self._engine._io[name]
            if io["mode"] == "INPUT":
                return Dims(self._shapes.get(name, io["shape"]))
            shape = list(io["shape"])
            if shape and shape[0] == -1 and all(self._shapes.get(n) for n in self._engine._inputs()):
                shape[0] = 1
            return Dims(shape)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            state.rec("IExecutionContext.set_tensor_address", name, memory)
            if name not in self._engine._io or not isinstance(memory, int):
                return False
            self._addr[name] = memory
            return True

        def get_tensor_address(self, name: str) -> int:
            return self._addr.get(name, 0)

        def execute_async_v3(self, stream_handle: int) -> bool:
            state.rec("IExecutionContext.execute_async_v3", stream_handle)
            if not isinstance(stream_handle, int) or set(self._addr) != set(self._engine._io):
                return False  # TensorRT: "address is not set for tensor ..."
            import onnxruntime as ort

            if self._session is None:
                self._session = ort.InferenceSession(self._engine._model, providers=["CPUExecutionProvider"])
            feeds = {}
            for name in self._engine._inputs():
                shape = [int(d) for d in self.get_tensor_shape(name)._d]
                if any(d < 0 for d in shape):
                    return False
                dtype = np.dtype(_NP[self._engine._io[name]["dtype"]])
                raw = ctypes.string_at(self._addr[name], int(np.prod(shape)) * dtype.itemsize)
                feeds[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
            for name, value in zip([o.name for o in self._session.get_outputs()], self._session.run(None, feeds),
                                   strict=True):
                arr: np.ndarray = np.ascontiguousarray(value, dtype=_NP[self._engine._io[name]["dtype"]])
                ctypes.memmove(self._addr[name], arr.ctypes.data, arr.nbytes)
            return True

        if not v10:
            def execute_async_v2(self, bindings: list[int], stream_handle: int, input_consumed: Any = None) -> bool:
                raise AssertionError("the binding-index API is deprecated on 8.6 and gone in 10.x")

    class ICudaEngine:
        __slots__ = ("__weakref__", "_contexts", "_header", "_io", "_model")

        def __init__(self, header: dict[str, Any], model: bytes) -> None:
            self._header = header
            self._io: dict[str, dict[str, Any]] = {t["name"]: t for t in header["io"]}
            self._model = model
            self._contexts: weakref.WeakSet[IExecutionContext] = weakref.WeakSet()
            state.engines.add(self)

        def _inputs(self) -> list[str]:
            return [n for n, t in self._io.items() if t["mode"] == "INPUT"]

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        def get_tensor_name(self, index: int) -> str:
            return list(self._io)[index]

        def get_tensor_mode(self, name: str) -> Any:
            return getattr(TensorIOMode, self._io[name]["mode"])

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self._io[name]["shape"])

        def get_tensor_dtype(self, name: str) -> Any:
            return getattr(DataType, self._io[name]["dtype"])

        def create_execution_context(self) -> IExecutionContext | None:
            state.rec("ICudaEngine.create_execution_context")
            if state.max_contexts is not None and len(state.contexts) >= state.max_contexts:
                return None  # the activation memory could not be allocated: nullptr -> None
            dynamic = any(-1 in t["shape"] for t in self._io.values() if t["mode"] == "INPUT")
            taken = any(c._profile == 0 for c in self._contexts)
            ctx = IExecutionContext(self, -1 if state.profile_per_context and dynamic and taken else 0)
            self._contexts.add(ctx)
            return ctx

        @property
        def device_memory_size(self) -> int:
            if v10_1:
                state.deprecated.append("ICudaEngine.device_memory_size")  # 10.1: use device_memory_size_v2
            return state.context_memory

        if v10_1:
            @property
            def device_memory_size_v2(self) -> int:
                return state.context_memory

        if not v10:
            @property
            def num_bindings(self) -> int:
                return len(self._io)

            def get_binding_index(self, name: str) -> int:
                return list(self._io).index(name)

    class Builder:
        __slots__ = ("_logger",)

        def __init__(self, logger: ILogger) -> None:
            assert isinstance(logger, ILogger)
            self._logger = logger
            state.rec("Builder")

        @property
        def num_DLA_cores(self) -> int:
            return state.dla_cores

        @property
        def platform_has_tf32(self) -> bool:
            return True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            state.rec("Builder.create_network", flags)
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
            state.rec("Builder.build_serialized_network")
            if state.build_returns_none or not network._outputs:
                return None
            if v10 and config.progress_monitor is not None:
                mon = config.progress_monitor
                mon.phase_start("Building engine", None, 2)
                for step in range(2):
                    mon.step_complete("Building engine", step)
                mon.phase_finish("Building engine")
            profiles = {n: s[1] for p in config._profiles for n, s in p._shapes.items()}
            io = []
            for t in network._inputs:
                if t.shape[0] == -1 and t.name not in profiles:
                    return None  # "Network has dynamic or shape inputs, but no optimization profile"
                io.append({"name": t.name, "shape": list(t.shape._d), "dtype": t.dtype.name, "mode": "INPUT"})
            for t in network._outputs:
                shape = list(t.shape._d)
                if state.data_dependent_output:
                    shape = [shape[0], -1, *shape[2:]]
                io.append({"name": t.name, "shape": shape, "dtype": t.dtype.name, "mode": "OUTPUT"})
            timing = config._timing
            hits = 0
            if timing is not None:
                wanted = [f"tactic:{t['name']}" for t in io]
                hits = sum(w in timing._entries for w in wanted)
                timing._entries = sorted(set(timing._entries) | set(wanted))
            header = {"trt": version, "gpu": state.gpu, "flags": sorted(BuilderFlag.__members__[k].name
                                                                        for k in builder_flags
                                                                        if config.get_flag(getattr(BuilderFlag, k))),
                      "dla_core": config.DLA_core if int(config.default_device_type) == 1 else None,
                      "workspace": config._pools.get(int(MemoryPoolType.WORKSPACE), 0),
                      "opt_level": config.builder_optimization_level, "io": io, "timing_hits": hits}
            body = _PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network._model
            return IHostMemory(body + hashlib.sha256(body).digest())

        if not v10:
            @property
            def max_batch_size(self) -> int:
                return 1

            def build_engine(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:
                raise AssertionError("Builder.build_engine is deprecated on 8.6 and gone in 10.x")

    class Runtime:
        __slots__ = ("DLA_core", "_logger")
        DLA_core: int  # set through object.__setattr__ (annotation only: no class attribute)

        def __init__(self, logger: ILogger) -> None:
            assert isinstance(logger, ILogger)
            self._logger = logger
            object.__setattr__(self, "DLA_core", 0)
            state.rec("Runtime")

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "DLA_core":
                state.rec("Runtime.DLA_core=", value)
            object.__setattr__(self, name, value)

        @property
        def num_DLA_cores(self) -> int:
            return state.dla_cores

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            state.rec("Runtime.deserialize_cuda_engine", len(data), self.DLA_core)
            body, digest = data[:-32], data[-32:]
            if not data.startswith(_PLAN_MAGIC) or hashlib.sha256(body).digest() != digest:
                return None  # "Serialization assertion ... failed: magic tag / checksum"
            header = plan_header(data)
            if header["trt"] != version or header["gpu"] != state.gpu:
                return None  # "The engine plan file is not compatible with this version of TensorRT"
            header["deserialized_on_dla_core"] = self.DLA_core if header["dla_core"] is not None else None
            model = body[body.index(b"\n", len(_PLAN_MAGIC)) + 1:]
            return ICudaEngine(header, model)

    names: dict[str, Any] = {
        "Dims": Dims, "ILogger": ILogger, "Logger": Logger, "init_libnvinfer_plugins": init_libnvinfer_plugins,
        "IHostMemory": IHostMemory, "ITimingCache": ITimingCache, "ITensor": ITensor,
        "INetworkDefinition": INetworkDefinition, "ParserError": ParserError, "OnnxParser": OnnxParser,
        "IOptimizationProfile": IOptimizationProfile, "IBuilderConfig": IBuilderConfig,
        "IExecutionContext": IExecutionContext, "ICudaEngine": ICudaEngine, "Builder": Builder, "Runtime": Runtime,
        "BuilderFlag": BuilderFlag, "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "DataType": DataType, "TensorIOMode": TensorIOMode, "MemoryPoolType": MemoryPoolType,
        "DeviceType": DeviceType,
    }
    if v10:
        class IProgressMonitor:  # a pybind11 trampoline: subclasses override the three methods
            def __init__(self) -> None:
                state.rec("IProgressMonitor")

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                raise NotImplementedError

            def step_complete(self, phase_name: str, step: int) -> bool:
                raise NotImplementedError

            def phase_finish(self, phase_name: str) -> None:
                raise NotImplementedError

        names["IProgressMonitor"] = IProgressMonitor
    for k, v in names.items():
        setattr(mod, k, v)
    return mod
