"""Engine factory: config -> loaded Engine, through the engine cache where there is one.

- onnxruntime (CPU / CUDA EP): the cached "engine" is ONNX Runtime's optimised graph
  (SessionOptions.optimized_model_filepath), saved right after the first session is built and
  loaded back as an ordinary ONNX model afterwards. An "all"-level optimised graph can hold
  CPU-specific layouts, which is why the CPU model and ISA are part of its key.
- onnxruntime with the TensorRT EP: ONNX Runtime keeps its own engine files; they are pointed at
  `<cache>/ort-trt/<key>/` (engines) and the shared timing cache folder, so they survive restarts
  and a different runtime / device / model gets a different folder. Those files are ONNX
  Runtime's: they are not checksummed or evicted by EngineCache.
- tensorrt: a native TensorRT plan built from the ONNX model (agent.engines.tensorrt), cached,
  verified and quarantined by EngineCache.

`create_engine` returns a LOADED engine (the cache's load step is what proves an entry good).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cache.keys import canonical_json, model_digest
from agent.cache.store import EngineCache
from agent.config import EngineConfig, ProviderConfig
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
    from agent.engines.tensorrt import onnx_io_specs

    inputs, _ = onnx_io_specs(model_path)
    return ";".join(f"{s.name}:{'x'.join(str(d) for d in s.shape)}:{s.dtype}" for s in inputs)


def key_fields(model_path: Path, cfg: EngineConfig, fingerprint: dict[str, str] | None = None) -> dict[str, str]:
    """Every field of the cache key for this model and engine config (DESIGN.md's contract)."""
    from agent.engines.tensorrt import BuildOptions

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


def _ort_trt_options(cfg: EngineConfig, cache: EngineCache, key: str) -> EngineConfig:
    """Point ONNX Runtime's TensorRT EP at the cache (options the user set explicitly win)."""
    engine_dir = cache.root / "ort-trt" / key
    timing_dir = cache.root / "ort-trt" / "timing"
    engine_dir.mkdir(parents=True, exist_ok=True)
    timing_dir.mkdir(parents=True, exist_ok=True)
    providers: list[ProviderConfig] = []
    for given in cfg.providers:
        p = given
        if p.name == "TensorrtExecutionProvider":
            defaults: dict[str, Any] = {
                "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engine_dir),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(timing_dir),
                "trt_max_workspace_size": str(cfg.workspace_mb << 20),
                "trt_builder_optimization_level": str(cfg.optimization_level),
                "trt_fp16_enable": str(cfg.precision in ("fp16", "int8")),
                "trt_int8_enable": str(cfg.precision == "int8"),
            }
            if cfg.dla_core is not None:
                defaults.update({"trt_dla_enable": "True", "trt_dla_core": str(cfg.dla_core)})
            p = ProviderConfig(name=p.name, options={**defaults, **p.options})
        providers.append(p)
    return cfg.model_copy(update={"providers": providers})


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
    key = cache.cache_key(fields)
    if "TensorrtExecutionProvider" in fields["providers"].split(","):
        report(0.0, "building TensorRT engines (ONNX Runtime TensorRT EP)")
        engine = OnnxRuntimeEngine(model_path, _ort_trt_options(cfg, cache, key), on_event=on_event)
        engine.load()
        engine.info.engine_key = key
        report(1.0, "engine ready")
        return engine

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
    from agent.engines.tensorrt import (
        NOT_INSTALLED,
        BuildOptions,
        TensorRTEngine,
        build_engine_bytes,
        tensorrt_available,
    )

    if tensorrt_available() is None:
        raise EngineError(NOT_INSTALLED)
    options = BuildOptions.from_config(cfg)
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="edge-agent-trt-") as tmp:
            path = Path(tmp) / "engine.bin"
            path.write_bytes(build_engine_bytes(model_path, options, None, progress))
            engine = TensorRTEngine(path, model_path, cfg.precision)
            engine.load()  # the bytes are in memory after this; the file can go
        return engine
    fields = key_fields(model_path, cfg)
    key = cache.cache_key(fields)

    def build(out: Path) -> None:
        out.write_bytes(build_engine_bytes(model_path, options, cache, progress))

    def load(path: Path) -> TensorRTEngine:
        engine = TensorRTEngine(path, model_path, cfg.precision, engine_key=key)
        engine.load()
        return engine

    engine, _ = cache.get_or_build(fields, build, load)
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
