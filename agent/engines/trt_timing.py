"""TensorRT timing caches, one per TensorRT version and GPU, under the engine cache.

Data flow: `timing_tag(fields)` (TensorRT version + GPU name / CC / SM count + board + system CUDA,
from the engine's key fields) -> `<cache>/timing/<tag>.cache` read under a shared lock ->
`attach(config, bytes)` before the build -> the build -> `save(config, cache, tag)`: the file is
read again under the exclusive lock, merged INTO this build's cache (as Polygraphy does), and
written atomically.

Why one file per version and GPU: after a JetPack upgrade (8.6 -> 10.3) a single shared file would
be read by a TensorRT that did not write it. Every TensorRT call that can fail is checked: a cache
that cannot be parsed, does not match (`set_timing_cache` False) or cannot be combined is set aside
with a warning and the build goes on with an empty one: a timing cache only saves build time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cache.lock import FileLock

if TYPE_CHECKING:
    import tensorrt as trt

    from agent.cache.store import EngineCache

__all__ = ["TAG_FIELDS", "attach", "read", "save", "timing_path", "timing_tag"]

log = logging.getLogger(__name__)

# what makes a timing cache valid: the TensorRT that measured it and the GPU it measured on
TAG_FIELDS = ("tensorrt", "gpu_name", "gpu_cc", "gpu_sm_count", "board", "cuda_system")


def timing_tag(fields: dict[str, str]) -> str:
    """A file-name-safe tag: readable prefix (TensorRT version, GPU) + a hash over TAG_FIELDS."""
    picked = {k: fields.get(k, "unknown") for k in TAG_FIELDS}
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
    readable = f"trt{picked['tensorrt']}-{picked['gpu_name']}-cc{picked['gpu_cc']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[:80] + "-" + digest


def timing_path(cache: EngineCache, tag: str) -> Path:
    return cache.root / "timing" / f"{tag}.cache"


def _lock(cache: EngineCache, tag: str, shared: bool) -> FileLock:
    return FileLock(cache.locks_dir / f"timing-{tag}.lock", shared=shared, timeout_s=cache.lock_timeout_s)


def read(cache: EngineCache, tag: str) -> bytes | None:
    """The stored timing cache for `tag`, or None (none yet, or unreadable: said in the log)."""
    cache.ensure_ready()
    path = timing_path(cache, tag)
    with _lock(cache, tag, shared=True):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("timing cache %s unreadable (%s): building without it", path, exc)
            return None


def attach(config: trt.IBuilderConfig, data: bytes | None) -> trt.ITimingCache | None:
    """Give the builder a timing cache from `data` (empty when None or unusable); None when TensorRT
    cannot create even an empty one (the build then runs without)."""
    timing = None
    if data:
        timing = config.create_timing_cache(data)
        if timing is None:
            log.warning("stored TensorRT timing cache cannot be parsed: starting an empty one")
        elif not config.set_timing_cache(timing, False):
            log.warning("stored TensorRT timing cache does not match this TensorRT / GPU: starting an empty one")
            timing = None
        else:
            return timing
    timing = config.create_timing_cache(b"")
    if timing is None or not config.set_timing_cache(timing, False):
        log.warning("TensorRT could not create an empty timing cache: building without one")
        return None
    return timing


def save(config: trt.IBuilderConfig, cache: EngineCache, tag: str) -> bool:
    """Merge the stored cache into this build's and write it back, under the exclusive lock.
    True when written; False (with a warning) when TensorRT gave nothing to save."""
    from agent.cache.store import write_atomic

    ours = config.get_timing_cache()
    if ours is None:
        log.warning("TensorRT returned no timing cache after the build: nothing saved")
        return False
    path = timing_path(cache, tag)
    with _lock(cache, tag, shared=False):
        current = None
        with contextlib.suppress(FileNotFoundError):
            current = path.read_bytes()
        if current:
            old = config.create_timing_cache(current)
            if old is None or not ours.combine(old, False):
                log.warning("stored timing cache %s could not be merged: replaced by this build's", path.name)
        data = bytes(ours.serialize())
        if not data:
            log.warning("TensorRT serialised an empty timing cache: nothing saved")
            return False
        path.parent.mkdir(exist_ok=True, mode=0o700)
        write_atomic(path, data)
    return True
