"""MqttClient against a real mosquitto (tests/support/broker.py) and a real paho subscriber."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.config import BackoffConfig, MqttConfig, TlsConfig
from agent.mqtt.client import MqttClient
from agent.mqtt.topics import Topics
from tests.support.broker import Broker, free_port
from tests.support.certs import make_pki
from tests.support.mqtt import Collector, Msg

ROOT = Path(__file__).resolve().parents[2]
T = Topics("edge", "D")
WILL = b"offline-will"
# mosquitto started as root drops to user `mosquitto`, which cannot read pytest's private tmp dirs
AS_ROOT = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""


def persistent_conf(d: Path) -> str:
    # later lines win over Broker's own `persistence false`; autosave keeps sessions across SIGKILL
    return f"persistence true\npersistence_location {d}/\nautosave_interval 1\n{AS_ROOT}"


def mk_cfg(port: int, **kw: object) -> MqttConfig:
    kw.setdefault("reconnect", BackoffConfig(initial_s=0.1, max_s=0.5, jitter=0.2))
    return MqttConfig(host="127.0.0.1", port=port, keepalive_s=5, **kw)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def seqs(msgs: list[Msg], topic: str) -> list[int]:
    return [int(m.payload) for m in msgs if m.topic == topic]


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.stop(0)


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.client.disconnect()  # first, so that close()'s loop_stop need not wait out paho's 1 s select
        c.close()


def new_client(clients: list[MqttClient], cfg: MqttConfig, client_id: str = "edge-agent-D",
               **kw: object) -> MqttClient:
    c = MqttClient(cfg, client_id, will_topic=T.status, will_payload=WILL, **kw)  # type: ignore[arg-type]
    clients.append(c)
    return c


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_roundtrip(broker: Broker, clients: list[MqttClient], collectors: list[Collector], protocol: str) -> None:
    col = Collector(broker.host, broker.port, ["edge/D/#"])
    collectors.append(col)
    got: list[tuple[str, bytes]] = []
    connects: list[int] = []
    c = MqttClient(mk_cfg(broker.port, protocol=protocol), "edge-agent-D", T.status, WILL,
                   on_connect=lambda: connects.append(1))
    clients.append(c)

    def boom(topic: str, payload: bytes) -> None:
        raise RuntimeError("callbacks must not break paho")

    c.subscribe(T.model_update, lambda tp, p: got.append((tp, p)))
    c.subscribe(T.chunk_filter(), boom)
    t0 = time.monotonic()
    c.start()
    assert time.monotonic() - t0 < 0.5
    wait_until(lambda: c.connected, what="connect")
    assert connects == [1]
    assert c.publish(T.status, "online", qos=1, retain=True)
    assert c.publish(T.detections("cam0"), b'{"seq": 1}', qos=0)
    col.wait_for(lambda ms: len(ms) >= 2)
    assert {(m.topic, m.payload) for m in col.messages} == {(T.status, b"online"),
                                                            (T.detections("cam0"), b'{"seq": 1}')}
    time.sleep(0.2)  # SUBACK
    col.client.publish(T.chunks("tx", 0), b"x", qos=1)
    col.client.publish(T.model_update, b"manifest", qos=1)
    wait_until(lambda: got == [(T.model_update, b"manifest")], what="incoming message")
    st = c.stats()
    assert st["connected"] and st["connects"] == 1 and st["sent"] == 2 and st["received"] == 2
    assert st["callback_errors"] == 1
    assert not c.publish("edge/D/+", b"x") and c.stats()["publish_errors"] == 1


def test_last_will_after_sigkill(broker: Broker, collectors: list[Collector]) -> None:
    col = Collector(broker.host, broker.port, [T.status])
    collectors.append(col)
    child = subprocess.Popen([sys.executable, "-m", "tests.support.mqtt_child", broker.host, str(broker.port),
                              "edge-agent-D", T.status, WILL.decode()], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        col.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        col.wait_for(lambda ms: any(m.payload == WILL for m in ms))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    late = Collector(broker.host, broker.port, [T.status])  # the will is retained
    collectors.append(late)
    msgs = late.wait_for(lambda ms: len(ms) >= 1)
    assert msgs[0].payload == WILL and msgs[0].retain


def test_clean_stop_publishes_final_status_not_will(broker: Broker, clients: list[MqttClient],
                                                     collectors: list[Collector]) -> None:
    col = Collector(broker.host, broker.port, [T.status])
    collectors.append(col)
    c = new_client(clients, mk_cfg(broker.port))
    c.start()
    wait_until(lambda: c.connected)
    c.publish(T.status, b"online", qos=1, retain=True)
    for i in range(20):
        c.publish(T.events, str(i), qos=1)
    c.stop(2.0, final=(T.status, b"offline"))
    assert c.stats()["sent"] == 21 and not c.connected
    col.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline"])
    time.sleep(0.3)
    assert WILL not in [m.payload for m in col.messages]


@pytest.fixture
def pbroker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that keeps sessions across restarts and (autosaved every second) across SIGKILL."""
    d = tmp_path / "pbroker"
    d.mkdir()
    b = Broker(d, extra_conf=persistent_conf(d)).start()
    try:
        yield b
    finally:
        b.stop()


