"""Inspection trigger mode: a PLC asks "judge the next part", the agent answers with one result.

Data flow, per camera with an `inspection:` section:

    PLC ──trigger──▶ paho thread: parse, (3.1.1) ack at once, BUSY / REJECTED / NO_FRAME answered
                     at once, else the job becomes the one in flight, stamped with its arrival time
    post thread ──Result──▶ fan-out ──▶ `_on_result`: frames captured before the arrival are
                     skipped; fresh ones are judged against the recipe until N are voted ──▶ answer
    watcher thread (10 ms): deadline passed ──▶ TIMEOUT; camera lost / ended ──▶ NO_FRAME;
                     broker back ──▶ flush the buffered answers, in order
    answer ──▶ outbox (at most `buffer_size`, the oldest dropped and the next answer flagged
                     `overrun`) ──connected──▶ MqttClient, QoS 1 (its own queue re-sends what was in
                     flight when a connection dropped)

Two request forms, one job model:
- MQTT 5: a request on edge/D/C/inspect with Response Topic and Correlation Data; the answer goes to
  the Response Topic carrying the same Correlation Data. Message Expiry, when set, is the deadline.
- MQTT 3.1.1: the inspection id (decimal ASCII, 1-65535) on .../inspect/trigger; the id is echoed
  on .../inspect/ack at once and the answer goes to .../inspect/result.

Only one inspection is in flight per camera; a second trigger gets BUSY and the first goes on.
The id of the one in flight, sent again, is taken as a retransmission: acknowledged again, answered
once. Answers are built by agent/plc/inspection_rules.py (fixed keys, ASCII, values <= 256 chars).
The component reads results and publishes; it never blocks the pipeline's threads (the post thread
does a recipe check under a lock, microseconds, and a non-blocking queue put).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.plc.inspection_rules import (
    MAX_ID,
    Code,
    FrameVerdict,
    Outcome,
    RequestError,
    judge_frame,
    parse_request,
    result_payload,
    vote,
)
from agent.telemetry.metrics import Ring
from agent.vision.types import Result

if TYPE_CHECKING:
    from agent.config import InspectionConfig
    from agent.mqtt.client import MqttClient
    from agent.plc import PlcHost

log = logging.getLogger(__name__)

TICK_S = 0.01
_FIELD_ORDER = ("code", "pass", "ms")  # `id` goes last: a PLC polling last/id sees the others updated first


@dataclass
class _Job:
    id: int
    recipe: str
    arrival: float  # time.time() when the trigger arrived: frames captured before it are not judged
    arrival_mono: float
    deadline_mono: float
    reply_topic: str
    correlation: bytes | None
    verdicts: list[FrameVerdict] = field(default_factory=list)


@dataclass
class _Answer:
    outcome: Outcome
    topic: str
    correlation: bytes | None


class CameraInspection:
    """The handshake of one camera. Thread-safe: paho's, the post and the watcher thread meet here."""

    def __init__(self, host: PlcHost, mqtt: MqttClient, camera_id: str, cfg: InspectionConfig) -> None:
        self.camera_id = camera_id
        self.cfg = cfg
        self._host = host
        self._mqtt = mqtt
        t = host.topics
        self.t_request = t.inspect(camera_id)
        self.t_trigger = t.inspect_trigger(camera_id)
        self.t_ack = t.inspect_ack(camera_id)
        self.t_result = t.inspect_result(camera_id)
        self._t_last = {f: t.inspect_last(camera_id, f) for f in (*_FIELD_ORDER, "id")}
        self._topics = t
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._outbox: deque[_Answer] = deque()
        self._overrun = False
        self._changed = False  # an answer went out since the last `take_changed` (Sparkplug's notice)
        self._last: dict[str, bool | int | float | str] = {
            "Inspection/Last ID": 0, "Inspection/Last Code": 0, "Inspection/Last Pass": False,
            "Inspection/Last ms": 0.0, "Inspection/Results": 0, "Inspection/Overruns": 0}
        self._next_auto_id = 0
        self._latency = Ring(4096)
        self._n: dict[str, int] = dict.fromkeys(
            ("triggers", "ok", "pass", "fail", "busy", "timeout", "no_frame", "rejected", "rule_errors",
             "duplicates", "stale_frames", "deferred", "overruns", "sent"), 0)
        mqtt.subscribe_with_properties(self.t_request, self._on_request, qos=1)
        mqtt.subscribe_with_properties(self.t_trigger, self._on_trigger, qos=1)
        host.add_result_listener(camera_id, self._on_result)

    # ---- requests (paho's thread) ---------------------------------------------------------------
    def _on_request(self, topic: str, payload: bytes, props: Properties | None) -> None:
        self._handle(payload, props, v5=True)

    def _on_trigger(self, topic: str, payload: bytes, props: Properties | None) -> None:
        self._handle(payload, props, v5=False)

    def _handle(self, payload: bytes, props: Properties | None, v5: bool) -> None:
        arrival, arrival_mono = time.time(), time.monotonic()
        reply_topic, correlation, expiry_s = self.t_result, None, None
        with self._lock:
            self._n["triggers"] += 1
        if v5:
            reply_topic = getattr(props, "ResponseTopic", None) or ""
            correlation = getattr(props, "CorrelationData", None)
            expiry_s = getattr(props, "MessageExpiryInterval", None)
            if not reply_topic or "+" in reply_topic or "#" in reply_topic:
                why = "an MQTT 5 request needs a Response Topic without wildcards (MQTT 3.1.1: use .../inspect/trigger)"
                self._reject(RequestError(why), self.t_result, None, arrival_mono)
                return
        try:
            req = parse_request(payload, self.cfg.max_request_bytes, need_id=not v5)
        except RequestError as exc:
            if exc.id and not v5:
                self._mqtt.publish(self.t_ack, str(exc.id), qos=1)
            self._reject(exc, reply_topic, correlation, arrival_mono)
            return
        with self._lock:
            id_ = req.id if req.id is not None else self._auto_id()
        if not v5:
            self._mqtt.publish(self.t_ack, str(id_), qos=1)
        recipe = req.recipe or self.cfg.default_recipe
        if recipe not in self.cfg.recipes:
            known = ", ".join(sorted(self.cfg.recipes))[:120]
            self._reject(RequestError(f"unknown recipe {recipe!r} (known: {known})", id_), reply_topic,
                         correlation, arrival_mono)
            return
        if req.deadline_ms is not None:
            deadline_s = req.deadline_ms / 1e3
        elif expiry_s is not None:
            deadline_s = max(0.001, float(expiry_s))
        else:
            deadline_s = self.cfg.deadline_ms / 1e3
        job = _Job(id_, recipe, arrival, arrival_mono, arrival_mono + deadline_s, reply_topic, correlation)
        with self._lock:
            current = self._job
            if current is not None:
                if current.id == id_ and current.reply_topic == reply_topic and current.correlation == correlation:
                    self._n["duplicates"] += 1  # a retransmission of the trigger in flight: acked again above
                    return
                self._finish_locked(_Job(id_, recipe, arrival, arrival_mono, 0.0, reply_topic, correlation),
                                    Code.BUSY, f"inspection {current.id} in flight")
                return
            state = self._host.camera_state(self.camera_id)
            if state != "streaming":
                self._finish_locked(job, Code.NO_FRAME, f"camera {state}")
                return
            self._job = job

    def _auto_id(self) -> int:
        self._next_auto_id = self._next_auto_id % MAX_ID + 1
        return self._next_auto_id

    def _reject(self, exc: RequestError, topic: str, correlation: bytes | None, arrival_mono: float) -> None:
        with self._lock:
            self._finish_locked(_Job(exc.id, "", 0.0, arrival_mono, 0.0, topic, correlation), Code.REJECTED,
                                exc.reason)

    # ---- results (the post thread) ----------------------------------------------------------------
    def _on_result(self, result: Result) -> None:
        with self._lock:
            job = self._job
            if job is None:
                return
            if result.ts < job.arrival:
                self._n["stale_frames"] += 1  # captured before the trigger: never judged
                return
            recipe = self.cfg.recipes[job.recipe]
            try:
                verdict = judge_frame(recipe, result, self._host.model_labels(self.camera_id))
            except Exception as exc:  # a bug in a rule must answer the PLC, not leave it waiting
                log.exception("inspection %s: recipe %s failed", self.camera_id, job.recipe)
                verdict = FrameVerdict(False, {}, result.ts, result.model_version, Code.RULE_FAILED,
                                       f"recipe evaluation failed: {type(exc).__name__}")
            job.verdicts.append(verdict)
            if verdict.code != Code.OK or len(job.verdicts) >= recipe.frames:
                final = vote(job.verdicts)
                self._finish_locked(job, final.code, final.reason, final)

    # ---- the watcher thread ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Deadlines, a lost camera, and the outbox once the broker is back."""
        with self._lock:
            job = self._job
            if job is not None:
                state = self._host.camera_state(self.camera_id)
                if state != "streaming":
                    self._finish_locked(job, Code.NO_FRAME, f"camera {state}")
                elif time.monotonic() >= job.deadline_mono:
                    done = len(job.verdicts)
                    self._finish_locked(job, Code.TIMEOUT,
                                        f"deadline passed with {done} of {self.cfg.recipes[job.recipe].frames} "
                                        "frames judged")
            if self._outbox and self._mqtt.connected:
                while self._outbox:
                    self._send_locked(self._outbox.popleft())

    # ---- answers -----------------------------------------------------------------------------------
    def _finish_locked(self, job: _Job, code: Code, reason: str, verdict: FrameVerdict | None = None) -> None:
        ms = (time.monotonic() - job.arrival_mono) * 1e3
        if self._job is job:
            self._job = None
        outcome = Outcome(job.id, code, reason=reason, ms=ms, recipe=job.recipe)
        if verdict is not None:
            outcome.passed, outcome.counts, outcome.ts = verdict.passed, verdict.counts, verdict.ts
            outcome.model = verdict.model_version
        key = {Code.OK: "ok", Code.BUSY: "busy", Code.TIMEOUT: "timeout", Code.NO_FRAME: "no_frame",
               Code.REJECTED: "rejected"}.get(code, "rule_errors")
        self._n[key] += 1
        if code == Code.OK:
            self._n["pass" if outcome.passed else "fail"] += 1
        if code not in (Code.REJECTED, Code.BUSY):
            self._latency.add(ms)
        answer = _Answer(outcome, job.reply_topic, job.correlation)
        if self._outbox or not self._mqtt.connected:
            if len(self._outbox) >= self.cfg.buffer_size:
                self._outbox.popleft()
                self._overrun = True
                self._n["overruns"] += 1
            self._outbox.append(answer)
            self._n["deferred"] += 1  # decided while the broker was away (or behind one that was)
        else:
            self._send_locked(answer)

    def _send_locked(self, answer: _Answer) -> None:
        o = answer.outcome
        props = None
        if answer.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = answer.correlation
        self._mqtt.publish(answer.topic, result_payload(o, self._overrun), qos=1, properties=props)
        self._overrun = False
        self._n["sent"] += 1
        self._last.update({"Inspection/Last ID": o.id, "Inspection/Last Code": int(o.code),
                           "Inspection/Last Pass": bool(o.passed and o.code == Code.OK),
                           "Inspection/Last ms": round(o.ms, 1), "Inspection/Results": self._n["sent"],
                           "Inspection/Overruns": self._n["overruns"]})
        self._changed = True
        if self.cfg.retained_fields:
            values = {"code": str(int(o.code)), "pass": "1" if o.passed and o.code == Code.OK else "0",
                      "ms": f"{o.ms:.1f}"}
            for name in _FIELD_ORDER:
                self._mqtt.publish(self._t_last[name], values[name], qos=1, retain=True)
            for label, n in o.counts.items():
                self._mqtt.publish(self._topics.inspect_last(self.camera_id, f"count/{label}"), str(n), qos=1,
                                   retain=True)
            self._mqtt.publish(self._t_last["id"], str(o.id), qos=1, retain=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._n, "in_flight": self._job is not None, "buffered": len(self._outbox),
                    "latency_ms": self._latency.summary()}

    def metrics(self) -> dict[str, bool | int | float | str]:
        """The last answer's values, for the Sparkplug node (names stable from the start)."""
        with self._lock:
            return dict(self._last)

    def take_changed(self) -> bool:
        with self._lock:
            changed, self._changed = self._changed, False
            return changed

    def latencies(self) -> list[float]:
        """Trigger -> answer milliseconds of the last 4096 judged / timed-out triggers (for measurements)."""
        with self._lock:
            return [float(v) for v in self._latency.values()]


