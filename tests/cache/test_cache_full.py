"""A full engine-cache disk: the engine is built and served uncached, said as engine_cache_full, and
nothing half-written stays in the cache (found by the reliability suite's disk_full scenario: the
agent did not start at all when its cache file system was full)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from agent.cache.store import EngineCache
from agent.config import EngineConfig
from agent.engines.factory import create_engine
from agent.errors import CacheError
from tests.cache.test_store import Builder, FakeDevice, Recorder, fields_for, load_ok
from tests.support.models import fixed_yolov8_model
from tests.updates.helpers import tmpfs


def _cache(root: Path, rec: Recorder) -> EngineCache:
    return EngineCache(root, 1 << 30, on_event=rec, fingerprint=FakeDevice())


def test_enospc_while_writing_serves_an_uncached_engine(tmp_path: Path) -> None:
    rec, device = Recorder(), FakeDevice()
    cache = _cache(tmp_path / "cache", rec)
    calls = {"n": 0}

    def build(path: Path) -> None:
        calls["n"] += 1
        path.write_bytes(b"E" * 100)
        if path.parent.parent == cache.root:  # inside the cache: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    engine, entry = cache.get_or_build(fields_for(device), build, load_ok)
    assert engine == b"E" * 100 and entry.built and entry.meta["uncached"]
    assert calls["n"] == 2
    assert "engine_cache_full" in rec.names()
    assert not (cache.root / entry.key).exists()  # no half entry, nothing "corrupt" for `cache verify`
    assert not entry.dir.exists()  # the private copy is gone once loaded
    assert [i.state for i in cache.verify()] == []


def test_enospc_on_the_metadata_leaves_no_engine_without_metadata(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cache import store

    rec, device = Recorder(), FakeDevice()
    cache = _cache(tmp_path / "cache", rec)
    real = store.write_atomic

    def full_for_meta(path: Path, data: bytes, sync_dir: bool = True) -> None:
        if path.name == store.META_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, sync_dir)

    monkeypatch.setattr(store, "write_atomic", full_for_meta)
    engine, entry = cache.get_or_build(fields_for(device), Builder(), load_ok)
    assert engine and entry.meta["uncached"]
    assert not (cache.root / entry.key).exists()


def test_a_failure_that_is_not_a_full_disk_still_raises(tmp_path: Path) -> None:
    rec, device = Recorder(), FakeDevice()
    cache = _cache(tmp_path / "cache", rec)

    def broken(path: Path) -> None:
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        cache.get_or_build(fields_for(device), broken, load_ok)
    assert "engine_cache_full" not in rec.names()


def test_full_everywhere_is_a_clear_cache_error(tmp_path: Path) -> None:
    rec, device = Recorder(), FakeDevice()
    cache = _cache(tmp_path / "cache", rec)

    def build(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CacheError, match="is full"):
        cache.get_or_build(fields_for(device), build, load_ok)


def test_real_onnxruntime_engine_on_a_full_tmpfs(tmp_path: Path) -> None:
    """ONNX Runtime says only "Protobuf serialization failed" on ENOSPC: the file system is asked."""
    model = fixed_yolov8_model(tmp_path / "m.onnx", [(32, 32, 16, 16, 1, 0.8)], size=320, anchors=20000)
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        if mnt is None:
            pytest.skip("mounting a tmpfs is not permitted here")
        rec = Recorder()
        cache = EngineCache(mnt, 1 << 30, on_event=rec)
        engine = create_engine(model, EngineConfig(intra_op_threads=1), cache, on_event=rec)
        try:
            out = engine.infer(np.zeros((1, 3, 320, 320), np.float32))
            assert out[0].shape == (1, 6, 20000)
        finally:
            engine.close()
        assert "engine_cache_full" in rec.names()
        assert not [p for p in mnt.rglob("*") if p.is_file() and p.name in ("engine.bin", "meta.json")]
        assert not [p for p in mnt.rglob("*") if ".tmp-" in p.name]
