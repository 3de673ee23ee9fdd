"""Score a detector's published detections against a clip's ground truth.

    python scripts/evaluate.py --video agent/data/demo/sample.mp4 --truth agent/data/demo/sample.json \
        [--model agent/data/demo/model.onnx] [--json OUT]

`score_detections(published, truth)` takes detections payloads as the agent publishes them
(DESIGN.md: {"seq", "ts", "camera", "frame": {"w", "h"}, "model", "latency_ms", "detections":
[{"class_id", "label", "score", "box": [x1, y1, x2, y2]}]}), maps payload seq i to truth frame
index i (seq counts from 0), and computes COCO mAP@0.5 and mAP@0.5:0.95 (faster-coco-eval) and the
share of frames whose per-label counts (detections with score >= count_threshold) equal the truth.

The CLI produces the payloads with the agent's own pipeline (scripts/agent_eval.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "agent" / "data" / "demo" / "model.onnx"

__all__ = ["iter_frames", "score_detections"]


# --------------------------------------------------------------------------------------------------
# scoring


def _counts(objects: list[dict[str, Any]], threshold: float | None) -> Counter[str]:
    c: Counter[str] = Counter()
    for o in objects:
        if threshold is None or float(o.get("score", 1.0)) >= threshold:
            c[str(o["label"])] += 1
    return c


def score_detections(published: list[dict[str, Any]], truth: dict[str, Any], count_threshold: float = 0.5,
                     ) -> dict[str, Any]:
    """COCO mAP@0.5, mAP@0.5:0.95 and per-frame count accuracy of published payloads vs truth.

    A truth frame with no payload counts as a frame with no detections.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    labels: list[str] = list(truth["labels"])
    frames = truth["frames"]
    by_seq: dict[int, dict[str, Any]] = {}
    for p in published:
        by_seq[int(p["seq"])] = p
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    counts_ok = 0
    for fr in frames:
        i = int(fr["index"])
        images.append({"id": i + 1, "width": int(truth["width"]), "height": int(truth["height"])})
        for o in fr["objects"]:
            x1, y1, x2, y2 = (float(v) for v in o["box"])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(o["class_id"]) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        found = by_seq.get(i, {}).get("detections", [])
        for d in found:
            x1, y1, x2, y2 = (float(v) for v in d["box"])
            dets.append({"image_id": i + 1, "category_id": int(d["class_id"]) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(d["score"])})
        if _counts(found, count_threshold) == _counts(fr["objects"], None):
            counts_ok += 1
    gt = COCO({"images": images, "annotations": anns,
               "categories": [{"id": k + 1, "name": n} for k, n in enumerate(labels)]})
    result: dict[str, Any] = {"frames": len(frames), "payloads": len(published), "truth_objects": len(anns),
                              "detections": len(dets), "count_threshold": count_threshold,
                              "count_accuracy": counts_ok / max(1, len(frames))}
    if not dets:
        result.update({"map50": 0.0, "map50_95": 0.0, "ap50_per_class": dict.fromkeys(labels, 0.0)})
        return result
    dt = gt.loadRes(dets)
    ev = COCOeval_faster(gt, dt, "bbox", print_function=logging.getLogger(__name__).debug)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    result["map50_95"] = float(ev.stats[0])
    result["map50"] = float(ev.stats[1])
    # per-class AP@0.5: precision[T, R, K, A, M]; T index 0 is IoU 0.5, A 0 = all areas, M -1 = 100 dets
    prec = np.asarray(ev.eval["precision"])
    per: dict[str, float] = {}
    for k, name in enumerate(labels):
        pk = prec[0, :, k, 0, -1]
        pk = pk[pk > -1]
        per[name] = float(pk.mean()) if pk.size else float("nan")
    result["ap50_per_class"] = per
    return result


def iter_frames(video: Path | str) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise RuntimeError(f"cannot open video {video}")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield frame
    finally:
        cap.release()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, required=True)
    ap.add_argument("--truth", type=Path, help="ground truth JSON (default: the video's .json)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conf", type=float, default=0.05, help="score floor of published detections")
    ap.add_argument("--count-threshold", type=float, default=0.5)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    truth = json.loads((args.truth or args.video.with_suffix(".json")).read_text())
    if str(ROOT) not in sys.path:  # run as a script
        sys.path.insert(0, str(ROOT))
    from scripts.agent_eval import agent_payloads  # the agent's own pipeline produces the payloads

    payloads, _ = agent_payloads(args.video, args.model, args.conf, args.threads)
    res = score_detections(payloads, truth, args.count_threshold)
    lat = np.array([p["latency_ms"] for p in payloads]) if payloads else np.zeros(1)
    res["latency_ms_median"] = float(np.median(lat))
    res["model"] = str(args.model)
    res["video"] = str(args.video)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
