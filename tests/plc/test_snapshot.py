"""The commissioning view: `edge-agent snapshot` (real file decoding, the demo model) and the local
HTTP endpoint of a running service (real sockets)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from agent.cli import main
from agent.config import load_config, parse_config
from agent.models.store import ModelStore, ModelVersion
from agent.plc.snapshot import draw_overlay, snapshot_model
from agent.service import Service
from agent.vision.types import Detection
from scripts import scenes
from tests.support.broker import free_port
from tests.support.models import fixed_yolov8_model

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


def install_model(models: Path, work: Path, version: str, trial: bool = False) -> ModelVersion:
    """A real ONNX model installed and activated in the model store, as a fleet update leaves it: one
    "widget" (score 0.9) in the middle of every frame, labels and decoder from its manifest only."""
    src = fixed_yolov8_model(work / f"widgets-{version}.onnx", [(32, 32, 16, 16, 0, 0.9)], labels=["x0", "x1"])
    data = src.read_bytes()
    manifest = {"schema": 1, "id": f"id-widgets-{version}",
                "model": {"name": "widgets", "version": version, "sha256": hashlib.sha256(data).hexdigest(),
                          "size": len(data), "input": {"width": 64, "height": 64},
                          "labels": ["widget", "gizmo"], "decoder": "yolov8"}}
    store = ModelStore(models)
    mv = store.install(store.stage(src, json.dumps(manifest).encode(), move=False))
    return store.activate(mv, trial=trial)


def test_snapshot_uses_the_model_an_update_installed(tmp_path: Path, clip: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    install_model(models, tmp_path, "9")
    download = models / "staging" / "widgets-10.partial"  # a running service's download in progress
    download.mkdir()
    state = (models / "state.json").read_bytes()
    cfg = write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(models)})
    assert main(["snapshot", "-c", str(cfg), "-o", str(tmp_path / "snap.jpg"), "--frames", "2"]) == 0
    said = capsys.readouterr().out
    assert f"model widgets 9 (installed): {models / 'versions' / 'widgets-9' / 'model.onnx'}" in said
    assert "1 detection(s) (widget 1)" in said and "part" not in said  # its labels, not the demo model's
    # read only: the service's download and its pointers are left as they were
    assert download.is_dir() and (models / "state.json").read_bytes() == state


def test_snapshot_without_an_installed_model_uses_the_configured_one(tmp_path: Path, clip: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    cfg = write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(models)})
    assert main(["snapshot", "-c", str(cfg), "-o", str(tmp_path / "snap.jpg"), "--frames", "2"]) == 0
    said = capsys.readouterr().out
    assert f"model demo 1 (configured; no model installed in {models}): {load_config(cfg).model.path}" in said
    assert re.search(r"[( ]part \d", said.splitlines()[-1]) and "widget" not in said  # the demo model's plates
    assert not models.exists()  # nothing created where the service keeps its store
    cfg = write_cfg(tmp_path, clip)  # updates off: the configured model whatever the store holds
    install_model(models, tmp_path, "9")
    assert main(["snapshot", "-c", str(cfg), "-o", str(tmp_path / "snap.jpg"), "--frames", "1"]) == 0
    assert "model demo 1 (configured; updates off)" in capsys.readouterr().out


def test_snapshot_model_is_the_one_the_service_starts_with(tmp_path: Path, clip: Path) -> None:
    models = tmp_path / "models"
    cfg = load_config(write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(models)}))
    install_model(models, tmp_path, "8")
    v9 = install_model(models, tmp_path, "9")
    v9.model_path.write_bytes(b"damaged")  # the active version damaged: the service's start takes the previous
    snap = snapshot_model(cfg)
    assert (snap.source, snap.version) == ("installed", "8") and "damaged" in snap.note
    assert (snap.path, snap.name, snap.version, snap.model_cfg) == Service(cfg)._initial_model()
    assert snap.model_cfg.labels == ["widget", "gizmo"] and snap.model_cfg.decoder == "yolov8"


def test_snapshot_model_on_trial_and_unusable_store(tmp_path: Path, clip: Path) -> None:
    models = tmp_path / "models"
    install_model(models, tmp_path, "9", trial=True)
    state = (models / "state.json").read_bytes()
    cfg = load_config(write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(models)}))
    snap = snapshot_model(cfg)  # what the running service serves during the health window
    assert (snap.source, snap.version, snap.note) == ("installed", "9", "on trial")
    assert (models / "state.json").read_bytes() == state  # no rollback done by the snapshot
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cfg = load_config(write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(not_a_dir)}))
    snap = snapshot_model(cfg)  # the service cannot use it either and serves the configured model
    assert snap.source == "configured" and "unusable" in snap.note
    assert (snap.path, snap.name, snap.version, snap.model_cfg) == Service(cfg)._initial_model()


def test_snapshot_of_a_store_it_cannot_read_says_so(tmp_path: Path, clip: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    install_model(models, tmp_path, "9")
    cfg = write_cfg(tmp_path, clip, updates={"enabled": True, "models_dir": str(models)})
    models.chmod(0)  # as the service's 0700 store looks to another user
    try:
        try:
            os.listdir(models)
            pytest.skip("this user reads a mode-0 folder anyway (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        assert main(["snapshot", "-c", str(cfg), "-o", str(tmp_path / "snap.jpg")]) == 1
    finally:
        models.chmod(0o700)
    err = capsys.readouterr().err
    assert "cannot read the model store" in err and "service's user" in err and "Traceback" not in err


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
