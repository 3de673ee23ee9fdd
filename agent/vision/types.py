"""Data types that flow between the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Frame:
    """One captured frame. `ts` is the capture time in Unix seconds; `seq` counts from 0 per source."""

    image: np.ndarray  # HxWx3 uint8, BGR (OpenCV order)
    ts: float
    seq: int
    mono: float = 0.0  # time.monotonic() at capture, for latency figures immune to clock steps

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How a source frame was fitted into the model input: scaled by `scale`, then padded."""

    scale: float
    pad_x: float
    pad_y: float
    src_w: int
    src_h: int


@dataclass(slots=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source-frame pixels
    track_id: int | None = None  # set by the counting tracker when the payload asks for track ids

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "class_id": self.class_id,
            "label": self.label,
            "score": round(float(self.score), 4),
            "box": [round(float(v), 1) for v in self.box],
        }
        if self.track_id is not None:  # only then: the contract payload is unchanged by default
            out["track_id"] = self.track_id
        return out


@dataclass(slots=True)
class Result:
    """Detections of one frame plus the timings gathered on its way through the pipeline."""

    frame_seq: int
    ts: float
    mono: float
    frame_w: int
    frame_h: int
    detections: list[Detection]
    model_name: str
    model_version: str
    stage_ms: dict[str, float] = field(default_factory=dict)
