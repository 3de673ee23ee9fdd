"""The agent's MQTT connection: paho-mqtt 2.x behind a small, never-blocking interface.

Data flow: the service and the PLC components call `publish()` -> the bounded queue and the
in-flight tracking of agent/mqtt/outbound.py -> this client's sender thread hands messages to paho
while connected -> paho's network thread writes them and reports PUBACKs back here. Incoming
messages arrive on paho's thread in `_on_message` and go to the callbacks registered with
`subscribe` / `subscribe_with_properties`. The connection itself (the paho client, its session,
the reconnect waits) is agent/mqtt/connection.py; the password and TLS are agent/mqtt/credentials.py.

Design (see DESIGN.md, MQTT lessons):

- `start()` returns at once. paho's network thread connects and reconnects by itself
  (`loop_start`, first connection retried too); the delay between attempts is the config's
  exponential backoff with jitter, handed to paho before each wait. A broker that is down,
  unreachable or refuses the CONNACK never raises into the caller: `connected` stays false and
  `stats()["last_error"]` says why.
- `publish()` never blocks: messages go to a bounded queue owned by the agent (`queue_size`; when
  full the OLDEST is dropped and counted as "dropped"). A sender thread hands them to paho only
  while connected, and at most `inflight_window` at a time. QoS 0 while offline is dropped at once
  ("dropped_qos0_offline"); QoS >= 1 messages (status, counts, events, model state) wait in the
  queue and go out, in order, after the reconnect; QoS 1 messages in flight at a drop are re-sent
  by paho and counted ("resent"). Details in agent/mqtt/outbound.py.
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
- TCP_NODELAY on the socket (why, with the measurement: agent/mqtt/connection.py).
- Credentials: `password_file`, else `$CREDENTIALS_DIRECTORY/mqtt_password` (systemd). The password
  is never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from agent.backoff import Backoff
from agent.config import MqttConfig
from agent.mqtt.connection import (
    MIN_RECONNECT_S,
    connect_properties,
    is_failure,
    new_paho_client,
    set_tcp_nodelay,
)
from agent.mqtt.outbound import Outbound, Outgoing

log = logging.getLogger(__name__)

MessageCallback = Callable[[str, bytes], None]
PropsCallback = Callable[[str, bytes, "Properties | None"], None]

DEFAULT_MAX_RX_BYTES = 16 * 1024 * 1024
DEFAULT_SESSION_EXPIRY_S = 600


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
        self._v5 = cfg.protocol == "5"

        self._cv = threading.Condition(threading.Lock())
        self._n: dict[str, int] = dict.fromkeys(
            ("connects", "disconnects", "refused", "sent", "dropped", "dropped_qos0_offline", "resent", "received",
             "rx_dropped", "publish_errors", "callback_errors"), 0)
        self._out = Outbound(cfg.queue_size, inflight_window, self._n)  # under self._cv
        # filter -> (callback, qos, whether the callback takes the message's properties)
        self._subs: dict[str, tuple[Callable[..., None], int, bool]] = {}
        self._connected = False
        self._backoff = Backoff(cfg.reconnect, floor_s=MIN_RECONNECT_S)
        self._started = False
        self._closing = False
        self._stop_sender = False
        self._sender: threading.Thread | None = None
        self._last_logged_error: str | None = None
        self._last_error: str | None = None

        self._client, self._setup_error = new_paho_client(cfg, client_id, self._out.window, will_topic, will_payload)
        c = self._client
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_log = self._on_log
        c.on_socket_open = self._on_socket_open

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
                                           properties=connect_properties(self._session_expiry_s, self._max_rx))
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
            if not self._out.offer(Outgoing(topic, data, qos, retain, properties if self._v5 else None),
                                   self._connected):
                return False
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
            while (self._out.queue or self._out.pending_qos()) and self._started:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            left_queued, left_pending = len(self._out.queue), self._out.pending_qos()
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
            out: dict[str, Any] = {"connected": self._connected, **self._n, "queued": len(self._out.queue),
                                   "inflight": len(self._out.pending), "last_error": self._last_error}
        return out

    # ---- sender thread ------------------------------------------------------------------------------
    def _sender_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop_sender:
                        return
                    if self._connected and self._out.ready():
                        break
                    self._cv.wait(0.2)
                out, epoch = self._out.take()
            try:
                self._hand_over(out, epoch)
            except Exception:  # never let the sender die
                log.exception("mqtt: sender error")

    def _hand_over(self, out: Outgoing, epoch: int) -> None:
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
                self._out.put_back(out)
                self._cv.wait(0.05)
                return
            self._rejected(self._out.handed_over(out, epoch, info.mid, rc == mqtt.MQTT_ERR_SUCCESS))

    def _rejected(self, reason: str | None) -> None:
        """A broker rejection from the outbound side (called with the lock held)."""
        if reason is not None:
            self._last_error = reason
            log.warning("mqtt: %s", reason)

    # ---- paho callbacks (paho's thread; must never raise) --------------------------------------------
    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            with self._cv:
                self._rejected(self._out.acked(mid, reason_code))
                self._cv.notify_all()
        except Exception:
            log.exception("mqtt: on_publish failed")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if is_failure(reason_code):
                with self._cv:
                    self._n["refused"] += 1
                self._set_error(f"connection refused by the broker: {reason_code}", level=logging.ERROR)
                return
            self._backoff.reset()
            with self._cv:
                self._connected = True
                self._n["connects"] += 1
                resend = self._out.connected()
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
                self._out.disconnected()
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
        set_tcp_nodelay(sock)

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

    def _schedule_retry(self) -> None:
        """Set paho's next reconnect wait from the backoff."""
        delay = self._backoff.next_delay()
        # paho annotates the delays as int but works with seconds as float
        self._client.reconnect_delay_set(cast(int, delay), cast(int, delay))

    def _set_error(self, text: str, level: int = logging.WARNING) -> None:
        with self._cv:
            self._last_error = text
            repeat = text == self._last_logged_error
            self._last_logged_error = text
        log.log(logging.DEBUG if repeat else level, "mqtt: %s", text)


__all__ = ["DEFAULT_MAX_RX_BYTES", "DEFAULT_SESSION_EXPIRY_S", "MessageCallback", "MqttClient", "PropsCallback"]
