"""Raw outputs -> Detection list: decode, class-aware NMS (not for end2end), boxes to source pixels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.errors import ModelError
from agent.vision.decoders import LAYOUTS, Candidates, decode, detect_layout, layout_num_classes
from agent.vision.labels import fallback_labels
from agent.vision.nms import nms
from agent.vision.preprocess import scale_boxes_to_source
from agent.vision.types import Detection, Letterbox

if TYPE_CHECKING:
    from agent.config import ModelConfig

__all__ = ["Postprocessor"]

_GENERIC = re.compile(r"class_(\d{1,6})")


@dataclass(frozen=True, slots=True)
class _Thresholds:
    """Swapped as one object so a live reload never shows a half-updated set to the post thread."""

    score: float
    per_class: np.ndarray  # float32, index = class id
    iou: float
    max_det: int


class Postprocessor:
    """Callable: (outputs, letterbox) -> detections in source pixels, highest score first."""

    def __init__(self, labels: list[str], layout: str, score_threshold: float,
                 class_thresholds: dict[str, float], iou_threshold: float, max_detections: int) -> None:
        if layout not in LAYOUTS:
            raise ModelError(f"unknown decoder {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.labels = list(labels)
        self.layout = layout
        self._state = self._build(score_threshold, class_thresholds, iou_threshold, max_detections)

    @classmethod
    def from_config(cls, cfg: ModelConfig, labels: list[str],
                    output_shapes: Sequence[tuple[int, ...]]) -> Postprocessor:
        """Resolve `cfg.decoder` ("auto" -> detect_layout) and check the labels against the output."""
        shapes = [tuple(int(d) for d in s) for s in output_shapes]
        if not shapes:
            raise ModelError("the model has no outputs")
        layout: str = cfg.decoder
        if layout == "auto":
            layout = detect_layout(shapes, len(labels) or None)
        shape = shapes[0]
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
            raise ModelError(f"decoder {layout} expects one [1, A, B] output, got {list(shape)}")
        fits = {"yolov8": shape[-2] >= 5, "yolov5": shape[-1] >= 6, "end2end": shape[-1] == 6}[layout]
        if not fits:
            raise ModelError(f"output shape {list(shape)} does not fit decoder {layout}; check model.decoder")
        nc = layout_num_classes(layout, shape)
        if nc is not None:
            if not labels:
                labels = fallback_labels(nc)
            elif len(labels) != nc:
                raise ModelError(f"{len(labels)} labels, but output {list(shape)} has {nc} classes")
        return cls(labels, layout, cfg.score_threshold, dict(cfg.class_thresholds), cfg.iou_threshold,
                   cfg.max_detections)

    # ---- thresholds ----------------------------------------------------------------------
    def _build(self, score_threshold: float, class_thresholds: dict[str, float], iou_threshold: float,
               max_detections: int) -> _Thresholds:
        if not 0.0 <= score_threshold <= 1.0:
            raise ModelError(f"score_threshold must be within [0, 1], got {score_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ModelError(f"iou_threshold must be within (0, 1], got {iou_threshold}")
        if max_detections < 1:
            raise ModelError(f"max_detections must be >= 1, got {max_detections}")
        ids: dict[str, list[int]] = {}
        for i, name in enumerate(self.labels):
            ids.setdefault(name, []).append(i)
        updates: list[tuple[int, float]] = []
        unknown: list[str] = []
        for name, thr in class_thresholds.items():
            if not 0.0 <= thr <= 1.0:
                raise ModelError(f"class threshold of {name!r} must be within [0, 1], got {thr}")
            m = _GENERIC.fullmatch(name)
            if name in ids:
                updates.extend((i, thr) for i in ids[name])
            elif m is not None and int(m.group(1)) >= len(self.labels):
                updates.append((int(m.group(1)), thr))  # class ids beyond the label list (end2end)
            else:
                unknown.append(name)
        if unknown:
            known = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise ModelError(f"class_thresholds name unknown labels {sorted(unknown)}; known labels: {known}")
        size = max([len(self.labels)] + [i + 1 for i, _ in updates])
        per_class = np.full(size, score_threshold, dtype=np.float32)
        for i, thr in updates:
            per_class[i] = thr
        per_class.setflags(write=False)
        return _Thresholds(float(score_threshold), per_class, float(iou_threshold), int(max_detections))

    def set_thresholds(self, score_threshold: float, class_thresholds: dict[str, float], iou_threshold: float,
                       max_detections: int | None = None) -> None:
        """Change thresholds live (SIGHUP reload); validated first, then swapped atomically."""
        max_det = self._state.max_det if max_detections is None else max_detections
        self._state = self._build(score_threshold, class_thresholds, iou_threshold, max_det)

    @property
    def score_threshold(self) -> float:
        return self._state.score

    @property
    def iou_threshold(self) -> float:
        return self._state.iou

    @property
    def max_detections(self) -> int:
        return self._state.max_det

    def class_threshold(self, class_id: int) -> float:
        st = self._state
        return float(st.per_class[class_id]) if 0 <= class_id < st.per_class.size else st.score

    # ---- per frame -----------------------------------------------------------------------
    def label_of(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"

    @property
    def thresholds(self) -> _Thresholds:
        """The current threshold set (one immutable object; a live reload replaces it)."""
        return self._state

    def decode(self, outputs: list[np.ndarray]) -> Candidates:
        """Raw outputs -> scored candidates in model-input pixels (the step GPU decoding replaces)."""
        if not outputs:
            raise ModelError("no model outputs to decode")
        st = self._state
        return decode(self.layout, outputs[0], st.per_class, st.score)

    def finish(self, cand: Candidates, lb: Letterbox) -> list[Detection]:
        """Candidates -> NMS (not for end2end) -> detections in source pixels, highest score first."""
        if len(cand) == 0:
            return []
        st = self._state
        if self.layout == "end2end":
            keep = np.argsort(-cand.scores, kind="stable")[: st.max_det]
        else:
            keep = nms(cand.boxes, cand.scores, cand.class_ids, st.iou, st.max_det)
        boxes = scale_boxes_to_source(cand.boxes[keep], lb).tolist()
        scores = cand.scores[keep].tolist()
        class_ids = cand.class_ids[keep].tolist()
        return [
            Detection(class_id=c, label=self.label_of(c), score=s, box=(b[0], b[1], b[2], b[3]))
            for c, s, b in zip(class_ids, scores, boxes, strict=True)
        ]

    def __call__(self, outputs: list[np.ndarray] | Candidates, lb: Letterbox) -> list[Detection]:
        """Raw outputs (or candidates already selected on the device) -> detections."""
        cand = outputs if isinstance(outputs, Candidates) else self.decode(outputs)
        return self.finish(cand, lb)
