"""The service under a notify socket made by the test: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector


class NotifySocket:
    """A datagram socket standing in for systemd's: records every notification with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in list(self.messages) if m.startswith(prefix)]

    def wait(self, prefix: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(prefix)
            if found:
                return found[0][0]
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} in {timeout} s; got {[m for _, m in self.messages][-10:]}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def notify(tmp_path: Path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def _env(ns: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "1000000", "EDGE_AGENT_TEST_HOOKS": "1"}


def test_ready_watchdog_freeze_and_stop(tmp_path: Path, broker: Broker, notify: NotifySocket) -> None:
    model = fixed_yolov8_model(tmp_path / "m.onnx", [(32, 32, 16, 16, 0, 0.9)])
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@10",
                       service={"stall_s": 2.0, "drain_s": 2})
    col = Collector(broker.host, broker.port, ["edge/dev1/status", "edge/dev1/cam0/detections"])
    agent = AgentProcess(cfg, env=_env(notify))
    try:
        t_ready = notify.wait("READY=1", 60)
        first_det = col.wait_for(lambda m: any(x.topic.endswith("detections") for x in m), timeout=10)
        t_first = next(x.at for x in first_det if x.topic.endswith("detections"))
        # READY comes after the first frame was processed (its detections went to the broker
        # within a few milliseconds of READY; allow for delivery through the broker).
        assert t_ready >= t_first - 0.5
        time.sleep(2.0)
        # READY says the camera streams; the fps follows in STATUS once measured (a second of frames)
        ready_line = [m for _, m in notify.messages if "READY=1" in m or m.startswith("STATUS=")]
        assert any("cam0 streaming" in m for m in ready_line), ready_line
        assert any("cam0" in m and "fps" in m for m in ready_line), ready_line
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        assert len(pings) >= 3, "the watchdog must be fed while frames flow"
        agent.signal(signal.SIGUSR2)  # test hook: the inference thread stops making progress
        time.sleep(5.0)  # stall_s 2 s, then at most one more interval
        frozen_at = time.monotonic() - 5.0
        late = [t for t, _ in notify.lines("WATCHDOG=1") if t > frozen_at + 3.0]
        assert late == [], "watchdog pings went on while the pipeline was stuck"
        assert agent.proc.poll() is None
    finally:
        code = agent.stop()
    assert code == 0, agent.output()
    notify.wait("STOPPING=1", 5)
    col.wait_for(lambda m: json.loads([x for x in m if x.topic.endswith("status")][-1].payload)["state"]
                 == "offline", timeout=10)
    col.close()


def test_no_ready_while_the_camera_delivers_nothing(tmp_path: Path, broker: Broker, notify: NotifySocket) -> None:
    model = fixed_yolov8_model(tmp_path / "m.onnx", [(32, 32, 16, 16, 0, 0.9)])
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "rtsp://127.0.0.1:9/none",
                       cameras=[{"id": "cam0", "source": "rtsp://127.0.0.1:9/none", "open_timeout_s": 1}],
                       telemetry={"period_s": 0.5})
    agent = AgentProcess(cfg, env=_env(notify))
    try:
        notify.wait("STATUS=", 60)
        time.sleep(3.0)
        assert notify.lines("READY=1") == []
        # Waiting on a lost camera is not a hang: the watchdog stays fed (no restart loop).
        assert len(notify.lines("WATCHDOG=1")) >= 2
    finally:
        assert agent.stop() == 0, agent.output()
