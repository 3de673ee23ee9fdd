from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest


def write_video(path: Path, n: int, fps: float = 30.0, size: tuple[int, int] = (96, 64)) -> Path:
    assert n <= 42
    """An MJPG .avi whose frame i is a flat grey of level 6 * i (so order survives lossy coding)."""
    w, h = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened(), "cv2.VideoWriter cannot write MJPG/avi here"
    for i in range(n):
        vw.write(np.full((h, w, 3), level(i), np.uint8))
    vw.release()
    return path


def level(i: int) -> int:
    return 6 * i  # distinct up to 42 frames


def index_of(img: np.ndarray, n: int) -> int:
    """Which frame of a `write_video` file `img` is (levels are 6 apart; MJPG keeps a flat grey within 2)."""
    m = float(img.mean())
    return min(range(n), key=lambda i: abs(level(i) - m))


@pytest.fixture
def video(tmp_path: Path) -> Callable[..., Path]:
    def make(n: int = 30, fps: float = 30.0, name: str = "v.avi") -> Path:
        return write_video(tmp_path / name, n, fps)

    return make
