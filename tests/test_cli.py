"""`edge-agent` on bad input, through the real console script: one clear message, the documented
exit code (2 for usage and config mistakes), never a traceback; and what a first user meets:
`demo | head`, `demo --mqtt`, `check-config` on files that do not fit, the schema's defaults, the
ready line and the "online" status of a starting service."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.broker import Broker, free_port
from tests.support.cli import ROOT, assert_clean, edge_agent, entry_point
from tests.support.mqtt import Collector

DEMO = ROOT / "agent" / "data" / "demo"


def _config(tmp_path: Path, name: str = "agent.yaml", *, model: str = "", camera: str = "",
            mqtt: str = "{enabled: false}") -> Path:
    """A config on the demo clip and model, writing only under tmp_path; `model` / `camera` add keys."""
    p = tmp_path / name
    p.write_text(
        f"device_id: clitest\n"
        f"cameras: [{{source: {camera or DEMO / 'sample.mp4'}}}]\n"
        f"model: {{path: {DEMO / 'model.onnx'}{', ' + model if model else ''}}}\n"
        f"mqtt: {mqtt}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        f"updates: {{enabled: false, models_dir: {tmp_path / 'models'}}}\n"
        f"service: {{watchdog: false}}\n"
    )
    return p


# ---- bad input: every subcommand ------------------------------------------------------------------

BAD_ARGS = [
    (["run", "-c", "/nonexistent.yaml"], 2, "cannot read"),
    (["run", "-c", "/etc"], 2, "Is a directory"),
    (["run", "-c", "CFG", "--max-frames", "0"], 2, "--max-frames"),
    (["run", "-c", "CFG", "--max-frames", "x"], 2, "--max-frames"),
    (["run", "-c", "CFG", "--duration", "-1"], 2, "--duration"),
    (["run", "-c", "CFG", "--duration", "nan"], 2, "--duration"),
    (["check-config"], 2, "-c FILE"),
    (["check-config", "-c", "/etc/passwd"], 2, "expected a mapping"),
    (["check-config", "-c", "BADYAML"], 2, "YAML syntax error"),
    (["demo", "--mqtt", "127.0.0.1:abc"], 2, "--mqtt"),
    (["demo", "--mqtt", "127.0.0.1:70000"], 2, "--mqtt"),
    (["demo", "--mqtt", ":1883"], 2, "--mqtt"),
    (["demo", "--duration", "0"], 2, "--duration"),
    (["demo", "--max-frames", "-5"], 2, "--max-frames"),
    (["bench", "--frames", "0"], 2, "--frames"),
    (["bench", "--frames", "-3"], 2, "--frames"),
    (["bench", "--frames", "1.5"], 2, "--frames"),
    (["bench", "--size", "10x"], 2, "--size"),
    (["bench", "--size", "0x0"], 2, "--size"),
    (["bench", "--model", "/nonexistent.onnx"], 2, "--model"),
    (["bench", "--video", "/nonexistent.mp4"], 2, "--video"),
    (["bench", "--clip", "/nonexistent.mp4"], 2, "--clip"),
    (["bench", "--clip", "/etc/passwd"], 2, "--clip: cannot decode a frame"),
    (["bench", "--streams", "1", "--clip", "/etc/passwd"], 2, "--clip: cannot decode a frame"),
    (["bench", "-c", "/nonexistent.yaml"], 2, "-c"),
    (["bench", "-c", "BADYAML"], 2, "YAML syntax error"),
    (["bench", "--json", "/nonexistent-dir/out.json"], 2, "--json"),
    (["bench", "--streams", "1", "--fps", "0"], 2, "--fps"),
    (["bench", "--streams", "1", "--seconds", "-1"], 2, "--seconds"),
    (["build-engine", "/nonexistent.onnx"], 2, "model not found"),
    (["build-engine", "/etc/passwd", "--cache-dir", "TMP/cache"], 2, "cannot read ONNX model"),
    (["build-engine", str(DEMO / "model.onnx"), "--cache-dir", "/etc/passwd"], 2, "not writable"),
    (["build-engine", str(DEMO / "model.onnx"), "-c", "BADYAML"], 2, "YAML syntax error"),
    (["cache", "list", "-c", "BADYAML"], 2, "YAML syntax error"),
    (["nonsense"], 2, "invalid choice"),
]


@pytest.mark.parametrize(("args", "code", "needle"), BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS])
def test_bad_input_gives_a_message_not_a_traceback(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    cfg = _config(tmp_path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cameras: [\n  - {source: x\n")
    subst = {"CFG": str(cfg), "BADYAML": str(bad_yaml)}
    argv = [subst.get(a, a.replace("TMP", str(tmp_path))) for a in args]
    assert_clean(edge_agent(*argv, timeout=60), code, needle)


# ---- point 2: a closed stdout ---------------------------------------------------------------------

def test_demo_into_head_stops_at_once_and_quietly() -> None:
    """`edge-agent demo | head -2`: the reader leaves after two lines; the demo (6 s of paced video)
    stops at once, exit 0, and says nothing about the broken pipe."""
    proc = subprocess.Popen([entry_point(), "demo"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = [proc.stdout.readline() for _ in range(2)]
    assert all(line.startswith(b'{"seq":') for line in first), first
    proc.stdout.close()  # what head does after its lines
    closed = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - closed
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "BrokenPipe" not in text, text
    assert took < 3.0, f"demo ran on {took:.1f} s after its reader left"


def test_schema_printed_into_a_closed_pipe_is_quiet() -> None:
    res = subprocess.run(f"'{entry_point()}' check-config --schema | head -c 10", shell=True, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.stdout.startswith("{")
    assert "Traceback" not in res.stderr, res.stderr


# ---- point 6: the demo's broker -------------------------------------------------------------------

def test_demo_unreachable_broker_fails_with_the_reason() -> None:
    port = free_port()  # nothing listens there
    res = edge_agent("demo", "--mqtt", f"127.0.0.1:{port}", timeout=60)
    assert_clean(res, 1, f"--mqtt 127.0.0.1:{port}", "Connection refused")
    assert res.stdout == ""  # said before the first frame


def test_demo_unknown_broker_host_fails_with_the_reason() -> None:
    res = edge_agent("demo", "--mqtt", "no-such-host.invalid:1883", timeout=60)
    assert_clean(res, 1, "no-such-host.invalid:1883", "cannot reach the broker")


def test_demo_to_a_broker_publishes_online_once(broker: Broker) -> None:
    """Point 8: "online" once at start (it was published at start and again at connect), then offline."""
    col = Collector(broker.host, broker.port, ["edge/demo/status"])
    try:
        res = edge_agent("demo", "--mqtt", f"{broker.host}:{broker.port}", "--fast", "--max-frames", "20")
        assert_clean(res, 0)
        assert res.stdout.count('"seq"') == 20
        msgs = col.wait_for(lambda ms: any(b'"offline"' in m.payload for m in ms))
    finally:
        col.close()
    states = [json.loads(m.payload)["state"] for m in msgs]
    assert states == ["online", "offline"], states


# ---- point 5: files that do not fit ----------------------------------------------------------------

CONFIG_MISTAKES = [
    ({"model": "path: missing.onnx"}, "model.path: file not found"),
    ({"model": "path: /etc/passwd"}, "model.path: not a readable ONNX model"),
    ({"camera": "missing.mp4"}, "cameras[0].source: video file not found"),
    ({"camera": "'foo://camera'"}, "cameras[0].source: unknown camera source scheme"),
    ({"model": "decoder: end2end"}, "model.decoder:"),
    ({"model": "decoder: yolov5"}, "model.decoder:"),
    ({"model": "labels: [a, b, c]"}, "model.labels:"),
    ({"model": "labels: missing-labels.txt"}, "model.labels: cannot read labels file"),
]


@pytest.mark.parametrize(("keys", "needle"), CONFIG_MISTAKES,
                         ids=[n.split(":")[0] + str(k) for k, n in CONFIG_MISTAKES])
def test_check_config_and_run_refuse_files_that_do_not_fit(tmp_path: Path, keys: dict[str, str], needle: str) -> None:
    cfg = _config(tmp_path, **keys)
    assert_clean(edge_agent("check-config", "-c", str(cfg)), 2, needle)
    # run exits 2 as well (RestartPreventExitStatus=2: no restart loop on a config mistake)
    assert_clean(edge_agent("run", "-c", str(cfg), "--max-frames", "1"), 2, needle)


def test_check_config_accepts_the_fitting_config(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("part\nscratch\ndent\nmissing_hole\n")
    cfg = _config(tmp_path, model="labels: labels.txt, decoder: yolov8")
    res = edge_agent("check-config", "-c", str(cfg))
    assert_clean(res, 0)
    assert "ok" in res.stdout


# ---- point 7: the schema's defaults ------------------------------------------------------------------

def test_schema_shows_the_real_reconnect_defaults() -> None:
    res = edge_agent("check-config", "--schema")
    assert_clean(res, 0)
    schema = json.loads(res.stdout)
    defs = schema["$defs"]

    def backoff_of(model: str) -> dict[str, float]:
        ref = defs[model]["properties"]["reconnect"]["$ref"].rsplit("/", 1)[-1]
        return {k: v["default"] for k, v in defs[ref]["properties"].items()}

    assert backoff_of("CameraConfig") == {"initial_s": 0.25, "max_s": 0.5, "jitter": 0.2}
    assert backoff_of("MqttConfig") == {"initial_s": 0.2, "max_s": 1.0, "jitter": 0.2}


# ---- point 8: the ready line -------------------------------------------------------------------------

def test_ready_line_reports_the_video_rate(tmp_path: Path) -> None:
    """The demo clip is 15 fps, paced as live: the ready line says about 15 (it said 0.0, 21 or 31)."""
    res = edge_agent("--log-level", "info", "run", "-c", str(_config(tmp_path)), "--max-frames", "45")
    assert_clean(res, 0)
    m = re.search(r"ready: .*cam0 streaming ([0-9.]+) fps", res.stderr)
    assert m is not None, res.stderr[-2000:]
    assert 10.0 <= float(m.group(1)) <= 19.0, m.group(0)  # the old line said 0.0, 21 or 31
