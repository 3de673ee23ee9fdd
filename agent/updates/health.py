"""The health window's verdict: keep a freshly activated model, or roll it back.

    host.health_since(before the swap) + host.health_since(the swap) -> HealthPolicy.judge
    -> None (keep: last_good) | the reason (roll back to the previous version)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["HealthPolicy"]


@dataclass(frozen=True)
class HealthPolicy:
    """A window is bad when errors exceed `max_error_ratio` of frames, no frame was processed while
    the old model did process some, or fps fell under `min_fps_ratio` of the old model's fps."""

    max_error_ratio: float = 0.05
    min_fps_ratio: float = 0.5
    # fps from fewer frames is noise (a paced source releasing a few frames at once after a stall
    # doubles it): below this many frames on either side only errors and silence are judged, unless
    # the old rate would have given twice as many in the new window (then a short count is the
    # model: a 500 ms model gives 4 frames in 2 s where a 20 fps camera gave 40)
    min_frames_for_fps: int = 5

    def judge(self, before: dict[str, Any], after: dict[str, Any]) -> str | None:
        frames, errors = int(after.get("frames", 0)), int(after.get("errors", 0))
        if errors and errors > self.max_error_ratio * max(frames + errors, 1):
            return f"{errors} errors in {frames + errors} frames"
        if frames == 0 and int(before.get("frames", 0)) > 0:
            return "no frame processed since the swap"
        fps0, fps1 = float(before.get("fps", 0.0) or 0.0), float(after.get("fps", 0.0) or 0.0)
        span = float(after.get("span_s", 0.0) or 0.0) or (frames / fps1 if fps1 > 0 else 0.0)
        expected = fps0 * span  # frames the old model would have processed in the new window
        enough = (int(before.get("frames", 0)) >= self.min_frames_for_fps
                  and (frames >= self.min_frames_for_fps or expected >= 2 * self.min_frames_for_fps))
        if enough and fps0 > 0 and fps1 < self.min_fps_ratio * fps0:
            return f"fps fell from {fps0:.1f} to {fps1:.1f}"
        return None
