"""An accepted manifest survives a kill at any moment after its MQTT callback (found by the
reliability suite's update_kill scenario: killed between "seen" and "pending", an update vanished
without a word - acknowledged to the broker, and refused as replayed if delivered again)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import UpdatesConfig
from agent.models.store import ModelStore
from agent.mqtt.topics import Topics
from agent.updates.manager import UpdateManager
from agent.updates.manifest import generate_keypair, load_private_key
from tests.updates.helpers import make_manifest, signed_bytes
from tests.updates.test_manager import Bus, FakeHost, model_file, wait_state


@pytest.fixture
def device(tmp_path: Path) -> Iterator[dict[str, Any]]:
    kp = generate_keypair(tmp_path / "keys", "ops")
    cfg = UpdatesConfig(models_dir=tmp_path / "models", trusted_keys={"ops": kp.public_b64}, health_window_s=0.3,
                        download_timeout_s=2.0)
    started: list[UpdateManager] = []

    def boot(clock: float | None = None) -> tuple[UpdateManager, Bus, FakeHost]:
        """A fresh process on the same disk: new store object (recover()), new manager, new bus."""
        store = ModelStore(cfg.models_dir, cfg.keep_versions)
        store.recover()
        bus, host = Bus(), FakeHost()
        mgr = UpdateManager(cfg, "dev1", Topics("edge", "dev1"), bus, store, host,
                            clock=(lambda: clock) if clock is not None else time.time)
        return mgr, bus, host

    try:
        yield {"boot": boot, "started": started, "tmp": tmp_path, "key": load_private_key(kp.private_path)}
    finally:
        for m in started:
            m.stop()


def _raw(env: dict[str, Any], ttl: int = 3600) -> bytes:
    p = model_file(env["tmp"])
    return signed_bytes(make_manifest(p.read_bytes(), now=int(time.time()), ttl=ttl, url=p.as_uri(),
                                      manifest_id="durable-0001"), env["key"], "ops")


def test_killed_right_after_the_callback_the_update_resumes(device: dict[str, Any]) -> None:
    first, _, _ = device["boot"]()
    raw = _raw(device)
    first._on_manifest("edge/dev1/model/update", raw)  # accepted and acknowledged; no worker ran: "killed"

    second, bus, host = device["boot"]()
    device["started"].append(second)
    second.start()
    s = wait_state(bus, lambda s: s["state"] in ("active", "failed"))
    assert (s["state"], s["manifest_id"]) == ("active", "durable-0001"), s
    second._on_manifest("edge/dev1/model/update", raw)  # the broker delivers it again: not a second update
    assert second.wait_idle(5)
    assert host.activated and host.current == ("widgets", "2")
    assert [e["reason"] for e in bus.events() if e["event"] == "update_rejected"] == ["replayed"]


def test_a_pending_update_that_can_no_longer_run_is_reported(device: dict[str, Any]) -> None:
    first, _, _ = device["boot"]()
    first._on_manifest("edge/dev1/model/update", _raw(device, ttl=60))

    second, bus, host = device["boot"](clock=time.time() + 3600)  # down for an hour: the manifest expired
    device["started"].append(second)
    second.start()
    s = wait_state(bus, lambda s: s["state"] == "failed")
    assert (s["error"], s["manifest_id"]) == ("expired", "durable-0001"), s
    assert host.activated == []
    third, _, _ = device["boot"]()
    assert third.store.recall("pending") is None  # reported once, not at every start