def persistent_collector(b: Broker, collectors: list[Collector], topics: list[str]) -> Collector:
    col = Collector(b.host, b.port, topics, client_id="test-collector", clean=False)
    col.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work
    collectors.append(col)
    return col


def test_qos1_while_broker_stopped_arrive_in_order(pbroker: Broker, clients: list[MqttClient],
                                                   collectors: list[Collector]) -> None:
    col = persistent_collector(pbroker, collectors, [T.events])
    c = new_client(clients, mk_cfg(pbroker.port))
    c.start()
    wait_until(lambda: c.connected)
    for i in range(5):
        c.publish(T.events, str(i), qos=1)
    col.wait_for(lambda ms: len(ms) >= 5)
    pbroker.stop()
    wait_until(lambda: not c.connected)
    for i in range(5, 55):
        assert c.publish(T.events, str(i), qos=1)
    assert not c.publish(T.telemetry, b"{}", qos=0)  # QoS 0 while offline: dropped, counted
    assert c.stats()["queued"] == 50 and c.stats()["dropped_qos0_offline"] == 1
    pbroker.start()
    # (0-4 may come twice: the broker saved them at its stop before the collector's PUBACKs)
    col.wait_for(lambda ms: set(seqs(ms, T.events)) == set(range(55)), timeout=15)
    assert list(dict.fromkeys(seqs(col.messages, T.events))) == list(range(55)), "order"
    st = c.stats()
    assert st["connects"] == 2 and st["disconnects"] == 1 and st["queued"] == 0 and st["dropped"] == 0


def test_queue_overflow_drops_oldest(pbroker: Broker, clients: list[MqttClient],
                                     collectors: list[Collector]) -> None:
    col = persistent_collector(pbroker, collectors, [T.events])
    pbroker.stop()
    c = new_client(clients, mk_cfg(pbroker.port, queue_size=10))
    c.start()
    t0 = time.monotonic()
    for i in range(25):
        assert c.publish(T.events, str(i), qos=1)
    assert time.monotonic() - t0 < 0.1
    st = c.stats()
    assert st["dropped"] == 15 and st["queued"] == 10 and not st["connected"]
    pbroker.start()
    col.wait_for(lambda ms: len(ms) >= 10, timeout=15)
    time.sleep(0.2)
    assert list(dict.fromkeys(seqs(col.messages, T.events))) == list(range(15, 25))


def test_broker_sigkill_mid_stream_loses_nothing(tmp_path: Path, clients: list[MqttClient],
                                                 collectors: list[Collector]) -> None:
    """SIGKILL the broker while QoS 1 messages are in flight, 3 times: none lost, in order.

    What the agent answers for is every message the broker has NOT acknowledged. To kill at a moment
    where that is all there is in flight, the broker is frozen (SIGSTOP) once the stream is quiet, a
    burst is published (paho writes its window into the frozen broker's socket, the rest waits in
    our queue), and the frozen broker is killed. A broker killed while running also loses messages
    it had acknowledged but not yet forwarded (mosquitto acks on routing): that is the broker's
    durability, outside any client's reach (measured: 30-80 of 600 in this setup).
    """
    per_cycle, cycles = 200, 3
    d = tmp_path / "kb"
    d.mkdir()
    b = Broker(d, extra_conf=persistent_conf(d)).start()
    try:
        col = persistent_collector(b, collectors, [T.events])
        c = new_client(clients, mk_cfg(b.port))
        c.start()
        wait_until(lambda: c.connected)
        # mosquitto's first autosave comes 1-3 s after its start: the collector's session must be on disk
        wait_until((d / "mosquitto.db").exists, timeout=5, what="autosave")
        unacked_at_kill = []
        for k in range(cycles):
            sent_before = k * per_cycle
            wait_until(lambda: c.stats()["sent"] == sent_before  # noqa: B023
                       and len(set(seqs(col.messages, T.events))) == sent_before, what="a quiet stream")  # noqa: B023
            assert b.proc is not None
            b.proc.send_signal(signal.SIGSTOP)
            for i in range(per_cycle):
                c.publish(T.events, str(sent_before + i), qos=1)
            wait_until(lambda: c.stats()["inflight"] > 0, what="messages handed to paho")
            time.sleep(0.05)  # paho writes its window into the frozen broker's socket
            unacked_at_kill.append(c.stats()["inflight"])
            b.kill()
            b.start()
            # the next cycle only once both ends are back (else the broker loses what it holds for the collector)
            wait_until(lambda: c.connected and col.client.is_connected(), what="reconnects")
        n = per_cycle * cycles
        wait_until(lambda: c.stats()["sent"] == n and len(set(seqs(col.messages, T.events))) == n,
                   timeout=10, what="all messages")
        got = seqs(col.messages, T.events)
        assert list(dict.fromkeys(got)) == list(range(n)), "lost or out of order"
        st = c.stats()
        assert st["disconnects"] == cycles and st["dropped"] == 0 and st["queued"] == 0 and st["inflight"] == 0
        assert st["resent"] == sum(unacked_at_kill) and all(u > 0 for u in unacked_at_kill)
        print(f"sigkill x{cycles}: {n} sent, 0 lost, {len(got) - n} duplicates, unacked at kills {unacked_at_kill},"
              f" resent={st['resent']}")
    finally:
        b.stop()


