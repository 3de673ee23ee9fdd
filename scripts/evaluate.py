"""Score a detector's published detections against a clip's ground truth.

    python scripts/evaluate.py --video agent/data/demo/sample.mp4 --truth agent/data/demo/sample.json \
        [--model agent/data/demo/model.onnx] [--json OUT]

`score_detections(published, truth)` takes detections payloads as the agent publishes them
(DESIGN.md: {"seq", "ts", "camera", "frame": {"w", "h"}, "model", "latency_ms", "detections":
[{"class_id", "label", "score", "box": [x1, y1, x2, y2]}]}), maps payload seq i to truth frame
index i (seq counts from 0), and computes COCO mAP@0.5 and mAP@0.5:0.95 (faster-coco-eval) and the
share of frames whose per-label counts (detections with score >= count_threshold) equal the truth.

`reference_payloads(video, model)` is a plain, self-contained reference loop (cv2 letterbox + ONNX
Runtime + YOLOv8 decode + class-aware NMS) producing such payloads; the agent's own pipeline is
meant to replace it as the producer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "agent" / "data" / "demo" / "model.onnx"

__all__ = ["ReferenceDetector", "reference_payloads", "score_detections"]


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


# --------------------------------------------------------------------------------------------------
# reference inference loop


def _letterbox_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int, float]:
    r = min(dst_h / src_h, dst_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    dw, dh = (dst_w - new_w) / 2, (dst_h - new_h) / 2
    return new_w, new_h, round(dw - 0.1), round(dh - 0.1), r


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order = scores.argsort()[::-1]
    keep: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (xx2 - xx1).clip(0) * (yy2 - yy1).clip(0)
        ov = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[ov <= iou]
    return keep


class ReferenceDetector:
    """cv2 letterbox + ONNX Runtime (CPU) + YOLOv8-layout decode + class-aware NMS."""

    def __init__(self, model: Path | str = DEFAULT_MODEL, threads: int = 2, conf: float = 0.05,
                 iou: float = 0.6, max_det: int = 100) -> None:
        import ast

        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.in_h, self.in_w = int(inp.shape[2]), int(inp.shape[3])
        meta = self.session.get_modelmeta().custom_metadata_map
        names = ast.literal_eval(meta["names"]) if "names" in meta else {}
        self.labels = [str(names[k]) for k in sorted(names)]
        self.version = meta.get("version", "")
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.fp16_input = "float16" in inp.type
        self._geom: tuple[int, int, tuple[int, int, int, int, float]] | None = None

    def preprocess(self, frame: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int, float]]:
        h, w = frame.shape[:2]
        if self._geom is None or self._geom[:2] != (w, h):
            self._geom = (w, h, _letterbox_geometry(w, h, self.in_w, self.in_h))
        nw, nh, left, top, _ = self._geom[2]
        canvas = np.full((self.in_h, self.in_w, 3), 114, np.uint8)
        canvas[top:top + nh, left:left + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)
        return (x.astype(np.float16) if self.fp16_input else x), self._geom[2]

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def postprocess(self, out: np.ndarray, geom: tuple[int, int, int, int, float], w: int, h: int
                    ) -> list[dict[str, Any]]:
        x = out[0]  # [4 + nc, N]
        scores = x[4:]
        cls = scores.argmax(0)
        sc = scores.max(0)
        idx = np.flatnonzero(sc >= self.conf)
        if idx.size == 0:
            return []
        cx, cy, bw, bh = x[0, idx], x[1, idx], x[2, idx], x[3, idx]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        cls, sc = cls[idx], sc[idx]
        offset = cls[:, None].astype(np.float32) * 4096.0  # class-aware NMS in one pass
        keep = _nms(boxes + offset, sc, self.iou)[: self.max_det]
        _, _, left, top, r = geom
        dets = []
        for i in keep:
            b = boxes[i].copy()
            b[[0, 2]] = ((b[[0, 2]] - left) / r).clip(0, w)
            b[[1, 3]] = ((b[[1, 3]] - top) / r).clip(0, h)
            c = int(cls[i])
            dets.append({"class_id": c, "label": self.labels[c] if c < len(self.labels) else str(c),
                         "score": round(float(sc[i]), 4), "box": [round(float(v), 1) for v in b]})
        return dets

    def __call__(self, frame: np.ndarray) -> list[dict[str, Any]]:
        x, geom = self.preprocess(frame)
        return self.postprocess(self.infer(x), geom, frame.shape[1], frame.shape[0])


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


def reference_payloads(video: Path | str, model: Path | str = DEFAULT_MODEL, threads: int = 2,
                       conf: float = 0.05, camera: str = "cam0") -> list[dict[str, Any]]:
    """Run the reference loop over every frame of the video; one DESIGN.md payload per frame."""
    det = ReferenceDetector(model, threads=threads, conf=conf)
    payloads = []
    for seq, frame in enumerate(iter_frames(video)):
        t0 = time.perf_counter()
        dets = det(frame)
        payloads.append({"seq": seq, "ts": time.time(), "camera": camera,
                         "frame": {"w": int(frame.shape[1]), "h": int(frame.shape[0])},
                         "model": {"name": "demo", "version": det.version},
                         "latency_ms": round((time.perf_counter() - t0) * 1000, 2), "detections": dets})
    return payloads


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
    payloads = reference_payloads(args.video, args.model, args.threads, args.conf)
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
