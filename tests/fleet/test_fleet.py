from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.errors import UpdateError
from agent.fleet.cli import main
from agent.fleet.push import build_manifest, connect, model_info, push_model
from agent.fleet.status import collect_status, format_table
from agent.updates.manifest import generate_keypair, load_private_key, load_trusted_keys, sign_manifest, verify_manifest
from agent.updates.transfer import ChunkAssembler
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector


class FakeDevice:
    """A test double of a device's update intake: plain paho, verifies the manifest, reassembles chunks."""

    def __init__(self, broker: Broker, device: str, workdir: Path, trusted: dict[str, str],
                 groups: tuple[str, ...] = (), prefix: str = "edge") -> None:
        self.device, self.prefix, self.workdir = device, prefix, workdir
        self.trusted = load_trusted_keys(trusted)
        self.groups = groups
        self.asm: ChunkAssembler | None = None
        self.result: Path | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.mid = ""
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{device}", protocol=mqtt.MQTTv311)
        subs = [f"{prefix}/{device}/model/update", f"{prefix}/{device}/model/chunks/#"]
        subs += [t for g in groups for t in (f"{prefix}/group/{g}/model/update", f"{prefix}/group/{g}/model/chunks/#")]
        ready = threading.Event()
        self.c.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in subs])
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(5)

    def state(self, state: str, **kw: Any) -> None:
        payload = {"state": state, "manifest_id": self.mid, "ts": time.time(), **kw}
        self.c.publish(f"{self.prefix}/{self.device}/model/state", json.dumps(payload), qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/model/update"):
            try:
                m = verify_manifest(msg.payload, self.trusted, self.device, self.groups, current_version="1")
            except UpdateError as exc:
                self.error = exc.reason
                try:  # best effort, as the real agent: say which manifest was refused
                    self.mid = str(json.loads(msg.payload).get("id", ""))
                except (ValueError, AttributeError):
                    self.mid = ""
                self.state("failed", error=exc.reason)
                self.done.set()
                return
            self.mid = m.id
            assert m.source.mqtt is not None
            mq = m.source.mqtt
            self.asm = ChunkAssembler(self.workdir, mq.transfer_id, mq.chunk_size, mq.chunks, m.model.size, 10**8)
            self.state("received", version=m.model.version)
            self.state("downloading", progress=0.0)
            return
        if self.asm is None:
            return
        idx = int(msg.topic.rsplit("/", 1)[1])
        self.asm.add(idx, msg.payload)
        if self.asm.complete and self.result is None:
            self.result = self.asm.finalize()
            for s in ("verifying", "building", "validating", "active"):
                self.state(s)
            self.done.set()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        if self.asm is not None:
            self.asm.close()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    kp = generate_keypair(tmp_path / "keys", "ops")
    return kp.private_path, {"ops": kp.public_b64}


def big_model(tmp_path: Path) -> Path:
    return fixed_yolov8_model(tmp_path / "widgets.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64, anchors=4000)


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "keygen", "--out", str(tmp_path / "k"), "--key-id", "ops-1"]) == 0
    out = capsys.readouterr().out
    assert "ops-1: " in out and (tmp_path / "k" / "ops-1.key").stat().st_mode & 0o777 == 0o600
    b64 = out.strip().splitlines()[-1].split(": ")[1]
    assert load_trusted_keys({"ops-1": b64})


