"""The reliability suite's network helpers: the delay proxy and the namespace with nftables faults."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.netns import NetNs, unavailable_reason
from tests.support.tcp_proxy import DelayProxy

NETNS_UNAVAILABLE = unavailable_reason()  # probed once (it makes and removes a namespace)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield "127.0.0.1", int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    t0 = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload
    return time.monotonic() - t0


def test_proxy_adds_the_delay_per_direction_and_changes_live(echo_server: tuple[str, int]) -> None:
    with DelayProxy(("127.0.0.1", 0), echo_server, up_s=0.1, down_s=0.05) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        rtt = _round_trip(s, b"x" * 100)
        assert 0.15 <= rtt < 0.5
        proxy.set_delay(0.0, 0.0)
        assert _round_trip(s, b"y" * 100) < 0.1
        assert proxy.stats.active == 1 and proxy.stats.bytes_up == 200


def test_proxy_delay_does_not_cap_throughput(echo_server: tuple[str, int]) -> None:
    # 50 writes 10 ms apart through a 0.2 s delay: all back 0.2 s after the last one, not after 50 x 0.2 s
    with DelayProxy(("127.0.0.1", 0), echo_server, up_s=0.2) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        t0 = time.monotonic()
        for _ in range(50):
            s.sendall(b"z" * 10)
            time.sleep(0.01)
        got = b""
        while len(got) < 500:
            got += s.recv(65536)
        assert time.monotonic() - t0 < 0.5 + 0.2 + 0.5


def test_proxy_close_cuts_connections_and_a_dead_target_closes_the_client() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    with DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port)) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert s.recv(10) == b""


@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE))
def test_netns_partition_loss_and_heal() -> None:
    with NetNs("t") as ns:
        srv = socket.socket()
        srv.bind((ns.host_ip, 0))
        srv.listen()
        port = srv.getsockname()[1]
        client = ns.popen(["python3", "-c", (
            "import socket,sys,time\n"
            f"s=socket.create_connection(('{ns.host_ip}',{port}),timeout=30)\n"
            "for i in range(40):\n"
            "    s.sendall(b'%03d' % i); time.sleep(0.05)\n"
            "s.close()\n")])
        try:
            conn, _ = srv.accept()
            conn.settimeout(0.3)
            assert conn.recv(3)
            ns.partition()
            time.sleep(0.4)
            with pytest.raises(socket.timeout):  # silence, no error: the cable is cut
                while True:
                    conn.recv(1024)
            ns.heal()
            conn.settimeout(10)
            got = b""
            while chunk := conn.recv(1024):
                got += chunk
            assert got.endswith(b"039")  # TCP delivered the rest after the heal
            assert client.wait(10) == 0
            ns.loss(50)
            # the TCP client is done: send datagrams both ways so the rules have packets to count
            sender = ns.popen(["python3", "-c", (
                "import socket,time\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                f"for i in range(40): s.sendto(b'x',('{ns.host_ip}',9)); time.sleep(0.01)\n")])
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(40):
                udp.sendto(b"x", (ns.ns_ip, 9))
                time.sleep(0.01)
            udp.close()
            assert sender.wait(10) == 0
            dropped = ns.dropped()
            assert dropped["from_agent"] > 0 and dropped["to_agent"] > 0, dropped  # ~20 of 40 each way
            ns.heal()
        finally:
            client.kill()
            srv.close()
    left = [subprocess.run(c, capture_output=True, text=True, check=False).stdout
            for c in (["ip", "netns", "list"], ["nft", "list", "tables"], ["ip", "link"])]
    assert ns.name not in left[0] and ns.host_table not in left[1] and ns.host_if not in left[2]
