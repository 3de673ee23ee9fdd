"""Sparkplug B 3.0 edge node: the agent as seen by a SCADA host (Ignition's MQTT Engine, a Tahu host).

Group = the line (`sparkplug.group_id`), edge node = this device (`device_id`), Sparkplug device =
each camera. Data flow:

    post threads ──Result──▶ `_on_result`: frame times (fps), model name / version, detections in
                  the frame, per camera, under a lock (microseconds; the pipeline never waits here)
    PLC components ──metrics() / counters()──▶ sampled by the node thread every `period_s`, and
                  within one loop tick (50 ms) after a component's change notice (`wake`)
    node thread, which owns its paho client (callbacks run inside its `client.loop()`):
        CONNECT (will = NDEATH with this connection's bdSeq, QoS 1, not retained; clean session)
        ─▶ subscribe NCMD (and the Primary Host's STATE) ─▶ [Primary Host online] ─▶ NBIRTH (seq 0,
        bdSeq, Node Control/Rebirth, node metrics) ─▶ DBIRTH per live camera ─▶ each sample: NDATA /
        DDATA with the values that changed (aliases, no names); DDEATH when a camera is lost, DBIRTH
        when it streams again
        NCMD Node Control/Rebirth = true ─▶ NBIRTH + DBIRTHs again (same bdSeq, seq from 0)
        Primary Host offline after our births ─▶ NDEATH, DISCONNECT, a new session (bdSeq + 1)
        that waits for the host to come back online before it births again
        close() ─▶ NDEATH, then DISCONNECT (a clean disconnect discards the will, so it is sent)

Why a session of its own and not the agent's MqttClient: Sparkplug wants a clean session, its own
will, QoS 0 births and data that are never replayed after a reconnect (a stale birth would lie to
the host), and a bdSeq tied to each CONNECT packet; the agent's connection is a persistent session
with a queue that replays. bdSeq grows by one per CONNECT packet sent (a TCP connect that fails
sends none) and is persisted (`state_file`), so a restarted agent never repeats its last will's
value. Values are sampled, not pushed: a component's fault or a slow broker never reaches the
pipeline, and data is only ever published by this one thread, so seq needs no lock.

Metric sources (the PLC components) expose either `metrics() -> {camera id: {name: value}}` (the
generic form, see `agent.plc.MetricSource`) or, like the counting component, `counters()` with a
`camera_id`; `add_change_listener(callback)`, where present, is used as the change notice. A new
metric name or a changed datatype re-births the device (DDEATH + DBIRTH), or the node for node
metrics, because a BIRTH must list every metric its session will report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.backoff import Backoff
from agent.errors import ConfigError
from agent.fsutil import write_atomic
from agent.mqtt.connection import is_failure
from agent.mqtt.credentials import make_ssl_context, read_password
from agent.plc.sparkplug_payload import (
    BDSEQ,
    REBIRTH,
    DataType,
    MetricValue,
    Out,
    SparkplugTopics,
    coerce,
    datatype_of,
    death_payload,
    decode,
    decode_value,
    encode,
    now_ms,
    same_value,
)

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.plc import PlcHost
    from agent.vision.types import Result

log = logging.getLogger(__name__)

DEAD_CAMERA_STATES = frozenset({"lost", "ended", "stopped", "unknown"})
_LOOP_S = 0.05  # one network-loop tick: the latency of a change notice, a command, a stop
_CONNACK_TIMEOUT_S = 10.0
_NDEATH_ACK_S = 2.0
_FPS_WINDOW_S = 2.0
_MAX_NAME = 200


def default_state_file(cfg: AgentConfig) -> Path:
    return cfg.updates.models_dir.parent / "state" / "sparkplug.json"


class BdSeqStore:
    """The bdSeq of the last CONNECT packet, in a small JSON file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None

    def load(self) -> int | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("sparkplug: %s unreadable (%s): bdSeq starts at 0", self.path, exc)
            return None
        value = data.get("bdseq") if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
            return value
        log.warning("sparkplug: %s holds no bdseq 0-255: bdSeq starts at 0", self.path)
        return None

    def save(self, value: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"bdseq": value}).encode())
            self.error = None
        except OSError as exc:
            # keep going in memory: a lost file costs at most a repeated bdSeq after a restart
            if self.error is None:
                log.warning("sparkplug: cannot persist bdSeq to %s: %s", self.path, exc)
            self.error = str(exc)


