"""The bundled demo model, its variants (v2, fp16) and the sample clip honour their contracts."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo"
LABELS = ["part", "scratch", "dent", "missing_hole"]
MODELS = {"model.onnx": "1", "model_v2.onnx": "2", "model_fp16.onnx": "1"}


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract(name: str) -> None:
    path = DEMO / name
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    meta = _meta(model)
    names = ast.literal_eval(meta["names"])
    assert names == dict(enumerate(LABELS))
    assert ast.literal_eval(meta["imgsz"]) == [320, 320]
    assert int(meta["stride"]) == 32
    assert meta["task"] == "detect"
    assert meta["version"] == MODELS[name]
    assert meta["license"] == "Apache-2.0"
    assert path.stat().st_size < 5 * 1024 * 1024
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = s.get_inputs(), s.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("images", "tensor(float)", [1, 3, 320, 320])
    assert out.type == "tensor(float)"
    assert out.shape[:2] == [1, 4 + len(LABELS)] and isinstance(out.shape[2], int)
    y = s.run(None, {"images": np.full((1, 3, 320, 320), 114 / 255, np.float32)})[0]
    assert y.shape == tuple(out.shape)
    assert np.isfinite(y).all()
    assert (y[0, 4:] >= 0).all() and (y[0, 4:] <= 1).all()  # sigmoid-ed scores
    assert float(y[0, 4:].max()) < 0.25  # nothing on a blank letterbox canvas


def test_variants_share_the_io_contract() -> None:
    shapes = set()
    for name in MODELS:
        s = ort.InferenceSession(str(DEMO / name), providers=["CPUExecutionProvider"])
        shapes.add((s.get_inputs()[0].name, tuple(s.get_inputs()[0].shape), s.get_inputs()[0].type,
                    tuple(s.get_outputs()[0].shape), s.get_outputs()[0].type))
    assert len(shapes) == 1


def _detect(model: Path, frame: np.ndarray) -> list[dict[str, Any]]:
    """The agent's own letterbox, engine, decoder and NMS on one frame, as published."""
    from agent.config import EngineConfig, ModelConfig
    from agent.engines.onnxruntime import OnnxRuntimeEngine
    from agent.pipeline import build_runtime

    rt = build_runtime(OnnxRuntimeEngine(model, EngineConfig(intra_op_threads=1)),
                       ModelConfig(path=model, score_threshold=0.5), model)
    try:
        tensor, lb = rt.letterbox(frame)
        return [d.to_json() for d in rt.post(rt.engine.infer(tensor), lb)]
    finally:
        rt.close()


def test_fp16_agrees_with_fp32() -> None:
    cap = cv2.VideoCapture(str(DEMO / "sample.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok
    a = _detect(DEMO / "model.onnx", frame)
    b = _detect(DEMO / "model_fp16.onnx", frame)
    assert a, "the fp32 model found nothing in the first sample frame"
    assert sorted(d["class_id"] for d in a) == sorted(d["class_id"] for d in b)
    for d in a:
        best = min(b, key=lambda e: sum(abs(p - q) for p, q in zip(d["box"], e["box"], strict=True)))
        assert best["class_id"] == d["class_id"]
        assert max(abs(p - q) for p, q in zip(d["box"], best["box"], strict=True)) < 3.0
        assert abs(best["score"] - d["score"]) < 0.05


def test_labels_file() -> None:
    assert (DEMO / "labels.txt").read_text().split() == LABELS


def test_sample_video_matches_truth() -> None:
    truth = json.loads((DEMO / "sample.json").read_text())
    assert truth["labels"] == LABELS
    assert (DEMO / "sample.mp4").stat().st_size < 1.5 * 1024 * 1024
    cap = cv2.VideoCapture(str(DEMO / "sample.mp4"))
    assert cap.isOpened()
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (truth["height"], truth["width"], 3)
        n += 1
    cap.release()
    assert n == len(truth["frames"]) > 0
    assert [f["index"] for f in truth["frames"]] == list(range(n))
    for f in truth["frames"]:
        for o in f["objects"]:
            assert o["label"] == LABELS[o["class_id"]]
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= truth["width"] and 0 <= y1 < y2 <= truth["height"]


def test_model_card_names_the_shipped_bytes() -> None:
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert "Apache-2.0" in card
    for name in MODELS:
        digest = hashlib.sha256((DEMO / name).read_bytes()).hexdigest()
        assert re.search(rf"{re.escape(name)}.*{digest}", card), f"{name} sha256 missing or stale in MODEL_CARD.md"
