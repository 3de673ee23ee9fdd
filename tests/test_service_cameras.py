"""Several cameras on one loaded model, in the real service (real ONNX Runtime, real OpenCV decoding).

Each camera's detections must equal a one-camera run on the same file, frame by frame and in
order (no cross-talk between the cameras' buffers), with the model loaded once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.capture.sources import FileSource
from agent.config import AgentConfig
from agent.service import Service
from agent.vision.types import Result

DEMO = Path(__file__).resolve().parents[1] / "agent" / "data" / "demo"


def variant(src: Path, dst: Path, flip: int | None, frames: int) -> Path:
    """A copy of the demo clip (flipped: other detections), as MJPG in an AVI, `frames` long."""
    cap = cv2.VideoCapture(str(src))
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (640, 360))
    n = 0
    while n < frames:
        ok, img = cap.read()
        if not ok:
            break
        out.write(img if flip is None else cv2.flip(img, flip))
        n += 1
    cap.release()
    out.release()
    return dst


def config(tmp_path: Path, sources: list[Path], **engine: Any) -> AgentConfig:
    return AgentConfig.model_validate({
        "device_id": "dev1",
        "cameras": [{"id": f"cam{i}", "source": str(s), "pace": False} for i, s in enumerate(sources)],
        "model": {"path": str(DEMO / "model.onnx"), "labels": str(DEMO / "labels.txt")},
        "engine": {"intra_op_threads": 1, "warmup_runs": 1, **engine},
        "mqtt": {"enabled": False},
        "cache": {"dir": str(tmp_path / "cache")},
        "updates": {"enabled": False, "models_dir": str(tmp_path / "models")},
        "service": {"watchdog": False},
    })


def serve(cfg: AgentConfig) -> tuple[dict[str, list[Result]], dict[str, Any], list[str]]:
    """Run the service until every file ended; results per camera, telemetry before shutdown, events."""
    svc = Service(cfg, use_cache=False)
    results: dict[str, list[Result]] = {c.id: [] for c in cfg.cameras}
    lock = threading.Lock()
    events: list[str] = []
    emit = svc.emit
    svc.emit = lambda name, data=None: (events.append(name), emit(name, data))[1]  # type: ignore[method-assign]
    for cam in cfg.cameras:
        def sink(r: Result, cid: str = cam.id) -> None:
            with lock:
                results[cid].append(r)
        svc.add_result_listener(cam.id, sink)
    try:
        svc.start()
        for p in svc.pipelines:
            assert p.wait(120), f"{p.camera_id} did not finish"
        tele = svc.telemetry()
    finally:
        svc.shutdown()
    return results, tele, events


def rows(results: list[Result]) -> list[tuple[int, list[tuple[str, float, tuple[float, ...]]]]]:
    return [(r.frame_seq, [(d.label, d.score, tuple(d.box)) for d in r.detections]) for r in results]


def same(a: list[Result], b: list[Result]) -> None:
    ra, rb = rows(a), rows(b)
    assert [s for s, _ in ra] == [s for s, _ in rb]
    for (seq, da), (_, db) in zip(ra, rb, strict=True):
        assert [d[0] for d in da] == [d[0] for d in db], f"frame {seq}"
        for x, y in zip(da, db, strict=True):
            assert x[1] == pytest.approx(y[1], abs=1e-5) and x[2] == pytest.approx(y[2], abs=1e-3), f"frame {seq}"


@pytest.mark.parametrize("io_binding", [False, True])
def test_cameras_share_one_model_and_match_single_camera_runs(tmp_path: Path, io_binding: bool) -> None:
    clips = [variant(DEMO / "sample.mp4", tmp_path / "a.avi", None, 60),
             variant(DEMO / "sample.mp4", tmp_path / "b.avi", 1, 60),
             variant(DEMO / "sample.mp4", tmp_path / "c.avi", 0, 45)]
    shared, tele, _ = serve(config(tmp_path, clips, io_binding=io_binding))
    assert tele["engine"]["model_loads"] == 1 and tele["engine"]["cameras_on_engine"] == 3
    assert [c["frames_processed"] for c in tele["cameras"]] == [60, 60, 45]
    for i, clip in enumerate(clips):
        alone, one_tele, _ = serve(config(tmp_path, [clip], io_binding=io_binding))
        assert one_tele["engine"]["model_loads"] == 1 and one_tele["engine"]["cameras_on_engine"] == 1
        got = shared[f"cam{i}"]
        assert [r.frame_seq for r in got] == list(range(len(got)))
        same(got, alone["cam0"])
    # the flipped clips really detect something else: equal results above are not an accident
    assert rows(shared["cam0"]) != rows(shared["cam1"])
    assert sum(len(r.detections) for r in shared["cam1"]) > 0


def test_cuda_graphs_off_with_an_event_when_cameras_share_a_session(tmp_path: Path) -> None:
    clip = variant(DEMO / "sample.mp4", tmp_path / "a.avi", None, 10)
    results, tele, events = serve(config(tmp_path, [clip, clip], cuda_graph=True))
    assert "cuda_graph_off" in events
    assert tele["engine"]["model_loads"] == 1 and tele["engine"]["cuda_graph"] is False
    assert [len(v) for v in results.values()] == [10, 10]
    _, _, one = serve(config(tmp_path, [clip], cuda_graph=True))
    assert "cuda_graph_off" not in one


def test_frames_differ_per_camera() -> None:
    # guards the fixture: a flip of the demo clip is not the clip
    cap = cv2.VideoCapture(str(DEMO / "sample.mp4"))
    ok, img = cap.read()
    cap.release()
    assert ok and not np.array_equal(img, cv2.flip(img, 1))


def test_a_lost_camera_does_not_starve_the_others(tmp_path: Path) -> None:
    from tests.support.rtsp_server import free_port

    clip = variant(DEMO / "sample.mp4", tmp_path / "a.avi", None, 30)
    cfg = config(tmp_path, [clip])
    dead = cfg.cameras[0].model_copy(update={"id": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/none",
                                             "open_timeout_s": 0.5})
    cfg = cfg.model_copy(update={"cameras": [dead, cfg.cameras[0]]})
    svc = Service(cfg, use_cache=False)
    try:
        svc.start()
        live = next(p for p in svc.pipelines if p.camera_id == "cam0")
        assert live.wait(60)
        tele = svc.telemetry()
    finally:
        svc.shutdown()
    cams = {c["camera"]: c for c in tele["cameras"]}
    assert cams["cam0"]["frames_processed"] == 30 and cams["cam0"]["errors"] == 0
    assert cams["dead"]["frames_processed"] == 0 and cams["dead"]["camera_state"] != "streaming"
    assert tele["engine"]["model_loads"] == 1 and tele["engine"]["cameras_on_engine"] == 2


class WedgingFile(FileSource):
    """TEST DOUBLE standing in for an NVDEC file read that blocks (seen on the H200 under overload:
    "capture thread still blocked in a read"; no NVDEC here): a real FileSource (real OpenCV
    decoding) whose read() blocks after a few frames, for files named wedged*, until released."""

    release = threading.Event()

    def read(self) -> np.ndarray | None:
        if self.frames_read >= 5 and self.path.name.startswith("wedged"):
            self.release.wait(60)  # bounded: a thread left behind ends on its own
        return super().read()


def test_shutdown_under_overload_with_wedged_reads_is_bounded_once(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """6 unpaced, looped files overload the CPU engine (every frame, in order, ~10 fps each on 2
    cores) and 3 more cameras wedge in a read. Shutdown must finish within one budget for all
    cameras together, and still publish every frame the healthy cameras inferred.

    Before: each camera's stop waited its own 10 s (capture join, then each thread's join), so 3
    wedged cameras took 30 s (measured). Now one budget (STOP_CAMERAS_S, 3 s here to keep the test
    short) covers all of them: ~3.2 s. The bound, 8 s, leaves 5 s for a loaded 2-core CI machine
    to stop the healthy cameras and publish their last frames (0.1-0.4 s on this 2-core box for
    8-24 overloaded file cameras without a wedged one), and is far below the 30 s before.
    """
    import agent.service as service_mod
    from agent.capture import sources

    monkeypatch.setitem(sources.SOURCES, "file", WedgingFile)
    monkeypatch.setattr(service_mod, "STOP_CAMERAS_S", 3.0)
    clip = variant(DEMO / "sample.mp4", tmp_path / "a.avi", None, 30)
    wedged = variant(DEMO / "sample.mp4", tmp_path / "wedged.avi", None, 30)
    cfg = config(tmp_path, [clip] * 6 + [wedged] * 3)
    cfg = cfg.model_copy(update={"cameras": [c.model_copy(update={"loop": True}) for c in cfg.cameras]})
    svc = Service(cfg, use_cache=False)
    seqs: dict[str, list[int]] = {c.id: [] for c in cfg.cameras}
    for cam in cfg.cameras:
        def sink(r: Result, cid: str = cam.id) -> None:
            seqs[cid].append(r.frame_seq)
        svc.add_result_listener(cam.id, sink)
    WedgingFile.release.clear()
    took: float | None = None
    try:
        svc.start()
        healthy = [p for p in svc.pipelines if int(p.camera_id[3:]) < 6]
        deadline = time.monotonic() + 30
        # the healthy cameras well under way, the others wedged after their 5 frames
        while time.monotonic() < deadline and not (all(p.processed >= 10 for p in healthy)
                                                   and all(p.processed >= 5 for p in svc.pipelines)):
            time.sleep(0.1)
        assert [p.processed >= 5 for p in svc.pipelines] == [True] * 9, [p.processed for p in svc.pipelines]
        t0 = time.monotonic()
        svc.shutdown()
        took = time.monotonic() - t0
    finally:
        WedgingFile.release.set()
        if took is None:  # failed before the timed shutdown: still stop every camera
            svc.shutdown()
    assert took < 8.0, f"shutdown took {took:.1f} s"
    for p in healthy:
        # what was inferred was published, every frame in order (looped: seq runs on)
        assert p.processed == p.submitted and p.errors == 0
        assert seqs[p.camera_id] == list(range(len(seqs[p.camera_id])))
