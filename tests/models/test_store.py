from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest

from agent.errors import UpdateError
from agent.models.store import ModelStore, ModelVersion


def manifest(name: str, version: str, data: bytes) -> dict[str, object]:
    return {"schema": 1, "id": f"id-{name}-{version}-xxxx",
            "model": {"name": name, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
                      "size": len(data), "input": {"width": 64, "height": 64}, "labels": ["a", "b"],
                      "decoder": "yolov8"}}


def add(store: ModelStore, version: str, name: str = "w", size: int = 2048, seed: int | None = None) -> ModelVersion:
    if seed is None:
        seed = int(hashlib.md5(f"{name}-{version}".encode()).hexdigest()[:8], 16)
    data = random.Random(seed).randbytes(size)
    src = store.root.parent / f"src-{name}-{version}.onnx"
    src.write_bytes(data)
    staged = store.stage(src, json.dumps(manifest(name, version, data)).encode())
    return store.install(staged)


def test_install_activate_rollback(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=3)
    assert s.recover() is None and s.active() is None
    v1 = add(s, "1")
    assert s.is_complete(v1) and v1.path == tmp_path / "models" / "versions" / "w-1"
    assert (v1.path / "labels.txt").read_text() == "a\nb\n"
    s.activate(v1)
    v2 = add(s, "2")
    s.activate(v2)
    assert s.active() == v2 and s.previous() == v1
    assert s.rollback("health") == v1
    assert s.active() == v1 and s.previous() is None  # the bad one is never "previous"
    assert "w-2" in s.bad_versions()
    assert s.rollback("again") is None  # nothing left: the bundled default
    assert s.active() is None


def test_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        s = ModelStore(tmp_path / "models", keep=2)
        v = add(s, "1")
        s.activate(v)
    finally:
        os.umask(old)
    for p in [s.root, *s.root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_install_rejects_incomplete_and_outside(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=2)
    data = b"x" * 100
    d = s.new_staging_dir("w", "1")
    (d / "model.onnx").write_bytes(data[:50])
    (d / "manifest.json").write_text(json.dumps(manifest("w", "1", data)))
    with pytest.raises(UpdateError) as ei:
        s.install(d)
    assert ei.value.reason == "checksum_mismatch"
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(UpdateError):
        s.install(other)
    with pytest.raises(UpdateError):
        s.new_staging_dir("../x", "1")


def test_install_same_version_twice_is_idempotent(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=2)
    a = add(s, "1", seed=1)
    b = add(s, "1", seed=1)
    assert a.path == b.path and list(s.staging_dir.iterdir()) == []


def test_recover_falls_back(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=3)
    v1, v2 = add(s, "1"), add(s, "2")
    s.activate(v1)
    s.activate(v2)
    (v2.path / "model.onnx").write_bytes(b"damaged")  # active incomplete -> previous
    (s.staging_dir / "w-3.half").mkdir()
    assert s.recover() == v1
    assert list(s.staging_dir.iterdir()) == []
    assert s.active() == v1
    import shutil

    shutil.rmtree(v1.path)  # active dangling, no previous -> bundled default
    assert s.recover() is None and s.active() is None


def test_desired_and_last_good_survive_restart(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=3)
    v1 = add(s, "1")
    s.activate(v1)
    s.mark_good(v1)
    s.set_desired("w", "2", "m-2")
    s.remember("seen_ids", ["a", "b"])
    s2 = ModelStore(tmp_path / "models", keep=3)
    assert s2.recover() == v1
    assert s2.last_good() == v1
    assert s2.desired() is not None and s2.desired()["version"] == "2"  # type: ignore[index]
    assert s2.recall("seen_ids") == ["a", "b"]


def test_prune_keeps_active_previous(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=2)
    vs = [add(s, str(i)) for i in range(1, 6)]
    s.activate(vs[0])
    s.activate(vs[1])  # previous = 1, active = 2; 3, 4, 5 installed later (newer mtimes)
    removed = s.prune()
    assert {"w-1", "w-2"} <= {v.key for v in s.installed_versions()}
    assert sorted(removed) == ["w-3", "w-4", "w-5"]
    s.mark_good(vs[0])
    assert s.prune() == []
    assert list(s.trash_dir.iterdir()) == []


def _child(root: Path, seed: int) -> None:  # pragma: no cover - runs in a forked child
    rnd = random.Random(seed)
    s = ModelStore(root, keep=3)
    for j in range(1000):
        v = add(s, f"{seed}.{j}", size=rnd.choice([1024, 65536, 262144]), seed=j)
        s.activate(v)
        if rnd.random() < 0.3 and s.previous() is not None:
            s.rollback("test")
        if rnd.random() < 0.3:
            s.prune()


def test_crash_at_random_points_leaves_a_complete_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    s = ModelStore(root, keep=3)
    base = add(s, "1")
    s.activate(base)
    rnd = random.Random(11)
    for i in range(2, 36):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _child(root, i)
            finally:
                os._exit(0)
        time.sleep(rnd.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        store = ModelStore(root, keep=3)
        active = store.recover()
        assert active is not None, f"iteration {i}: lost every model"
        assert store.is_complete(active)
        for v in store.installed_versions():  # nothing half-installed ever appears in versions/
            assert store.is_complete(v), v
        assert list(store.staging_dir.iterdir()) == []
        if len(store.installed_versions()) > 8:
            store.prune()


def test_restart_during_trial_rolls_back(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", keep=3)
    v1, v2 = add(s, "1"), add(s, "2")
    s.activate(v1)
    s.activate(v2, trial=True)
    assert s.on_trial() == "w-2"
    s2 = ModelStore(tmp_path / "models", keep=3)  # the agent died during the health window
    assert s2.recover() == v1
    assert s2.on_trial() is None and "w-2" in s2.bad_versions()
    s2.activate(v2, trial=True)
    s2.end_trial(good=True)
    assert s2.last_good() == v2 and ModelStore(tmp_path / "models").recover() == v2
