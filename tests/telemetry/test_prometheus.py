"""The Prometheus exporter, read back over a real HTTP GET on loopback."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from agent.errors import ConfigError
from agent.telemetry.prometheus import PrometheusExporter, flatten
from tests.support.broker import free_port

SNAPSHOT = {
    "ts": 1763812345.1, "uptime_s": 12.5, "fps": 29.5, "frames_dropped": 3,
    "cameras": [{"camera": "cam0", "fps": 29.5, "camera_state": "streaming",
                 "latency_ms": {"e2e": {"p50": 6.8, "p99": 9.1}}, "model": {"name": "demo", "version": "3"}}],
    "mqtt": {"connected": True, "queued": 0},
    "model": {"name": "demo", "version": "3"},
    "system": {"cpu_percent": {"process": 12.5, "system": 40.0}, "load": {"1m": 0.5},
               "disks": [{"path": "/var/cache/edge-agent/engines", "free_mb": 900.0}],
               "gpu": {"util_percent": 34.5, "name": "Orin"}, "temperatures_c": {"tj-thermal": 46.9}},
}


def test_flatten() -> None:
    got = {(n, lbl): v for n, lbl, v in flatten(SNAPSHOT)}
    assert got[("fps", ())] == 29.5
    assert got[("mqtt_connected", ())] == 1.0
    assert got[("cameras_latency_ms_e2e_p99", (("camera", "cam0"),))] == 9.1
    assert got[("system_load_1m", ())] == 0.5
    assert got[("system_temperatures_c_tj_thermal", ())] == 46.9
    assert got[("system_disks_free_mb", (("path", "/var/cache/edge-agent/engines"),))] == 900.0
    assert not any("name" in n or "version" in n or "state" in n for n, _ in got)  # strings left out


def test_metrics_over_http() -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client not installed (extra `metrics`)")
    port = free_port()
    exp = PrometheusExporter(port, addr="127.0.0.1")
    try:
        exp.update(SNAPSHOT)
        exp.update({**SNAPSHOT, "fps": 30.0})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
    finally:
        exp.close()
    lines = set(body.splitlines())
    assert "edge_agent_fps 30.0" in lines
    assert "edge_agent_mqtt_connected 1.0" in lines
    assert 'edge_agent_cameras_fps{camera="cam0"} 29.5' in lines
    assert 'edge_agent_cameras_latency_ms_e2e_p50{camera="cam0"} 6.8' in lines
    assert "edge_agent_system_gpu_util_percent 34.5" in lines
    assert "# TYPE edge_agent_fps gauge" in lines


def test_clear_error_when_the_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"prometheus_port.*pip install 'edge-agent\[metrics\]'"):
        PrometheusExporter(9100)
