"""ONNX -> serialized TensorRT engine bytes (the build half of the native TensorRT backend).

Data flow: `build_engine_bytes(model, options, cache)`: plugins registered -> Builder ->
`network_from_onnx` (parse; every parser error named) -> `configure` (memory pool, optimisation
level, precision flags, DLA with GPU fallback, batch-1 profile) -> timing cache for this TensorRT
and GPU attached (agent.engines.trt_timing) -> build_serialized_network -> timing cache merged
and saved -> bytes. The caller (agent.engines.factory through EngineCache.get_or_build) writes
them to the cache right after the build.

Precision: fp32 clears BuilderFlag.TF32 (on by default; Orin's SM 8.7 has TF32 tensor cores), fp16
sets FP16, int8 sets INT8 + FP16 and expects an explicitly quantized model (Q/DQ nodes with INT8
DequantizeLinear inputs, agent.engines.quantize): no calibrator, implicit calibrators are
deprecated since 10.1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.engines import trt_timing
from agent.engines.trt_common import BuildOptions, dims_tuple, init_plugins, logger, network_flags, require_tensorrt
from agent.errors import EngineError, ModelError

if TYPE_CHECKING:
    import tensorrt as trt

    from agent.cache.store import EngineCache

__all__ = ["ProgressFn", "build_engine_bytes", "configure", "network_from_onnx", "progress_monitor"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]  # (fraction done 0..1, what is happening)


def progress_monitor(trt_module: Any, progress: ProgressFn) -> Any | None:
    """An IProgressMonitor reporting the top-level phase's fraction, where the module has one
    (TensorRT 10.0+; 8.6 has none). Called from TensorRT's threads: `progress` must be thread-safe."""
    base = getattr(trt_module, "IProgressMonitor", None)
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


def network_from_onnx(builder: trt.Builder, model_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """(network, parser) from an ONNX file; external data is found beside the model. The parser
    must stay alive while the network is used."""
    import tensorrt as trt

    # EXPLICIT_BATCH is read on 8.x only: 10.x deprecates it (every network is explicit-batch)
    major = int(str(trt.__version__).split(".")[0])
    bit = int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else None
    network = builder.create_network(network_flags(trt.__version__, bit))
    if network is None:
        raise EngineError("TensorRT could not create a network definition")
    parser = trt.OnnxParser(network, logger())
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse {model_path.name}: " + ("; ".join(errors[:5]) or "no error given"))
    return network, parser


def configure(builder: trt.Builder, network: trt.INetworkDefinition, options: BuildOptions) -> trt.IBuilderConfig:
    """A builder config for `options`: memory pool, optimisation level, precision, DLA, batch 1."""
    import tensorrt as trt

    config = builder.create_builder_config()
    if config is None:
        raise EngineError("TensorRT could not create a builder config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds inputs to 10-bit mantissas
    elif options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "int8":
        # Explicit quantization: scales come from the model's Q/DQ nodes. FP16 lets the layers
        # TensorRT leaves unquantised run in half precision.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        raise EngineError(f"unknown precision {options.precision!r} (fp32, fp16 or int8)")
    if options.dla_core is not None:
        if options.precision == "fp32":
            raise EngineError("a DLA core needs precision fp16 or int8 (DLA has no fp32)")
        if options.dla_core >= builder.num_DLA_cores:
            raise EngineError(f"DLA core {options.dla_core} requested, this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
    # batch 1: a dynamic first axis gets a profile fixed at 1; other dynamic axes are refused
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = dims_tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ModelError(f"input {tensor.name!r} has dynamic dimensions {shape}; export with a fixed size")
        if shape and shape[0] < 0:
            profile = profile or builder.create_optimization_profile()
            fixed = trt.Dims([1, *shape[1:]])
            profile.set_shape(tensor.name, fixed, fixed, fixed)
    if profile is not None and config.add_optimization_profile(profile) < 0:
        raise EngineError("TensorRT refused the batch-1 optimisation profile")
    return config


def build_engine_bytes(model_path: Path, options: BuildOptions, cache: EngineCache | None = None,
                       progress: ProgressFn | None = None, timing_tag: str | None = None) -> bytes:
    """Build a serialized engine from an ONNX model. With a cache, the timing cache of this
    TensorRT and GPU (`timing_tag`, from the key fields; read from this machine when None) is used
    and merged back after the build."""
    version = require_tensorrt()
    import tensorrt as trt

    model_path = Path(model_path)
    init_plugins()
    builder = trt.Builder(logger())
    network, parser = network_from_onnx(builder, model_path)
    config = configure(builder, network, options)
    tag = None
    if cache is not None:
        if timing_tag is None:
            from agent.engines.fingerprint import read_fingerprint

            timing_tag = trt_timing.timing_tag({**read_fingerprint("tensorrt", ["TensorRT"]), "tensorrt": version})
        tag = timing_tag
        if trt_timing.attach(config, trt_timing.read(cache, tag)) is None:
            tag = None
    monitor = progress_monitor(trt, progress) if progress is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {model_path.name} (see its log above)")
    data = bytes(serialized)
    if not data:
        raise EngineError(f"TensorRT built an empty engine from {model_path.name}")
    if cache is not None and tag is not None:
        try:
            trt_timing.save(config, cache, tag)
        except OSError as exc:  # the engine is good; only the next build is slower
            log.warning("could not save the TensorRT timing cache: %s", exc)
    del parser, network  # the parser must outlive the network's use above
    return data
