"""A TCP relay between one MQTT client and the broker that records what it relays, for loss accounting.

The broker's log says which packet ids it acknowledged but not what they carried, so a message
lost after a broker crash cannot be blamed on the client or on the broker from the log alone.
`MqttTap` sits on its own loopback port in front of the broker and forwards every byte unchanged;
on the way it parses the client's CONNECT and PUBLISH packets (topic, packet id, payload) and the
broker's CONNACK and PUBACK packets (packet id), each with its monotonic time. A PUBLISH is
recorded before the chunk that completes it is forwarded, so its PUBACK is always recorded after it.

`pause()` closes the listening socket and every relayed connection (the client then sees a
refused connection, as with a dead broker); `resume()` listens again on the same port. MQTT 3.1.1
and 5 (properties skipped). Not a general proxy: one upstream, loopback, no TLS.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from tests.support.broker import free_port

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4


@dataclass(frozen=True)
class TapEvent:
    at: float  # time.monotonic()
    conn: int  # relayed connection number, from 1
    kind: str  # "open", "connect", "connack", "publish", "puback", "closed"
    pid: int = 0  # packet id (publish with QoS > 0, puback)
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    dup: bool = False


def _varint(buf: bytes | bytearray, i: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at buf[i:]: (value, next index), or None when incomplete."""
    value, mult = 0, 1
    for k in range(4):
        if i + k >= len(buf):
            return None
        b = buf[i + k]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, i + k + 1
        mult *= 128
    raise ValueError("malformed MQTT remaining length")


class _Parser:
    """Splits one direction's byte stream into MQTT packets and records the interesting ones."""

    def __init__(self, tap: MqttTap, conn: int, upstream: bool, state: dict[str, int]) -> None:
        self.tap, self.conn, self.upstream, self.state = tap, conn, upstream, state
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            head = _varint(self.buf, 1)
            if head is None:
                return
            length, start = head
            end = start + length
            if len(self.buf) < end:
                return
            ptype, flags, body = self.buf[0] >> 4, self.buf[0] & 0x0F, bytes(self.buf[start:end])
            del self.buf[:end]
            self._packet(ptype, flags, body)

    def _packet(self, ptype: int, flags: int, body: bytes) -> None:
        rec = self.tap._record
        if self.upstream and ptype == CONNECT:
            name_len = int.from_bytes(body[0:2], "big")
            self.state["level"] = body[2 + name_len]  # 4: MQTT 3.1.1, 5: MQTT 5
            rec(TapEvent(time.monotonic(), self.conn, "connect"))
        elif self.upstream and ptype == PUBLISH:
            qos, dup = (flags >> 1) & 3, bool(flags & 8)
            tlen = int.from_bytes(body[0:2], "big")
            topic = body[2:2 + tlen].decode("utf-8", "replace")
            i, pid = 2 + tlen, 0
            if qos:
                pid, i = int.from_bytes(body[i:i + 2], "big"), i + 2
            if self.state.get("level") == 5:
                props = _varint(body, i)
                if props is None:
                    raise ValueError("malformed MQTT 5 properties")
                i = props[1] + props[0]
            rec(TapEvent(time.monotonic(), self.conn, "publish", pid, topic, body[i:], qos, dup))
        elif not self.upstream and ptype == CONNACK:
            rec(TapEvent(time.monotonic(), self.conn, "connack"))
        elif not self.upstream and ptype == PUBACK:
            rec(TapEvent(time.monotonic(), self.conn, "puback", int.from_bytes(body[0:2], "big")))


class MqttTap:
    """Relays 127.0.0.1:`port` to the broker at `upstream`; `events` holds what passed, in order."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.events: list[TapEvent] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._conn_no = 0

    def _record(self, ev: TapEvent) -> None:
        with self._lock:
            self.events.append(ev)

    def snapshot(self) -> list[TapEvent]:
        with self._lock:
            return list(self.events)

    # ---- lifecycle -------------------------------------------------------------------------------
    def resume(self) -> MqttTap:
        """Listen (again) on the same port."""
        if self._listener is not None:
            return self
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, self.port))
        ls.listen(16)
        self._listener = ls
        self._accepter = threading.Thread(target=self._accept_loop, args=(ls,), name="tap-accept", daemon=True)
        self._accepter.start()
        return self

    start = resume

    def pause(self) -> None:
        """Stop listening and cut every relayed connection (both ends see the connection close)."""
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        if self._accepter is not None:
            self._accepter.join(2)
            self._accepter = None
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._shut(s)
        threads, self._threads = self._threads, []
        for t in threads:
            t.join(2)

    stop = pause

    # ---- relaying --------------------------------------------------------------------------------
    @staticmethod
    def _shut(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed by pause()
            try:
                server = socket.create_connection(self.upstream, timeout=1.0)
                server.settimeout(None)
            except OSError:
                client.close()  # no broker behind us: the client sees its connection closed
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conn_no += 1
                conn = self._conn_no
                self._socks.update((client, server))
            self._record(TapEvent(time.monotonic(), conn, "open"))
            state: dict[str, int] = {}
            pair = [(client, server, _Parser(self, conn, True, state)),
                    (server, client, _Parser(self, conn, False, state))]
            for src, dst, parser in pair:
                t = threading.Thread(target=self._pump, args=(conn, src, dst, parser), daemon=True,
                                     name=f"tap-{conn}-{'up' if parser.upstream else 'down'}")
                self._threads.append(t)
                t.start()

    def _pump(self, conn: int, src: socket.socket, dst: socket.socket, parser: _Parser) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                try:
                    parser.feed(data)  # before forwarding: a PUBLISH is on record before its PUBACK can be
                except (ValueError, IndexError):
                    parser.buf.clear()  # unparsable: still relay, stop interpreting this chunk
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # one side gone: cut both, as a broker crash would
            self._shut(src)
            self._shut(dst)
            with self._lock:
                gone = src in self._socks
                self._socks.discard(src)
                self._socks.discard(dst)
            src.close()
            if gone:
                self._record(TapEvent(time.monotonic(), conn, "closed"))
