"""sd_notify over a real AF_UNIX datagram socket (a file path and an abstract one), as systemd sees it."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, Watchdog


class Listener:
    """The manager's side of NOTIFY_SOCKET: collects every datagram."""

    def __init__(self, address: str) -> None:
        self.address = address  # as written into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def take(self) -> list[str]:
        time.sleep(0.1)  # datagrams are delivered at once; give the reader thread its turn
        with self._lock:
            out, self.messages = self.messages, []
        return out

    def wait_for(self, pred: object, timeout: float = 3.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(pred(m) for m in self.messages):  # type: ignore[operator]
                    return list(self.messages)
            time.sleep(0.01)
        raise AssertionError(f"no matching message in {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    if request.param == "path":
        d = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: AF_UNIX paths are limited to 108 bytes
        addr = str(d / "notify")
    else:
        addr = f"@edge-agent-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lst = Listener(addr)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    try:
        yield lst
    finally:
        lst.close()
        if request.param == "path":
            Path(addr).unlink(missing_ok=True)
            Path(addr).parent.rmdir()


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.backend == "off"
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.status("y") is False
    assert n.sent == 0 and n.failed == 0


@pytest.mark.parametrize("use_library", [None, False])
def test_exact_messages(listener: Listener, use_library: bool | None) -> None:
    n = Notifier(use_library=use_library)
    assert n.enabled
    assert n.ready("demo v1; cam0 streaming 30 fps")
    n.watchdog()
    n.trigger_watchdog()
    n.extend_timeout(90)
    n.ready_after_reload()
    n.stopping()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msgs = listener.take()
    assert msgs[:6] == [
        "READY=1\nSTATUS=demo v1; cam0 streaming 30 fps",
        "WATCHDOG=1",
        "WATCHDOG=trigger",
        "EXTEND_TIMEOUT_USEC=90000000",
        "READY=1",
        "STOPPING=1",
    ]
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", msgs[6])
    assert m, msgs[6]
    assert before <= int(m.group(1)) <= after
    assert len(msgs) == 7
    assert n.sent == 7 and n.failed == 0
    n.close()


def test_status_is_one_line_and_rate_limited(listener: Listener) -> None:
    n = Notifier(status_min_interval_s=0.3)
    assert n.status("starting\nengine")  # a newline would start another KEY=VALUE line
    assert not n.status("starting engine")  # unchanged: never resent
    assert not n.status("building 10%")  # changed, but too soon: pending
    assert not n.status("building 20%")  # replaces the pending one
    assert listener.take() == ["STATUS=starting engine"]
    msgs = listener.wait_for(lambda m: m.startswith("STATUS=building"))
    assert msgs == ["STATUS=building 20%"]  # the latest pending text, flushed when the interval ended
    listener.take()
    time.sleep(0.35)
    assert n.status("running")  # the interval passed: sent at once
    assert listener.take() == ["STATUS=running"]
    n.close()


def test_extend_timeout_repeats_are_coalesced(listener: Listener) -> None:
    n = Notifier()
    assert n.extend_timeout(60)
    assert not n.extend_timeout(60)  # the previous extension still covers it
    assert n.extend_timeout(120)  # asks for more: sent
    assert listener.take() == ["EXTEND_TIMEOUT_USEC=60000000", "EXTEND_TIMEOUT_USEC=120000000"]


def test_unreachable_socket_counts_a_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    n = Notifier(use_library=False)
    assert n.watchdog() is False
    assert n.failed == 1


def test_watchdog_interval_from_environment() -> None:
    me = str(os.getpid())
    assert Notifier.watchdog_interval({}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not ours
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Watchdog(Notifier("")).interval_s == 1.5
    monkeypatch.delenv("WATCHDOG_USEC")
    wd = Watchdog(Notifier(""))
    assert wd.interval_s is None
    wd.start()  # no watchdog asked for: no thread
    assert wd._thread is None


def test_watchdog_stops_pinging_when_a_stage_stalls(listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.sdnotify")
    n = Notifier(status_min_interval_s=0.0)
    infer_progress = [time.monotonic()]
    frozen = threading.Event()

    def infer() -> float:
        if not frozen.is_set():
            infer_progress[0] = time.monotonic()
        return infer_progress[0]

    wd = Watchdog(n, stall_s=0.3, interval_s=0.05)
    wd.add_probe("capture-cam0", time.monotonic)
    wd.add_probe("infer-cam0", infer)
    wd.start()
    try:
        time.sleep(0.3)
        assert listener.take().count("WATCHDOG=1") >= 3
        frozen.set()
        msgs = listener.wait_for(lambda m: m.startswith("STATUS=stalled"))
        status = [m for m in msgs if m.startswith("STATUS=")]
        assert "infer-cam0" in status[0] and "capture-cam0" not in status[0]
        listener.take()
        time.sleep(0.4)
        assert "WATCHDOG=1" not in listener.take()  # no pings while stuck: systemd will restart us
        assert wd.stalled == ["infer-cam0"]
        assert any("infer-cam0" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        frozen.clear()  # progress again: pings resume
        listener.wait_for(lambda m: m == "WATCHDOG=1")
        assert wd.stalled == []
    finally:
        wd.stop()
        n.close()


def test_failing_probe_counts_as_stalled() -> None:
    def broken() -> float:
        raise RuntimeError("boom")

    wd = Watchdog(Notifier(""), stall_s=1.0, interval_s=1.0)
    wd.add_probe("ok", time.monotonic)
    wd.add_probe("broken", broken)
    assert wd.check() == ["broken"]
    assert wd.tick() is False
    wd.remove_probe("broken")
    assert wd.tick() is True
