"""A PLC simulator for the inspection handshake: real paho clients, MQTT 5 and 3.1.1.

`Plc311` plays a Siemens-style PLC: it publishes the inspection id to .../inspect/trigger and
collects what comes back on .../inspect/ack and .../inspect/result. `Plc5` plays an MQTT 5 client
(CODESYS, Node-RED): requests on .../inspect with Response Topic + Correlation Data (+ Message
Expiry), answers matched by Correlation Data. Both record the wall time just before each send, so a
test can check that no answer was judged on a frame captured before its trigger. Used by
tests/plc/test_inspection.py and scripts/measure_inspection.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class Answer:
    topic: str
    payload: bytes
    at: float  # time.monotonic() on arrival
    correlation: bytes | None = None

    @property
    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.payload)
        return out


def _nodelay(client: mqtt.Client, userdata: object, sock: Any) -> None:
    # like the agent: a small trigger must not wait for the broker's delayed ACK (Nagle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Base:
    def __init__(self, host: str, port: int, protocol: mqtt.MQTTProtocolVersion, client_id: str, clean: bool,
                 subscriptions: list[str]) -> None:
        self.answers: list[Answer] = []
        self.sent_at: dict[Any, float] = {}  # key -> time.time() just before the publish
        self._cond = threading.Condition()
        self._subs = subscriptions
        self._ready = threading.Event()
        if protocol == mqtt.MQTTv5:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                      clean_session=clean)
        self._v5 = protocol == mqtt.MQTTv5
        self._clean = clean
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.on_socket_open = _nodelay
        self.client.reconnect_delay_set(0.05, 0.3)  # type: ignore[arg-type]  # paho takes float seconds
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if clean else 3600
            self.client.connect(host, port, keepalive=5, clean_start=clean, properties=props)
        else:
            self.client.connect(host, port, keepalive=5)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise TimeoutError("PLC simulator could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object,
                    props: object = None) -> None:
        client.subscribe([(t, 1) for t in self._subs])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if self._v5 and msg.properties else None
        with self._cond:
            self.answers.append(Answer(msg.topic, bytes(msg.payload), time.monotonic(), corr))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Answer]], bool], timeout: float = 10.0) -> list[Answer]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.answers):
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = [(a.topic, a.payload[:80]) for a in self.answers[-8:]]
                    raise TimeoutError(f"condition not met in {timeout} s; last answers {shown}")
                self._cond.wait(left)
            return list(self.answers)

    def on(self, topic: str) -> list[Answer]:
        with self._cond:
            return [a for a in self.answers if a.topic == topic]

    def clear(self) -> None:
        with self._cond:
            self.answers.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Plc311(_Base):
    """The 3.1.1 handshake: trigger -> ack -> result, on one camera's topics."""

    def __init__(self, host: str, port: int, base: str, client_id: str = "", clean: bool = True) -> None:
        self.base = base  # edge/D/C/inspect
        super().__init__(host, port, mqtt.MQTTv311, client_id or f"plc-{uuid.uuid4().hex[:8]}", clean,
                         [f"{base}/ack", f"{base}/result"])

    def trigger(self, payload: bytes | str, key: Any = None) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.sent_at[key if key is not None else data] = time.time()
        self.client.publish(f"{self.base}/trigger", data, qos=1)

    def results(self) -> list[dict[str, Any]]:
        return [a.json for a in self.on(f"{self.base}/result")]

    def acks(self) -> list[bytes]:
        return [a.payload for a in self.on(f"{self.base}/ack")]

    def wait_result(self, id_: int, timeout: float = 10.0, count: int = 1) -> list[dict[str, Any]]:
        self.wait_for(lambda a: sum(1 for r in self._results(a) if r["id"] == id_) >= count, timeout)
        return [r for r in self.results() if r["id"] == id_]

    def _results(self, answers: list[Answer]) -> list[dict[str, Any]]:
        return [a.json for a in answers if a.topic == f"{self.base}/result"]


class Plc5(_Base):
    """MQTT 5 request / response on .../inspect; answers come back on a private Response Topic."""

    def __init__(self, host: str, port: int, base: str, client_id: str = "", clean: bool = True) -> None:
        self.base = base
        self.reply_topic = f"plc/{uuid.uuid4().hex[:8]}/reply"
        super().__init__(host, port, mqtt.MQTTv5, client_id or f"plc5-{uuid.uuid4().hex[:8]}", clean,
                         [self.reply_topic])

    def request(self, payload: bytes | str = b"", correlation: bytes | None = None, expiry_s: int | None = None,
                response_topic: str | None = "") -> bytes:
        corr = correlation if correlation is not None else uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic or self.reply_topic
        props.CorrelationData = corr
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        data = payload.encode() if isinstance(payload, str) else payload
        self.sent_at[corr] = time.time()
        self.client.publish(self.base, data, qos=1, properties=props)
        return corr

    def wait_answer(self, corr: bytes, timeout: float = 10.0) -> dict[str, Any]:
        answers = self.wait_for(lambda a: any(x.correlation == corr for x in a), timeout)
        return next(x for x in answers if x.correlation == corr).json
