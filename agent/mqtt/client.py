"""The agent's MQTT connection: paho-mqtt 2.x behind a small, never-blocking interface.

Design (see DESIGN.md, MQTT lessons):

- `start()` returns at once. paho's network thread connects and reconnects by itself
  (`loop_start`, first connection retried too); the delay between attempts is the config's
  exponential backoff with jitter, computed here and handed to paho before each wait. A broker that
  is down, unreachable or refuses the CONNACK never raises into the caller: `connected` stays false
  and `stats()["last_error"]` says why.
- `publish()` never blocks: messages go to a bounded queue owned by the agent (`queue_size`; when
  full the OLDEST is dropped and counted as "dropped"). A sender thread hands them to paho only
  while connected, and at most `inflight_window` at a time (paho's own queue is unbounded while
  offline, so it is never allowed to fill).
- QoS 0 while offline is dropped at once and counted as "dropped_qos0_offline": QoS 0 carries
  detections and telemetry, which are "latest state" data; replaying minutes-old frames to a PLC
  after a reconnect is worse than a gap. QoS >= 1 messages (status, counts, events, model state)
  wait in the queue and go out, in order, after the reconnect.
- QoS 1 handed to paho but not acknowledged when the connection drops: paho 2.x keeps them in its
  own session store and sends them again (DUP set) after any successful reconnect, whether or not
  the broker kept the session (measured with a broker killed by SIGKILL: tests/mqtt/test_client.py).
  This client tracks every handed-over message by mid until its PUBACK (`on_publish`), counts the
  ones re-sent after a reconnect ("resent"), and holds back new messages after a reconnect until
  those re-sends are acknowledged, so the order stays the publish order. Duplicates are possible
  (a QoS 1 message whose PUBACK was lost) but only for messages in flight at the moment of a drop.
- Subscriptions are renewed in `on_connect` after every (re)connect. Callbacks run on paho's
  thread: keep them short; exceptions are caught and logged, never raised into paho. Incoming
  payloads over `max_rx_bytes` (default 16 MiB) are dropped and counted ("rx_dropped"); under
  MQTT 5 the broker is also told the maximum packet size so it does not send them at all.
- MQTT 5 by default with clean_start=False and a session expiry interval (the broker keeps the
  subscriptions and queues QoS 1 messages to the device across short disconnects); MQTT 3.1.1 by
  config with clean_session=False. The last will (the status topic, `offline`) is retained, QoS 1.
  `stop(drain_s, final)` flushes for at most `drain_s`, publishes `final` retained (a clean
  disconnect suppresses the will, so the explicit `offline` matters), then disconnects.
- MQTT 5 properties: `publish(..., properties=)` sends them (a request's Correlation Data on its
  answer, say); under MQTT 3.1.1 they are left off. `subscribe_with_properties` hands a callback the
  incoming message's properties too (Response Topic, Correlation Data, Message Expiry; None under
  3.1.1 or when the message had none).
- TCP_NODELAY on the socket: PLC messages are small and answer each other (trigger, ack, result,
  PUBACK); with Nagle's algorithm a small write waits for the peer's delayed ACK, up to 40 ms per
  hop on Linux (measured on loopback through mosquitto: a paho QoS 1 ping-pong took 68 ms, 0.94 ms
  with TCP_NODELAY on the clients and `set_tcp_nodelay true` on the broker).
- Credentials: `password_file`, else `$CREDENTIALS_DIRECTORY/mqtt_password` (systemd). The password
  is never logged.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig

log = logging.getLogger(__name__)

MessageCallback = Callable[[str, bytes], None]
PropsCallback = Callable[[str, bytes, "Properties | None"], None]

DEFAULT_MAX_RX_BYTES = 16 * 1024 * 1024
DEFAULT_SESSION_EXPIRY_S = 600
_RESEND_HOLD_S = 5.0  # after a reconnect, new messages wait at most this long for re-sends' PUBACKs


@dataclass(frozen=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None


@dataclass
class _Pending:
    out: _Out
    epoch: int  # connection number it was handed over on


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from `password_file` or `$CREDENTIALS_DIRECTORY/mqtt_password`, or None.

    Raises OSError when a configured file cannot be read (the message names the file, never its content).
    """
    path: Path | None = cfg.password_file
    if path is None:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / "mqtt_password").is_file():
            path = Path(cred_dir) / "mqtt_password"
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        # its message quotes a byte of the secret and its position: say only what is wrong
        raise OSError(errno.EINVAL, "not UTF-8 text", str(path)) from None
    return text or None  # an empty credential (the unit's fallback) means: no password


