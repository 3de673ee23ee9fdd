"""systemd notification protocol (sd_notify) and a progress-aware watchdog.

`Notifier` uses `systemd.daemon.notify` where systemd-python is importable; otherwise it speaks the
protocol itself: one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``
(a leading ``@`` means the abstract namespace). That needs no library, so it also works inside a
container. Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a cheap no-op.

`Watchdog` pings ``WATCHDOG=1`` every half ``WatchdogSec`` but only while every registered stage
made progress recently: a live thread is not a live pipeline. When a stage stalls it says which one
and stops pinging, so systemd kills the service (``Result=watchdog``) and ``Restart=`` brings it
back.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_SendFn = Callable[[str], bool]


def _systemd_notify() -> _SendFn | None:
    """`systemd.daemon.notify` if systemd-python is really installed, else None.

    (A plain ``import systemd`` can succeed on a namespace package, e.g. the repository's own
    ``systemd/`` folder when run from the source tree, hence the explicit sub-module import.)
    """
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    fn = getattr(daemon, "notify", None)
    if fn is None:
        return None

    def send(message: str) -> bool:
        return bool(fn(message))

    return send


class Notifier:
    """Sends sd_notify messages; a no-op when not run under systemd (no ``$NOTIFY_SOCKET``).

    `socket_path` defaults to ``$NOTIFY_SOCKET``; `use_library` False forces the built-in protocol
    (True/None: systemd-python when importable). `status()` is rate-limited: systemd rate-limits
    notifications, so an unchanged text is never resent and a changed one at most once every
    `status_min_interval_s` (the latest pending text is flushed when that interval ends).
    """

    def __init__(self, socket_path: str | None = None, *, use_library: bool | None = None,
                 status_min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.socket_path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET") or None
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._status_min_interval_s = status_min_interval_s
        self._last_status: str | None = None
        self._last_status_at = float("-inf")
        self._pending_status: str | None = None
        self._status_timer: threading.Timer | None = None
        self._last_extend_at = float("-inf")
        self._last_extend_s = 0.0
        self._library: _SendFn | None = None
        if self.socket_path and use_library is not False and socket_path is None:
            # The library reads $NOTIFY_SOCKET itself: only usable when we did not override the path.
            self._library = _systemd_notify()
        self.sent = 0
        self.failed = 0

    # ---- transport ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    @property
    def backend(self) -> str:
        if not self.enabled:
            return "off"
        return "systemd-python" if self._library is not None else "socket"

    def notify(self, message: str) -> bool:
        """Send one raw notification (``KEY=VALUE`` lines); True when it was delivered."""
        if not self.socket_path:
            return False
        try:
            ok = self._library(message) if self._library is not None else self._send_socket(message)
        except OSError as exc:
            ok = False
            log.debug("sd_notify %r failed: %s", message, exc)
        with self._lock:
            if ok:
                self.sent += 1
            else:
                self.failed += 1
        return ok

    def _send_socket(self, message: str) -> bool:
        assert self.socket_path is not None
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif not addr.startswith("/"):
            # systemd >= 253 also allows vsock:CID:PORT; not needed on a Jetson's own systemd.
            log.debug("unsupported NOTIFY_SOCKET address %r", addr)
            return False
        data = message.encode("utf-8")
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock = self._sock
            return sock.sendto(data, addr) == len(data)

    def close(self) -> None:
        with self._lock:
            if self._status_timer is not None:
                self._status_timer.cancel()
                self._status_timer = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ---- messages -------------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up finished), with a STATUS line when given."""
        msg = "READY=1"
        if status is not None:
            status = _one_line(status)
            msg += f"\nSTATUS={status}"
            with self._lock:
                self._note_status_sent(status)
        return self.notify(msg)

    def status(self, text: str) -> bool:
        """STATUS=text, rate-limited (see the class doc); True when sent now."""
        text = _one_line(text)
        with self._lock:
            if not self.socket_path or text == self._last_status:
                self._pending_status = None
                return False
            now = self._clock()
            wait = self._last_status_at + self._status_min_interval_s - now
            if wait > 0:
                self._pending_status = text
                if self._status_timer is None:
                    self._status_timer = threading.Timer(wait, self._flush_status)
                    self._status_timer.name = "sd-status"  # not "Thread-N": CPU per thread is grouped by name
                    self._status_timer.daemon = True
                    self._status_timer.start()
                return False
            self._note_status_sent(text)
        return self.notify(f"STATUS={text}")

    def _note_status_sent(self, text: str) -> None:  # caller holds the lock
        self._last_status = text
        self._last_status_at = self._clock()
        self._pending_status = None

    def _flush_status(self) -> None:
        with self._lock:
            self._status_timer = None
            text = self._pending_status
            if text is None or text == self._last_status:
                return
            self._note_status_sent(text)
        self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: keep-alive ping (send every `watchdog_interval() / 2`)."""
        return self.notify("WATCHDOG=1")

    def trigger_watchdog(self) -> bool:
        """WATCHDOG=trigger: a fatal error; systemd acts as if the watchdog expired (restart now)."""
        return self.notify("WATCHDOG=trigger")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more from now (start, reload or stop timeout).

        Repeated calls within a second asking no more than the last extension are skipped.
        """
        usec = max(1, int(seconds * 1_000_000))
        with self._lock:
            now = self._clock()
            if now - self._last_extend_at < min(1.0, seconds / 2) and seconds <= self._last_extend_s:
                return False
            self._last_extend_at, self._last_extend_s = now, seconds
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (Type=notify-reload, systemd >= 253, wants both)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def ready_after_reload(self, status: str | None = None) -> bool:
        """READY=1 after a reload finished."""
        return self.ready(status)

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    # ---- environment ----------------------------------------------------------------------------
    @staticmethod
    def watchdog_interval(environ: Any = None) -> float | None:
        """WatchdogSec in seconds from ``$WATCHDOG_USEC``, or None when off or meant for another pid.

        Ping at half of it. ``$WATCHDOG_PID``, when set, must be this process (sd_watchdog_enabled).
        """
        env = os.environ if environ is None else environ
        raw = env.get("WATCHDOG_USEC")
        if not raw:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    """A STATUS value must not contain a newline (it would start another KEY=VALUE)."""
    return " ".join(str(text).split())