class Inspection:
    """The `inspection` PLC component: one handshake per camera whose config turns it on."""

    name = "inspection"

    def __init__(self, host: PlcHost) -> None:
        self.cameras: dict[str, CameraInspection] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        wanted = [(c.id, c.inspection) for c in host.cfg.cameras if c.inspection is not None and c.inspection.enabled]
        if host.mqtt is None:
            log.warning("inspection is configured for %s but MQTT is off: no triggers can arrive",
                        ", ".join(cid for cid, _ in wanted))
            return
        for cid, icfg in wanted:
            self.cameras[cid] = CameraInspection(host, host.mqtt, cid, icfg)
        self._thread = threading.Thread(target=self._watch, name="plc-inspection", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(TICK_S):
            changed = False
            for cam in self.cameras.values():
                try:
                    cam.tick()
                    changed = cam.take_changed() or changed
                except Exception:  # the watcher must outlive any one fault
                    log.exception("inspection watcher failed on %s", cam.camera_id)
            if changed:  # outside every lock of ours: a listener may take its own
                for callback in list(self._listeners):
                    try:
                        callback()
                    except Exception:
                        log.exception("inspection change listener failed")

    def metrics(self) -> dict[str, dict[str, bool | int | float | str]]:
        """{camera: {"Inspection/Last ID", "Inspection/Last Code", ...}} for the Sparkplug node."""
        return {cid: cam.metrics() for cid, cam in self.cameras.items()}

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs (on the watcher thread) within ~10 ms after answers went out."""
        self._listeners.append(callback)

    def stats(self) -> dict[str, Any]:
        return {cid: cam.stats() for cid, cam in self.cameras.items()}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            # answers still waiting for the broker go to the MQTT client's queue for its bounded drain
            for cam in self.cameras.values():
                cam.tick()


__all__ = ["CameraInspection", "Inspection"]
