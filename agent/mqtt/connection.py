"""The connection under the agent's MQTT client: the paho client, its session, and the reconnect waits.

Data flow: the config's `mqtt` section -> `new_paho_client` (MQTT 5 with a persistent session, or
3.1.1 with clean_session=False; the retained QoS 1 last will; paho's own in-flight window and
store kept small, as the backlog lives in the agent's queue (agent/mqtt/outbound.py); credentials
and TLS from agent/mqtt/credentials.py) -> `connect_properties` for the MQTT 5 CONNECT (session
expiry, the largest packet the agent accepts) -> paho's network thread connects and reconnects by
itself, waiting what `agent.backoff.Backoff` says before each attempt (exponential from
`reconnect.initial_s` to `reconnect.max_s`, +/- `jitter`, at least `MIN_RECONNECT_S`; reset by a
successful CONNACK).

`is_failure` reads paho's reason codes (a ReasonCode under either protocol, or an int) so that a
refused CONNACK or a rejected PUBLISH is never taken for success. `set_tcp_nodelay` turns off
Nagle's algorithm on a new socket: PLC messages are small and answer each other (trigger, ack,
result, PUBACK); with Nagle a small write waits for the peer's delayed ACK, up to 40 ms per hop on
Linux (measured on loopback through mosquitto: a paho QoS 1 ping-pong took 69 ms, about 1 ms with
TCP_NODELAY on the clients and `set_tcp_nodelay true` on the broker; see
scripts/measure_inspection.py --nagle-check).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.mqtt.credentials import apply_credentials

log = logging.getLogger("agent.mqtt.client")  # the records keep the logger name they had before the split

MAX_PACKET_SIZE = 268_435_455  # MQTT's largest remaining length
_HEADER_ROOM = 70_000  # the largest topic and the fixed / variable headers on top of the payload cap
MIN_RECONNECT_S = 0.05  # never a busy loop against a dead broker


def is_failure(rc: Any) -> bool:
    """Whether a CONNACK / PUBACK reason (ReasonCode or int) is a failure; anything unreadable is one."""
    if isinstance(rc, ReasonCode):
        return bool(rc.is_failure)
    try:
        return int(rc) != 0
    except (TypeError, ValueError):
        return True


def new_paho_client(cfg: MqttConfig, client_id: str, window: int, will_topic: str,
                    will_payload: bytes) -> tuple[mqtt.Client, str | None]:
    """A paho client for `cfg` with the will set, callbacks not yet: (client, why it must not connect)."""
    if cfg.protocol == "5":
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
    c.suppress_exceptions = True
    # paho's in-flight window and its store of QoS>0 messages stay small: the backlog lives in our queue.
    c.max_inflight_messages_set(min(20, window))
    c.max_queued_messages_set(window)
    c.will_set(will_topic, will_payload, qos=1, retain=True)
    return c, apply_credentials(c, cfg)


def connect_properties(session_expiry_s: int, max_rx_bytes: int) -> Properties:
    """MQTT 5 CONNECT properties: how long the broker keeps the session, and the largest packet we take."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    # the broker then does not send what the client would drop anyway
    props.MaximumPacketSize = min(max_rx_bytes + _HEADER_ROOM, MAX_PACKET_SIZE)
    return props


def set_tcp_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a socket paho just opened (see the module docstring)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError) as exc:  # a socket kind without the option
        log.debug("mqtt: TCP_NODELAY not set: %s", exc)
