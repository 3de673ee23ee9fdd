"""Procedural frames (`synthetic:WxH@FPS`): a camera that needs no hardware, deterministic per frame."""

from __future__ import annotations

import re

import numpy as np

from agent.capture.sources.base import FrameSource, _cv2, _Pacer
from agent.config import CameraConfig
from agent.errors import SourceError

_SYNTH_RE = re.compile(r"^(?:(\d+)x(\d+))?(?:@(\d+(?:\.\d+)?))?$")


class SyntheticSource(FrameSource):
    """Procedural frames: a gradient background, a moving box and disc, and the frame number.

    Deterministic: frame i depends only on i and the size. `synthetic:WxH@FPS` overrides the
    config's width / height / fps (defaults 640x480 at 30). Paced at fps unless `pace` is False.
    Counted as live: it behaves like a camera (newest frame wins).
    """

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        spec = cfg.source.split(":", 1)[1]
        m = _SYNTH_RE.match(spec)
        if m is None:
            raise SourceError(
                f"bad synthetic source {cfg.source!r}: expected synthetic:[WxH][@FPS], e.g. synthetic:640x480@30"
            )
        w, h, f = m.groups()
        self.width = int(w) if w else (cfg.width or 640)
        self.height = int(h) if h else (cfg.height or 480)
        self._fps = float(f) if f else (cfg.fps or 30.0)
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192) or not 0 < self._fps <= 1000:
            raise SourceError(f"bad synthetic source {cfg.source!r}: size 16..8192, fps 0..1000")
        self._i = 0
        self._pacer: _Pacer | None = None
        self._bg: np.ndarray | None = None

    def open(self) -> None:
        self._i = 0
        self._pacer = _Pacer(self._fps) if self.cfg.pace else None
        x = np.linspace(0, 255, self.width, dtype=np.float32)
        y = np.linspace(0, 255, self.height, dtype=np.float32)
        bg = np.empty((self.height, self.width, 3), np.uint8)
        bg[..., 0] = (x[None, :] * 0.5).astype(np.uint8)
        bg[..., 1] = (y[:, None] * 0.5).astype(np.uint8)
        bg[..., 2] = 64
        self._bg = bg

    @staticmethod
    def render(i: int, width: int, height: int, bg: np.ndarray | None = None) -> np.ndarray:
        cv2 = _cv2()
        img = bg.copy() if bg is not None else np.full((height, width, 3), 64, np.uint8)
        s = max(8, min(width, height) // 6)
        span_x, span_y = max(1, width - s), max(1, height - s)
        bx = (i * 4) % (2 * span_x)
        bx = bx if bx < span_x else 2 * span_x - bx
        by = (i * 3) % (2 * span_y)
        by = by if by < span_y else 2 * span_y - by
        cv2.rectangle(img, (bx, by), (bx + s, by + s), (0, 200, 255), -1)
        cx = int(width / 2 + (width / 3) * np.cos(i * 0.05))
        cy = int(height / 2 + (height / 3) * np.sin(i * 0.05))
        cv2.circle(img, (cx, cy), s // 2, (255, 80, 0), -1)
        scale = max(0.4, height / 480)
        cv2.putText(img, f"#{i}", (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
        return img

    def read(self) -> np.ndarray | None:
        if self._bg is None:
            return None
        if self._pacer is not None:
            self._pacer.wait()
        img = self.render(self._i, self.width, self.height, self._bg)
        self._i += 1
        return img

    def close(self) -> None:
        self._bg = None

    @property
    def live(self) -> bool:
        return True

    @property
    def fps(self) -> float | None:
        return self._fps

    def describe(self) -> str:
        return f"synthetic {self.width}x{self.height}@{self._fps:g}"