def make_ssl_context(tls: Any) -> ssl.SSLContext:
    """An SSL context from a TlsConfig: the CA bundle (or the system's), the client pair for mutual TLS."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.insecure:
        ctx.check_hostname = False  # the chain is still verified
    return ctx


def _is_failure(rc: Any) -> bool:
    if isinstance(rc, ReasonCode):
        return bool(rc.is_failure)
    try:
        return int(rc) != 0
    except (TypeError, ValueError):
        return True


class MqttClient:
    """One MQTT connection of the agent. Thread-safe; see the module docstring for the guarantees."""

    def __init__(self, cfg: MqttConfig, client_id: str, will_topic: str, will_payload: bytes,
                 on_connect: Callable[[], None] | None = None, *,
                 max_rx_bytes: int = DEFAULT_MAX_RX_BYTES,
                 session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
                 inflight_window: int = 100) -> None:
        self._cfg = cfg
        self.client_id = client_id
        self._user_on_connect = on_connect
        self._max_rx = max_rx_bytes
        self._session_expiry_s = session_expiry_s
        self._window = max(1, inflight_window)
        self._v5 = cfg.protocol == "5"

        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[_Out] = deque()
        self._pending: dict[int, _Pending] = {}
        self._early: OrderedDict[int, Any] = OrderedDict()  # on_publish seen before publish() returned
        # filter -> (callback, qos, whether the callback takes the message's properties)
        self._subs: dict[str, tuple[Callable[..., None], int, bool]] = {}
        self._connected = False
        self._epoch = 0
        self._hold_until = 0.0
        self._attempt = 0
        self._started = False
        self._closing = False
        self._stop_sender = False
        self._sender: threading.Thread | None = None
        self._setup_error: str | None = None
        self._last_logged_error: str | None = None
        self._n: dict[str, int] = dict.fromkeys(
            ("connects", "disconnects", "refused", "sent", "dropped", "dropped_qos0_offline", "resent", "received",
             "rx_dropped", "publish_errors", "callback_errors"), 0)
        self._last_error: str | None = None

        self._client = self._make_client(will_topic, will_payload)

    # ---- setup ----------------------------------------------------------------------------------
    def _make_client(self, will_topic: str, will_payload: bytes) -> mqtt.Client:
        cfg = self._cfg
        if self._v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                            protocol=mqtt.MQTTv311)
        c.suppress_exceptions = True
        # paho's in-flight window and its store of QoS>0 messages stay small: the backlog lives in our queue.
        c.max_inflight_messages_set(min(20, self._window))
        c.max_queued_messages_set(self._window)
        c.will_set(will_topic, will_payload, qos=1, retain=True)
        if cfg.username is not None or cfg.password_file is not None:
            try:
                password = read_password(cfg)
            except OSError as exc:
                self._setup_error = f"cannot read the MQTT password file: {exc.strerror or type(exc).__name__}"
                password = None
            if cfg.username is not None:
                c.username_pw_set(cfg.username, password)
            elif password is not None:
                log.warning("mqtt: a password is configured but no username; the password is not used")
        elif os.environ.get("CREDENTIALS_DIRECTORY") and \
                (Path(os.environ["CREDENTIALS_DIRECTORY"]) / "mqtt_password").is_file():
            log.warning("mqtt: $CREDENTIALS_DIRECTORY/mqtt_password exists but mqtt.username is not set; not used")
        if cfg.tls is not None:
            try:
                c.tls_set_context(make_ssl_context(cfg.tls))
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self._setup_error = f"TLS setup failed: {exc}"
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_log = self._on_log
        c.on_socket_open = self._on_socket_open
        return c

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        # room for the largest topic and the fixed / variable headers on top of the payload cap
        props.MaximumPacketSize = min(self._max_rx + 70_000, 268_435_455)
        return props

    # ---- public interface ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        """Begin connecting in the background; returns at once and never raises for broker trouble."""
        with self._cv:
            if self._started:
                return
            self._started = True
        self._sender = threading.Thread(target=self._sender_loop, name="mqtt-sender", daemon=True)
        self._sender.start()
        if self._setup_error is not None:
            self._set_error(self._setup_error, level=logging.ERROR)
            log.error("mqtt: not connecting (%s)", self._setup_error)
            return
        cfg = self._cfg
        try:
            self._schedule_retry()
            if self._v5:
                self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False,
                                           properties=self._connect_properties())
            else:
                self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
            self._client.loop_start()
        except Exception as exc:
            self._set_error(f"cannot start the MQTT client: {exc}", level=logging.ERROR)
            return
        log.info("mqtt: connecting to %s:%d as %s (MQTT %s%s)", cfg.host, cfg.port, self.client_id, cfg.protocol,
                 ", TLS" if cfg.tls is not None else "")

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> bool:
        """Queue a message; never blocks. False when it was refused or dropped at once (see stats).

        `properties` (MQTT 5 PUBLISH properties) go out with it under MQTT 5 and are left off under 3.1.1.
        """
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if qos not in (0, 1, 2) or not topic or "+" in topic or "#" in topic:
            with self._cv:
                self._n["publish_errors"] += 1
            log.error("mqtt: refusing to publish to %r with qos %r", topic, qos)
            return False
        with self._cv:
            if self._closing and self._stop_sender:
                return False
            if qos == 0 and not self._connected:
                self._n["dropped_qos0_offline"] += 1
                return False
            if len(self._queue) >= self._cfg.queue_size:
                self._queue.popleft()
                self._n["dropped"] += 1
            self._queue.append(_Out(topic, data, qos, retain, properties if self._v5 else None))
            self._cv.notify_all()
        return True

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None:
        """Register `callback(topic, payload)` for a filter; (re)subscribed after every connect."""
        self._subscribe(topic_filter, callback, qos, False)

    def subscribe_with_properties(self, topic_filter: str, callback: PropsCallback, qos: int = 1) -> None:
        """Like `subscribe`, but `callback(topic, payload, properties)` also gets the MQTT 5 properties."""
        self._subscribe(topic_filter, callback, qos, True)

    def _subscribe(self, topic_filter: str, callback: Callable[..., None], qos: int, with_props: bool) -> None:
        with self._cv:
            self._subs[topic_filter] = (callback, qos, with_props)
            connected = self._connected
        if connected:
            self._send_subscribe(topic_filter, qos)

    def stop(self, drain_s: float, final: tuple[str, bytes | str] | None = None) -> None:
        """Flush the queue for at most `drain_s`, publish `final` (QoS 1, retained), disconnect, join."""
        deadline = time.monotonic() + max(0.0, drain_s)
        with self._cv:
            if self._closing:
                return
            self._closing = True
            while (self._queue or self._pending_qos()) and self._started:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            left_queued, left_pending = len(self._queue), self._pending_qos()
            self._stop_sender = True
            self._cv.notify_all()
        if self._sender is not None:
            self._sender.join(5)
        if left_queued or left_pending:
            log.warning("mqtt: stopping with %d queued and %d unacknowledged messages", left_queued, left_pending)
        if final is not None and self._connected:
            topic, payload = final
            try:
                info = self._client.publish(topic, payload, qos=1, retain=True)
                info.wait_for_publish(max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("mqtt: final status not confirmed: %s", exc)
        elif final is not None:
            log.warning("mqtt: final status not sent (not connected); the broker publishes the last will")
        try:
            self._client.disconnect()
        except Exception:
            pass
        self._client.loop_stop()
        with self._cv:
            self._connected = False

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out: dict[str, Any] = {"connected": self._connected, **self._n, "queued": len(self._queue),
                                   "inflight": len(self._pending), "last_error": self._last_error}
        return out

    # ---- sender thread ------------------------------------------------------------------------------
    def _pending_qos(self) -> int:
        return sum(1 for p in self._pending.values() if p.out.qos > 0)

    def _resends_outstanding(self) -> bool:
        if time.monotonic() >= self._hold_until:
            return False
        return any(p.epoch < self._epoch and p.out.qos > 0 for p in self._pending.values())

    def _sender_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop_sender:
                        return
                    if (self._connected and self._queue and len(self._pending) < self._window
                            and not self._resends_outstanding()):
                        break
                    self._cv.wait(0.2)
                out = self._queue.popleft()
                epoch = self._epoch
            try:
                self._hand_over(out, epoch)
            except Exception:  # never let the sender die
                log.exception("mqtt: sender error")

    def _hand_over(self, out: _Out, epoch: int) -> None:
        try:
            info = self._client.publish(out.topic, out.payload, out.qos, out.retain, properties=out.properties)
        except (ValueError, TypeError) as exc:
            with self._cv:
                self._n["publish_errors"] += 1
            self._set_error(f"publish to {out.topic!r} failed: {exc}")
            return
        rc = info.rc
        with self._cv:
            if rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # paho's store is full: retry this one first, later
                self._queue.appendleft(out)
                self._cv.wait(0.05)
                return
            if out.qos == 0 and rc != mqtt.MQTT_ERR_SUCCESS:
                self._n["dropped_qos0_offline"] += 1
                self._early.pop(info.mid, None)
                return
            # QoS > 0: paho holds it now (also on NO_CONN: it sends it after the reconnect) until PUBACK.
            reason = self._early.pop(info.mid, None)
            if reason is not None:
                self._finish(out, reason)
            elif out.qos == 0 and epoch != self._epoch:
                self._n["dropped_qos0_offline"] += 1  # handed to a connection that is gone
            else:
                self._pending[info.mid] = _Pending(out, epoch)

    def _finish(self, out: _Out, reason: Any) -> None:
        if _is_failure(reason):
            self._n["publish_errors"] += 1
            self._last_error = f"broker rejected a message on {out.topic!r}: {reason}"
            log.warning("mqtt: %s", self._last_error)
        else:
            self._n["sent"] += 1

    # ---- paho callbacks (paho's thread; must never raise) --------------------------------------------
    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            with self._cv:
                p = self._pending.pop(mid, None)
                if p is None:
                    self._early[mid] = reason_code
                    while len(self._early) > 10_000:
                        self._early.popitem(last=False)
                else:
                    self._finish(p.out, reason_code)
                self._cv.notify_all()
        except Exception:
            log.exception("mqtt: on_publish failed")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if _is_failure(reason_code):
                with self._cv:
                    self._n["refused"] += 1
                self._set_error(f"connection refused by the broker: {reason_code}", level=logging.ERROR)
                return
            with self._cv:
                self._connected = True
                self._epoch += 1
                self._attempt = 0
                self._n["connects"] += 1
                self._drop_qos0_pending()
                resend = self._pending_qos()
                self._n["resent"] += resend
                self._hold_until = time.monotonic() + _RESEND_HOLD_S if resend else 0.0
                subs = [(f, q) for f, (_, q, _) in self._subs.items()]
                self._cv.notify_all()
            log.info("mqtt: connected to %s:%d (session present: %s%s)", self._cfg.host, self._cfg.port,
                     bool(getattr(flags, "session_present", False)),
                     f"; re-sending {resend} unacknowledged" if resend else "")
            self._last_logged_error = None
            for topic_filter, qos in subs:
                self._send_subscribe(topic_filter, qos)
            if self._user_on_connect is not None:
                try:
                    self._user_on_connect()
                except Exception:
                    log.exception("mqtt: on_connect callback failed")
        except Exception:
            log.exception("mqtt: on_connect failed")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        try:
            self._set_error(f"cannot connect to {self._cfg.host}:{self._cfg.port}")
            self._schedule_retry()
        except Exception:
            log.exception("mqtt: on_connect_fail failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            with self._cv:
                was = self._connected
                self._connected = False
                if was:
                    self._n["disconnects"] += 1
                self._drop_qos0_pending()
                lost0 = sum(1 for o in self._queue if o.qos == 0)
                if lost0:
                    self._queue = deque(o for o in self._queue if o.qos > 0)
                    self._n["dropped_qos0_offline"] += lost0
                closing = self._closing
                self._cv.notify_all()
            if closing:
                return
            if was:
                self._set_error(f"connection lost: {reason_code}")
            self._schedule_retry()
        except Exception:
            log.exception("mqtt: on_disconnect failed")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            size = len(msg.payload)
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                with self._cv:
                    self._n["rx_dropped"] += 1
                return
            if size > self._max_rx:
                with self._cv:
                    self._n["rx_dropped"] += 1
                log.warning("mqtt: dropped a %d-byte message on %s (limit %d)", size, topic, self._max_rx)
                return
            with self._cv:
                self._n["received"] += 1
                targets = [(cb, props) for f, (cb, _, props) in self._subs.items()
                           if mqtt.topic_matches_sub(f, topic)]
            payload = bytes(msg.payload)
            for cb, with_props in targets:
                try:
                    if with_props:
                        cb(topic, payload, getattr(msg, "properties", None) if self._v5 else None)
                    else:
                        cb(topic, payload)
                except Exception:
                    with self._cv:
                        self._n["callback_errors"] += 1
                    log.exception("mqtt: message callback for %s failed", topic)
        except Exception:
            log.exception("mqtt: on_message failed")

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError, ValueError) as exc:  # a socket kind without the option
            log.debug("mqtt: TCP_NODELAY not set: %s", exc)

    def _on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        # paho's errors worth keeping (TLS alerts, socket errors); its "not connected" chatter while it
        # waits to reconnect is not one of them
        if level == mqtt.MQTT_LOG_ERR and not buf.startswith("Client is not connected"):
            self._set_error(f"paho: {buf}")

    # ---- helpers -------------------------------------------------------------------------------------
    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        try:
            if self._v5:
                self._client.subscribe(topic_filter, options=mqtt.SubscribeOptions(qos=qos))
            else:
                self._client.subscribe(topic_filter, qos)
        except Exception as exc:
            self._set_error(f"subscribe to {topic_filter!r} failed: {exc}")

    def _drop_qos0_pending(self) -> None:
        """QoS 0 messages not yet written when a connection ends are gone (paho does not keep them)."""
        lost = [mid for mid, p in self._pending.items()
                if p.out.qos == 0 and not (self._connected and p.epoch == self._epoch)]
        for mid in lost:
            del self._pending[mid]
        self._n["dropped_qos0_offline"] += len(lost)

    def _schedule_retry(self) -> None:
        """Set paho's next reconnect wait: exponential from `initial_s` to `max_s`, +/- jitter."""
        b = self._cfg.reconnect
        with self._cv:
            base = min(b.initial_s * (2 ** min(self._attempt, 30)), b.max_s)
            self._attempt += 1
        delay = max(0.05, base * (1.0 + random.uniform(-b.jitter, b.jitter)))
        # paho annotates the delays as int but works with seconds as float
        self._client.reconnect_delay_set(cast(int, delay), cast(int, delay))

    def _set_error(self, text: str, level: int = logging.WARNING) -> None:
        with self._cv:
            self._last_error = text
            repeat = text == self._last_logged_error
            self._last_logged_error = text
        log.log(logging.DEBUG if repeat else level, "mqtt: %s", text)
