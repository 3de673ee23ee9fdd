"""Output decoders: raw detector outputs -> scored candidate boxes in MODEL INPUT pixels (xyxy).

Layouts (batch 1; the leading batch axis may be absent):
  yolov8   [1, 4+nc, N]  cx, cy, w, h, then nc class scores; no objectness (YOLOv8, YOLO11, ...)
  yolov5   [1, N, 5+nc]  cx, cy, w, h, objectness, nc class scores; score = obj * cls (YOLOv5, YOLOv7)
  end2end  [1, K, 6]     x1, y1, x2, y2, score, class_id; NMS done in the graph (YOLOv10, `end2end` exports)

Each anchor keeps its best class only (Ultralytics `multi_label=False`). A candidate is kept when
its score >= the threshold of its class; a score of exactly 0 (or NaN) is never kept, so padded
end2end rows vanish even with a zero threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.errors import ModelError

__all__ = [
    "DECODERS",
    "LAYOUTS",
    "Candidates",
    "decode",
    "decode_end2end",
    "decode_yolov5",
    "decode_yolov8",
    "detect_layout",
    "layout_num_classes",
]

LAYOUTS = ("yolov8", "yolov5", "end2end")
_TINY = float(np.finfo(np.float32).tiny)
_E2E_MAX_K = 1000  # end2end exports keep max_det rows (100 / 300 usually)
_V5_ANCHOR_MULTIPLE = 63  # YOLOv5/v7: 3 anchors x 21 cells per 32x32 block at strides 8, 16, 32


@dataclass(slots=True)
class Candidates:
    """Scored boxes in model-input pixels. boxes: float32 Nx4 xyxy; scores: float32 N; class_ids: int32 N."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.boxes[idx], self.scores[idx], self.class_ids[idx])


def _as_2d(output: np.ndarray, layout: str) -> np.ndarray:
    if output.ndim == 3 and output.shape[0] == 1:
        return output[0]
    if output.ndim == 2:
        return output
    raise ModelError(f"{layout} decoder expects one [1, A, B] output at batch 1, got shape {output.shape}")


def _thresholds_for(thresholds: np.ndarray, class_ids: np.ndarray, default: float) -> np.ndarray:
    """Per-candidate thresholds: thresholds[class_id], `default` for ids beyond the table."""
    n = thresholds.shape[0]
    if n == 0:
        return np.full(class_ids.shape, max(default, _TINY), dtype=np.float32)
    t = thresholds[np.clip(class_ids, 0, n - 1)]
    if int(class_ids.max(initial=0)) >= n:
        t = np.where(class_ids < n, t, np.float32(max(default, _TINY)))
    return t


def _floor(thresholds: np.ndarray, default: float) -> float:
    lo = float(thresholds.min()) if thresholds.size else default
    return max(min(lo, default), _TINY)


def _xywh_to_xyxy(cx: np.ndarray, cy: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    out = np.empty((cx.shape[0], 4), dtype=np.float32)
    hw, hh = w * 0.5, h * 0.5
    out[:, 0] = cx - hw
    out[:, 1] = cy - hh
    out[:, 2] = cx + hw
    out[:, 3] = cy + hh
    return out


def decode_yolov8(output: np.ndarray, thresholds: np.ndarray, default_threshold: float) -> Candidates:
    """[1, 4+nc, N]. Thresholds on the per-anchor max over the [nc, N] view before gathering anything."""
    x = _as_2d(output, "yolov8")
    if x.shape[0] < 5:
        raise ModelError(f"yolov8 output needs at least 5 rows (4 box + classes), got shape {output.shape}")
    scores = x[4:]  # [nc, N] view, no copy
    best = scores.max(axis=0)  # one vectorised pass over contiguous rows
    idx = np.flatnonzero(best >= _floor(thresholds, default_threshold))
    if idx.size == 0:
        return Candidates.empty()
    # argmax only over the few anchors that passed, not the whole [nc, N] tensor
    cls = scores[:, idx].argmax(axis=0).astype(np.int32)
    sc = best[idx].astype(np.float32)
    keep = sc >= _thresholds_for(thresholds, cls, default_threshold)
    idx, cls, sc = idx[keep], cls[keep], sc[keep]
    box = x[:4, idx].astype(np.float32)
    return Candidates(_xywh_to_xyxy(box[0], box[1], box[2], box[3]), sc, cls)


def decode_yolov5(output: np.ndarray, thresholds: np.ndarray, default_threshold: float) -> Candidates:
    """[1, N, 5+nc]; score = objectness * class score. Objectness (>= any product) filters first."""
    x = _as_2d(output, "yolov5")
    if x.shape[1] < 6:
        raise ModelError(f"yolov5 output needs at least 6 columns (box, obj, classes), got {output.shape}")
    idx = np.flatnonzero(x[:, 4] >= _floor(thresholds, default_threshold))
    if idx.size == 0:
        return Candidates.empty()
    rows = x[idx].astype(np.float32)  # k x (5+nc), small
    cls_scores = rows[:, 5:] * rows[:, 4:5]
    cls = cls_scores.argmax(axis=1).astype(np.int32)
    sc = cls_scores[np.arange(cls.size), cls]
    keep = sc >= _thresholds_for(thresholds, cls, default_threshold)
    rows, cls, sc = rows[keep], cls[keep], sc[keep]
    return Candidates(_xywh_to_xyxy(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]), sc, cls)