class _Feed:
    """What one camera's post thread leaves for the node (read and written under the node's lock)."""

    __slots__ = ("detections", "model_name", "model_version", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=1024)
        self.model_name: str | None = None
        self.model_version: str | None = None
        self.detections = 0


class _Session:
    """One MQTT connection's state; touched only on the node thread (paho's callbacks included)."""

    def __init__(self, client: mqtt.Client, bdseq: int) -> None:
        self.client = client
        self.bdseq = bdseq
        self.connack: bool | None = None
        self.lost = False
        self.born = False
        self.rebirth = False
        self.host_online = False
        self.host_went_offline = False


class SparkplugNode:
    """The Sparkplug B edge node (a PlcComponent). Starts its thread at construction."""

    name = "sparkplug"

    def __init__(self, host: PlcHost, sources: Sequence[object] = ()) -> None:
        cfg = host.cfg
        sp = cfg.sparkplug
        if sp.group_id is None:
            raise ConfigError(["sparkplug.group_id: required when sparkplug is enabled"])
        self._host = host
        self._sp = sp
        self._mq = cfg.mqtt
        self._default_model = (cfg.model.name, cfg.model.version)
        self.topics = SparkplugTopics(sp.group_id, cfg.device_id)
        self.cameras = [c.id for c in cfg.cameras]
        self.client_id = sp.client_id or f"edge-agent-{cfg.device_id}-sparkplug"
        self.broker = (sp.host or self._mq.host, sp.port or self._mq.port)
        self._password: str | None = None
        if self._mq.username is not None:
            try:
                self._password = read_password(self._mq)
            except OSError as exc:
                raise ConfigError([f"mqtt.password_file: cannot read it: {exc.strerror or exc}"]) from None
        self._store = BdSeqStore(sp.state_file or default_state_file(cfg))
        self._last_bdseq = self._store.load()
        self._lock = threading.Lock()
        self._feeds = {cam: _Feed() for cam in self.cameras}
        self._sources = list(sources)
        self._source_cache: dict[int, dict[str, dict[str, MetricValue]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        # published state: the node thread's alone
        self._seq = 0
        self._next_alias = 1
        self._aliases: dict[tuple[str | None, str], int] = {}
        self._types: dict[tuple[str | None, str], DataType] = {}
        self._sent: dict[str | None, dict[str, MetricValue]] = {}
        self._born_devices: set[str] = set()
        self._state_ts: float = -math.inf  # newest Primary Host STATE timestamp seen (older ones are stale)
        self._warned: set[str] = set()
        self.bdseq: int | None = None
        self.connected = False
        self.last_error: str | None = None
        self.n: dict[str, int] = dict.fromkeys(
            ("connects", "sessions", "births", "rebirth_requests", "messages", "device_births", "device_deaths",
             "bad_commands", "other_commands", "bad_state", "source_errors"), 0)
        for cam in self.cameras:
            host.add_result_listener(cam, functools.partial(self._on_result, cam))
        for src in self._sources:
            add = getattr(src, "add_change_listener", None)
            if callable(add):
                add(self._on_change)
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)
        self._thread.start()
        log.info("sparkplug: edge node %s/%s for %s on %s:%d (MQTT %s%s)", self.topics.group, self.topics.node,
                 ", ".join(self.cameras), *self.broker, sp.protocol,
                 f", waiting for primary host {sp.primary_host_id}" if sp.primary_host_id else "")

    # ---- any thread ---------------------------------------------------------------------------
    def wake(self) -> None:
        """A change notice: sample and publish within one loop tick instead of at the next period."""
        self._wake.set()

    def _on_change(self, *args: object) -> None:
        self._wake.set()

    def _on_result(self, camera_id: str, result: Result) -> None:
        with self._lock:
            f = self._feeds[camera_id]
            f.times.append(result.mono)
            f.model_name, f.model_version = result.model_name, result.model_version
            f.detections = len(result.detections)

    def stats(self) -> dict[str, Any]:
        return {**self.n, "connected": self.connected, "bdseq": self.bdseq, "seq": self._seq,
                "devices_born": sorted(self._born_devices), "last_error": self.last_error,
                "state_file_error": self._store.error}

    def close(self) -> None:
        """NDEATH and DISCONNECT (bounded by a few seconds), then the thread ends."""
        self._stop.set()
        self._thread.join(_NDEATH_ACK_S + 3.0)
        if self._thread.is_alive():
            log.warning("sparkplug: node thread still running after close")

    # ---- sampling (node thread) -------------------------------------------------------------------
    def _sample(self) -> tuple[dict[str | None, dict[str, MetricValue]], set[str]]:
        """Current values: {None: node metrics, camera: device metrics}, and the cameras alive now."""
        now = time.monotonic()
        values: dict[str | None, dict[str, MetricValue]] = {}
        model: tuple[str, str] | None = None  # the node's: that of the first camera with a result
        with self._lock:
            for cam, f in self._feeds.items():
                recent = [t for t in f.times if now - t <= _FPS_WINDOW_S]
                span = recent[-1] - recent[0] if len(recent) >= 2 else 0.0
                fps = (len(recent) - 1) / span if span > 0 else 0.0
                name = f.model_name or self._default_model[0]
                version = f.model_version or self._default_model[1]
                if f.model_name is not None and model is None:
                    model = (name, version)
                values[cam] = {"Inference/FPS": round(fps, 1), "Model/Name": name, "Model/Version": version,
                               "Detections/Count": f.detections}
        model = model or self._default_model
        values[None] = {"Properties/Agent Version": __version__, "Model/Name": model[0], "Model/Version": model[1]}
        alive: set[str] = set()
        for cam in self.cameras:
            state = self._host.camera_state(cam)
            values[cam]["Camera/State"] = state
            if state not in DEAD_CAMERA_STATES:
                alive.add(cam)
        for i, src in enumerate(self._sources):
            for cam, metrics in self._source_metrics(i, src).items():
                device = values[cam]
                for name, value in metrics.items():
                    if name in device:
                        self._warn_once(f"clash:{cam}:{name}", "sparkplug: %s's metric %r on %s clashes with "
                                        "another; ignored", _src_name(src), name, cam)
                        continue
                    device[name] = value
        return values, alive

    def _source_metrics(self, index: int, src: object) -> dict[str, dict[str, MetricValue]]:
        """One component's metrics, checked; its last good ones when it fails (no re-birth storm)."""
        try:
            fn = getattr(src, "metrics", None)
            if callable(fn):
                raw = fn()
            elif callable(getattr(src, "counters", None)) and isinstance(getattr(src, "camera_id", None), str):
                raw = {src.camera_id: src.counters()}  # type: ignore[attr-defined]
            else:
                return {}
            clean = self._check_metrics(src, raw)
        except Exception as exc:
            self.n["source_errors"] += 1
            self._warn_once(f"src:{index}", "sparkplug: metrics of %s failed (%s); its last values stay",
                            _src_name(src), exc)
            return self._source_cache.get(index, {})
        self._source_cache[index] = clean
        return clean

    def _check_metrics(self, src: object, raw: object) -> dict[str, dict[str, MetricValue]]:
        if not isinstance(raw, Mapping):
            raise TypeError(f"metrics() returned {type(raw).__name__}, not a mapping of camera id -> metrics")
        out: dict[str, dict[str, MetricValue]] = {}
        for cam, metrics in raw.items():
            if cam not in self._feeds or not isinstance(metrics, Mapping):
                self._warn_once(f"cam:{_src_name(src)}:{cam}", "sparkplug: %s gave metrics for %r, which is no "
                                "camera of this agent; ignored", _src_name(src), cam)
                continue
            good: dict[str, MetricValue] = {}
            for name, value in metrics.items():
                try:
                    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
                        raise TypeError(f"a metric name must be a string of 1-{_MAX_NAME} characters")
                    datatype_of(value)
                except TypeError as exc:
                    self._warn_once(f"val:{_src_name(src)}:{name}", "sparkplug: %s metric %r on %s skipped: %s",
                                    _src_name(src), name, cam, exc)
                    continue
                good[name] = value
            out[cam] = good
        return out

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ---- connection (node thread) -------------------------------------------------------------------
    def _run(self) -> None:
        delays = Backoff(self._mq.reconnect)
        while not self._stop.is_set():
            try:
                established = self._session()
            except Exception:  # the node must outlive any one fault; the next session starts clean
                log.exception("sparkplug: session failed")
                established = False
            self.connected = False
            if self._stop.is_set():
                break
            if established:
                delays.reset()
            self._stop.wait(next(delays))

    def _new_client(self, s_holder: list[_Session]) -> mqtt.Client:
        if self._sp.protocol == "5":
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                            protocol=mqtt.MQTTv311)
        c.suppress_exceptions = True
        if self._mq.username is not None:
            c.username_pw_set(self._mq.username, self._password)
        if self._mq.tls is not None:
            c.tls_set_context(make_ssl_context(self._mq.tls))

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            s = s_holder[0]
            s.connack = not is_failure(rc)
            if not s.connack:
                self.last_error = f"broker refused the connection: {rc}"
                log.warning("sparkplug: %s", self.last_error)

        def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            s_holder[0].lost = True

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            s = s_holder[0]
            if msg.topic == self.topics.node_topic("NCMD"):
                self._on_ncmd(s, bytes(msg.payload))
            elif self._sp.primary_host_id is not None and msg.topic == SparkplugTopics.state(self._sp.primary_host_id):
                self._on_state(s, bytes(msg.payload))

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        return c

    def _session(self) -> bool:
        """One connection, from CONNECT to its end; True when the broker accepted it."""
        bdseq = 0 if self._last_bdseq is None else (self._last_bdseq + 1) % 256
        holder: list[_Session] = []
        try:
            client = self._new_client(holder)
        except (OSError, ValueError) as exc:  # TLS files (ssl.SSLError is an OSError)
            self.last_error = f"MQTT client setup failed: {exc}"
            self._warn_once("setup", "sparkplug: %s", self.last_error)
            return False
        s = _Session(client, bdseq)
        holder.append(s)
        client.will_set(self.topics.node_topic("NDEATH"), death_payload(bdseq), qos=1, retain=False)
        host, port = self.broker
        try:
            if self._sp.protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0
                client.connect(host, port, self._mq.keepalive_s, clean_start=True, properties=props)
            else:
                client.connect(host, port, self._mq.keepalive_s)
        except (OSError, ValueError) as exc:  # refused, unreachable, name unknown, TLS handshake
            self.last_error = f"cannot connect to {host}:{port}: {exc}"
            log.debug("sparkplug: %s", self.last_error)
            with contextlib.suppress(Exception):
                client.disconnect()
            return False
        # The CONNECT packet carrying this will is out: the value is spent, whatever the broker answers.
        self._last_bdseq = self.bdseq = bdseq
        self._store.save(bdseq)
        self.n["connects"] += 1
        try:
            return self._serve(s)
        finally:
            self.connected = False
            self._born_devices.clear()  # a host counts them dead with the node
            with contextlib.suppress(Exception):
                client.disconnect()

    def _serve(self, s: _Session) -> bool:
        client = s.client
        deadline = time.monotonic() + _CONNACK_TIMEOUT_S
        while s.connack is None and not s.lost and not self._stop.is_set():
            if client.loop(timeout=_LOOP_S) != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                s.lost = True
        if not s.connack or s.lost:
            if not self.last_error or s.connack is None:
                self.last_error = "connection closed before the broker accepted it"
            return False
        self.connected = True
        self.last_error = None
        self.n["sessions"] += 1
        log.info("sparkplug: connected to %s:%d (bdSeq %d)", *self.broker, s.bdseq)
        client.subscribe(self.topics.node_topic("NCMD"), qos=1)
        if self._sp.primary_host_id is not None:
            client.subscribe(SparkplugTopics.state(self._sp.primary_host_id), qos=1)
        else:
            s.host_online = True
        next_sample = 0.0
        while not self._stop.is_set():
            if client.loop(timeout=_LOOP_S) != mqtt.MQTT_ERR_SUCCESS or s.lost:
                self.last_error = "connection lost"
                log.warning("sparkplug: connection to %s:%d lost", *self.broker)
                return True
            if s.host_went_offline:
                log.info("sparkplug: primary host %s went offline: NDEATH, new session", self._sp.primary_host_id)
                self._end(s)
                return True
            if not s.host_online:
                continue
            now = time.monotonic()
            if not s.born or s.rebirth:
                self._births(s)
                next_sample = now + self._sp.period_s
            elif now >= next_sample or self._wake.is_set():
                self._wake.clear()
                next_sample = now + self._sp.period_s
                self._report(s)
        self._end(s)
        return True

    def _end(self, s: _Session) -> None:
        """Intentional end: NDEATH (waited for, bounded), then DISCONNECT."""
        if s.lost:
            return
        info = s.client.publish(self.topics.node_topic("NDEATH"), death_payload(s.bdseq), qos=1, retain=False)
        deadline = time.monotonic() + _NDEATH_ACK_S
        while not info.is_published() and not s.lost and time.monotonic() < deadline:
            if s.client.loop(timeout=_LOOP_S) != mqtt.MQTT_ERR_SUCCESS:
                break
        s.client.disconnect()

    # ---- commands (node thread, inside client.loop) -------------------------------------------------
    def _on_ncmd(self, s: _Session, payload: bytes) -> None:
        try:
            p = decode(payload)
        except ValueError as exc:
            self.n["bad_commands"] += 1
            log.warning("sparkplug: NCMD ignored: %s", exc)
            return
        names = {alias: name for (scope, name), alias in self._aliases.items() if scope is None}
        for m in p.metrics:
            name = m.name if m.HasField("name") else names.get(m.alias)
            if name == REBIRTH and decode_value(m) is True:
                self.n["rebirth_requests"] += 1
                log.info("sparkplug: rebirth requested")
                s.rebirth = True
            else:
                self.n["other_commands"] += 1
                log.info("sparkplug: NCMD for %r not supported; ignored", name)

    def _on_state(self, s: _Session, payload: bytes) -> None:
        try:
            obj = json.loads(payload.decode("utf-8"))
            online, ts = obj["online"], obj["timestamp"]
            if not isinstance(online, bool) or isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise TypeError("online must be a boolean and timestamp a number")
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            self.n["bad_state"] += 1
            log.warning("sparkplug: STATE of %s ignored (not {online, timestamp} JSON): %s",
                        self._sp.primary_host_id, exc)
            return
        if ts < self._state_ts:
            log.info("sparkplug: STATE of %s older than the last one seen; ignored", self._sp.primary_host_id)
            return
        self._state_ts = ts
        s.host_online = online
        if not online and s.born:
            s.host_went_offline = True

    # ---- publishing (node thread) ---------------------------------------------------------------------
    def _publish(self, s: _Session, topic: str, payload: bytes) -> None:
        if s.client.publish(topic, payload, qos=0, retain=False).rc != mqtt.MQTT_ERR_SUCCESS:
            s.lost = True
        self.n["messages"] += 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _alias(self, scope: str | None, name: str) -> int:
        key = (scope, name)
        if key not in self._aliases:
            self._aliases[key] = self._next_alias
            self._next_alias += 1
        return self._aliases[key]

    def _birth_metrics(self, scope: str | None, values: dict[str, MetricValue], ts: int) -> list[Out]:
        out = []
        for name, value in values.items():
            dt = datatype_of(value)
            self._types[(scope, name)] = dt
            out.append(Out(name, self._alias(scope, name), dt, value, ts))
        self._sent[scope] = dict(values)
        return out

    def _births(self, s: _Session) -> None:
        """NBIRTH (seq 0) and a DBIRTH for every live camera: a fresh set of aliases."""
        s.rebirth = False
        values, alive = self._sample()
        ts = now_ms()
        self._next_alias = 1
        self._aliases.clear()
        self._types.clear()
        self._sent.clear()
        self._born_devices.clear()
        metrics = [Out(BDSEQ, self._alias(None, BDSEQ), DataType.Int64, s.bdseq, ts),
                   Out(REBIRTH, None, DataType.Boolean, False, ts)]  # no alias: hosts write it by name
        metrics += self._birth_metrics(None, values[None], ts)
        self._seq = 0
        self._publish(s, self.topics.node_topic("NBIRTH"), encode(metrics, seq=0, ts=ts))
        s.born = True
        self.n["births"] += 1
        for cam in self.cameras:
            if cam in alive:
                self._dbirth(s, cam, values[cam], ts)

    def _dbirth(self, s: _Session, cam: str, values: dict[str, MetricValue], ts: int) -> None:
        metrics = self._birth_metrics(cam, values, ts)
        self._publish(s, self.topics.device_topic("DBIRTH", cam), encode(metrics, seq=self._next_seq(), ts=ts))
        self._born_devices.add(cam)
        self.n["device_births"] += 1

    def _ddeath(self, s: _Session, cam: str, ts: int) -> None:
        self._publish(s, self.topics.device_topic("DDEATH", cam), encode([], seq=self._next_seq(), ts=ts))
        self._born_devices.discard(cam)
        self._sent.pop(cam, None)
        self.n["device_deaths"] += 1

    def _changes(self, scope: str | None, values: dict[str, MetricValue], ts: int) -> list[Out] | None:
        """DATA metrics for what changed since the last publish; None when a re-birth is needed."""
        sent = self._sent[scope]
        if not set(values) <= set(sent):
            return None  # a metric the birth did not list
        out = []
        for name, value in values.items():
            dt = self._types[(scope, name)]
            try:
                v = coerce(value, dt)
            except TypeError:
                return None
            if not same_value(v, sent[name], self._sp.deadband if dt == DataType.Double else 0.0):
                out.append(Out(None, self._aliases[(scope, name)], dt, v, ts))
                sent[name] = v
        return out

    def _report(self, s: _Session) -> None:
        """Report by exception: NDATA / DDATA with the changed values; device births and deaths."""
        values, alive = self._sample()
        ts = now_ms()
        node = self._changes(None, values[None], ts)
        if node is None:
            s.rebirth = True
            return
        if node:
            self._publish(s, self.topics.node_topic("NDATA"), encode(node, seq=self._next_seq(), ts=ts))
        for cam in self.cameras:
            born = cam in self._born_devices
            if born and cam not in alive:
                self._ddeath(s, cam, ts)
            elif not born and cam in alive:
                self._dbirth(s, cam, values[cam], ts)
            elif born:
                dev = self._changes(cam, values[cam], ts)
                if dev is None:  # new metric names or a changed type: this device starts over
                    self._ddeath(s, cam, ts)
                    self._dbirth(s, cam, values[cam], ts)
                elif dev:
                    self._publish(s, self.topics.device_topic("DDATA", cam), encode(dev, seq=self._next_seq(), ts=ts))


def _src_name(src: object) -> str:
    return str(getattr(src, "name", type(src).__name__))


__all__ = ["DEAD_CAMERA_STATES", "BdSeqStore", "SparkplugNode", "default_state_file"]