def test_push_model_cli_end_to_end_over_mqtt(broker: Broker, tmp_path: Path, keys: tuple[Path, dict[str, str]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = big_model(tmp_path)
    assert model.stat().st_size > 3 * 16384
    dev = FakeDevice(broker, "dev1", tmp_path / "dev1", keys[1])
    try:
        rc = main(["fleet", "push-model", str(model), "--version", "2", "--device", "dev1", "--key", str(keys[0]),
                   "--host", broker.host, "--port", str(broker.port), "--chunk-size", "16384", "--wait", "15"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert dev.done.wait(5)
        assert dev.result is not None and dev.result.read_bytes() == model.read_bytes()  # byte equality
        assert "dev1: active" in out
    finally:
        dev.close()


def test_push_to_group_with_retained_manifest(broker: Broker, tmp_path: Path,
                                              keys: tuple[Path, dict[str, str]]) -> None:
    model = big_model(tmp_path)
    devs = [FakeDevice(broker, f"d{i}", tmp_path / f"d{i}", keys[1], groups=("line-3",)) for i in range(2)]
    other = FakeDevice(broker, "d9", tmp_path / "d9", keys[1], groups=("line-4",))
    try:
        info = model_info(model)
        signed = sign_manifest(build_manifest(info, name="widgets", version="2", groups=["line-3"],
                                              chunk_size=8192), load_private_key(keys[0]), "ops")
        client = connect(broker.host, broker.port)
        try:
            res = push_model(client, signed, model, retain=True, group_delay=0.3, wait_s=1.0)
        finally:
            client.disconnect()
            client.loop_stop()
        for d in devs:
            assert d.done.wait(5)
            assert d.result is not None and d.result.read_bytes() == model.read_bytes()
        assert set(res.states) == {"d0", "d1"} and res.ok
        assert other.asm is None and other.error is None  # line-4 never saw it
        # an attacker re-sending the group manifest to a device outside the group
        c = connect(broker.host, broker.port)
        c.publish("edge/d9/model/update", json.dumps(signed), qos=1).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        assert other.done.wait(5) and other.error == "not_for_this_device"
        late = Collector(broker.host, broker.port, ["edge/group/line-3/model/update"])
        try:
            msgs = late.wait_for(lambda m: len(m) >= 1, 5)
            assert msgs[0].retain and json.loads(msgs[0].payload)["id"] == signed["id"]
        finally:
            late.close()
    finally:
        for d in [*devs, other]:
            d.close()


def test_push_stops_when_the_device_refuses(broker: Broker, tmp_path: Path, keys: tuple[Path, dict[str, str]]) -> None:
    model = big_model(tmp_path)
    wrong = generate_keypair(tmp_path / "other", "ops")  # same key id, other key: bad signature
    dev = FakeDevice(broker, "dev1", tmp_path / "dev1", keys[1])
    try:
        info = model_info(model)
        signed = sign_manifest(build_manifest(info, name="w", version="2", devices=["dev1"], chunk_size=8192),
                               load_private_key(wrong.private_path), "ops")
        client = connect(broker.host, broker.port)
        try:
            res = push_model(client, signed, model, ready_timeout=5)
        finally:
            client.disconnect()
            client.loop_stop()
        assert not res.ok and res.bytes_sent == 0
        assert res.states["dev1"]["error"] == "bad_signature"
    finally:
        dev.close()


def test_status_reads_retained_topics(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    c = connect(broker.host, broker.port)
    now = time.time()
    msgs = {
        "edge/orin-1/status": {"state": "online", "ts": now - 5, "model": {"name": "widgets", "version": "3"}},
        "edge/orin-1/model/state": {"state": "downloading", "version": "4", "name": "widgets", "progress": 0.42,
                                    "error": None, "ts": now - 2},
        "edge/orin-2/status": {"state": "offline", "ts": now - 4000, "model": {"name": "demo", "version": "1"}},
        "edge/orin-3/model/state": {"state": "failed", "version": "9", "error": "bad_signature", "ts": now - 60},
    }
    for t, p in msgs.items():
        c.publish(t, json.dumps(p), qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    rows = collect_status(broker.host, broker.port, "edge", timeout=3)
    assert list(rows) == ["orin-1", "orin-2", "orin-3"]
    table = format_table(rows, now=now)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "MODEL"]
    assert "widgets:3" in lines[1] and "42%" in lines[1] and "2s ago" in lines[1]
    assert "offline" in lines[2] and "67m ago" in lines[2]
    assert "bad_signature" in lines[3]
    assert main(["fleet", "status", "--host", broker.host, "--port", str(broker.port), "--timeout", "2"]) == 0
    assert "orin-2" in capsys.readouterr().out


def test_push_model_cli_errors(tmp_path: Path, keys: tuple[Path, dict[str, str]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    model = big_model(tmp_path)
    assert main(["fleet", "push-model", str(model), "--version", "2", "--key", str(keys[0])]) == 2
    assert main(["fleet", "push-model", str(tmp_path / "nope"), "--version", "2", "--device", "d",
                 "--key", str(keys[0])]) == 2
    assert main(["fleet", "push-model", str(model), "--version", "2", "--device", "d", "--via", "url",
                 "--key", str(keys[0])]) == 2
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(random.randbytes(100))
    assert main(["fleet", "push-model", str(junk), "--version", "2", "--device", "d", "--key", str(keys[0]),
                 "--port", "1"]) == 2  # labels / size unknown: bad input, refused before any connection
    assert "unknown" in capsys.readouterr().err