def test_refusing_broker(tmp_path: Path, clients: list[MqttClient], monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "agent", "s3cret"], check=True,
                   capture_output=True)
    b = Broker(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {pw}\n{AS_ROOT}").start()
    try:
        c = new_client(clients, mk_cfg(b.port), client_id="anon")
        t0 = time.monotonic()
        c.start()
        assert time.monotonic() - t0 < 0.5
        wait_until(lambda: c.stats()["refused"] >= 2, what="refusals (retried)")
        st = c.stats()
        assert not st["connected"] and st["connects"] == 0
        assert "refused" in st["last_error"] and "authori" in st["last_error"].lower()
        t0 = time.monotonic()
        assert c.publish(T.events, b"e", qos=1) and not c.publish(T.telemetry, b"t", qos=0)
        assert time.monotonic() - t0 < 0.05

        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        ok = new_client(clients, mk_cfg(b.port, username="agent", password_file=secret), client_id="ok")
        ok.start()
        wait_until(lambda: ok.connected, what="authenticated connect")

        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mqtt_password").write_text("s3cret")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        sd = new_client(clients, mk_cfg(b.port, username="agent"), client_id="sd")
        sd.start()
        wait_until(lambda: sd.connected, what="connect with systemd credentials")
        t0 = time.monotonic()
        c.stop(0.5)
        assert time.monotonic() - t0 < 3
    finally:
        b.stop()


def test_no_broker_never_blocks(clients: list[MqttClient]) -> None:
    c = new_client(clients, mk_cfg(free_port()))
    t0 = time.monotonic()
    c.start()
    for i in range(1000):
        c.publish(T.events, str(i), qos=1)
        c.publish(T.detections("cam0"), b"{}", qos=0)
    assert time.monotonic() - t0 < 0.5
    time.sleep(0.5)
    st = c.stats()
    assert not st["connected"] and "cannot connect" in st["last_error"]
    assert st["queued"] == 1000 and st["dropped_qos0_offline"] == 1000
    t0 = time.monotonic()
    c.stop(0.3, final=(T.status, b"offline"))
    assert time.monotonic() - t0 < 2.5


def test_subscriptions_renewed_after_restart(broker: Broker, clients: list[MqttClient],
                                             collectors: list[Collector]) -> None:
    got: list[bytes] = []
    c = new_client(clients, mk_cfg(broker.port))
    c.subscribe(T.model_update, lambda tp, p: got.append(p))
    c.start()
    wait_until(lambda: c.connected)
    broker.restart()  # no persistence: the new broker knows nothing of the old session
    wait_until(lambda: c.stats()["connects"] == 2, what="reconnect")
    pub = Collector(broker.host, broker.port, ["unused/#"])
    collectors.append(pub)
    pub.client.publish(T.model_update, b"after-restart", qos=1, retain=True)
    wait_until(lambda: got == [b"after-restart"], what="message after restart")


def test_oversized_incoming_dropped(broker: Broker, clients: list[MqttClient],
                                    collectors: list[Collector]) -> None:
    got: list[bytes] = []
    c = new_client(clients, mk_cfg(broker.port), max_rx_bytes=1000)
    c.subscribe(T.chunk_filter(), lambda tp, p: got.append(p))
    c.start()
    wait_until(lambda: c.connected)
    time.sleep(0.2)
    pub = Collector(broker.host, broker.port, ["unused/#"])
    collectors.append(pub)
    pub.client.publish(T.chunks("t", 0), b"x" * 2000, qos=1)
    pub.client.publish(T.chunks("t", 1), b"y" * 10, qos=1)
    wait_until(lambda: got == [b"y" * 10])
    assert c.stats()["rx_dropped"] == 1 and c.stats()["received"] == 1


def test_mutual_tls(tmp_path: Path, clients: list[MqttClient]) -> None:
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path, extra_conf=(f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
                                     f"keyfile {pki['server_key']}\nrequire_certificate true\n{AS_ROOT}")).start()
    try:
        tls = TlsConfig(ca_file=pki["ca"], cert_file=pki["client_cert"], key_file=pki["client_key"])
        c = new_client(clients, mk_cfg(b.port, tls=tls), client_id="tls")
        c.start()
        wait_until(lambda: c.connected, what="TLS connect")
        c.publish(T.events, b"over tls", qos=1)
        wait_until(lambda: c.stats()["sent"] == 1)

        no_cert = new_client(clients, mk_cfg(b.port, tls=TlsConfig(ca_file=pki["ca"])), client_id="nocert")
        no_cert.start()
        wait_until(lambda: no_cert.stats()["last_error"] is not None, what="TLS refusal")
        time.sleep(0.5)
        st = no_cert.stats()
        assert not st["connected"] and st["connects"] == 0
        print("no client cert:", st["last_error"])
    finally:
        b.stop()


