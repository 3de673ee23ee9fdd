"""A Sparkplug B 3.0 host application for the tests: it subscribes like a SCADA host, decodes every
message of one edge node and checks the specification's rules as they arrive.

It is a real paho client (MQTT 5, so that a subscription with Retain As Published shows whether
the node published with retain, and QoS 1, so that the delivered QoS is the published one). Every
message of `spBv1.0/<group>/+/<node>[/#]` goes through `feed`, which records it and appends a
readable line to `violations` for each rule broken:

- topics: the namespace and verbs; device ids only on D* verbs
- NBIRTH / DBIRTH / NDATA / DDATA / DDEATH: QoS 0, not retained, a payload timestamp, a seq
- seq: NBIRTH 0; every later message one more than the previous, 255 wrapping to 0
- NDEATH: QoS 1 (it is the will), not retained, no seq, exactly one metric, bdSeq (Int64), and
  that bdSeq equals the bdSeq of the NBIRTH of the session it ends
- NBIRTH: a bdSeq metric (Int64); `Node Control/Rebirth` Boolean false without an alias; every other
  metric with name, alias, datatype, timestamp and a value of that datatype; aliases unique
- a new session (NBIRTH after an NDEATH) must not reuse the dead session's bdSeq
- DBIRTH: only while the node is born, not for a device already born; names and aliases, aliases
  unique across the node (a returning device may re-declare its own)
- NDATA / DDATA: only while node (and device) are born; aliases only (no names), each alias one
  the birth declared for that node / device, the datatype (when sent) and value kind as born, a
  metric timestamp
- nothing but an NBIRTH from a node that is dead

When the host's own connection drops (a broker killed), it behaves as a real host does: it forgets
the node, asks for a rebirth on reconnecting, and judges nothing until the next NBIRTH.

The value reader here is the checker's own (it does not reuse the node's decoder), so a wrong
encoding is caught rather than mirrored.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.plc import sparkplug_b_pb2 as pb

NS = "spBv1.0"
NODE_VERBS = {"NBIRTH", "NDEATH", "NDATA", "NCMD"}
DEVICE_VERBS = {"DBIRTH", "DDEATH", "DDATA", "DCMD"}
INT64, BOOLEAN, DOUBLE, STRING = 4, 11, 10, 12
_KIND = {1: "int_value", 2: "int_value", 3: "int_value", 4: "long_value", 5: "int_value", 6: "int_value",
         7: "int_value", 8: "long_value", 9: "float_value", 10: "double_value", 11: "boolean_value",
         12: "string_value", 13: "long_value", 14: "string_value"}


def read_value(m: pb.Payload.Metric) -> Any:
    """The metric's value as Python, by its datatype (Int64 sign-extended)."""
    kind = m.WhichOneof("value")
    if kind is None:
        return None
    v = getattr(m, kind)
    if m.datatype == INT64 and v >= 1 << 63:
        v -= 1 << 64
    return v


@dataclass
class SpMsg:
    topic: str
    verb: str
    device: str | None
    qos: int
    retain: bool
    payload: pb.Payload | None
    at: float
    raw: bytes = b""

    @property
    def seq(self) -> int | None:
        return self.payload.seq if self.payload is not None and self.payload.HasField("seq") else None

    def by_name(self) -> dict[str, pb.Payload.Metric]:
        assert self.payload is not None
        return {m.name: m for m in self.payload.metrics if m.HasField("name")}

    def values(self) -> dict[str, Any]:
        """BIRTH / NDEATH: name -> value."""
        return {name: read_value(m) for name, m in self.by_name().items()}


@dataclass
class _Device:
    aliases: dict[int, int] = field(default_factory=dict)  # alias -> datatype