class Watchdog:
    """Feeds the systemd watchdog only while every registered stage makes progress.

    Probes return the monotonic time of their stage's last progress. Every `interval_s` (default:
    half of ``$WATCHDOG_USEC``) the watchdog pings if no probe is older than `stall_s`; otherwise
    it logs which stages are stuck, puts it in STATUS and stops pinging until they recover, so
    systemd kills and restarts the service when WatchdogSec passes without a ping.
    """

    def __init__(self, notifier: Notifier, stall_s: float = 10.0, interval_s: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_stall: Callable[[list[str]], None] | None = None) -> None:
        if interval_s is None:
            wd = notifier.watchdog_interval()
            interval_s = wd / 2 if wd is not None else None
        self.notifier = notifier
        self.stall_s = stall_s
        self.interval_s = interval_s
        self.on_stall = on_stall
        self._clock = clock
        self._probes: dict[str, Callable[[], float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalled: list[str] = []
        self.pings = 0

    def add_probe(self, name: str, last_progress: Callable[[], float]) -> None:
        with self._lock:
            self._probes[name] = last_progress

    def remove_probe(self, name: str) -> None:
        with self._lock:
            self._probes.pop(name, None)

    def ages(self) -> dict[str, float | None]:
        """Seconds since each stage's last progress (None: its probe raised)."""
        now = self._clock()
        with self._lock:
            probes = list(self._probes.items())
        out: dict[str, float | None] = {}
        for name, probe in probes:
            try:
                out[name] = now - float(probe())
            except Exception:
                log.exception("watchdog probe %s failed", name)
                out[name] = None
        return out

    def check(self) -> list[str]:
        """Names of the stages without progress for more than `stall_s` (a probe that raises counts)."""
        return [name for name, age in self.ages().items() if age is None or age > self.stall_s]

    def tick(self) -> bool:
        """One round: ping if all stages progress; True when it pinged."""
        ages = self.ages()
        stuck = [name for name, age in ages.items() if age is None or age > self.stall_s]
        if stuck:
            if stuck != self.stalled:
                detail = ", ".join(f"{n} ({'probe failed' if ages[n] is None else f'{ages[n]:.1f} s'})"
                                   for n in stuck)
                log.error("watchdog: no progress in %s (limit %.1f s): pings stop, systemd will restart "
                          "the service", detail, self.stall_s)
                self.notifier.status(f"stalled: {detail}")
                if self.on_stall is not None:
                    self.on_stall(stuck)
            self.stalled = stuck
            return False
        if self.stalled:
            log.warning("watchdog: stages progress again (were stuck: %s); pings resume", ", ".join(self.stalled))
            self.stalled = []
        self.notifier.watchdog()
        self.pings += 1
        return True

    def start(self) -> None:
        if self.interval_s is None:
            log.info("watchdog: not enabled by systemd (no WATCHDOG_USEC for this process); not started")
            return
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.interval_s is not None
        while True:
            try:
                self.tick()
            except Exception:  # the watchdog thread must never die silently while pinging is expected
                log.exception("watchdog tick failed")
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


__all__ = ["Notifier", "Watchdog"]
