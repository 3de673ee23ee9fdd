from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _errors(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "agent.yaml")
    assert cfg.cameras[0].id == "cam0"
    assert cfg.model.path.is_absolute() and cfg.model.path.name == "model.onnx"
    assert cfg.client_id == f"edge-agent-{cfg.device_id}"


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config({"cameras": [{"source": "synthetic:"}]})
    assert cfg.mqtt.topic_prefix == "edge" and cfg.mqtt.detections_qos == 0
    assert cfg.engine.providers[0].name == "CPUExecutionProvider"
    assert cfg.cameras[0].rtsp_transport == "tcp"


def test_every_error_named_with_its_path() -> None:
    errs = _errors({"cameras": [{"source": "synthetic:"}, {"sorce": "x"}],
                    "mqtt": {"port": 70000, "qos": 1}, "model": {"score_threshold": 2}})
    joined = "\n".join(errs)
    assert "cameras[1].source: Field required" in joined
    assert "cameras[1].sorce: unknown key" in joined
    assert "mqtt.port:" in joined and "70000" in joined
    assert "mqtt.qos: unknown key" in joined
    assert "model.score_threshold:" in joined
    assert len(errs) == 5


@pytest.mark.parametrize("data,needle", [
    ({"cameras": []}, "cameras: List should have at least 1 item"),
    ({"cameras": [{"source": "a"}, {"source": "b"}]}, "camera ids must be unique"),
    ({"cameras": [{"source": "a", "reconnect": {"initial_s": 5, "max_s": 1}}]}, "max_s must be >= initial_s"),
    ({"cameras": [{"source": "a"}], "model": {"class_thresholds": {"dent": 1.5}}}, "threshold of 'dent'"),
    ({"cameras": [{"source": "a"}], "mqtt": {"tls": {"cert_file": "c.pem"}}}, "given together"),
    ({"cameras": [{"source": "a"}], "engine": {"providers": [{"name": "FooEP"}]}}, "engine.providers[0].name"),
    ({"cameras": [{"source": "a"}], "device_id": "a/b"}, "device_id"),
    ([1, 2], "expected a mapping"),
    ({"cameras": [{"source": "rtsp://h/x", "rtsp_transport": "http"}]}, "cameras[0].rtsp_transport"),
])
def test_bad_configs(data: object, needle: str) -> None:
    assert any(needle in e for e in _errors(data)), _errors(data)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("cameras:\n  - source: x\n   bad: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "line" in info.value.errors[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolved_from_config_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "a.yaml"
    p.write_text("cameras: [{source: clip.mp4}, {id: c2, source: 'synthetic:'}]\nmodel: {path: m.onnx}\n")
    cfg = load_config(p)
    assert cfg.model.path == tmp_path / "sub" / "m.onnx"
    assert cfg.cameras[0].source == str(tmp_path / "sub" / "clip.mp4")
    assert cfg.cameras[1].source == "synthetic:"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=60)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = _cli("check-config", "-c", str(ROOT / "config" / "agent.yaml"))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras: [{source: x, fps: -1}]\nmqtt: {hots: a}\n")
    res = _cli("check-config", "-c", str(bad))
    assert res.returncode == 2
    assert "cameras[0].fps:" in res.stderr and "mqtt.hots: unknown key" in res.stderr


def test_schema_is_json() -> None:
    res = _cli("check-config", "--schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert "cameras" in schema["properties"]
    assert schema["$defs"]["CameraConfig"]["properties"]["source"]["description"]