def decode_end2end(output: np.ndarray, thresholds: np.ndarray, default_threshold: float) -> Candidates:
    """[1, K, 6] rows x1, y1, x2, y2, score, class_id (NMS already applied in the graph)."""
    x = _as_2d(output, "end2end")
    if x.shape[1] != 6:
        raise ModelError(f"end2end output must be [1, K, 6], got shape {output.shape}")
    idx = np.flatnonzero(x[:, 4] >= _floor(thresholds, default_threshold))
    if idx.size == 0:
        return Candidates.empty()
    rows = x[idx].astype(np.float32)
    cls_f = np.rint(rows[:, 5])
    cls = cls_f.astype(np.int32)
    sc = rows[:, 4]
    keep = (cls_f >= 0) & (sc >= _thresholds_for(thresholds, np.maximum(cls, 0), default_threshold))
    return Candidates(np.ascontiguousarray(rows[keep, :4]), np.ascontiguousarray(sc[keep]), cls[keep])


Decoder = Callable[[np.ndarray, np.ndarray, float], Candidates]
DECODERS: dict[str, Decoder] = {"yolov8": decode_yolov8, "yolov5": decode_yolov5, "end2end": decode_end2end}


def decode(layout: str, output: np.ndarray, thresholds: np.ndarray, default_threshold: float) -> Candidates:
    try:
        fn = DECODERS[layout]
    except KeyError:
        raise ModelError(f"unknown decoder {layout!r}; expected one of {', '.join(LAYOUTS)}") from None
    return fn(output, thresholds, default_threshold)


def layout_num_classes(layout: str, shape: tuple[int, ...]) -> int | None:
    """Class count implied by `shape` under `layout` (None for end2end, where ids are values)."""
    a, b = shape[-2], shape[-1]
    if layout == "yolov8":
        return a - 4
    if layout == "yolov5":
        return b - 5
    return None


def detect_layout(output_shapes: list[tuple[int, ...]], num_classes: int | None) -> str:
    """Pick the decoder from the first output's shape; ModelError when it cannot be told apart."""
    if not output_shapes:
        raise ModelError("the model has no outputs")
    shape = tuple(int(d) for d in output_shapes[0])
    hint = "set `model.decoder` to yolov8, yolov5 or end2end in the config"
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1) or min(shape) <= 0:
        raise ModelError(f"cannot detect the layout of output shape {list(shape)} (not [1, A, B]); {hint}")
    a, b = shape[-2], shape[-1]
    nc = num_classes if num_classes and num_classes > 0 else None
    # What the shape allows at all, given the class count when known.
    possible = {
        "yolov8": a >= 5 and (nc is None or a - 4 == nc),
        "yolov5": b >= 6 and (nc is None or b - 5 == nc),
        "end2end": b == 6,
    }
    found = [k for k in LAYOUTS if possible[k]]
    if nc is not None and len(found) == 1:
        return found[0]  # the class count settles it
    if not found:
        raise ModelError(f"output shape {list(shape)} fits no known layout"
                         + (f" with {nc} classes" if nc else "") + f"; {hint}")
    # Several fit, or one fits only because the class count is unknown. Real exports have far more
    # anchors than channels, yolov5 anchor counts are multiples of 63, end2end keeps a few hundred rows.
    plausible = {
        "yolov8": a < b,
        "yolov5": a > b and (b != 6 or a % _V5_ANCHOR_MULTIPLE == 0),
        "end2end": a <= _E2E_MAX_K,
    }
    likely = [k for k in found if plausible[k]]
    if len(likely) == 1:
        return likely[0]
    raise ModelError(f"output shape {list(shape)} is ambiguous (could be {' or '.join(likely or found)}"
                     + ("" if nc else "; the class count is unknown") + f"); {hint}")
