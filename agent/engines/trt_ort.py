"""ONNX Runtime's TensorRT execution provider, with its engine files kept like native engines.

Data flow: the cache entry of key K (same key fields and fingerprint as a native engine, plus the
provider list) holds `K/ort-trt/` (the files the EP writes: its serialized engines and profiles)
and `K/engine.bin`, which here is a manifest: the sha256 and size of every file in `ort-trt/`.
Build: the EP is pointed at an empty `K/ort-trt/` and the per-TensorRT-and-GPU timing folder, the
session is created once (the EP builds and writes its engines), the manifest is written (the
cache checksums it like an engine). Load: every file is checked against the manifest BEFORE the
session is created (a damaged engine file raises, so EngineCache quarantines the entry and
rebuilds it), the session is created on the same folder, and the files are checked again (an EP
that silently rebuilt means its cached engine was not used: quarantine and rebuild too).

Why: the EP otherwise keeps engines where its options say, unverified, unkeyed by our
fingerprint, and never evicted; a JetPack upgrade or a damaged file would then be found (or not)
by the EP alone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cache.keys import file_sha256
from agent.config import EngineConfig, ProviderConfig
from agent.engines.base import Engine
from agent.engines.trt_timing import timing_tag
from agent.errors import EngineError

if TYPE_CHECKING:
    from agent.cache.store import EngineCache

__all__ = ["EP", "EP_DIR", "create", "ep_options", "manifest", "verify"]

EP = "TensorrtExecutionProvider"
EP_DIR = "ort-trt"
_FORMAT = 1

MakeEngine = Callable[[Path, EngineConfig], Engine]  # (model, config with the EP's options) -> loaded engine


def ep_options(cfg: EngineConfig, engine_dir: Path, timing_dir: Path) -> EngineConfig:
    """`cfg` with the TensorRT EP's caches pointed at `engine_dir` / `timing_dir` and the build
    options of the native backend; options the user set explicitly win."""
    providers: list[ProviderConfig] = []
    for given in cfg.providers:
        p = given
        if p.name == EP:
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


def _files(engine_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in engine_dir.rglob("*") if p.is_file()):
        out[path.relative_to(engine_dir).as_posix()] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return out


def manifest(engine_dir: Path) -> bytes:
    """The manifest of what the EP wrote (EngineError when it wrote nothing: no engine to keep)."""
    files = _files(engine_dir)
    if not files:
        raise EngineError(f"ONNX Runtime's TensorRT EP wrote no engine into {engine_dir} (did it take any node?)")
    return json.dumps({"format": _FORMAT, "files": files}, sort_keys=True, indent=1).encode()


def verify(manifest_path: Path, engine_dir: Path) -> None:
    """EngineError naming the first file that is missing, extra, or differs from the manifest."""
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        want = data["files"]
        if data.get("format") != _FORMAT or not isinstance(want, dict):
            raise ValueError("unknown manifest format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"TensorRT EP manifest {manifest_path} unreadable: {exc}") from exc
    try:
        have = _files(engine_dir) if engine_dir.is_dir() else {}
    except OSError as exc:
        raise EngineError(f"TensorRT EP engine folder {engine_dir} unreadable: {exc.strerror or exc}") from exc
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise EngineError(f"TensorRT EP engine file {name} is missing")
        if name not in want:
            raise EngineError(f"TensorRT EP wrote {name}, not in the manifest (its cached engine was not used)")
        if have[name] != want[name]:
            raise EngineError(f"TensorRT EP engine file {name} differs from the manifest (damaged or rebuilt)")


def create(model_path: Path, cfg: EngineConfig, cache: EngineCache, fields: dict[str, str],
           make_engine: MakeEngine) -> tuple[Engine, bool]:
    """(loaded engine, taken from the cache) for an ONNX Runtime session using the TensorRT EP."""
    timing_dir = cache.root / "timing" / "ort-trt" / timing_tag(fields)

    def build(out: Path) -> None:
        engine_dir = out.parent / EP_DIR
        shutil.rmtree(engine_dir, ignore_errors=True)  # left by a build that was killed
        engine_dir.mkdir(parents=True, mode=0o700)
        timing_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_engine(model_path, ep_options(cfg, engine_dir, timing_dir)).close()
        out.write_bytes(manifest(engine_dir))

    def load(path: Path) -> Engine:
        engine_dir = path.parent / EP_DIR
        verify(path, engine_dir)
        timing_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = make_engine(model_path, ep_options(cfg, engine_dir, timing_dir))
        try:
            verify(path, engine_dir)
        except EngineError:
            with contextlib.suppress(Exception):
                engine.close()
            raise
        return engine

    engine, entry = cache.get_or_build(fields, build, load)
    return engine, not entry.built
