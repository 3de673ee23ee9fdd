"""The counting component of one camera: tracker -> lines and zones -> retained counters on MQTT.

Data flow, all on the camera's post thread: before the detections are published, `track` runs one
ByteTrack step (agent/plc/tracking.py) and, when `counting.track_ids` is on, writes the ids into
the detections (so they appear in the payload); then the lines and zones (agent/plc/counting.py)
take the tracked anchors. After the detections are published, `publish` writes the counters file
when a line counted (before anything goes out, so a published counter never runs ahead of the
disk and never goes back after a power cut), then publishes what changed:

    edge/D/C/line/<name>/in, .../out            retained uint32 (decimal), every label of the line
    edge/D/C/line/<name>/in/<label>, .../out/<label>   retained uint32 per label
    edge/D/C/line/<name>/event                  one per crossing, not retained, with a camera-wide seq
    edge/D/C/zone/<name>/count[/<label>]        retained: objects inside now

A request on edge/D/C/line/<name>/reset (any payload) zeroes that line; the answer goes to
.../reset/reply (and to an MQTT 5 request's Response Topic with its Correlation Data). Nothing
else resets a counter.

Read API for other components (the Sparkplug node): `counters()` gives every counter by name
(`line/<name>/in`, `line/<name>/out`, `zone/<name>/count`), `add_change_listener(cb)` calls
`cb(changed)` with the entries that changed after each frame (on the post thread: keep it short).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, CameraConfig, CountingConfig
from agent.errors import AgentError
from agent.mqtt.topics import Topics
from agent.plc.counting import UINT32, CounterStore, Crossing, LineCounter, Tracked, ZoneCounter, anchor_of
from agent.plc.tracking import Tracker
from agent.publish import dumps
from agent.vision.types import Result

log = logging.getLogger(__name__)

ChangeListener = Callable[[dict[str, int]], None]


def default_state_file(cfg: AgentConfig, camera_id: str) -> Path:
    return cfg.updates.models_dir.parent / "state" / f"counters-{camera_id}.json"


class CountingComponent:
    """Zones and counting lines of one camera (a PlcComponent)."""

    def __init__(self, host: Any, cam: CameraConfig, tracker: Tracker | None = None) -> None:
        assert cam.counting is not None
        self.cfg: CountingConfig = cam.counting
        self.camera_id = cam.id
        self.name = f"counting/{cam.id}"
        self._host = host
        self.tracker = tracker or Tracker(self.cfg.tracker, cam.fps or 30.0)
        self.lines = {li.name: LineCounter(li, self.cfg.min_frames, self.cfg.band_px) for li in self.cfg.lines}
        self.zones = {z.name: ZoneCounter(z) for z in self.cfg.zones}
        self._lock = threading.Lock()  # counters: post thread vs reset requests on paho's thread
        self._listeners: list[ChangeListener] = []
        self._pending: list[Crossing] = []
        self._published: dict[str, str] = {}
        self._last_values: dict[str, int] = {}
        # counts change in a few frames of many: the retained messages are rebuilt only when they did
        self._version = 0  # bumped (under _lock) by every change of a count
        self._retained_version = -1  # the version the retained messages were last built from
        self._pub_lock = threading.Lock()  # retained publishing: post thread vs a reset's reply
        self._was_connected = False
        self.last_ids: list[int | None] = []
        self.last_result: Result | None = None
        self.seq = 0
        self.n = {"frames": 0, "crossings": 0, "resets": 0, "save_errors": 0, "bad_requests": 0}
        self.store = CounterStore(self.cfg.state_file or default_state_file(host.cfg, cam.id))
        self._restore()
        # retained values go out at once (queued until the broker is there), not only after a first frame
        self._publish_retained(self.counters())
        host.add_result_step(cam.id, self.track)
        host.add_result_listener(cam.id, self.publish)
        mqtt = host.mqtt
        if mqtt is not None:
            mqtt.subscribe_with_properties(host.topics.line_reset_filter(cam.id), self._on_reset, qos=1)

    # ---- read API ---------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Every counter by name, as published: `line/<name>/in|out` (uint32), `zone/<name>/count`."""
        with self._lock:
            return self._counters_locked()

    def per_label(self) -> dict[str, dict[str, Any]]:
        """{"lines": {name: {"in": {label: n}, "out": {...}}}, "zones": {name: {label: n}}}."""
        with self._lock:
            return {"lines": {n: {"in": dict(c.counts_in), "out": dict(c.counts_out)} for n, c in self.lines.items()},
                    "zones": {n: dict(z.counts) for n, z in self.zones.items()}}

    def add_change_listener(self, callback: ChangeListener) -> None:
        self._listeners.append(callback)

    def stats(self) -> dict[str, Any]:
        return {**self.n, "seq": self.seq, "counters": self.counters()}

    def close(self) -> None:
        with self._lock:
            self._save_locked()

    # ---- per frame (post thread) -------------------------------------------------------------
    def track(self, result: Result) -> None:
        """Before publishing: track ids, then the lines and zones."""
        ids = self.tracker.update(result.detections)
        if self.cfg.track_ids:
            for det, tid in zip(result.detections, ids, strict=True):
                det.track_id = tid
        objects = [Tracked(tid, det.label, anchor_of(det.box, self.cfg.anchor))
                   for det, tid in zip(result.detections, ids, strict=True) if tid is not None]
        with self._lock:
            for line in self.lines.values():
                crossed = line.update(objects)
                if crossed:
                    self._pending.extend(crossed)
                    self._version += 1
                if self.n["frames"] % 100 == 0:
                    line.forget_unseen(self.cfg.tracker.lost_frames + 10)
            for zone in self.zones.values():
                before = zone.counts
                zone.update(objects)
                if zone.counts != before:
                    self._version += 1
            self.n["frames"] += 1
        self.last_ids = ids
        self.last_result = result

    def publish(self, result: Result) -> None:
        """After the detections: persist, then publish counters that changed and one event per crossing."""
        with self._lock:
            crossings, self._pending = self._pending, []
            events = []
            for c in crossings:
                self.seq += 1
                events.append((c, self.seq))
            self.n["crossings"] += len(crossings)
            if crossings:
                self._save_locked()
            values = self._counters_locked()
        mqtt = self._host.mqtt
        if mqtt is not None:
            connected = bool(mqtt.connected)
            if connected and not self._was_connected:
                with self._pub_lock:  # a new session (the broker may have lost retained values): all again
                    self._published.clear()
                    self._retained_version = -1
            self._was_connected = connected
            for c, seq in events:
                line = self.lines[c.line]
                n_in, n_out = line.totals()
                event = {"seq": seq, "ts": round(result.ts, 3), "line": c.line, "dir": c.direction,
                         "label": c.label[:64], "track": c.track_id, "in": n_in, "out": n_out}
                mqtt.publish(self._host.topics.line_event(self.camera_id, c.line), dumps(event, ascii_only=True),
                             qos=1)
        self._notify(self._publish_retained(values))

    def _notify(self, changed: dict[str, int]) -> None:
        if not changed:
            return
        for cb in list(self._listeners):
            try:
                cb(changed)
            except Exception:  # a reader's fault never stops counting
                log.exception("counting change listener %r failed", cb)

    # ---- internals ----------------------------------------------------------------------------
    def _counters_locked(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, line in self.lines.items():
            out[f"line/{name}/in"], out[f"line/{name}/out"] = line.totals()
        for name, zone in self.zones.items():
            out[f"zone/{name}/count"] = zone.total
        return out

    def _retained_messages(self) -> tuple[dict[str, str], int]:
        """topic -> payload of every retained counter (totals and per label), and the version they show."""
        t: Topics = self._host.topics
        cam = self.camera_id
        msgs: dict[str, str] = {}
        with self._lock:
            version = self._version
            for name, line in self.lines.items():
                n_in, n_out = line.totals()
                msgs[t.line_count(cam, name, "in")] = str(n_in)
                msgs[t.line_count(cam, name, "out")] = str(n_out)
                for direction, counts in (("in", line.counts_in), ("out", line.counts_out)):
                    for label in sorted(set(line.labels) | set(counts)):
                        msgs[t.line_count(cam, name, direction, label)] = str(counts.get(label, 0) % UINT32)
            for name, zone in self.zones.items():
                msgs[t.zone_count(cam, name)] = str(zone.total)
                for label in sorted(set(zone.labels) | set(zone.counts) | self._zone_seen(name)):
                    msgs[t.zone_count(cam, name, label)] = str(zone.counts.get(label, 0))
        return msgs, version

    def _zone_seen(self, zone: str) -> set[str]:
        # labels once published for this zone keep being published (as 0 when gone), never left stale
        prefix = self._host.topics.zone_count(self.camera_id, zone) + "/"
        return {t[len(prefix):] for t in self._published if t.startswith(prefix)}

    def _publish_retained(self, values: dict[str, int]) -> dict[str, int]:
        mqtt = self._host.mqtt
        with self._pub_lock:
            before, self._last_values = self._last_values, values
            if mqtt is not None and self._retained_version != self._version:
                msgs, self._retained_version = self._retained_messages()
                for topic, payload in msgs.items():
                    if self._published.get(topic) != payload:
                        mqtt.publish(topic, payload, qos=1, retain=True)
                        self._published[topic] = payload
        return {k: v for k, v in values.items() if before.get(k) != v}

    def _restore(self) -> None:
        state, problem = self.store.load()
        if problem is not None:
            log.error("counting %s: %s; counters start from zero", self.camera_id, problem)
            self._host.emit("counters_reset_by_damage", {"camera": self.camera_id, "error": problem[:200]})
        if state is None:
            return
        self.seq = int(state["seq"])
        for name, data in state["lines"].items():
            line = self.lines.get(name)
            if line is None:
                log.warning("counting %s: line %r in %s is no longer configured: its counters are dropped",
                            self.camera_id, name, self.store.path)
                continue
            line.counts_in.update(data.get("in", {}))
            line.counts_out.update(data.get("out", {}))
        log.info("counting %s: counters restored from %s (seq %d)", self.camera_id, self.store.path, self.seq)

    def _state_locked(self) -> dict[str, Any]:
        return {"version": 1, "camera": self.camera_id, "seq": self.seq,
                "lines": {n: {"in": dict(c.counts_in), "out": dict(c.counts_out)} for n, c in self.lines.items()}}

    def _save_locked(self) -> None:
        try:
            self.store.save(self._state_locked())
        except OSError as exc:
            self.n["save_errors"] += 1
            if self.n["save_errors"] == 1 or self.n["save_errors"] % 1000 == 0:
                log.error("counting %s: cannot write %s: %s (counters live on, not persisted)",
                          self.camera_id, self.store.path, exc)
                self._host.emit("counters_not_saved", {"camera": self.camera_id, "error": str(exc)[:200]})

    def _on_reset(self, topic: str, payload: bytes, props: Any) -> None:
        """paho's thread: .../line/<name>/reset -> zero that line, persist, reply."""
        name = topic.rsplit("/", 2)[-2]
        t: Topics = self._host.topics
        with self._lock:
            line = self.lines.get(name)
            if line is not None:
                line.reset()
                self._version += 1
                self.n["resets"] += 1
                self._save_locked()
        if line is None:
            self.n["bad_requests"] += 1
            reply: dict[str, object] = {"ok": False, "line": name[:64], "error": (
                f"no line {name[:64]!r} on camera {self.camera_id} (lines: {', '.join(self.lines) or 'none'})")[:256]}
        else:
            reply = {"ok": True, "line": name, "in": 0, "out": 0, "ts": round(time.time(), 3)}
            log.info("counting %s: line %s reset by request", self.camera_id, name)
            self._host.emit("counters_reset", {"camera": self.camera_id, "line": name})
        mqtt = self._host.mqtt
        if mqtt is None:
            return
        text = dumps(reply, ascii_only=True)
        try:
            reply_topic = t.line_reset_reply(self.camera_id, name)
        except ValueError:
            reply_topic = None
        if reply_topic is not None:
            mqtt.publish(reply_topic, text, qos=1)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        if response:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            out = Properties(PacketTypes.PUBLISH)
            corr = getattr(props, "CorrelationData", None)
            if corr is not None:
                out.CorrelationData = corr
            mqtt.publish(response, text, qos=1, properties=out)
        if line is not None:
            self._notify(self._publish_retained(self.counters()))


def start_counting(host: Any) -> list[CountingComponent]:
    """One component per camera whose `counting` section is on."""
    out: list[CountingComponent] = []
    for cam in host.cfg.cameras:
        if cam.counting is not None and cam.counting.enabled:
            try:
                out.append(CountingComponent(host, cam))
            except AgentError:
                for c in out:
                    c.close()
                raise
    return out


__all__ = ["ChangeListener", "CountingComponent", "default_state_file", "start_counting"]
