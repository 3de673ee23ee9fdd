from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture.reader import CaptureThread
from agent.config import CameraConfig, EngineConfig, ModelConfig
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.pipeline import Pipeline, build_runtime
from agent.vision.types import Result
from tests.support.models import fixed_yolov8_model


def write_video(path: Path, n: int, w: int = 128, h: int = 96, fps: float = 30.0) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for i in range(n):
        img = np.full((h, w, 3), (i * 5) % 255, np.uint8)
        cv2.putText(img, str(i), (5, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        vw.write(img)
    vw.release()
    return path


def runtime(tmp_path: Path, name: str, box: tuple[float, float, float, float, int, float], version: str):
    model = fixed_yolov8_model(tmp_path / f"{name}.onnx", [box], labels=["part", "dent"], version=version)
    mcfg = ModelConfig(path=model, version=version)
    return build_runtime(OnnxRuntimeEngine(model, EngineConfig(intra_op_threads=1)), mcfg, model)


class Sink:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.target = 0

    def __call__(self, r: Result) -> None:
        with self.lock:
            self.results.append(r)
            if self.target and len(self.results) >= self.target:
                self.event.set()


def test_fast_file_mode_every_frame_once_in_order(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 60)
    rt = runtime(tmp_path, "m", (32, 32, 16, 16, 1, 0.9), "1")
    sink = Sink()
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), rt, sink)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    seqs = [r.frame_seq for r in sink.results]
    assert seqs == list(range(60))
    # The fixed box (cx 32, cy 32, 16x16 in a 64x64 input) maps back to source pixels 128x96:
    # scale 0.5, vertical padding 8 -> x (24-0)/0.5 .. (40-0)/0.5, y (24-8)/0.5 .. (40-8)/0.5.
    det = sink.results[0].detections
    assert len(det) == 1 and det[0].label == "dent" and det[0].score == pytest.approx(0.9)
    assert det[0].box == pytest.approx((48.0, 32.0, 80.0, 64.0), abs=0.5)
    stats = pipe.stats()
    assert stats["frames_processed"] == 60 and stats["frames_dropped"] == 0
    lat = stats["latency_ms"]
    assert isinstance(lat, dict) and {"preprocess", "infer", "postprocess", "e2e"} <= set(lat)


def test_max_frames_stops_early(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 30)
    rt = runtime(tmp_path, "m", (32, 32, 16, 16, 0, 0.8), "1")
    sink = Sink()
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False, loop=True)), rt, sink,
                    max_frames=45)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    assert [r.frame_seq for r in sink.results] == list(range(45))


def test_swap_at_frame_boundary_loses_nothing(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 200)
    old = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    new = runtime(tmp_path, "v2", (20, 20, 8, 8, 1, 0.7), "2")
    sink = Sink()
    sink.target = 40
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), old, sink)
    pipe.start()
    assert sink.event.wait(30)
    ticket = pipe.request_swap(new)
    assert ticket.done.wait(30)
    assert pipe.wait(60)
    pipe.stop()
    assert ticket.old is old and ticket.first_seq is not None
    seqs = [r.frame_seq for r in sink.results]
    assert seqs == list(range(200)), "a frame was dropped or processed twice across the swap"
    for r in sink.results:
        want = "2" if r.frame_seq >= ticket.first_seq else "1"
        assert r.model_version == want
        assert r.detections[0].label == ("dent" if want == "2" else "part")
    assert 40 <= ticket.first_seq < 200


def test_old_runtime_is_drained_before_it_may_be_closed(tmp_path: Path) -> None:
    """`drained` comes only after the post thread published every frame of the old runtime (the update
    host closes the old runtime on it: closing earlier frees buffers the post thread still reads)."""
    video = write_video(tmp_path / "v.avi", 120)
    old = runtime(tmp_path, "v1", (32, 32, 16, 16, 0, 0.8), "1")
    new = runtime(tmp_path, "v2", (20, 20, 8, 8, 1, 0.7), "2")

    class SlowSink(Sink):
        def __call__(self, r: Result) -> None:
            time.sleep(0.01)  # a slow publisher: frames of the old runtime queue up behind it
            super().__call__(r)

    sink = SlowSink()
    sink.target = 20
    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), old, sink)
    pipe.start()
    assert sink.event.wait(30)
    ticket = pipe.request_swap(new)
    assert ticket.drained.wait(30)
    with sink.lock:
        published_old = [r.frame_seq for r in sink.results if r.model_version == "1"]
    assert ticket.first_seq is not None
    assert published_old == list(range(ticket.first_seq)), "the old runtime was called drained too early"
    assert pipe.wait(60)
    pipe.stop()
    assert [r.frame_seq for r in sink.results] == list(range(120))
