"""Operator side of a model push: describe the model, sign a manifest, publish it (and the chunks).

Topics (contract): manifest to `<prefix>/<device>/model/update` or `<prefix>/group/<g>/model/update`
(QoS 1; a group manifest may be retained), chunks to `.../model/chunks/<transfer>/<index>` (QoS 1).
The transfer id is the first 32 hex digits of the model's sha256, so pushing the same model again
resumes a device's interrupted transfer (chunks it already holds are ignored).

Before sending chunks the pusher waits (up to `ready_timeout`) for each targeted device to report
`received` / `downloading` for this manifest on `model/state`, since a device drops chunks of a
transfer it has not accepted yet; for groups it waits `group_delay` seconds instead.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.errors import UpdateError
from agent.updates.state import record_for

__all__ = [
    "ModelInfo",
    "PushResult",
    "StateWatcher",
    "build_manifest",
    "chunk_topic",
    "connect",
    "model_info",
    "publish_chunks",
    "push_model",
    "update_topic",
]

TERMINAL = ("active", "failed", "rolled_back")


@dataclass
class ModelInfo:
    sha256: str
    size: int
    width: int | None
    height: int | None
    labels: list[str] | None
    decoder: str | None


def model_info(path: Path) -> ModelInfo:
    """sha256, size, and what the ONNX file says about itself (input size, labels, layout)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    width = height = None
    labels: list[str] | None = None
    decoder: str | None = None
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in m.metadata_props}
        if "names" in meta:
            names = ast.literal_eval(meta["names"])  # a Python dict literal in Ultralytics exports
            if isinstance(names, dict):
                labels = [str(names[k]) for k in sorted(names)]
            elif isinstance(names, list):
                labels = [str(x) for x in names]
        inits = {i.name for i in m.graph.initializer}
        inputs = [i for i in m.graph.input if i.name not in inits]
        if inputs:
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[2] and dims[3]:
                height, width = int(dims[2]), int(dims[3])
        if m.graph.output:
            oshape = tuple(d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim)
            if oshape and all(oshape):
                from agent.vision.decoders import detect_layout

                try:
                    decoder = detect_layout([oshape], len(labels) if labels else None)
                except Exception:
                    decoder = None
    except Exception:
        pass  # not fatal here: the device validates the model anyway
    return ModelInfo(h.hexdigest(), size, width, height, labels, decoder)


def update_topic(prefix: str, device: str | None = None, group: str | None = None) -> str:
    return f"{prefix}/group/{group}/model/update" if group else f"{prefix}/{device}/model/update"


def chunk_topic(prefix: str, transfer: str, index: int, device: str | None = None, group: str | None = None) -> str:
    base = f"{prefix}/group/{group}" if group else f"{prefix}/{device}"
    return f"{base}/model/chunks/{transfer}/{index}"


def build_manifest(info: ModelInfo, *, name: str, version: str, devices: Iterable[str] = (),
                   groups: Iterable[str] = (), url: str | None = None, chunk_size: int = 256 * 1024,
                   expires_in: int = 3600, rollback: bool = False, now: float | None = None,
                   manifest_id: str | None = None) -> dict[str, Any]:
    """The unsigned manifest dict (sign it with `sign_manifest`)."""
    if info.width is None or info.height is None:
        raise UpdateError("malformed", "input size unknown: pass --input-size WxH")
    if not info.labels:
        raise UpdateError("malformed", "labels unknown: pass --labels FILE")
    if not info.decoder:
        raise UpdateError("malformed", "output layout unknown: pass --decoder yolov8|yolov5|end2end")
    t = int(time.time() if now is None else now)
    source: dict[str, Any]
    if url:
        source = {"url": url}
    else:
        source = {"mqtt": {"transfer_id": info.sha256[:32], "chunk_size": chunk_size,
                           "chunks": math.ceil(info.size / chunk_size)}}
    return {
        "schema": 1,
        "id": manifest_id or uuid.uuid4().hex,
        "model": {"name": name, "version": version, "sha256": info.sha256, "size": info.size,
                  "input": {"width": info.width, "height": info.height}, "labels": list(info.labels),
                  "decoder": info.decoder},
        "source": source,
        "targets": {"devices": sorted(set(devices)), "groups": sorted(set(groups))},
        "issued_at": t,
        "expires_at": t + int(expires_in),
        "rollback": bool(rollback),
    }


