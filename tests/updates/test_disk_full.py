"""Updates on a full disk (found by the reliability suite's disk_full scenario).

- chunks arriving after the one that hit ENOSPC must not turn the reason into "bad_transfer";
- a model store too full for its own state.json fails the update as disk_full (not "internal"),
  and leaves no temp file, no partial transfer, no staged version behind;
- an error in the bookkeeping after a swap (the cache's protected.json on a full disk) must not
  make the manager release the engine that now serves.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.config import UpdatesConfig
from agent.models.store import ModelStore
from agent.mqtt.topics import Topics
from agent.pipeline import SwapTicket
from agent.updates.host import Bundle, ServiceHost
from agent.updates.manager import UpdateManager
from agent.updates.manifest import generate_keypair, load_private_key, sign_manifest
from tests.support.models import fixed_yolov8_model
from tests.updates.helpers import make_manifest, tmpfs
from tests.updates.test_manager import Bus, FakeHost, wait_state


@pytest.fixture
def full_env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An UpdateManager whose model store lives on a 256 KiB tmpfs."""
    with tmpfs(tmp_path / "models", "256k") as mnt:
        if mnt is None:
            pytest.skip("mounting a tmpfs is not permitted here")
        kp = generate_keypair(tmp_path / "keys", "ops")
        cfg = UpdatesConfig(models_dir=mnt, trusted_keys={"ops": kp.public_b64}, health_window_s=0.3,
                            download_timeout_s=2.0)
        bus, host = Bus(), FakeHost()
        store = ModelStore(cfg.models_dir, cfg.keep_versions)
        store.recover()
        mgr = UpdateManager(cfg, "dev1", Topics("edge", "dev1"), bus, store, host)
        mgr.start()
        try:
            yield {"bus": bus, "host": host, "store": store, "mgr": mgr, "mnt": mnt, "tmp": tmp_path,
                   "key": load_private_key(kp.private_path)}
        finally:
            mgr.stop()


def _push_chunks(env: dict[str, Any], data: bytes, chunk: int = 4096) -> None:
    raw = json.dumps(sign_manifest(make_manifest(data, now=int(time.time()), mqtt_chunk=chunk), env["key"],
                                   "ops")).encode()
    env["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(env["bus"], lambda s: s["state"] in ("downloading", "failed"))
    tid = json.loads(raw)["source"]["mqtt"]["transfer_id"]
    for i in range((len(data) + chunk - 1) // chunk):
        env["bus"].deliver(f"edge/dev1/model/chunks/{tid}/{i}", data[i * chunk:(i + 1) * chunk])


def _half_written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and (p.suffix in (".tmp", ".part", ".state") or "staging" in p.parts))


def test_download_onto_a_full_store_fails_as_disk_full(full_env: dict[str, Any]) -> None:
    model = fixed_yolov8_model(full_env["tmp"] / "big.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64, anchors=20000)
    _push_chunks(full_env, model.read_bytes())  # 480 KB onto 256 KiB
    s = wait_state(full_env["bus"], lambda s: s["state"] == "failed")
    assert s["error"] == "disk_full", s
    assert full_env["mgr"].wait_idle(5)
    assert full_env["host"].activated == [] and full_env["store"].active() is None
    assert _half_written(full_env["mnt"]) == []


def test_a_store_too_full_for_its_state_fails_as_disk_full(full_env: dict[str, Any]) -> None:
    mnt: Path = full_env["mnt"]
    with open(mnt / "ballast", "wb", buffering=0) as f:  # every free byte
        for block in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    model = fixed_yolov8_model(full_env["tmp"] / "small.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64, anchors=16)
    _push_chunks(full_env, model.read_bytes(), chunk=256)
    s = wait_state(full_env["bus"], lambda s: s["state"] == "failed")
    assert s["error"] == "disk_full" and "state" in s["detail"], s
    assert full_env["mgr"].wait_idle(5)
    assert _half_written(mnt) == []
    assert full_env["host"].activated == []


def test_an_error_after_the_swap_does_not_undo_it() -> None:
    """ServiceHost.activate: the pipelines took the new runtime; on_model_activated then fails."""
    class Pipe:
        def request_swap(self, rt: Any) -> SwapTicket:
            t = SwapTicket(rt)
            t.applied.set()
            return t

    def broken_bookkeeping(rt: Any) -> None:
        raise OSError(28, "No space left on device")

    svc = SimpleNamespace(pipelines=[Pipe()], on_model_activated=broken_bookkeeping)
    host = ServiceHost(svc)  # type: ignore[arg-type]
    closed = threading.Event()
    rt = SimpleNamespace(close=closed.set)
    bundle = Bundle("demo", "2", [rt], "k")  # type: ignore[list-item]
    host.activate(bundle, None)  # must not raise: the new model serves
    assert not closed.is_set()
