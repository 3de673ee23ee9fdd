"""Operator view of the fleet, from the retained `<prefix>/<device>/status` and `.../model/state`.

    broker (retained) -> collect_status -> DeviceRow per device -> format_table

A row shows what the device serves (model/state's `state` / `name` / `version`, the status topic's
model when model/state is absent) and, beside it, its last update attempt (UPDATE, PROGRESS, ERROR)
and the last manifest it refused (REFUSED). Payloads of agents up to 0.2.0 (where model/state
was the attempt itself) are read as an attempt.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from agent.fleet.push import connect

__all__ = ["DeviceRow", "collect_status", "format_table"]


@dataclass
class DeviceRow:
    device: str
    status: dict[str, Any] = field(default_factory=dict)
    model_state: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> str:
        return str(self.status.get("state", "?"))

    @property
    def new_form(self) -> bool:
        """model/state says what serves, with the attempt beside it (agents 0.3.0 on)."""
        return "last_attempt" in self.model_state or "last_refused" in self.model_state

    @property
    def model(self) -> str:
        ms = self.model_state
        if self.new_form and ms.get("version") is not None:
            served = f"{ms.get('name') or '?'}:{ms['version']}"
            return f"{served} (rolled back)" if ms.get("state") == "rolled_back" else served
        m = self.status.get("model")
        if isinstance(m, dict) and m.get("name"):
            return f"{m.get('name')}:{m.get('version', '?')}"
        return "-"

    @property
    def attempt(self) -> dict[str, Any]:
        """The last update attempt (empty when none was reported)."""
        if not self.new_form:
            return self.model_state
        a = self.model_state.get("last_attempt")
        return a if isinstance(a, dict) else {}

    @property
    def refused(self) -> dict[str, Any]:
        r = self.model_state.get("last_refused") if self.new_form else None
        return r if isinstance(r, dict) else {}

    @property
    def last_seen(self) -> float | None:
        ts = [v.get("ts") for v in (self.status, self.model_state)]
        nums = [float(t) for t in ts if isinstance(t, int | float)]
        return max(nums) if nums else None


def collect_status(host: str, port: int, prefix: str = "edge", timeout: float = 3.0,
                   quiet_s: float = 0.5, tls: ssl.SSLContext | None = None) -> dict[str, DeviceRow]:
    """Read the retained topics: stops `quiet_s` after the last message, or at `timeout`."""
    rows: dict[str, DeviceRow] = {}
    lock = threading.Lock()
    last = [time.monotonic()]
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        rest = msg.topic[len(prefix) + 1:]
        device, _, kind = rest.partition("/")
        if not msg.payload or device == "group":
            return
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        with lock:
            row = rows.setdefault(device, DeviceRow(device))
            if kind == "status":
                row.status = payload
            elif kind == "model/state":
                row.model_state = payload
            last[0] = time.monotonic()

    client = connect(host, port, tls=tls)
    try:
        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.subscribe([(f"{prefix}/+/status", 1), (f"{prefix}/+/model/state", 1)])
        subscribed.wait(5)
        last[0] = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                idle = time.monotonic() - last[0]
            if idle >= quiet_s:
                break
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return dict(sorted(rows.items()))


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    d = max(0.0, now - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    if d < 172800:
        return f"{d / 3600:.0f}h ago"
    return f"{d / 86400:.0f}d ago"


def _ts(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) else None


def format_table(rows: dict[str, DeviceRow], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("DEVICE", "STATUS", "MODEL", "UPDATE", "PROGRESS", "ERROR", "REFUSED", "LAST SEEN")
    lines: list[tuple[str, ...]] = [header]
    for row in rows.values():
        at, ref = row.attempt, row.refused
        upd = str(at.get("state", "-"))
        if at.get("version"):
            upd += f" ({at.get('name') or ''}:{at['version']})"
        prog = at.get("progress")
        refused = f"{ref.get('error')} ({_age(_ts(ref.get('ts')), now)})" if ref else "-"
        lines.append((row.device, row.online, row.model, upd,
                      f"{float(prog) * 100:.0f}%" if isinstance(prog, int | float) else "-",
                      str(at.get("error") or "-"), refused, _age(row.last_seen, now)))
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]
    if not rows:
        out.append("(no device has reported)")
    return "\n".join(out)