def connect(host: str, port: int, client_id: str | None = None, timeout: float = 10.0,
            tls: ssl.SSLContext | None = None) -> mqtt.Client:
    """A connected paho client with its network loop running (over TLS when `tls` is given)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"edge-fleet-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv311)
    if tls is not None:
        c.tls_set_context(tls)
    c.max_inflight_messages_set(64)
    ok = threading.Event()
    c.on_connect = lambda *a: ok.set()
    try:
        c.connect(host, port, keepalive=30)
    except OSError as exc:
        raise UpdateError("broker_unreachable", f"{host}:{port}: {exc}") from None
    c.loop_start()
    if not ok.wait(timeout):
        c.loop_stop()
        raise UpdateError("broker_unreachable", f"no CONNACK from {host}:{port} in {timeout:g} s")
    return c


class StateWatcher:
    """Follows `<prefix>/<device>/model/state` (all devices with '+') for one manifest id."""

    def __init__(self, client: mqtt.Client, prefix: str, devices: Iterable[str] | None, manifest_id: str,
                 on_state: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.manifest_id = manifest_id
        self.states: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._on_state = on_state
        self.prefix = prefix
        topics = [f"{prefix}/{d}/model/state" for d in devices] if devices else [f"{prefix}/+/model/state"]
        for t in topics:
            client.message_callback_add(t, self._on_message)
        done = threading.Event()
        prev = client.on_subscribe
        client.on_subscribe = lambda *a: done.set()
        client.subscribe([(t, 1) for t in topics])
        done.wait(5)
        client.on_subscribe = prev

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        # the record of this manifest: `last_attempt` / `last_refused` beside what serves (0.3.0 on)
        payload = record_for(payload, self.manifest_id) if isinstance(payload, dict) else None
        if payload is None:
            return
        device = msg.topic[len(self.prefix) + 1:].split("/", 1)[0]
        with self._cond:
            self.states[device] = payload
            self._cond.notify_all()
        if self._on_state is not None:
            self._on_state(device, payload)

    def wait(self, pred: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.states):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True


def publish_chunks(client: mqtt.Client, model_path: Path, chunk_size: int, topics_for: Callable[[int], list[str]],
                   progress: Callable[[int, int], None] | None = None, window: int = 32,
                   timeout: float = 120.0) -> int:
    """Publish every chunk at QoS 1 with at most `window` unacknowledged; returns the bytes sent."""
    size = model_path.stat().st_size
    total = math.ceil(size / chunk_size)
    pending: list[mqtt.MQTTMessageInfo] = []
    sent = 0
    with open(model_path, "rb") as f:
        for idx in range(total):
            data = f.read(chunk_size)
            for topic in topics_for(idx):
                info = client.publish(topic, data, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise UpdateError("publish_failed", f"chunk {idx}: {mqtt.error_string(info.rc)}")
                pending.append(info)
            while len(pending) > window:
                pending.pop(0).wait_for_publish(timeout)
            sent += len(data)
            if progress is not None:
                progress(sent, size)
    for info in pending:
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise UpdateError("publish_failed", "the broker did not acknowledge every chunk")
    return sent


@dataclass
class PushResult:
    manifest: dict[str, Any]
    bytes_sent: int = 0
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    ok: bool = True
    silent: list[str] = field(default_factory=list)  # targeted devices that never reported a state


def push_model(client: mqtt.Client, signed: dict[str, Any], model_path: Path | None, *, prefix: str = "edge",
               retain: bool = False, ready_timeout: float = 10.0, group_delay: float = 2.0,
               wait_s: float = 0.0, progress: Callable[[int, int], None] | None = None,
               on_state: Callable[[str, dict[str, Any]], None] | None = None) -> PushResult:
    """Publish a signed manifest to its targets, then the chunks (MQTT source), then optionally watch."""
    targets = signed["targets"]
    devices: list[str] = list(targets.get("devices", []))
    groups: list[str] = list(targets.get("groups", []))
    payload = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    watcher = StateWatcher(client, prefix, devices if not groups else None, signed["id"], on_state)
    infos = [client.publish(update_topic(prefix, device=d), payload, qos=1) for d in devices]
    infos += [client.publish(update_topic(prefix, group=g), payload, qos=1, retain=retain) for g in groups]
    for info in infos:
        info.wait_for_publish(10)
        if not info.is_published():
            raise UpdateError("publish_failed", "the broker did not acknowledge the manifest")
    result = PushResult(signed)
    mq = signed["source"].get("mqtt")
    if mq is not None:
        if model_path is None:
            raise UpdateError("malformed", "an MQTT transfer needs the model file")
        if devices:
            watcher.wait(lambda s: all(d in s for d in devices), ready_timeout)
        if groups:
            time.sleep(group_delay)
        refused = {d: s for d, s in watcher.states.items() if s.get("state") == "failed"}
        if refused and devices and len(refused) == len(devices):
            result.states, result.ok = dict(watcher.states), False
            return result
        tid = mq["transfer_id"]

        def topics_for(i: int) -> list[str]:
            return ([chunk_topic(prefix, tid, i, device=d) for d in devices if d not in refused]
                    + [chunk_topic(prefix, tid, i, group=g) for g in groups])

        result.bytes_sent = publish_chunks(client, model_path, mq["chunk_size"], topics_for, progress)
    if wait_s > 0:
        if devices and not groups:
            watcher.wait(lambda s: all(s.get(d, {}).get("state") in TERMINAL for d in devices), wait_s)
        else:
            time.sleep(wait_s)  # group members are not known in advance: watch for the whole time
    result.states = dict(watcher.states)
    result.silent = [d for d in devices if d not in result.states]
    waited = mq is not None or wait_s > 0
    if waited and devices and not groups and len(result.silent) == len(devices):
        result.ok = False  # nobody acknowledged the manifest: it reached no device
    if wait_s > 0:
        result.ok = bool(result.states) and all(s.get("state") == "active" for s in result.states.values())
        if devices and not groups:
            result.ok = result.ok and all(d in result.states for d in devices)
    return result
