"""Engine factory: config -> loaded Engine, through the engine cache where there is one.

- onnxruntime (CPU / CUDA EP): the cached "engine" is ONNX Runtime's optimised graph
  (SessionOptions.optimized_model_filepath), saved right after the first session is built and
  loaded back as an ordinary ONNX model afterwards. An "all"-level optimised graph can hold
  CPU-specific layouts, which is why the CPU model and ISA are part of its key.
- onnxruntime with the TensorRT EP: ONNX Runtime writes its own engine files; they are kept inside
  the cache entry of the same key (`<cache>/<key>/ort-trt/`), with a checksummed manifest as the
  entry's engine, verified before and after each load, quarantined and rebuilt when damaged, and
  evicted with the entry (agent.engines.trt_ort). Its timing cache is per TensorRT version and GPU.
- tensorrt: a native TensorRT plan built from the ONNX model (agent.engines.trt_build, run by
  agent.engines.tensorrt), cached, verified and quarantined by EngineCache; built for, and loaded
  onto, the configured DLA core.

`create_engine` returns a LOADED engine (the cache's load step is what proves an entry good).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.cache.keys import canonical_json, model_digest
from agent.cache.store import EngineCache
from agent.config import EngineConfig
from agent.engines import trt_ort
from agent.engines.base import Engine
from agent.engines.fingerprint import key_fingerprint
from agent.errors import CacheError, EngineError

__all__ = ["create_engine", "effective_providers", "key_fields"]

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, object]], None]
ProgressFn = Callable[[float, str], None]  # (fraction done 0..1, what is happening)

# provider options that say where files go, not what the engine is: not part of the key
_PATH_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path", "trt_engine_cache_enable",
                 "trt_timing_cache_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path")


def effective_providers(cfg: EngineConfig) -> list[str]:
    """The configured providers this onnxruntime really has, in order (what the session will use)."""
    wanted: list[str] = [p.name for p in cfg.providers]
    try:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
    except ImportError:
        return wanted
    return [p for p in wanted if p in available] or wanted


def _input_shape(model_path: Path) -> str:
    from agent.engines.trt_common import onnx_io_specs

    inputs, _ = onnx_io_specs(model_path)
    return ";".join(f"{s.name}:{'x'.join(str(d) for d in s.shape)}:{s.dtype}" for s in inputs)


def key_fields(model_path: Path, cfg: EngineConfig, fingerprint: dict[str, str] | None = None) -> dict[str, str]:
    """Every field of the cache key for this model and engine config (DESIGN.md's contract)."""
    from agent.engines.trt_common import BuildOptions

    model_path = Path(model_path)
    providers = ["TensorRT"] if cfg.backend == "tensorrt" else effective_providers(cfg)
    fields = {"model_sha256": model_digest(model_path), "backend": cfg.backend, "providers": ",".join(providers),
              "precision": cfg.precision, "input_shape": _input_shape(model_path)}
    if cfg.backend == "tensorrt":
        fields.update(BuildOptions.from_config(cfg).key_fields())
    else:
        fields["graph_optimization"] = cfg.graph_optimization
        fields["provider_options"] = canonical_json(
            {p.name: {k: str(v) for k, v in sorted(p.options.items()) if k not in _PATH_OPTIONS}
             for p in cfg.providers if p.name in providers})
        if "TensorrtExecutionProvider" in providers:
            fields.update(BuildOptions.from_config(cfg).key_fields())
    fields.update(key_fingerprint(cfg.backend, providers) if fingerprint is None else fingerprint)
    return fields


def _usable(cache: EngineCache | None, on_event: EventSink | None) -> EngineCache | None:
    """The cache, or None when its directory is unusable: the engine is then built without it (the
    service keeps running) and the reason is logged and reported as engine_cache_unusable."""
    if cache is None:
        return None
    try:
        cache.ensure_ready()
    except CacheError as exc:
        log.error("%s", exc)
        if on_event is not None:
            on_event("engine_cache_unusable", {"dir": str(cache.root), "error": str(exc)})
        return None
    return cache


def _create_onnxruntime(model_path: Path, cfg: EngineConfig, cache: EngineCache | None,
                        on_event: EventSink | None, progress: ProgressFn | None) -> Engine:
    from agent.engines.onnxruntime import OnnxRuntimeEngine

    def report(fraction: float, note: str) -> None:
        if progress is not None:
            progress(fraction, note)

    if cache is None:
        engine = OnnxRuntimeEngine(model_path, cfg, on_event=on_event)
        engine.load()
        return engine
    fields = key_fields(model_path, cfg)
    if trt_ort.EP in fields["providers"].split(","):
        def make(model: Path, ep_cfg: EngineConfig) -> Engine:
            ort_engine = OnnxRuntimeEngine(model, ep_cfg, on_event=on_event)
            ort_engine.load()
            return ort_engine

        report(0.0, "building TensorRT engines (ONNX Runtime TensorRT EP)")
        ep_engine, cached = trt_ort.create(model_path, cfg, cache, fields, make)
        ep_engine.info.engine_key = cache.cache_key(fields)
        ep_engine.info.extra["engine_cached"] = cached
        report(1.0, "engine ready")
        return ep_engine

    def build(out: Path) -> None:
        report(0.0, "optimizing graph (ONNX Runtime)")
        builder = OnnxRuntimeEngine(model_path, cfg, optimized_model_out=out, on_event=on_event)
        builder.load()
        builder.close()
        if not out.is_file():
            raise EngineError(f"ONNX Runtime did not write its optimised model to {out}")

    def load(path: Path) -> OnnxRuntimeEngine:
        engine = OnnxRuntimeEngine(path, cfg, on_event=on_event)
        engine.load()
        return engine

    engine, entry = cache.get_or_build(fields, build, load)
    engine.info.engine_key = entry.key
    engine.info.extra["engine_cached"] = not entry.built
    report(1.0, "engine ready")
    return engine


def _create_tensorrt(model_path: Path, cfg: EngineConfig, cache: EngineCache | None,
                     progress: ProgressFn | None) -> Engine:
    from agent.engines.tensorrt import TensorRTEngine
    from agent.engines.trt_build import build_engine_bytes
    from agent.engines.trt_common import BuildOptions, require_tensorrt
    from agent.engines.trt_timing import timing_tag

    require_tensorrt()
    options = BuildOptions.from_config(cfg)
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="edge-agent-trt-") as tmp:
            path = Path(tmp) / "engine.bin"
            path.write_bytes(build_engine_bytes(model_path, options, None, progress))
            engine = TensorRTEngine(path, model_path, cfg.precision, dla_core=cfg.dla_core)
            engine.load()  # the bytes are in memory after this; the file can go
        return engine
    fields = key_fields(model_path, cfg)
    key = cache.cache_key(fields)

    def build(out: Path) -> None:
        out.write_bytes(build_engine_bytes(model_path, options, cache, progress, timing_tag(fields)))

    def load(path: Path) -> TensorRTEngine:
        engine = TensorRTEngine(path, model_path, cfg.precision, engine_key=key, dla_core=cfg.dla_core)
        engine.load()
        return engine

    engine, entry = cache.get_or_build(fields, build, load)
    engine.info.extra["engine_cached"] = not entry.built
    return engine


