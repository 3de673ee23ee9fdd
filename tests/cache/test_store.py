"""EngineCache on real files: keys, corruption of every kind, crashes, concurrent builds, eviction."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cache.keys import cache_key
from agent.cache.store import ENGINE_FILE, META_FILE, EngineCache
from agent.engines.fingerprint import CACHE_FORMAT_VERSION
from agent.errors import CacheError

WORKER = Path(__file__).with_name("_worker.py")


class FakeDevice:
    """A fingerprint source whose fields a test can change (a JetPack upgrade, say)."""

    def __init__(self) -> None:
        self.fp = {"tensorrt": "10.3.0", "cuda_runtime": "12.6", "gpu_name": "Orin", "l4t": "36.4.0"}

    def __call__(self, backend: str, providers: list[str]) -> dict[str, str]:
        return dict(self.fp)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def __call__(self, name: str, data: dict[str, object]) -> None:
        self.events.append((name, data))

    def names(self) -> list[str]:
        return [n for n, _ in self.events]


def fields_for(device: FakeDevice, model: str = "a", **extra: str) -> dict[str, str]:
    return {"model_sha256": model * 64, "backend": "tensorrt", "providers": "TensorRT", "precision": "fp16",
            **device.fp, **extra}


class Builder:
    """Counts builds; writes `payload` (default: derived from the count)."""

    def __init__(self, size: int = 1000) -> None:
        self.count = 0
        self.size = size

    def __call__(self, path: Path) -> None:
        self.count += 1
        path.write_bytes(b"E" * self.size)


def load_ok(path: Path) -> bytes:
    data = path.read_bytes()
    if not data or set(data) != {ord("E")}:
        raise ValueError("not an engine")
    return data


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def cache(tmp_path: Path, device: FakeDevice, rec: Recorder) -> EngineCache:
    return EngineCache(tmp_path / "cache", 1 << 20, on_event=rec, fingerprint=device)


def test_key_is_canonical_and_covers_every_field() -> None:
    a = {"model_sha256": "x", "backend": "tensorrt", "precision": "fp16"}
    b = dict(reversed(list(a.items())))
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**a, "precision": "fp32"})
    assert cache_key(a) == cache_key({**a, "cache_format": CACHE_FORMAT_VERSION})
    assert cache_key(a) != cache_key({**a, "cache_format": CACHE_FORMAT_VERSION + "-next"})
    with pytest.raises(TypeError):
        cache_key({"workspace_mb": 1024})  # type: ignore[dict-item]


def test_build_once_then_hit(cache: EngineCache, device: FakeDevice, rec: Recorder) -> None:
    build = Builder()
    data, entry = cache.get_or_build(fields_for(device), build, load_ok)
    assert entry.built and build.count == 1 and len(data) == 1000
    meta = json.loads((entry.dir / META_FILE).read_text())
    assert meta["fields"]["tensorrt"] == "10.3.0" and meta["size"] == 1000 and meta["engine_sha256"]
    assert {"built_at", "build_s", "last_use", "key"} <= set(meta)
    data, entry2 = EngineCache(cache.root, 1 << 20, fingerprint=device).get_or_build(fields_for(device), build,
                                                                                     load_ok)
    assert not entry2.built and build.count == 1 and entry2.key == entry.key
    assert json.loads((entry.dir / META_FILE).read_text())["last_use"] >= meta["last_use"]
    assert not [p for p in entry.dir.iterdir() if ".tmp-" in p.name]
    assert "engine_built" in rec.names()


def _truncate(d: Path) -> None:
    (d / ENGINE_FILE).write_bytes((d / ENGINE_FILE).read_bytes()[:10])


def _flip(d: Path) -> None:
    data = bytearray((d / ENGINE_FILE).read_bytes())
    data[500] ^= 0x01
    (d / ENGINE_FILE).write_bytes(bytes(data))


def _empty(d: Path) -> None:
    (d / ENGINE_FILE).write_bytes(b"")


def _wrong_sha(d: Path) -> None:
    meta = json.loads((d / META_FILE).read_text())
    meta["engine_sha256"] = "0" * 64
    (d / META_FILE).write_text(json.dumps(meta))


def _wrong_fields(d: Path) -> None:
    meta = json.loads((d / META_FILE).read_text())
    meta["fields"]["tensorrt"] = "8.6.2"
    (d / META_FILE).write_text(json.dumps(meta))


def _garbage_meta(d: Path) -> None:
    (d / META_FILE).write_text("{not json")


def _meta_only(d: Path) -> None:
    (d / ENGINE_FILE).unlink()


def _engine_only(d: Path) -> None:
    (d / META_FILE).unlink()


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], bool]] = {
    # name: (how, visible without reading the checksum)
    "truncated": (_truncate, True),
    "flipped byte": (_flip, False),
    "empty engine": (_empty, True),
    "wrong checksum in metadata": (_wrong_sha, False),
    "metadata fields do not match": (_wrong_fields, True),
    "metadata not json": (_garbage_meta, True),
    "metadata without engine": (_meta_only, True),
    "engine without metadata": (_engine_only, True),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_entry_is_detected_quarantined_and_rebuilt(name: str, cache: EngineCache, device: FakeDevice,
                                                           rec: Recorder) -> None:
    corrupt, shallow = CORRUPTIONS[name]
    build = Builder()
    _, entry = cache.get_or_build(fields_for(device), build, load_ok)
    corrupt(entry.dir)
    states = {i.key: i.state for i in cache.verify()}
    assert states[entry.key] == "corrupt"
    if shallow:
        assert {i.key: i.state for i in cache.list_entries()}[entry.key] == "corrupt"
    assert cache.lookup(fields_for(device)) is None
    data, again = cache.get_or_build(fields_for(device), build, load_ok)
    assert again.built and build.count == 2 and len(data) == 1000
    quarantined = [e for e in rec.events if e[0] == "engine_quarantined"]
    assert len(quarantined) == 1 and quarantined[0][1]["key"] == entry.key and quarantined[0][1]["reason"]
    moved = list(cache.quarantine_dir.iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(entry.key)
    assert (moved[0] / "reason.txt").read_text().strip()
    assert [i.state for i in cache.verify()] == ["ok"]


def test_engine_that_fails_to_load_is_quarantined_and_rebuilt(cache: EngineCache, device: FakeDevice,
                                                              rec: Recorder) -> None:
    build = Builder()
    cache.get_or_build(fields_for(device), build, load_ok)
    calls = {"n": 0}

    def load_fails_once(path: Path) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("deserialize failed: version mismatch")
        return load_ok(path)

    _, entry = cache.get_or_build(fields_for(device), build, load_fails_once)
    assert entry.built and build.count == 2
    reason = next(d["reason"] for n, d in rec.events if n == "engine_quarantined")
    assert "version mismatch" in str(reason)


def test_fresh_build_that_does_not_load_raises(cache: EngineCache, device: FakeDevice) -> None:
    def bad_build(path: Path) -> None:
        path.write_bytes(b"garbage")

    with pytest.raises(CacheError, match="does not load"):
        cache.get_or_build(fields_for(device), bad_build, load_ok)
    assert cache.lookup(fields_for(device)) is None


def test_failed_build_leaves_nothing(cache: EngineCache, device: FakeDevice, rec: Recorder) -> None:
    def failing(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        cache.get_or_build(fields_for(device), failing, load_ok)
    assert cache.lookup(fields_for(device)) is None
    assert not list((cache.root / cache.cache_key(fields_for(device))).iterdir())
    assert "engine_build_failed" in rec.names()


def test_fingerprint_change_makes_entries_stale_and_prune_removes_them(cache: EngineCache, device: FakeDevice,
                                                                       tmp_path: Path) -> None:
    build = Builder()
    old_keys = {cache.get_or_build(fields_for(device, m), build, load_ok)[1].key for m in "ab"}
    assert {i.state for i in cache.list_entries()} == {"ok"}
    device.fp["tensorrt"] = "10.7.0"  # JetPack upgrade
    fresh = EngineCache(cache.root, 1 << 20, fingerprint=device)
    infos = {i.key: i for i in fresh.list_entries()}
    assert {infos[k].state for k in old_keys} == {"stale"}
    assert "tensorrt: 10.3.0 -> 10.7.0" in infos[next(iter(old_keys))].reason
    _, entry = fresh.get_or_build(fields_for(device, "a"), build, load_ok)
    assert entry.built and build.count == 3 and entry.key not in old_keys
    assert sorted(fresh.prune(stale=True)) == sorted(old_keys)
    assert [(i.key, i.state) for i in fresh.list_entries()] == [(entry.key, "ok")]


def test_lru_eviction_never_removes_protected(tmp_path: Path, device: FakeDevice, rec: Recorder) -> None:
    cache = EngineCache(tmp_path / "c", 3500, on_event=rec, fingerprint=device)  # room for 3 of 1000 bytes
    build = Builder()
    keys = {}
    for m in "abc":
        keys[m] = cache.get_or_build(fields_for(device, m), build, load_ok)[1].key
        time.sleep(0.01)
    cache.set_protected([keys["a"]])  # the active model: oldest, but kept
    cache.get_or_build(fields_for(device, "b"), build, load_ok)  # b used: c is now the LRU
    time.sleep(0.01)
    keys["d"] = cache.get_or_build(fields_for(device, "d"), build, load_ok)[1].key
    present = {i.key for i in cache.list_entries()}
    assert present == {keys["a"], keys["b"], keys["d"]}
    assert [d["key"] for n, d in rec.events if n == "engine_evicted"] == [keys["c"]]
    # protection is persisted for other processes (the CLI)
    assert keys["a"] in EngineCache(cache.root, 1, fingerprint=device).protected_keys()
    # even a cap of 1 byte keeps protected engines and the one just built
    tiny = EngineCache(cache.root, 1, fingerprint=device)
    tiny.evict()
    assert {i.key for i in tiny.list_entries()} == {keys["a"]}


def test_unwritable_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="not writable") as err:
        EngineCache(blocker / "cache", 1 << 20)
    assert "every start would rebuild" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="not writable"):
            EngineCache(ro, 1 << 20)
    finally:
        ro.chmod(0o755)


def _spawn(root: Path, marker: Path, start_at: float, chunks: int, sleep_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), str(root), str(marker), str(start_at), str(chunks),
                             str(sleep_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_on_an_empty_cache_build_once(tmp_path: Path) -> None:
    root, marker = tmp_path / "cache", tmp_path / "builds.txt"
    start_at = time.time() + 1.0
    procs = [_spawn(root, marker, start_at, 20, 0.02) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(marker.read_text().split()) == 1, "exactly one build"
    assert sorted(r["built"] for r in results) == [False, True]
    assert all(r["ok"] for r in results)


def test_sigkill_during_build_or_write_leaves_nothing_or_a_valid_entry(tmp_path: Path) -> None:
    sys.path.insert(0, str(WORKER.parent))
    try:
        from _worker import FIELDS, expected
    finally:
        sys.path.remove(str(WORKER.parent))
    root, marker = tmp_path / "cache", tmp_path / "builds.txt"
    rng = random.Random(6)
    chunks = 16
    outcomes = {"nothing": 0, "valid": 0}
    for _ in range(10):
        proc = _spawn(root, marker, 0.0, chunks, 0.01)
        time.sleep(rng.uniform(0.1, 0.4))  # interpreter start ~0.15 s, build ~0.16 s, then fsync/rename/meta
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        fresh = EngineCache(root, 1 << 30, fingerprint=lambda backend, providers: {})
        entry = fresh.lookup(FIELDS)
        if entry is None:
            outcomes["nothing"] += 1
            assert {i.state for i in fresh.list_entries()} <= {"corrupt"}
        else:
            outcomes["valid"] += 1
            assert entry.engine_path.read_bytes() == expected(chunks)
            fresh.prune(stale=False, corrupt=False)
            (entry.dir / META_FILE).unlink()  # force the next child to build again
    fresh = EngineCache(root, 1 << 30, fingerprint=lambda backend, providers: {})
    data, entry = fresh.get_or_build(FIELDS, lambda p: p.write_bytes(expected(chunks)), lambda p: p.read_bytes())
    assert data == expected(chunks)
    assert [i.state for i in fresh.verify()] == ["ok"]
    assert outcomes["nothing"] > 0  # killed mid-way at least once
