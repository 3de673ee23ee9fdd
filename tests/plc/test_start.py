"""start_plc: when a later PLC component fails to start, the ones already started are closed, last first.

The components are the real ones: the counting component (it saves its counters file when closed),
the commissioning HTTP endpoint (a real loopback server and thread), and the Sparkplug node, whose
start fails for real on a password file it cannot read. The one double is the host: a Service
would need a model and camera pipelines, which start_plc does not touch; `_Host` gives the few
things the components ask of the service (config, topics, listener registration).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config
from agent.errors import ConfigError
from agent.mqtt.client import MqttClient
from agent.mqtt.topics import Topics
from agent.plc import start_plc
from agent.plc.counting_service import CountingComponent
from agent.plc.snapshot import CommissioningServer
from tests.support.broker import free_port

LINE = {"name": "l1", "points": [[80, 0], [80, 120]], "direction": "left_to_right", "labels": ["part"]}


class _Host:
    """Test double of agent.service.Service as a PlcHost (see the module docstring for why)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.mqtt: MqttClient | None = None
        self.events: list[tuple[str, dict[str, object] | None]] = []
        self.listeners: dict[str, list[Callable[[Any], None]]] = {}

    def emit(self, name: str, data: dict[str, object] | None = None) -> None:
        self.events.append((name, data))

    def add_result_listener(self, camera_id: str, sink: Callable[[Any], None]) -> None:
        self.listeners.setdefault(camera_id, []).append(sink)

    def add_result_step(self, camera_id: str, step: Callable[[Any], None]) -> None:
        self.listeners.setdefault(camera_id, []).append(step)

    def camera_state(self, camera_id: str) -> str:
        return "streaming"

    def latest_image(self, camera_id: str) -> Any:
        return None

    def model_labels(self, camera_id: str) -> list[str]:
        return ["part"]


def make_cfg(tmp: Path, http_port: int, password_file: Path) -> AgentConfig:
    return parse_config({
        "device_id": "dev1",
        "cameras": [{"id": "cam0", "source": "synthetic:160x120@10",
                     "counting": {"lines": [LINE], "state_file": str(tmp / "counters-cam0.json")}}],
        "mqtt": {"host": "127.0.0.1", "port": free_port(), "username": "dev1", "password_file": str(password_file)},
        "updates": {"enabled": False, "models_dir": str(tmp / "models")},
        "service": {"watchdog": False},
        "commissioning": {"http_port": http_port},
        "sparkplug": {"enabled": True, "group_id": "Line 1", "state_file": str(tmp / "sp.json")},
    })


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "commissioning-http" and t.is_alive()]


def test_a_failed_start_closes_what_started_before(tmp_path: Path) -> None:
    port = free_port()
    unreadable = tmp_path / "password"
    unreadable.mkdir()  # a folder: reading it fails (IsADirectoryError), as for an unreadable file
    before = http_threads()
    host = _Host(make_cfg(tmp_path, port, unreadable))
    with pytest.raises(ConfigError, match="password_file"):
        start_plc(host)
    # the commissioning endpoint had started (it registered its listener) and is closed again
    assert not listening(port)
    assert http_threads() == before
    # the counting component was closed too: closing saves its counters
    assert (tmp_path / "counters-cam0.json").is_file()


def test_closed_last_first_and_a_failing_close_does_not_hide_the_start_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the real components, their close() wrapped to record the order; the endpoint's close raises
    # after closing, to show that the others are still closed and the start error is what surfaces
    closed: list[str] = []
    counting_close, server_close = CountingComponent.close, CommissioningServer.close

    def record_counting(self: CountingComponent) -> None:
        closed.append(self.name)
        counting_close(self)

    def record_server(self: CommissioningServer) -> None:
        closed.append(self.name)
        server_close(self)
        raise RuntimeError("close failed")

    monkeypatch.setattr(CountingComponent, "close", record_counting)
    monkeypatch.setattr(CommissioningServer, "close", record_server)
    port = free_port()
    unreadable = tmp_path / "password"
    unreadable.mkdir()
    with caplog.at_level(logging.ERROR, logger="agent.plc"), pytest.raises(ConfigError, match="password_file"):
        start_plc(_Host(make_cfg(tmp_path, port, unreadable)))
    assert closed == ["commissioning", "counting/cam0"]
    assert not listening(port)
    assert any("closing commissioning after a failed PLC start failed" in r.getMessage() for r in caplog.records)