def test_paho_resends_unacked_qos1_after_broker_sigkill(tmp_path: Path) -> None:
    """What paho 2.x itself does (the client relies on it): unacked QoS 1 go again, DUP set, to a NEW broker."""
    b = Broker(tmp_path, extra_conf=AS_ROOT).start()
    acked: set[int] = set()
    p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw", protocol=mqtt.MQTTv5)
    p.on_publish = lambda cl, u, mid, rc, props: acked.add(mid)
    p.reconnect_delay_set(0.1, 0.1)  # type: ignore[arg-type]
    p.max_inflight_messages_set(20)
    try:
        p.connect(b.host, b.port, clean_start=False)
        p.loop_start()
        wait_until(p.is_connected)
        mids = []
        for i in range(200):
            mids.append(p.publish("raw/t", str(i), qos=1).mid)
            if i == 100:
                b.kill()
                b.log.rename(tmp_path / "first.log")
                b.start()
        wait_until(lambda: acked >= set(mids), what="all PUBACKs from the new broker")
        log = b.log_text()
        assert log.count("Received PUBLISH from raw (d1") >= 1  # re-sent with DUP
    finally:
        p.loop_stop()
        b.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_and_receive_mqtt5_properties(broker: Broker, clients: list[MqttClient], protocol: str) -> None:
    """Request / response over the agent's client: a real MQTT 5 paho peer sends Response Topic +
    Correlation Data + Message Expiry; the agent's callback sees them (None under 3.1.1, where the
    broker strips them) and answers with the Correlation Data, which the peer gets back under MQTT 5."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    seen: list[tuple[bytes, object]] = []
    c = new_client(clients, mk_cfg(broker.port, protocol=protocol))

    def on_request(topic: str, payload: bytes, props: Properties | None) -> None:
        seen.append((payload, props))
        reply = Properties(PacketTypes.PUBLISH)
        reply.CorrelationData = getattr(props, "CorrelationData", b"none")
        c.publish(getattr(props, "ResponseTopic", None) or "peer/none", b"answer", qos=1, properties=reply)

    c.subscribe_with_properties("edge/D/cam0/inspect", on_request)
    c.start()
    wait_until(lambda: c.connected)
    got: list[tuple[str, bytes, bytes | None]] = []
    peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="peer5", protocol=mqtt.MQTTv5)
    peer.on_message = lambda cl, u, m: got.append((m.topic, bytes(m.payload),
                                                   getattr(m.properties, "CorrelationData", None)))
    try:
        peer.connect(broker.host, broker.port)
        peer.loop_start()
        wait_until(peer.is_connected)
        peer.subscribe([("peer/reply", 1), ("peer/none", 1)])
        time.sleep(0.2)  # SUBACK
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "peer/reply"
        props.CorrelationData = b"\x00\x01corr"
        props.MessageExpiryInterval = 30
        peer.publish("edge/D/cam0/inspect", b"17", qos=1, properties=props)
        wait_until(lambda: len(got) == 1, what="the answer")
    finally:
        peer.loop_stop()
        peer.disconnect()
    (payload, rx) = seen[0]
    assert payload == b"17"
    if protocol == "5":
        assert rx is not None and rx.ResponseTopic == "peer/reply" and rx.CorrelationData == b"\x00\x01corr"
        assert 0 < rx.MessageExpiryInterval <= 30
        assert got == [("peer/reply", b"answer", b"\x00\x01corr")]
    else:  # no properties reach a 3.1.1 session, none leave it
        assert rx is None and got == [("peer/none", b"answer", None)]


def test_socket_has_tcp_nodelay(broker: Broker, clients: list[MqttClient]) -> None:
    """Small request / answer messages must not wait for the peer's delayed ACK (Nagle)."""
    import socket

    c = new_client(clients, mk_cfg(broker.port))
    c.start()
    wait_until(lambda: c.connected)
    sock = c._client.socket()
    assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
