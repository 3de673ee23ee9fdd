"""The commissioning view: `edge-agent snapshot` (real file decoding, the demo model) and the local
HTTP endpoint of a running service (real sockets)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from agent.cli import main
from agent.config import parse_config
from agent.plc.snapshot import draw_overlay
from agent.service import Service
from agent.vision.types import Detection
from scripts import scenes
from tests.support.broker import free_port

COUNTING = {"anchor": "center",
            "lines": [{"name": "l1", "points": [[320, 0], [320, 360]], "labels": ["part"]}],
            "zones": [{"name": "right", "polygon": [[330, 0], [640, 0], [640, 360], [330, 360]]}]}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "steady.avi"
    scenes.write_counting_clip(path, scenes.CountingClip("steady", [(3, 0.0), (30, 8.0)]), 5)
    return path


def write_cfg(tmp_path: Path, source: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "device_id": "dev1",
        "cameras": [{"id": "cam0", "source": str(source), "pace": False,
                     "counting": {**COUNTING, "state_file": str(tmp_path / "counters.json")}}],
        "engine": {"intra_op_threads": 1, "warmup_runs": 1},
        "mqtt": {"enabled": False}, "updates": {"enabled": False}, "service": {"watchdog": False},
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overlay_draws_on_a_copy() -> None:
    img = np.zeros((360, 640, 3), np.uint8)
    cfg = parse_config({"cameras": [{"source": "x.mp4", "counting": COUNTING}]}).cameras[0].counting
    out = draw_overlay(img, cfg, [Detection(0, "part", 0.9, (100, 100, 200, 180))], [7],
                       {"line/l1/in": 3, "line/l1/out": 1, "zone/right/count": 2})
    assert img.max() == 0 and out.shape == img.shape
    assert out[100, 150].any() and out[180, 320].any()  # the box's top edge, the line
    assert out[10:350, 330:640].any()  # the zone's fill


def test_snapshot_cli_writes_the_picture(tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, clip)
    (tmp_path / "counters.json").write_text(json.dumps(
        {"version": 1, "camera": "cam0", "seq": 4, "lines": {"l1": {"in": {"part": 4}, "out": {}}}}))
    out = tmp_path / "snap.jpg"
    assert main(["snapshot", "-c", str(cfg), "-o", str(out), "--frames", "4"]) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (360, 640, 3)
    said = capsys.readouterr().out
    assert "640x360" in said and "tracked" in said
    n_tracked = int(said.split(", ")[-1].split()[0])
    assert n_tracked >= 1  # after 4 frames the plates have track ids


@pytest.mark.parametrize(("args", "needle"), [
    (["--camera", "nope"], "no camera 'nope'"),
    (["-o", "{tmp}/x.png"], "must end in .jpg"),
    (["-o", "{tmp}/missing/x.jpg"], "does not exist"),
    (["--frames", "0"], None),
])
def test_snapshot_bad_inputs_are_clear_errors(tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str], needle: str | None) -> None:
    cfg = write_cfg(tmp_path, clip)
    argv = ["snapshot", "-c", str(cfg), "-o", str(tmp_path / "a.jpg")]
    argv += [a.format(tmp=tmp_path) for a in args]
    if needle is None:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "frames must be 1..300" in capsys.readouterr().err
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_snapshot_of_a_camera_that_cannot_open_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, tmp_path / "nowhere.avi")
    assert main(["snapshot", "-c", str(cfg), "-o", str(tmp_path / "a.jpg")]) == 1
    err = capsys.readouterr().err
    assert "nowhere.avi" in err and "Traceback" not in err


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def test_http_endpoint_serves_picture_and_counters(tmp_path: Path, clip: Path) -> None:
    port = free_port()
    path = write_cfg(tmp_path, clip, commissioning={"http_port": port})
    from agent.config import load_config

    svc = Service(load_config(path), use_cache=False)
    svc.start()
    try:
        assert all(p.finished.wait(60) for p in svc.pipelines)
        base = f"http://127.0.0.1:{port}"
        code, body, ctype = _get(f"{base}/counters")
        assert code == 200 and ctype == "application/json"
        data = json.loads(body)
        assert set(data["cam0"]["counters"]) == {"line/l1/in", "line/l1/out", "zone/right/count"}
        assert data["cam0"]["counters"]["line/l1/in"] >= 1
        assert data["cam0"]["per_label"]["lines"]["l1"]["in"]["part"] >= 1
        code, body, ctype = _get(f"{base}/snapshot.jpg?camera=cam0")
        assert code == 200 and ctype == "image/jpeg"
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (360, 640, 3)
        code, body, _ = _get(f"{base}/snapshot.jpg?camera=nope")
        assert code == 404 and "no camera 'nope'" in json.loads(body)["error"]
        code, body, _ = _get(f"{base}/secrets")
        assert code == 404
        assert svc.telemetry()["plc"]["commissioning"]["requests"] == 4
    finally:
        svc.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/counters", timeout=2)


def test_http_port_in_use_does_not_stop_the_service(tmp_path: Path, clip: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_cfg(tmp_path, clip, commissioning={"http_port": port})
        from agent.config import load_config

        events: list[str] = []
        svc = Service(load_config(path), use_cache=False)
        real_emit = svc.emit
        svc.emit = lambda name, data=None: (events.append(name), real_emit(name, data))[1]  # type: ignore[method-assign]
        assert svc.run() == 0
    assert "commissioning_http_failed" in events
    assert svc.pipelines[0].processed == 33