def create_engine(model_path: Path, cfg: EngineConfig, cache: EngineCache | None,
                  on_event: EventSink | None = None, progress: ProgressFn | None = None) -> Engine:
    """A loaded engine for `model_path` as `cfg` says, built once and then taken from `cache`
    (None: no caching). `progress(fraction, note)` reports long builds (feed it to
    sd_notify EXTEND_TIMEOUT / STATUS)."""
    model_path = Path(model_path)
    cache = _usable(cache, on_event)
    if cfg.backend == "tensorrt":
        return _create_tensorrt(model_path, cfg, cache, progress)
    if cfg.backend == "onnxruntime":
        return _create_onnxruntime(model_path, cfg, cache, on_event, progress)
    raise EngineError(f"unknown engine backend {cfg.backend!r} (onnxruntime or tensorrt)")


DEFAULT_GRAPH_LANES = 4
EngineEvent = tuple[str, dict[str, object]]


def shared_engine_settings(cfg: EngineConfig, cameras: int) -> tuple[dict[str, object], EngineEvent | None]:
    """Engine-config overrides for `cameras` cameras on one loaded model, and the event saying what changed.

    ONNX Runtime on a GPU EP, several cameras: with `cuda_graph` on the CUDA EP (and preprocessing
    allowed on the GPU) the model runs as CUDA-graph lanes (agent.engines.ort_lanes), min(cameras,
    graph_lanes or 4) of them (event `cuda_graph_lanes`); one camera only when graph_lanes >= 2.
    Otherwise graphs go off (event `cuda_graph_off`: ONNX Runtime captures them per thread in
    global mode, so captures from several camera threads would collide) and ONNX Runtime takes a
    stream of its own per run, so the cameras' runs overlap (one user stream would run them in turn).
    """
    first = cfg.providers[0]
    user_stream = "user_compute_stream" in first.options
    lanes_possible = (cfg.backend == "onnxruntime" and cfg.cuda_graph and first.name == "CUDAExecutionProvider"
                      and cfg.preprocess != "cpu" and not user_stream)
    # one camera: its own graph path, unless lanes are asked for (>= 2 keep several of its frames on
    # the GPU at once: the frontend submits without waiting for the one before)
    if lanes_possible and (cameras > 1 or (cameras == 1 and cfg.graph_lanes >= 2)):
        lanes = min(cameras, cfg.graph_lanes or DEFAULT_GRAPH_LANES) if cameras > 1 else cfg.graph_lanes
        return {"graph_lanes": lanes}, ("cuda_graph_lanes", {"cameras": cameras, "graph_lanes": lanes})
    if cameras <= 1 or cfg.backend != "onnxruntime":
        return ({"graph_lanes": 0} if cfg.graph_lanes else {}), None
    overrides: dict[str, object] = {"graph_lanes": 0}
    if first.name != "CPUExecutionProvider" and not user_stream:
        overrides["providers"] = [
            first.model_copy(update={"options": {**first.options, "has_user_compute_stream": "0"}}),
            *cfg.providers[1:]]
    if not cfg.cuda_graph:
        return overrides, None
    overrides["cuda_graph"] = False
    return overrides, ("cuda_graph_off", {
        "cameras": cameras, "reason": "several cameras share one ONNX Runtime session; CUDA graph lanes need the "
        "CUDA EP, GPU preprocessing and no user stream, and without them graphs captured per thread in global "
        "mode from several camera threads would collide"})
