#!/usr/bin/env python3
"""Accuracy through the agent itself: capture from a video file -> letterbox -> engine -> decode ->
NMS -> the detections JSON the agent publishes, scored against the video's ground truth (COCO mAP
with faster-coco-eval, per-frame counts per label).

    python scripts/agent_eval.py --video CLIP.mp4 [--truth CLIP.json] [--model M] [--json OUT]
    python scripts/agent_eval.py --int8          FP32 vs INT8 Q/DQ (TensorRT form and CPU form) on the
                                                  bundled clip: mAP and CPU latency side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.capture.reader import CaptureThread  # noqa: E402
from agent.config import DEMO_MODEL, DEMO_VIDEO, CameraConfig, EngineConfig, ModelConfig  # noqa: E402
from agent.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from agent.pipeline import Pipeline, build_runtime  # noqa: E402
from agent.publish import detections_payload, dumps  # noqa: E402
from agent.vision.types import Result  # noqa: E402
from scripts.evaluate import score_detections  # noqa: E402


def agent_payloads(video: Path, model: Path, score_threshold: float = 0.05, threads: int = 0) -> tuple[
        list[dict[str, Any]], dict[str, Any]]:
    """Run the agent's pipeline over every frame of `video` (fast, lossless); return the payloads
    exactly as published (parsed back from their JSON) and the pipeline's stage timings."""
    ecfg = EngineConfig(intra_op_threads=threads)
    mcfg = ModelConfig(path=model, score_threshold=score_threshold)
    rt = build_runtime(OnnxRuntimeEngine(model, ecfg), mcfg, model)
    rt.engine.warmup(3)
    out: list[dict[str, Any]] = []

    def sink(result: Result) -> None:
        out.append(json.loads(dumps(detections_payload(result, "cam0"))))

    pipe = Pipeline("cam0", CaptureThread(CameraConfig(source=str(video), pace=False)), rt, sink)
    pipe.start()
    if not pipe.wait(3600):
        raise SystemExit("agent_eval: the pipeline did not finish")
    pipe.stop()
    rt.close()
    return out, pipe.times.summary()


def evaluate(video: Path, truth: Path, model: Path, threads: int = 0) -> dict[str, Any]:
    payloads, times = agent_payloads(video, model, threads=threads)
    scores = score_detections(payloads, json.loads(truth.read_text()))
    return {"model": model.name, "frames": len(payloads), **scores, "infer_ms": times.get("infer", {})}


def bare_latency(model: Path, runs: int = 200, threads: int = 0) -> dict[str, float]:
    eng = OnnxRuntimeEngine(model, EngineConfig(intra_op_threads=threads))
    eng.load()
    x = np.random.default_rng(0).random(eng.input_spec.shape, dtype=np.float32).astype(eng.input_spec.dtype)
    eng.warmup(10)
    threads_used = int(str(eng.info.extra.get("intra_op_threads", 0)))
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        eng.infer(x)
        ms.append((time.perf_counter() - t0) * 1e3)
    eng.close()
    return {"median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "threads": threads_used}


def int8_table(video: Path, truth: Path, model: Path) -> list[dict[str, Any]]:
    from agent.engines.quantize import quantize_int8
    from scripts.evaluate import iter_frames

    frames = [f for i, f in enumerate(iter_frames(video)) if i % 3 == 0][:64]
    work = Path(tempfile.mkdtemp(prefix="int8-"))
    variants = {"fp32": model}
    for v in ("tensorrt", "cpu"):
        variants[f"int8-{v}"] = quantize_int8(model, work / f"int8_{v}.onnx", frames, variant=v)
    rows = []
    for name, path in variants.items():
        r = evaluate(video, truth, path)
        lat = bare_latency(path)
        rows.append({"variant": name, "mAP50": r.get("map50"), "mAP50_95": r.get("map50_95"),
                     "count_accuracy": r.get("count_accuracy"), **lat,
                     "size_kb": round(path.stat().st_size / 1024)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DEMO_VIDEO)
    ap.add_argument("--truth", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: physical cores)")
    ap.add_argument("--int8", action="store_true", help="compare FP32 with INT8 Q/DQ variants")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    truth = args.truth or args.video.with_suffix(".json")
    if args.int8:
        rows = int8_table(args.video, truth, args.model)
        print(f"{'variant':<14}{'mAP@.5':>8}{'mAP@.5:.95':>12}{'counts ok':>11}{'median ms':>11}{'p99 ms':>9}{'KB':>7}")
        for r in rows:
            print(f"{r['variant']:<14}{r['mAP50']:>8.3f}{r['mAP50_95']:>12.3f}{r['count_accuracy']:>11.3f}"
                  f"{r['median_ms']:>11.2f}{r['p99_ms']:>9.2f}{r['size_kb']:>7}")
        result: Any = rows
    else:
        result = evaluate(args.video, truth, args.model, args.threads)
        print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
