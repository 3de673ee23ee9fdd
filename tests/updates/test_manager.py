"""UpdateManager against a FakeHost - a TEST DOUBLE of the service (the real pipeline is not wired yet).

The host runs the candidate model with the real ONNX Runtime for the smoke test; MQTT is an in-memory
bus here, and a real mosquitto + the fleet pusher in the end-to-end test.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import UpdatesConfig
from agent.errors import UpdateError
from agent.models.store import ModelStore, ModelVersion
from agent.mqtt.topics import Topics
from agent.updates.manager import UpdateManager
from agent.updates.manifest import Manifest, generate_keypair, load_private_key, sign_manifest
from agent.updates.validate import smoke_test
from tests.support.models import fixed_yolov8_model
from tests.support.update_rig import update_records
from tests.updates.helpers import make_manifest


class Bus:
    """In-memory MQTT stand-in with the MqttClient publish/subscribe signatures."""

    def __init__(self) -> None:
        self.subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        data = payload.encode() if isinstance(payload, str) else payload
        with self.lock:
            self.published.append((topic, data, qos, retain))
        return True

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None], qos: int = 1) -> None:
        self.subs.append((topic_filter, callback))

    def deliver(self, topic: str, payload: bytes) -> None:
        for f, cb in self.subs:
            if mqtt.topic_matches_sub(f, topic):
                cb(topic, payload)

    def payloads(self) -> list[dict[str, Any]]:
        """The model/state payloads as published: what serves, the attempt and the refusal beside it."""
        with self.lock:
            return [json.loads(p) for t, p, _, _ in self.published if t.endswith("/model/state")]

    def states(self) -> list[dict[str, Any]]:
        """The attempt and refusal records those payloads carry, in order, each once."""
        return update_records(self.payloads())

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _, _ in self.published if t.endswith("/events")]


class FakeHost:
    """TEST DOUBLE of the service side (UpdateHost): no camera, no pipeline; real ONNX Runtime smoke runs."""

    def __init__(self) -> None:
        self.current = ("demo", "1")
        self.activated: list[ModelVersion | None] = []
        self.released: list[object] = []
        self.health: dict[str, Any] = {"frames": 100, "errors": 0, "fps": 30.0}
        self.smoke_fails = False
        self.gate: threading.Event | None = None  # blocks prepare_engine while set up

    def recent_frames(self) -> list[np.ndarray]:
        return [np.full((64, 64, 3), i * 40, np.uint8) for i in range(3)]

    def current_model(self) -> tuple[str, str]:
        return self.current

    def prepare_engine(self, model_path: Path | None, manifest: Manifest | None) -> object:
        if self.gate is not None:
            self.gate.wait(10)
        if model_path is None:
            return ("default", None)
        import onnxruntime as ort

        return ("engine", ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]))

    def smoke(self, bundle: object, frames: list[np.ndarray]) -> dict[str, Any]:
        if self.smoke_fails:
            raise UpdateError("non_finite_output", "fake NaN")
        sess = bundle[1]  # type: ignore[index]
        name = sess.get_inputs()[0].name
        tensors = [f.transpose(2, 0, 1)[None].astype(np.float32) / 255.0 for f in frames]
        return smoke_test(lambda t: sess.run(None, {name: t}), tensors, budget_ms=1000)

    def activate(self, bundle: object, version: ModelVersion | None) -> None:
        self.activated.append(version)
        self.current = (version.name, version.version) if version is not None else ("demo", "1")

    def release(self, bundle: object) -> None:
        self.released.append(bundle)

    def health_since(self, t0: float) -> dict[str, Any]:
        return dict(self.health)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    kp = generate_keypair(tmp_path / "keys", "ops")
    cfg = UpdatesConfig(models_dir=tmp_path / "models", trusted_keys={"ops": kp.public_b64}, groups=["line-3"],
                        health_window_s=0.3, download_timeout_s=2.0)
    bus, host = Bus(), FakeHost()
    store = ModelStore(cfg.models_dir, cfg.keep_versions)
    store.recover()
    mgr = UpdateManager(cfg, "dev1", Topics("edge", "dev1"), bus, store, host)
    mgr.start()
    e: dict[str, Any] = {"cfg": cfg, "bus": bus, "host": host, "store": store, "mgr": mgr,
                         "key": load_private_key(kp.private_path), "tmp": tmp_path}
    yield e
    e["mgr"].stop()


def model_file(tmp: Path, version: str = "2", gain: float = 0.0) -> Path:
    return fixed_yolov8_model(tmp / f"w{version}.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64, input_gain=gain,
                              anchors=1000)


def signed(env: dict[str, Any], data: bytes, **kw: Any) -> bytes:
    kw.setdefault("now", int(time.time()))
    kw.setdefault("manifest_id", f"m-{random.randrange(1 << 40):x}-x")
    return json.dumps(sign_manifest(make_manifest(data, **kw), env["key"], "ops")).encode()


def wait_state(bus: Bus, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in bus.states():
            if pred(s):
                return s
        time.sleep(0.02)
    raise AssertionError(f"state not reached; states: {[(s['state'], s.get('error')) for s in bus.states()]}")


def test_url_update_activates_and_keeps(env: dict[str, Any]) -> None:
    p = model_file(env["tmp"])
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri()))
    wait_state(env["bus"], lambda s: s["state"] == "active")
    assert env["mgr"].wait_idle(5)
    states = [s["state"] for s in env["bus"].states()]
    assert states[0] == "received" and states[-4:] == ["verifying", "building", "validating", "active"]
    assert "downloading" in states
    assert env["host"].current == ("widgets", "2")
    assert env["store"].active().key == "widgets-2" and env["store"].last_good().key == "widgets-2"
    assert env["store"].on_trial() is None
    assert [e["event"] for e in env["bus"].events()][-2:] == ["model_activated", "model_kept"]
    assert all(r for t, _, q, r in env["bus"].published if t.endswith("/model/state"))  # retained


def test_mqtt_chunks_out_of_order_via_group(env: dict[str, Any]) -> None:
    data = model_file(env["tmp"]).read_bytes()
    raw = signed(env, data, devices=[], groups=["line-3"], mqtt_chunk=1024)
    env["bus"].deliver("edge/group/line-3/model/update", raw)
    tid = json.loads(raw)["source"]["mqtt"]["transfer_id"]
    order = list(range((len(data) + 1023) // 1024))
    random.Random(2).shuffle(order)
    for i in order + order[:3]:  # and a few duplicates
        env["bus"].deliver(f"edge/group/line-3/model/chunks/{tid}/{i}", data[i * 1024:(i + 1) * 1024])
    wait_state(env["bus"], lambda s: s["state"] == "active")
    assert env["store"].active().model_path.read_bytes() == data


def test_bad_health_rolls_back_to_default(env: dict[str, Any]) -> None:
    env["host"].health = {"frames": 10, "errors": 50, "fps": 3.0}
    p = model_file(env["tmp"])
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri()))
    s = wait_state(env["bus"], lambda s: s["state"] == "rolled_back")
    assert s["error"] == "health" and s["restored"] is None
    assert env["mgr"].wait_idle(5)
    assert env["host"].activated[-1] is None and env["host"].current == ("demo", "1")
    assert env["store"].active() is None and "widgets-2" in env["store"].bad_versions()


def test_garbage_in_a_health_window_neither_hides_the_rollback_nor_the_served_model(env: dict[str, Any]) -> None:
    """Issue 16, point 10: `not json` right after activation, then a bad window."""
    env["cfg"].health_window_s = 1.0
    env["host"].health = {"frames": 10, "errors": 50, "fps": 3.0}
    p = model_file(env["tmp"])
    raw = signed(env, p.read_bytes(), url=p.as_uri(), manifest_id="slow-0002")
    env["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(env["bus"], lambda s: s["state"] == "active")
    env["bus"].deliver("edge/dev1/model/update", b"not json")
    refused = env["bus"].payloads()[-1]
    assert (refused["state"], refused["name"], refused["version"]) == ("active", "widgets", "2")
    assert refused["last_refused"]["error"] == "malformed" and refused["last_attempt"]["state"] == "active"
    wait_state(env["bus"], lambda s: s["state"] == "rolled_back")
    assert env["mgr"].wait_idle(5)
    final = env["bus"].payloads()[-1]
    assert (final["state"], final["name"], final["version"]) == ("rolled_back", "demo", "1"), final
    assert (final["last_attempt"]["state"], final["last_attempt"]["manifest_id"]) == ("rolled_back", "slow-0002")
    assert final["last_refused"]["error"] == "malformed"
    # no payload ever said failed / null over what served
    assert all(x["version"] is not None and x["state"] in ("active", "rolled_back") for x in env["bus"].payloads())


def test_a_refusal_during_a_running_update_is_reported_beside_it(env: dict[str, Any]) -> None:
    gate = threading.Event()
    env["host"].gate = gate
    p = model_file(env["tmp"])
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri(), manifest_id="run-0002"))
    wait_state(env["bus"], lambda s: s["state"] == "building")
    env["bus"].deliver("edge/dev1/model/update", b"{}")
    last = env["bus"].payloads()[-1]
    assert last["last_attempt"]["state"] == "building" and last["last_refused"]["error"] == "missing_signature"
    gate.set()
    wait_state(env["bus"], lambda s: s["state"] == "active")


def test_a_restart_reports_what_serves_and_the_last_attempt(env: dict[str, Any]) -> None:
    env["host"].smoke_fails = True
    p = model_file(env["tmp"])
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri(), manifest_id="bad-0002"))
    wait_state(env["bus"], lambda s: s["state"] == "failed")
    assert env["mgr"].wait_idle(5)
    env["mgr"].stop()
    store = ModelStore(env["cfg"].models_dir, env["cfg"].keep_versions)
    store.recover()
    bus = Bus()
    env["mgr"] = UpdateManager(env["cfg"], "dev1", Topics("edge", "dev1"), bus, store, FakeHost())
    env["mgr"].start()
    first = bus.payloads()[0]  # published at the start, before any update
    assert (first["state"], first["version"]) == ("active", "1")
    assert (first["last_attempt"]["state"], first["last_attempt"]["manifest_id"]) == ("failed", "bad-0002")


def test_smoke_failure_keeps_old_model(env: dict[str, Any]) -> None:
    env["host"].smoke_fails = True
    p = model_file(env["tmp"])
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri()))
    s = wait_state(env["bus"], lambda s: s["state"] == "failed")
    assert s["error"] == "non_finite_output"
    assert env["host"].activated == [] and len(env["host"].released) == 1
    assert env["store"].active() is None


def test_checksum_mismatch_and_rejections(env: dict[str, Any]) -> None:
    p = model_file(env["tmp"])
    other = model_file(env["tmp"], "3", gain=1.0)
    env["bus"].deliver("edge/dev1/model/update", signed(env, other.read_bytes(), url=p.as_uri()))
    assert wait_state(env["bus"], lambda s: s["state"] == "failed")["error"] in ("checksum_mismatch",
                                                                                 "size_mismatch")
    env["mgr"].wait_idle(5)
    raw = json.loads(signed(env, p.read_bytes(), url=p.as_uri(), manifest_id="forged-0001"))
    raw["model"]["version"] = "9"
    env["bus"].deliver("edge/dev1/model/update", json.dumps(raw).encode())
    s = wait_state(env["bus"], lambda s: s.get("manifest_id") == "forged-0001" and s["state"] == "failed")
    assert s["error"] == "bad_signature"
    env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri(), devices=["dev2"],
                                                        manifest_id="other-dev-01"))
    s = wait_state(env["bus"], lambda s: s.get("manifest_id") == "other-dev-01" and s["state"] == "failed")
    assert s["error"] == "not_for_this_device"
    reasons = [e["reason"] for e in env["bus"].events() if e["event"] == "update_rejected"]
    assert reasons == ["bad_signature", "not_for_this_device"]


def test_newer_manifest_supersedes_queued(env: dict[str, Any]) -> None:
    gate = threading.Event()
    env["host"].gate = gate
    ps = [model_file(env["tmp"], v) for v in ("2", "3", "4")]
    for p, v in zip(ps, ("2", "3", "4"), strict=True):
        env["bus"].deliver("edge/dev1/model/update", signed(env, p.read_bytes(), url=p.as_uri(), version=v))
        if v == "2":
            wait_state(env["bus"], lambda s: s["state"] == "building")
    gate.set()
    assert env["mgr"].wait_idle(15)
    assert env["host"].current == ("widgets", "4")
    assert [a.version for a in env["host"].activated if a] == ["2", "4"]
    assert any(e["event"] == "update_superseded" for e in env["bus"].events())


def test_interrupted_chunk_transfer_resumes_after_restart(env: dict[str, Any]) -> None:
    data = model_file(env["tmp"]).read_bytes()
    raw = signed(env, data, mqtt_chunk=1024)
    tid = json.loads(raw)["source"]["mqtt"]["transfer_id"]
    n = (len(data) + 1023) // 1024
    env["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(env["bus"], lambda s: s["state"] == "downloading")
    for i in range(0, n, 2):
        env["bus"].deliver(f"edge/dev1/model/chunks/{tid}/{i}", data[i * 1024:(i + 1) * 1024])
    env["mgr"].stop()  # agent restart
    bus2 = Bus()
    mgr2 = UpdateManager(env["cfg"], "dev1", Topics("edge", "dev1"), bus2, env["store"], env["host"])
    env["mgr"] = mgr2
    mgr2.start()  # resumes the pending manifest by itself
    wait_state(bus2, lambda s: s["state"] == "downloading")
    for i in range(1, n, 2):
        bus2.deliver(f"edge/dev1/model/chunks/{tid}/{i}", data[i * 1024:(i + 1) * 1024])
    wait_state(bus2, lambda s: s["state"] == "active")
    assert env["store"].active().model_path.read_bytes() == data


def test_stalled_transfer_fails_with_reason(env: dict[str, Any]) -> None:
    data = model_file(env["tmp"]).read_bytes()
    env["bus"].deliver("edge/dev1/model/update", signed(env, data, mqtt_chunk=1024))
    s = wait_state(env["bus"], lambda s: s["state"] == "failed", timeout=10)
    assert s["error"] == "transfer_stalled"


def test_end_to_end_fleet_push_over_real_broker(broker: Any, tmp_path: Path) -> None:
    from agent.fleet.push import build_manifest, connect, model_info, push_model

    class PahoAdapter:  # test double of agent.mqtt.client.MqttClient's publish / subscribe
        def __init__(self) -> None:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-e2e", protocol=mqtt.MQTTv311)
            self.cbs: list[tuple[str, Callable[[str, bytes], None]]] = []
            self.c.on_message = self._on_message
            self.c.connect(broker.host, broker.port)
            self.c.loop_start()

        def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            for f, cb in list(self.cbs):
                if mqtt.topic_matches_sub(f, m.topic):
                    cb(m.topic, bytes(m.payload))

        def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
            return self.c.publish(topic, payload, qos, retain).rc == 0

        def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None], qos: int = 1) -> None:
            self.cbs.append((topic_filter, callback))
            done = threading.Event()
            self.c.on_subscribe = lambda *a: done.set()
            self.c.subscribe(topic_filter, qos)
            done.wait(5)

    kp = generate_keypair(tmp_path / "keys", "ops")
    cfg = UpdatesConfig(models_dir=tmp_path / "models", trusted_keys={"ops": kp.public_b64}, health_window_s=0.2)
    host, adapter = FakeHost(), PahoAdapter()
    store = ModelStore(cfg.models_dir, cfg.keep_versions)
    mgr = UpdateManager(cfg, "dev1", Topics("edge", "dev1"), adapter, store, host)
    mgr.start()
    try:
        p = model_file(tmp_path)
        info = model_info(p)
        s = sign_manifest(build_manifest(info, name="widgets", version="2", devices=["dev1"], chunk_size=2048),
                          load_private_key(kp.private_path), "ops")
        client = connect(broker.host, broker.port)
        try:
            res = push_model(client, s, p, ready_timeout=5, wait_s=15)
        finally:
            client.disconnect()
            client.loop_stop()
        assert res.ok, res.states
        assert host.current == ("widgets", "2")
        assert store.active().model_path.read_bytes() == p.read_bytes()  # type: ignore[union-attr]
    finally:
        mgr.stop()
        adapter.c.disconnect()
        adapter.c.loop_stop()


def test_crash_during_the_health_window_rolls_back_and_does_not_resume(env: dict[str, Any]) -> None:
    """The agent dies after `active` but before its pending manifest was cleared: the restart rolls
    the trial back, reports it, and does not put the abandoned version on trial again."""
    env["cfg"].health_window_s = 30.0  # stays on trial
    p = model_file(env["tmp"])
    raw = signed(env, p.read_bytes(), url=p.as_uri())
    env["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(env["bus"], lambda s: s["state"] == "active")
    assert env["store"].on_trial() == "widgets-2"
    env["mgr"].stop()
    env["store"].remember("pending", raw.decode())  # as if killed before it was cleared
    store = ModelStore(env["cfg"].models_dir, env["cfg"].keep_versions)
    assert store.recover() is None  # back to the bundled default
    bus, host = Bus(), FakeHost()
    mgr = UpdateManager(env["cfg"], "dev1", Topics("edge", "dev1"), bus, store, host)
    env["mgr"] = mgr
    mgr.start()
    st = wait_state(bus, lambda s: s["state"] == "rolled_back")
    assert (st["error"], st["version"]) == ("restart_during_trial", "2")
    # the rollback at the restart reaches the retained state, which names what serves
    assert (bus.payloads()[-1]["state"], bus.payloads()[-1]["version"]) == ("rolled_back", "1")
    assert mgr.wait_idle(5)
    time.sleep(0.3)
    assert host.activated == [] and store.recall("pending") is None
    assert [s["state"] for s in bus.states()] == ["rolled_back"]


def test_resent_manifest_for_a_queued_transfer_keeps_its_chunks(env: dict[str, Any]) -> None:
    """An operator re-pushes (new manifest id, same model, so the same transfer id) while the first
    push is still queued: the newer job supersedes the older but must keep the shared assembler."""
    gate = threading.Event()
    env["host"].gate = gate
    first = model_file(env["tmp"], "2")
    env["bus"].deliver("edge/dev1/model/update", signed(env, first.read_bytes(), url=first.as_uri(), version="2"))
    wait_state(env["bus"], lambda s: s["state"] == "building")
    data = model_file(env["tmp"], "3", gain=0.5).read_bytes()
    raws = [signed(env, data, version="3", mqtt_chunk=1024) for _ in range(2)]
    tids = {json.loads(r)["source"]["mqtt"]["transfer_id"] for r in raws}
    assert len(tids) == 1  # the transfer id comes from the model's hash
    for raw in raws:
        env["bus"].deliver("edge/dev1/model/update", raw)
    tid = tids.pop()
    for i in range((len(data) + 1023) // 1024):
        env["bus"].deliver(f"edge/dev1/model/chunks/{tid}/{i}", data[i * 1024:(i + 1) * 1024])
    gate.set()
    assert env["mgr"].wait_idle(15)
    assert env["host"].current == ("widgets", "3")
    assert env["store"].active().model_path.read_bytes() == data


def test_health_judges_fps_only_on_enough_frames() -> None:
    from agent.updates.manager import HealthPolicy

    policy = HealthPolicy()
    # 0.5 fps source: 5 frames before, 2 after in the window; a burst after a stall doubles "before"
    assert policy.judge({"frames": 5, "fps": 0.5}, {"frames": 2, "errors": 0, "fps": 0.2}) is None
    assert policy.judge({"frames": 300, "fps": 15.0}, {"frames": 100, "errors": 0, "fps": 5.0}) == \
        "fps fell from 15.0 to 5.0"
    assert policy.judge({"frames": 5, "fps": 0.5}, {"frames": 0, "errors": 0, "fps": 0.0}) == \
        "no frame processed since the swap"
    # a slow model gives few frames where the old rate predicts many: that count is the model, not noise
    assert policy.judge({"frames": 40, "fps": 20.0}, {"frames": 4, "errors": 0, "fps": 2.0, "span_s": 2.0}) == \
        "fps fell from 20.0 to 2.0"
    assert policy.judge({"frames": 40, "fps": 20.0}, {"frames": 4, "errors": 0, "fps": 2.0}) == \
        "fps fell from 20.0 to 2.0"  # no span: frames / fps
    # ... but not where the old rate predicts few (5 at 2.5 fps over 2 s): 2 frames may be a stall
    assert policy.judge({"frames": 10, "fps": 2.5}, {"frames": 2, "errors": 0, "fps": 1.0, "span_s": 2.0}) is None
