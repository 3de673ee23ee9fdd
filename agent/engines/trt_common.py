"""What the TensorRT build and runtime share: version checks, the one logger, plugins, IO specs.

Data flow: `require_tensorrt()` (the real module or EngineError) -> `logger()` (one per process) ->
`init_plugins()` (TensorRT's own plugin library registered once, before any build or
deserialize) -> the builder (agent.engines.trt_build) and the runtime (agent.engines.tensorrt),
which compare the engine's IO with the ONNX model's through `onnx_io_specs` / `check_io_contract`.

`tensorrt` is imported lazily, so this module imports without it. `tensorrt-stubs` makes
`import tensorrt` succeed with nothing inside: the real module is told apart by `__version__`.
Version differences handled (8.6 = JetPack 6.0, 10.3 = JetPack 6.1 / 6.2): the EXPLICIT_BATCH
network flag is read and set on 8.x only (10.x networks are always explicit-batch and the flag is
deprecated there); IProgressMonitor exists from 10.0 on; the device memory an execution context
needs is `device_memory_size_v2` from 10.1 on (`device_memory_size`, the only one on 8.6 and 10.0,
is deprecated there).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import EngineConfig
from agent.engines.base import TensorSpec
from agent.engines.fingerprint import tensorrt_version
from agent.errors import EngineError, ModelError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "NOT_INSTALLED",
    "BuildOptions",
    "check_io_contract",
    "context_memory_bytes",
    "dims_tuple",
    "init_plugins",
    "logger",
    "network_flags",
    "numpy_dtype",
    "onnx_io_specs",
    "parse_version",
    "require_tensorrt",
    "tensorrt_available",
]

log = logging.getLogger(__name__)

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


def check_supported(version: str) -> int:
    """The major version, or EngineError for TensorRT older than 8.6 (JetPack 6.0's)."""
    major, minor, _ = parse_version(version)
    if major < 8 or (major == 8 and minor < 6):
        raise EngineError(f"TensorRT {version} is too old: 8.6 (JetPack 6.0) or newer is needed")
    return major


def network_flags(version: str, explicit_batch_bit: int | None) -> int:
    """Network creation flags: EXPLICIT_BATCH on 8.x (where it must be asked for; the caller reads
    the enum only there); 0 on 10.x, where every network is explicit-batch and the flag deprecated."""
    if check_supported(version) >= 10:
        return 0
    if explicit_batch_bit is None:
        raise EngineError(f"TensorRT {version} needs the EXPLICIT_BATCH network flag")
    return 1 << explicit_batch_bit


def context_memory_bytes(engine: trt.ICudaEngine, version: str) -> int:
    """Device memory TensorRT allocates for each execution context of `engine` (activations and
    scratch; create_execution_context's default STATIC strategy allocates it when the context is
    made). The weights are the engine's, loaded once: this is what one more camera on a shared
    engine costs TensorRT. 10.1 replaced device_memory_size with device_memory_size_v2 (which also
    counts weight-streaming scratch); 8.6 and 10.0 have only the former."""
    major, minor, _ = parse_version(version)
    size = engine.device_memory_size_v2 if (major, minor) >= (10, 1) else engine.device_memory_size
    return int(size)


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (Dims behaves like a sequence: len and indexing)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


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
    """Differences between the ONNX model's IO and the engine's (empty when they agree). Dimensions
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
    """Every builder option that changes the engine (each one is part of the cache key).

    fp32 really is fp32: TensorRT enables TF32 by default (BuilderFlag.TF32) and Orin's SM 8.7 has
    TF32 tensor cores, so the fp32 build clears it (`tf32` in the key says so). fp16 and int8 keep
    TF32 for the layers they leave in float.
    """

    precision: str = "fp32"  # fp32 | fp16 | int8 (int8 = explicit Q/DQ model, no calibrator)
    workspace_mb: int = 1024
    optimization_level: int = 3
    dla_core: int | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> BuildOptions:
        return cls(cfg.precision, cfg.workspace_mb, cfg.optimization_level, cfg.dla_core)

    @property
    def tf32(self) -> bool:
        return self.precision != "fp32"

    def key_fields(self) -> dict[str, str]:
        return {"precision": self.precision, "workspace_mb": str(self.workspace_mb),
                "optimization_level": str(self.optimization_level),
                "dla_core": "none" if self.dla_core is None else str(self.dla_core),
                "int8_calibration": "explicit-qdq-in-model" if self.precision == "int8" else "none",
                "tf32": "on" if self.tf32 else "off",
                "hardware_compat": "none", "version_compat": "false"}


# ---- TensorRT access -----------------------------------------------------------------------
def require_tensorrt() -> str:
    """The real TensorRT's version (8.6 or newer), or EngineError saying how to get it."""
    version = tensorrt_available()
    if version is None:
        raise EngineError(NOT_INSTALLED)
    check_supported(version)
    return version


_LOCK = threading.Lock()
_LOGGER: Any = None
_PLUGINS_FOR: Any = None  # the tensorrt module whose plugins are registered (a re-import re-registers)


def logger() -> trt.ILogger:
    """One process-wide TensorRT logger (TensorRT requires it to outlive builders and runtimes)."""
    global _LOGGER
    import tensorrt as trt

    with _LOCK:
        if _LOGGER is None or not isinstance(_LOGGER, trt.ILogger):
            _LOGGER = trt.Logger(trt.Logger.WARNING)
        return _LOGGER


def init_plugins() -> None:
    """Register TensorRT's plugin library (libnvinfer_plugin) once, before any build or
    deserialize: an engine holding a TensorRT plugin layer fails to deserialize in a fresh process
    without it (and would be rebuilt at every start)."""
    global _PLUGINS_FOR
    import tensorrt as trt

    with _LOCK:
        if _PLUGINS_FOR is trt:
            return
    if not trt.init_libnvinfer_plugins(logger(), ""):
        # A model without plugin layers still works: say it, do not refuse to run.
        log.warning("TensorRT init_libnvinfer_plugins failed: engines using TensorRT plugins will not load")
    with _LOCK:
        _PLUGINS_FOR = trt
