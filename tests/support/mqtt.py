"""A real paho-mqtt subscriber that records what arrives, for assertions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float


class Collector:
    """Subscribes to `topics` and keeps every message; `wait_for` blocks until a predicate holds."""

    def __init__(self, host: str, port: int, topics: list[str], client_id: str = "",
                 clean: bool = True, qos: int = 1) -> None:
        self.messages: list[Msg] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._qos = qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=clean)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object,
                    props: object = None) -> None:
        client.subscribe([(t, self._qos) for t in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Msg(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                                     time.monotonic()))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Msg]:
        with self._cond:
            return [m for m in self.messages if mqtt.topic_matches_sub(topic, m.topic)]

    def wait_for(self, pred: Callable[[list[Msg]], bool], timeout: float = 10.0) -> list[Msg]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise TimeoutError(f"condition not met in {timeout} s; {len(self.messages)} "
                                       f"messages on {topics[:20]}")
                self._cond.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