class SparkplugChecker:
    def __init__(self, host: str, port: int, group: str, node: str, client_id: str = "sparkplug-host") -> None:
        self.group, self.node = group, node
        self.messages: list[SpMsg] = []
        self.violations: list[str] = []
        self.wraps = 0  # seq going 255 -> 0 (outside an NBIRTH)
        self.stale_deaths: list[SpMsg] = []  # NDEATHs of a session whose birth was not the current one
        self.unsynced: list[SpMsg] = []  # after this host reconnected, before the node's next NBIRTH
        self.resyncs = 0
        self._connects = 0
        self._synced = True
        self._cond = threading.Condition()
        # rule state
        self._online = False
        self._bdseq: int | None = None  # the current (or last) session's NBIRTH bdSeq
        self._dead_bdseq: int | None = None
        self._seq: int | None = None
        self._node_aliases: dict[int, int] = {}
        self._alias_owner: dict[int, tuple[str | None, str]] = {}
        self._devices: dict[str, _Device] = {}
        self._names: dict[int, str] = {}  # alias -> metric name, this session
        self.current: dict[str | None, dict[str, Any]] = {}  # what a host shows now: {None: node, device: ...}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho annotates int, takes float seconds
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the Sparkplug host could not subscribe")

    # ---- MQTT ---------------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        client.subscribe([(f"{NS}/{self.group}/+/{self.node}", opts), (f"{NS}/{self.group}/+/{self.node}/+", opts)])
        if self._connects:
            # This host was away (its broker died, say): what it knew is stale and it missed what was said
            # meanwhile. Like a real host, it forgets the node and asks it for a rebirth; until an NBIRTH comes,
            # messages are recorded but not judged.
            with self._cond:
                self._online, self._seq, self._bdseq, self._dead_bdseq = False, None, None, None
                self._devices.clear()
                self._synced = False
                self.resyncs += 1
            self.request_rebirth(wait=False)
        self._connects += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.feed(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # ---- a host's commands ------------------------------------------------------------------------------
    def request_rebirth(self, wait: bool = True) -> None:
        p = pb.Payload(timestamp=int(time.time() * 1000))
        m = p.metrics.add(name="Node Control/Rebirth", datatype=BOOLEAN, timestamp=p.timestamp)
        m.boolean_value = True
        self.send_ncmd(p.SerializeToString(), wait)

    def send_ncmd(self, payload: bytes, wait: bool = True) -> None:
        info = self.client.publish(f"{NS}/{self.group}/NCMD/{self.node}", payload, qos=0)
        if wait:
            info.wait_for_publish(5)

    def publish_state(self, host_id: str, online: bool, ts_ms: int, retain: bool = True) -> None:
        """A Primary Host's STATE (Sparkplug 3.0: retained JSON {online, timestamp}, QoS 1)."""
        payload = json.dumps({"online": online, "timestamp": ts_ms})
        self.client.publish(f"{NS}/STATE/{host_id}", payload, qos=1, retain=retain,
                            properties=Properties(PacketTypes.PUBLISH)).wait_for_publish(5)

    # ---- queries ------------------------------------------------------------------------------------
    def of(self, verb: str, device: str | None = None) -> list[SpMsg]:
        with self._cond:
            return [m for m in self.messages if m.verb == verb and (device is None or m.device == device)]

    def wait_for(self, pred: Callable[[list[SpMsg]], bool], timeout: float = 10.0, what: str = "") -> list[SpMsg]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [(m.verb, m.device, m.seq) for m in self.messages[-12:]]
                    raise TimeoutError(f"{what or 'condition'} not met in {timeout} s; last messages {tail}; "
                                       f"violations {self.violations[:5]}")
                self._cond.wait(left)
            return list(self.messages)

    def wait_count(self, verb: str, n: int, timeout: float = 10.0, device: str | None = None) -> list[SpMsg]:
        self.wait_for(lambda ms: len([m for m in ms if m.verb == verb and (device is None or m.device == device)])
                      >= n, timeout, what=f"{n} x {verb}")
        return self.of(verb, device)

    def latest(self, device: str | None = None) -> dict[str, Any]:
        """The node's (or a device's) metric values as a host holds them after births and data."""
        with self._cond:
            return dict(self.current.get(device, {}))

    def wait_value(self, name: str, pred: Callable[[Any], bool], device: str | None = None,
                   timeout: float = 10.0) -> Any:
        self.wait_for(lambda ms: name in self.current.get(device, {}) and pred(self.current[device][name]),
                      timeout, what=f"{name} of {device or 'the node'}")
        return self.latest(device)[name]

    def assert_clean(self) -> None:
        assert not self.violations, "Sparkplug rules broken:\n  " + "\n  ".join(self.violations[:30])

    # ---- the rules ------------------------------------------------------------------------------------
    def _bad(self, msg: SpMsg, text: str) -> None:
        self.violations.append(f"{msg.verb}{'/' + msg.device if msg.device else ''} seq={msg.seq}: {text}")

    def feed(self, topic: str, raw: bytes, qos: int, retain: bool) -> None:
        """Record one message and check it (public: the checker's own tests feed crafted messages)."""
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != NS or parts[1] != self.group or parts[3] != self.node:
            return
        verb = parts[2]
        device = parts[4] if len(parts) == 5 else None
        msg = SpMsg(topic, verb, device, qos, retain, None, time.monotonic(), raw)
        with self._cond:
            self._check(msg, parts, raw)
            self.messages.append(msg)
            self._cond.notify_all()

    def _check(self, msg: SpMsg, parts: list[str], raw: bytes) -> None:
        verb, device = msg.verb, msg.device
        if verb in ("NCMD", "DCMD"):
            return  # a host's own commands
        if not self._synced:
            if verb != "NBIRTH":
                self.unsynced.append(msg)
                return
            self._synced = True
        if verb not in NODE_VERBS | DEVICE_VERBS or len(parts) > 5:
            self._bad(msg, f"unknown verb or topic shape {msg.topic!r}")
            return
        if (verb in DEVICE_VERBS) != (device is not None):
            self._bad(msg, "a device id must appear exactly on DBIRTH / DDEATH / DDATA / DCMD topics")
        try:
            p = pb.Payload()
            p.ParseFromString(raw)
        except Exception as exc:
            self._bad(msg, f"payload does not decode: {exc}")
            return
        msg.payload = p
        if msg.retain:
            self._bad(msg, "published with retain")
        if not p.HasField("timestamp"):
            self._bad(msg, "no payload timestamp")
        if verb == "NDEATH":
            self._ndeath(msg, p)
            return
        if msg.qos != 0:
            self._bad(msg, f"published at QoS {msg.qos}, not 0")
        if not p.HasField("seq"):
            self._bad(msg, "no seq")
        elif not 0 <= p.seq <= 255:
            self._bad(msg, f"seq {p.seq} outside 0-255")
        if verb == "NBIRTH":
            self._nbirth(msg, p)
            return
        if not self._online:
            self._bad(msg, "from a node that is not born (no NBIRTH since its NDEATH / the start)")
            return
        if self._seq is not None and p.HasField("seq"):
            want = (self._seq + 1) % 256
            if p.seq != want:
                self._bad(msg, f"seq {p.seq}, expected {want}")
            elif want == 0:
                self.wraps += 1
        self._seq = p.seq
        if verb == "DBIRTH":
            assert device is not None
            self._dbirth(msg, p, device)
        elif verb == "DDEATH":
            if device not in self._devices:
                self._bad(msg, "DDEATH of a device that is not born")
            self._devices.pop(device or "", None)
        elif verb == "NDATA":
            self._data(msg, p, self._node_aliases, None)
        elif verb == "DDATA":
            dev = self._devices.get(device or "")
            if dev is None:
                self._bad(msg, "DDATA before the device's DBIRTH (or after its DDEATH)")
                return
            self._data(msg, p, dev.aliases, device)

    def _birth_metric(self, msg: SpMsg, m: pb.Payload.Metric, scope: str | None, seen: set[int]) -> None:
        if not m.HasField("name") or not m.HasField("alias"):
            self._bad(msg, f"birth metric {m.name!r} without name and alias")
            return
        if not m.HasField("datatype") or not m.HasField("timestamp"):
            self._bad(msg, f"birth metric {m.name!r} without datatype or timestamp")
        kind = m.WhichOneof("value")
        if not m.is_null and kind != _KIND.get(m.datatype):
            self._bad(msg, f"birth metric {m.name!r}: datatype {m.datatype} but value in {kind}")
        self._names[m.alias] = m.name
        self.current.setdefault(scope, {})[m.name] = read_value(m)
        if m.alias in seen:
            self._bad(msg, f"alias {m.alias} twice in one birth")
        seen.add(m.alias)
        owner = self._alias_owner.get(m.alias)
        if owner is not None and owner != (scope, m.name):
            self._bad(msg, f"alias {m.alias} of {m.name!r} already names {owner}")
        self._alias_owner[m.alias] = (scope, m.name)

    def _nbirth(self, msg: SpMsg, p: pb.Payload) -> None:
        if p.seq != 0:
            self._bad(msg, f"NBIRTH seq {p.seq}, not 0")
        names = msg.by_name()
        bd = names.get("bdSeq")
        if bd is None or bd.datatype != INT64 or not isinstance(read_value(bd), int):
            self._bad(msg, "NBIRTH without an Int64 bdSeq metric")
            bdseq = None
        else:
            bdseq = read_value(bd)
            if not 0 <= bdseq <= 255:
                self._bad(msg, f"bdSeq {bdseq} outside 0-255")
            if not self._online and self._dead_bdseq is not None and bdseq == self._dead_bdseq:
                self._bad(msg, f"new session reuses the dead session's bdSeq {bdseq}")
        rb = names.get("Node Control/Rebirth")
        if rb is None or rb.datatype != BOOLEAN or read_value(rb) is not False:
            self._bad(msg, "NBIRTH without `Node Control/Rebirth` Boolean false")
        elif rb.HasField("alias"):
            self._bad(msg, "`Node Control/Rebirth` carries an alias")
        self._online, self._bdseq, self._seq = True, bdseq, 0
        self._devices.clear()
        self._alias_owner.clear()
        self._names.clear()
        self.current = {}
        self._node_aliases = {}
        seen: set[int] = set()
        for m in p.metrics:
            if m.name == "Node Control/Rebirth":
                continue
            self._birth_metric(msg, m, None, seen)
            if m.HasField("alias"):
                self._node_aliases[m.alias] = m.datatype

    def _dbirth(self, msg: SpMsg, p: pb.Payload, device: str) -> None:
        if device in self._devices:
            self._bad(msg, "DBIRTH of a device already born (no DDEATH between)")
        dev = _Device()
        seen: set[int] = set()
        for m in p.metrics:
            self._birth_metric(msg, m, device, seen)
            if m.HasField("alias"):
                if m.alias in self._node_aliases:
                    self._bad(msg, f"alias {m.alias} is a node metric's")
                dev.aliases[m.alias] = m.datatype
        self._devices[device] = dev

    def _data(self, msg: SpMsg, p: pb.Payload, aliases: dict[int, int], scope: str | None) -> None:
        if not p.metrics:
            self._bad(msg, "a DATA message with no metric")
        for m in p.metrics:
            if m.HasField("name"):
                self._bad(msg, f"DATA metric carries its name {m.name!r} (aliases only)")
            if not m.HasField("alias"):
                self._bad(msg, "DATA metric without an alias")
                continue
            if m.alias not in aliases:
                self._bad(msg, f"alias {m.alias} not declared by the birth")
                continue
            born = aliases[m.alias]
            if m.HasField("datatype") and m.datatype != born:
                self._bad(msg, f"alias {m.alias}: datatype {m.datatype}, born {born}")
            if not m.HasField("timestamp"):
                self._bad(msg, f"alias {m.alias} without a timestamp")
            if not m.is_null and m.WhichOneof("value") != _KIND.get(born):
                self._bad(msg, f"alias {m.alias}: value in {m.WhichOneof('value')} for datatype {born}")
            self.current.setdefault(scope, {})[self._names.get(m.alias, str(m.alias))] = read_value(m)

    def _ndeath(self, msg: SpMsg, p: pb.Payload) -> None:
        if msg.qos != 1:
            self._bad(msg, f"NDEATH delivered at QoS {msg.qos}: the will must be QoS 1")
        if p.HasField("seq"):
            self._bad(msg, "NDEATH carries a seq")
        if len(p.metrics) != 1 or p.metrics[0].name != "bdSeq" or p.metrics[0].datatype != INT64:
            self._bad(msg, "NDEATH must hold exactly one metric, bdSeq (Int64)")
            return
        bdseq = read_value(p.metrics[0])
        if not self._online:
            self.stale_deaths.append(msg)  # a session that never was born, or a repeated death
            return
        if bdseq != self._bdseq:
            self._bad(msg, f"NDEATH bdSeq {bdseq} does not match the session's NBIRTH bdSeq {self._bdseq}")
        self._online = False
        self._dead_bdseq = bdseq
        self._devices.clear()


_CONNECTED = re.compile(r"New client connected from \S+ as (?P<id>\S+) \(p(?P<proto>\d+), c(?P<clean>\d)")
_WILL = re.compile(r"Will message specified \(\d+ bytes\) \(r(?P<retain>\d), q(?P<qos>\d)\)")


def connects_in_broker_log(log: str, client_id: str) -> list[dict[str, int]]:
    """Each CONNECT of `client_id` as mosquitto logged it (`log_type all`): the protocol level (4: 3.1.1,
    5), the clean session / clean start flag, and the will's retain flag and QoS (-1 when no will)."""
    out: list[dict[str, int]] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _CONNECTED.search(line)
        if m is None or m["id"] != client_id:
            continue
        will = _WILL.search(lines[i + 1]) if i + 1 < len(lines) else None
        out.append({"proto": 4 if m["proto"] == "2" else int(m["proto"]), "clean": int(m["clean"]),
                    "will_retain": int(will["retain"]) if will else -1, "will_qos": int(will["qos"]) if will else -1})
    return out


__all__ = ["SpMsg", "SparkplugChecker", "connects_in_broker_log", "read_value"]
