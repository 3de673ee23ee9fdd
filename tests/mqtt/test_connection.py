"""agent/mqtt/connection.py: reason codes, the CONNECT properties, the paho client as built.

The connection's behaviour against a real broker (reconnects, a refused CONNACK, TCP_NODELAY on the
live socket) is in tests/mqtt/test_client.py.
"""

from __future__ import annotations

import socket

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.mqtt.connection import (
    MAX_PACKET_SIZE,
    connect_properties,
    is_failure,
    new_paho_client,
    set_tcp_nodelay,
)


def test_reason_codes() -> None:
    assert not is_failure(ReasonCode(PacketTypes.CONNACK, "Success"))
    assert is_failure(ReasonCode(PacketTypes.CONNACK, "Not authorized"))
    assert not is_failure(0) and is_failure(5) and is_failure(None) and is_failure("x")


def test_connect_properties() -> None:
    assert connect_properties(600, 1024).json() == {"SessionExpiryInterval": 600, "MaximumPacketSize": 1024 + 70_000}
    assert connect_properties(600, MAX_PACKET_SIZE).json()["MaximumPacketSize"] == MAX_PACKET_SIZE


def test_paho_client_as_built() -> None:
    v5, error = new_paho_client(MqttConfig(host="127.0.0.1", port=1883), "dev", 100, "edge/dev/status", b"offline")
    assert error is None and v5.protocol == mqtt.MQTTv5 and v5.suppress_exceptions
    assert v5.max_inflight_messages == 20 and v5.max_queued_messages == 100  # the backlog is ours, not paho's
    v3, _ = new_paho_client(MqttConfig(host="127.0.0.1", port=1883, protocol="3.1.1"), "dev", 5, "t", b"x")
    assert v3.protocol == mqtt.MQTTv311 and v3.max_inflight_messages == 5


def test_tcp_nodelay_on_a_tcp_socket_and_quiet_on_others() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        set_tcp_nodelay(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
        set_tcp_nodelay(u)  # no TCP here: logged at debug, never raised into paho
