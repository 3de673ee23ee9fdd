"""Turns results into the contract's MQTT messages: detections per frame, retained counts per label."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol

from agent.mqtt.topics import Topics
from agent.vision.types import Result


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool: ...


def dumps(obj: object, *, ascii_only: bool = False) -> str:
    """Compact one-line JSON, as the PLC-facing payloads want; `ascii_only` escapes every non-ASCII
    character (\\uXXXX) for PLC parsers that read ASCII only (Siemens LStream)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)


def detections_payload(result: Result, camera: str) -> dict[str, object]:
    latency = (time.monotonic() - result.mono) * 1e3 if result.mono else 0.0
    return {
        "seq": result.frame_seq,
        "ts": round(result.ts, 6),
        "camera": camera,
        "frame": {"w": result.frame_w, "h": result.frame_h},
        "model": {"name": result.model_name, "version": result.model_version},
        "latency_ms": round(latency, 2),
        "detections": [d.to_json() for d in result.detections],
    }


class ResultPublisher:
    """Publishes one camera's results; `echo` (for `demo`) also receives each payload line."""

    def __init__(self, client: Publisher | None, topics: Topics, camera: str, detections_qos: int = 0,
                 echo: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.topics = topics
        self.camera = camera
        self.qos = detections_qos
        self.echo = echo
        self.labels: list[str] = []
        self._last_counts: dict[str, int] = {}
        self._det_topic = topics.detections(camera)

    def __call__(self, result: Result) -> None:
        line = dumps(detections_payload(result, self.camera))
        if self.client is not None:
            self.client.publish(self._det_topic, line, qos=self.qos)
            self._publish_counts(result)
        if self.echo is not None:
            self.echo(line)

    def _publish_counts(self, result: Result) -> None:
        assert self.client is not None
        counts = dict.fromkeys(self.labels, 0)
        for det in result.detections:
            counts[det.label] = counts.get(det.label, 0) + 1
        for label, n in counts.items():
            if self._last_counts.get(label) != n:
                self.client.publish(self.topics.count(self.camera, label), str(n), qos=1, retain=True)
                self._last_counts[label] = n
