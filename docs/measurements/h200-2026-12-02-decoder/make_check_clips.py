"""The clips scripts/streams_check.py reads (--clips DIR), made here with PyAV and OpenCV.

Usage: python3 make_check_clips.py DIR
demo1080_h264.mp4 (the demo clip at 1920x1080), demo1080_flip{0,1}_h264.mp4 (flipped, cv2.flip
codes), corrupt.mp4 (demo1080_h264.mp4 with two runs of bytes overwritten mid-file), reschange.h264
(an Annex B stream: 1280x720, then 1920x1080).
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from agent.config import DEMO_VIDEO  # noqa: E402


def demo_frames(width: int, height: int, flip: int | None = None) -> list[np.ndarray]:
    cap, out = cv2.VideoCapture(str(DEMO_VIDEO)), []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        out.append(cv2.flip(img, flip) if flip is not None else img)


def encode(path: Path, frames: list[np.ndarray], fmt: str | None = None) -> None:
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=30)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast", "g": "30"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> int:
    d = Path(sys.argv[1])
    d.mkdir(parents=True, exist_ok=True)
    encode(d / "demo1080_h264.mp4", demo_frames(1920, 1080))
    for flip in (0, 1):
        encode(d / f"demo1080_flip{flip}_h264.mp4", demo_frames(1920, 1080, flip))
    data = bytearray((d / "demo1080_h264.mp4").read_bytes())
    rng = np.random.default_rng(17)
    for at in (0.4, 0.6):
        i = int(len(data) * at)
        data[i:i + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (d / "corrupt.mp4").write_bytes(bytes(data))
    encode(d / "part720.h264", demo_frames(1280, 720)[:45], "h264")
    encode(d / "part1080.h264", demo_frames(1920, 1080)[:45], "h264")
    (d / "reschange.h264").write_bytes((d / "part720.h264").read_bytes() + (d / "part1080.h264").read_bytes())
    for part in ("part720.h264", "part1080.h264"):
        (d / part).unlink()
    for p in sorted(d.iterdir()):
        print(p.name, p.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
