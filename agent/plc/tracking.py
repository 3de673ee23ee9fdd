"""Track ids for one camera's detections: ByteTrack from Roboflow's `trackers` package.

Data flow: the camera's post thread hands each frame's detections (source-frame pixels) to
`Tracker.update`, which runs one ByteTrack step and returns a track id per detection (None for a
detection no confirmed track owns yet: a new object's first frame, or a low-score box that matched
nothing). The counting step (agent/plc/counting.py) reads those ids; the detections payload gets
them only when the config asks (`counting.track_ids`).

Why `trackers` (Apache-2.0, maintained, numpy 2, Python >= 3.10): it is ByteTrack / OC-SORT from
the team behind `supervision` (MIT), whose Detections it takes. Its wheel declares `opencv-python`,
which on a Jetson would shadow JetPack's GStreamer-enabled OpenCV, and supervision's declares PyAV
(FFmpeg with GPL x264 inside) and matplotlib, which this path never imports: so both are installed
with `pip install --no-deps` and what they import comes from the `counting` extra (pyproject.toml).
Imported lazily: the agent runs without them while no camera counts.
(Why not supervision's LineZone for the crossing rule: see agent/plc/counting.py.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.config import TrackerConfig
from agent.errors import ConfigError
from agent.vision.types import Detection

INSTALL_HINT = ("zones and counting lines need the `counting` extra and ByteTrack's package: "
                "pip install '.[counting]' && pip install --no-deps 'trackers>=2.6,<3' 'supervision>=0.26.1'")


def _load() -> tuple[Any, Any]:
    try:
        import supervision as sv
        import trackers
    except ImportError as exc:
        raise ConfigError([f"cameras[].counting: {INSTALL_HINT} ({exc})"]) from None
    return sv, trackers


class Tracker:
    """One ByteTrack instance per camera; `update` is called once per frame, in frame order."""

    def __init__(self, cfg: TrackerConfig, fps: float = 30.0) -> None:
        self._sv, trackers = _load()
        self._bt = trackers.ByteTrackTracker(
            # `trackers` counts the lost buffer in 30 fps frames and scales it by frame_rate: give it
            # our frames at 30 so `lost_frames` means frames of this camera whatever its rate
            lost_track_buffer=cfg.lost_frames,
            frame_rate=30.0,
            track_activation_threshold=cfg.activation_score,
            minimum_consecutive_frames=1,
            minimum_iou_threshold=cfg.match_iou,
            high_conf_det_threshold=cfg.high_score,
        )
        self.frames = 0

    def update(self, detections: list[Detection]) -> list[int | None]:
        """Track ids for `detections`, in their order (None: not on a confirmed track)."""
        sv = self._sv
        self.frames += 1
        n = len(detections)
        if n:
            boxes = np.asarray([d.box for d in detections], np.float32).reshape(n, 4)
            dets = sv.Detections(xyxy=boxes, confidence=np.asarray([d.score for d in detections], np.float32),
                                 class_id=np.asarray([d.class_id for d in detections], int),
                                 data={"index": np.arange(n)})
        else:
            dets = sv.Detections.empty()
        out = self._bt.update(dets)  # fixed-rate mode: one step per call
        ids: list[int | None] = [None] * n
        if len(out) and out.tracker_id is not None:
            # the tracker may reorder its output: the index column maps back to our detections
            for idx, tid in zip(out.data["index"], out.tracker_id, strict=True):
                if int(tid) >= 0:
                    ids[int(idx)] = int(tid)
        return ids

    def reset(self) -> None:
        self._bt.reset()


__all__ = ["INSTALL_HINT", "Tracker"]
