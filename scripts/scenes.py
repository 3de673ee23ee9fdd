"""Synthetic conveyor-belt scenes for the bundled demo detector (importable library).

Everything is deterministic by seed: the same arguments give byte-identical images. A top-down
camera looks at a belt moving left to right; grey plates (`part`) ride on it, some carrying
defects: `scratch` (thin bright diagonal line), `dent` (dark soft elliptical blob), `missing_hole`
(black circle with a bright rim). Belt texture, lighting (gain, tint, gradient, slow changes),
motion blur and sensor noise vary by style.

Ground truth: boxes [x1, y1, x2, y2] in frame pixels (x2/y2 exclusive), clipped to the frame; a
partly visible object stays in the truth when its visible part spans at least `MIN_EXTENT[class]`
pixels (or its whole size, if smaller) in each direction. The rule depends only on what the image
shows, so a detector can learn it exactly (a rule on the hidden share of the area cannot be).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

LABELS: tuple[str, ...] = ("part", "scratch", "dent", "missing_hole")
PART, SCRATCH, DENT, MISSING_HOLE = range(4)
VARIANTS: tuple[str, ...] = ("standard", "dim", "bright", "unseen")
MIN_EXTENT = (40, 12, 12, 12)  # per class: visible extent (px) a cut-off object needs to count
EXPOSURE = 0.25  # exposure time as a share of the frame interval (1/60 s at 15 fps): sets motion blur

__all__ = [
    "LABELS",
    "VARIANTS",
    "Defect",
    "Part",
    "Style",
    "iter_video",
    "random_style",
    "render_scene",
    "write_images",
    "write_video",
]


@dataclass
class Style:
    belt_bgr: tuple[float, float, float]
    texture: float  # belt grain amplitude
    seam_pitch: int
    gain: float
    tint: tuple[float, float, float]  # per-channel multiplier (B, G, R)
    gradient: float  # linear light fall-off across the frame
    gradient_angle: float
    noise: float  # sensor noise sigma (0..255 scale)
    flicker: float  # relative gain change over a video
    rail_bgr: tuple[float, float, float] = (150.0, 150.0, 155.0)


@dataclass
class Defect:
    class_id: int
    # geometry relative to the plate's top-left corner
    params: dict[str, float] = field(default_factory=dict)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # plate-relative x1, y1, x2, y2


@dataclass
class Part:
    w: int
    h: int
    grey: float
    tone: tuple[float, float, float]
    defects: list[Defect]
    u: float = 0.0  # belt coordinate (video) or frame x (stills) of the left edge
    y: int = 0


def random_style(rng: np.random.Generator, variant: str = "standard") -> Style:
    """A lighting / belt style. `standard` is the training distribution; `unseen` lies outside it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == "unseen":
        # blue-green belt under warm, dim, strongly graded light: never produced by the others
        return Style(
            belt_bgr=(float(rng.uniform(95, 115)), float(rng.uniform(70, 85)), float(rng.uniform(25, 40))),
            texture=float(rng.uniform(10, 14)), seam_pitch=int(rng.integers(70, 110)),
            gain=float(rng.uniform(0.72, 0.8)), tint=(0.78, 0.95, 1.18),
            gradient=float(rng.uniform(0.35, 0.45)), gradient_angle=float(rng.uniform(0, 2 * math.pi)),
            noise=float(rng.uniform(5, 7)), flicker=0.12, rail_bgr=(120.0, 135.0, 150.0),
        )
    base = float(rng.uniform(35, 95))
    belt = tuple(float(base * rng.uniform(0.9, 1.1)) for _ in range(3))
    gain = {"standard": rng.uniform(0.8, 1.2), "dim": rng.uniform(0.6, 0.8), "bright": rng.uniform(1.15, 1.35)}[variant]
    tint = tuple(float(rng.uniform(0.92, 1.08)) for _ in range(3))
    return Style(
        belt_bgr=(belt[0], belt[1], belt[2]), texture=float(rng.uniform(3, 12)),
        seam_pitch=int(rng.integers(90, 200)), gain=float(gain), tint=(tint[0], tint[1], tint[2]),
        gradient=float(rng.uniform(0.0, 0.3)), gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        noise=float(rng.uniform(1, 6)), flicker=float(rng.uniform(0.0, 0.1)),
    )


# --------------------------------------------------------------------------------------------------
# objects


def _random_defect(rng: np.random.Generator, pw: int, ph: int) -> Defect | None:
    cls = int(rng.integers(1, 4))
    m = 6  # margin from the plate edge
    if cls == SCRATCH:
        length = float(rng.uniform(22, min(48, 0.8 * min(pw, ph) * 1.3)))
        ang = math.radians(float(rng.uniform(28, 62)) * (1 if rng.random() < 0.5 else -1))
        dx, dy = abs(length * math.cos(ang)), abs(length * math.sin(ang))
        if dx + 2 * m >= pw or dy + 2 * m >= ph:
            return None
        x1 = float(rng.uniform(m, pw - m - dx))
        y1 = float(rng.uniform(m, ph - m - dy))
        p1, p2 = ((x1, y1), (x1 + dx, y1 + dy)) if ang > 0 else ((x1, y1 + dy), (x1 + dx, y1))
        t = 2
        box = (round(x1) - 1, round(y1) - 1, round(x1 + dx) + 2, round(y1 + dy) + 2)
        return Defect(cls, {"x1": p1[0], "y1": p1[1], "x2": p2[0], "y2": p2[1], "t": t,
                            "v": float(rng.uniform(225, 255))}, box)
    if cls == DENT:
        a, b = float(rng.uniform(8, 15)), float(rng.uniform(6, 11))
        if rng.random() < 0.5:
            a, b = b, a
        if 2 * a + 2 * m >= pw or 2 * b + 2 * m >= ph:
            return None
        cx = float(rng.uniform(m + a, pw - m - a))
        cy = float(rng.uniform(m + b, ph - m - b))
        box = (round(cx - a), round(cy - b), round(cx + a) + 1, round(cy + b) + 1)
        return Defect(cls, {"cx": cx, "cy": cy, "a": a, "b": b, "k": float(rng.uniform(0.35, 0.5))}, box)
    r = float(rng.uniform(7, 12))  # missing hole
    rim = 2
    rr = r + rim
    if 2 * rr + 2 * m >= min(pw, ph):
        return None
    cx = float(rng.uniform(m + rr, pw - m - rr))
    cy = float(rng.uniform(m + rr, ph - m - rr))
    box = (round(cx - rr), round(cy - rr), round(cx + rr) + 1, round(cy + rr) + 1)
    return Defect(cls, {"cx": cx, "cy": cy, "r": r, "rim": rim, "v": float(rng.uniform(215, 250))}, box)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 3) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def random_part(rng: np.random.Generator, defect_rate: float = 0.7) -> Part:
    w, h = int(rng.integers(70, 131)), int(rng.integers(60, 111))
    grey = float(rng.uniform(135, 190))
    tone = (float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.97, 1.03)), float(rng.uniform(0.95, 1.05)))
    defects: list[Defect] = []
    n = 0 if rng.random() > defect_rate else int(rng.integers(1, 3))
    for _ in range(n * 4):
        if len(defects) >= n:
            break
        d = _random_defect(rng, w, h)
        if d is not None and not any(_overlaps(d.box, o.box) for o in defects):
            defects.append(d)
    return Part(w, h, grey, tone, defects)


def _draw_part(img: np.ndarray, p: Part, x: int, y: int) -> None:
    """Draw plate p with its top-left corner at (x, y) on the float32 BGR image (clipped by cv2)."""
    H, W = img.shape[:2]
    # shadow: darken an offset rectangle
    sx1, sy1, sx2, sy2 = max(x + 4, 0), max(y + 5, 0), min(x + p.w + 4, W), min(y + p.h + 5, H)
    if sx2 > sx1 and sy2 > sy1:
        img[sy1:sy2, sx1:sx2] *= 0.55
    g = p.grey
    col = (g * p.tone[0], g * p.tone[1], g * p.tone[2])
    cv2.rectangle(img, (x, y), (x + p.w - 1, y + p.h - 1), col, -1)
    hi = tuple(min(255.0, c + 38) for c in col)
    lo = tuple(max(0.0, c - 45) for c in col)
    cv2.rectangle(img, (x, y), (x + p.w - 1, y + 2), hi, -1)
    cv2.rectangle(img, (x, y), (x + 2, y + p.h - 1), hi, -1)
    cv2.rectangle(img, (x, y + p.h - 3), (x + p.w - 1, y + p.h - 1), lo, -1)
    cv2.rectangle(img, (x + p.w - 3, y), (x + p.w - 1, y + p.h - 1), lo, -1)
    s = 4  # sub-pixel shift bits for cv2 drawing
    f = float(1 << s)
    for d in p.defects:
        q = d.params
        if d.class_id == SCRATCH:
            c = q["v"]
            cv2.line(img, (round((x + q["x1"]) * f), round((y + q["y1"]) * f)),
                     (round((x + q["x2"]) * f), round((y + q["y2"]) * f)), (c, c, c), int(q["t"]), cv2.LINE_AA, s)
        elif d.class_id == DENT:
            centre = (round((x + q["cx"]) * f), round((y + q["cy"]) * f))
            for i, frac in enumerate((1.0, 0.7, 0.45)):  # darker towards the middle: a soft blob
                k = q["k"] - 0.1 * i
                dark = tuple(cc * max(0.15, k) for cc in col)
                axes = (round(q["a"] * frac * f), round(q["b"] * frac * f))
                cv2.ellipse(img, centre, axes, 0.0, 0.0, 360.0, dark, -1, cv2.LINE_AA, s)
        else:
            centre = (round((x + q["cx"]) * f), round((y + q["cy"]) * f))
            v = q["v"]
            cv2.circle(img, centre, round((q["r"] + q["rim"]) * f), (v, v, v), -1, cv2.LINE_AA, s)
            cv2.circle(img, centre, round(q["r"] * f), (8.0, 8.0, 8.0), -1, cv2.LINE_AA, s)


def _visible(box: tuple[float, float, float, float], W: int, H: int, extent: int) -> list[int] | None:
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
    if cx2 - cx1 < min(x2 - x1, extent) or cy2 - cy1 < min(y2 - y1, extent):
        return None
    return [int(cx1), int(cy1), int(cx2), int(cy2)]


def _objects_of(p: Part, x: int, y: int, W: int, H: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    b = _visible((x, y, x + p.w, y + p.h), W, H, MIN_EXTENT[PART])
    if b is not None:
        out.append({"class_id": PART, "label": LABELS[PART], "box": b})
    for d in p.defects:
        b = _visible((x + d.box[0], y + d.box[1], x + d.box[2], y + d.box[3]), W, H, MIN_EXTENT[d.class_id])
        if b is not None:
            out.append({"class_id": d.class_id, "label": LABELS[d.class_id], "box": b})
    return out


# --------------------------------------------------------------------------------------------------
# belt, lighting, camera


def _belt_rows(H: int) -> tuple[int, int]:
    m = max(8, H // 15)
    return m, H - m


def _belt_strip(rng: np.random.Generator, style: Style, length: int, H: int) -> np.ndarray:
    """A belt texture `length` pixels long (float32 BGR, H rows), to be cropped at the belt offset."""
    y0, y1 = _belt_rows(H)
    img = np.empty((H, length, 3), np.float32)
    img[:] = style.rail_bgr
    # rails: a bright line along each edge
    img[max(0, y0 - 4):y0 - 2] = tuple(min(255.0, c + 60) for c in style.rail_bgr)
    img[y1 + 2:y1 + 4] = tuple(min(255.0, c + 60) for c in style.rail_bgr)
    belt = np.empty((y1 - y0, length, 3), np.float32)
    belt[:] = style.belt_bgr
    low = rng.standard_normal((max(2, (y1 - y0) // 16), max(2, length // 16)), dtype=np.float32)
    low = np.asarray(cv2.resize(low, (length, y1 - y0), interpolation=cv2.INTER_CUBIC), np.float32)
    grain = rng.standard_normal((y1 - y0, length), dtype=np.float32) * 0.5
    tex = (low * 0.6 + grain) * style.texture
    belt += tex[:, :, None]
    for sx in range(int(rng.integers(0, style.seam_pitch)), length, style.seam_pitch):
        belt[:, sx:sx + 2] *= 0.7
    img[y0:y1] = belt
    return img


def _light_field(style: Style, W: int, H: int, gain: float) -> np.ndarray:
    xs = (np.arange(W, dtype=np.float32) - W / 2) / W
    ys = (np.arange(H, dtype=np.float32) - H / 2) / H
    ramp = math.cos(style.gradient_angle) * xs[None, :] + math.sin(style.gradient_angle) * ys[:, None]
    field_ = gain * (1.0 + style.gradient * ramp)
    return field_[:, :, None] * np.asarray(style.tint, np.float32)[None, None, :]


def _finish(img: np.ndarray, style: Style, rng: np.random.Generator, gain: float, blur: int) -> np.ndarray:
    H, W = img.shape[:2]
    img *= _light_field(style, W, H, gain)
    if blur > 1:
        k = np.full((1, blur), 1.0 / blur, np.float32)
        img = np.asarray(cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REPLICATE), np.float32)
    if style.noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(style.noise)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# stills


def render_scene(seed: int | np.random.Generator, width: int = 640, height: int = 360,
                 variant: str = "standard") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One still frame: BGR uint8 image and its objects ({class_id, label, box})."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    style = random_style(rng, variant)
    W, H = width, height
    img = _belt_strip(rng, style, W, H)
    y0, y1 = _belt_rows(H)
    objects: list[dict[str, Any]] = []
    placed: list[tuple[int, int, int, int]] = []
    n = int(rng.integers(1, 8))
    for _ in range(n * 6):
        if len(placed) >= n:
            break
        p = random_part(rng)
        if rng.random() < 0.25 and placed:  # touching a plate already there
            bx = placed[int(rng.integers(0, len(placed)))]
            side = int(rng.integers(0, 4))
            gap = int(rng.integers(0, 2))
            x = [bx[2] + gap, bx[0] - p.w - gap, int(rng.integers(bx[0] - p.w // 2, bx[2] - p.w // 2 + 1)),
                 int(rng.integers(bx[0] - p.w // 2, bx[2] - p.w // 2 + 1))][side]
            y = [int(rng.integers(bx[1] - p.h // 2, bx[3] - p.h // 2 + 1)),
                 int(rng.integers(bx[1] - p.h // 2, bx[3] - p.h // 2 + 1)), bx[3] + gap, bx[1] - p.h - gap][side]
        else:
            x = int(rng.integers(-p.w * 2 // 3, W - p.w // 3))  # some partly outside the frame
            y = int(rng.integers(y0, max(y0 + 1, y1 - p.h)))
        if y < y0 or y + p.h > y1:
            continue
        box = (x, y, x + p.w, y + p.h)
        if any(_overlaps(box, b, gap=0) for b in placed):
            continue
        placed.append(box)
        _draw_part(img, p, x, y)
        objects.extend(_objects_of(p, x, y, W, H))
    gain = style.gain * float(rng.uniform(0.9, 1.1))
    blur = int(rng.choice([1, 1, 3, 5, 7, 9, 11]))
    return _finish(img, style, rng, gain, blur), objects


def yolo_lines(objects: list[dict[str, Any]], W: int, H: int) -> str:
    lines = []
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        lines.append(f"{o['class_id']} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} "
                     f"{(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_images(out_dir: Path, count: int, seed: int, width: int = 640, height: int = 360,
                 variant: str = "standard") -> list[Path]:
    """images/NNNNN.png + labels/NNNNN.txt (YOLO format) + data.yaml-like names.txt."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img, objs = render_scene(np.random.default_rng([seed, i]), width, height, variant)
        p = out_dir / "images" / f"{i:05d}.png"
        cv2.imwrite(str(p), img)
        (out_dir / "labels" / f"{i:05d}.txt").write_text(yolo_lines(objs, width, height))
        paths.append(p)
    (out_dir / "names.txt").write_text("\n".join(LABELS) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------
# videos


def _belt_offset(t: int, motion: str, pitch: int, move: int, dwell: int, speed: float) -> tuple[float, float]:
    """(offset, velocity) of the belt at frame t. `indexed`: move one pitch in `move` frames, then
    stand still for `dwell` frames (an indexing conveyor); `continuous`: constant speed."""
    if motion == "continuous":
        return t * speed, speed
    cycle = move + dwell
    k, r = divmod(t, cycle)
    if r >= move:
        return float((k + 1) * pitch), 0.0
    ph = r / move
    off = k * pitch + pitch * (1 - math.cos(math.pi * ph)) / 2
    vel = pitch * math.pi / (2 * move) * math.sin(math.pi * ph)
    return off, vel


def iter_video(seed: int, frames: int, width: int = 640, height: int = 360, variant: str = "standard",
               motion: str = "indexed") -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Frames of a belt carrying plates left to right, with their ground truth."""
    rng = np.random.default_rng([seed, 7919])
    style = random_style(rng, variant)
    W, H = width, height
    y0, y1 = _belt_rows(H)
    pitch, move, dwell, speed = W * 5 // 16, 8, 10, 7.0
    travel = int(_belt_offset(frames, motion, pitch, move, dwell, speed)[0]) + 2 * W
    strip = _belt_strip(rng, style, travel + W, H)
    # plates along the belt: slot k is centred on belt coordinate k * pitch (fully visible when the
    # belt stands still); a slot may hold two plates stacked across the belt, touching or nearly.
    parts: list[Part] = []
    for k in range(-(travel // pitch) - 2, W // pitch + 2):
        if rng.random() < 0.12:
            continue  # empty slot
        stack = rng.random() < 0.3
        cx = k * pitch + W // 2 + float(rng.uniform(-8, 8))
        group = [random_part(rng) for _ in range(2 if stack else 1)]
        if stack:
            total = sum(p.h for p in group) + int(rng.integers(0, 3))
            if total > y1 - y0:
                group = group[:1]
        total = sum(p.h for p in group)
        ytop = int(rng.integers(y0, max(y0 + 1, y1 - total - (len(group) - 1) * 2)))
        for p in group:
            p.u, p.y = cx - p.w / 2, ytop
            ytop += p.h + int(rng.integers(0, 2))
        parts.extend(group)
    for t in range(frames):
        off, vel = _belt_offset(t, motion, pitch, move, dwell, speed)
        # the belt moves right: belt coordinate u is seen at frame x = u + off - pitch
        ioff = round(off)
        x0 = travel - ioff  # strip column shown at frame x = 0
        img = strip[:, x0:x0 + W].copy()
        objects: list[dict[str, Any]] = []
        for p in parts:
            x = round(p.u) + ioff - pitch
            if x + p.w + 6 < 0 or x - 6 > W:
                continue
            _draw_part(img, p, x, p.y)
            objects.extend(_objects_of(p, x, p.y, W, H))
        gain = style.gain * (1 + style.flicker * math.sin(2 * math.pi * t / 45.0))
        blur = max(1, int(abs(vel) * EXPOSURE) | 1)  # horizontal motion blur over the exposure
        yield _finish(img, style, np.random.default_rng([seed, 104729, t]), gain, blur), objects


def write_video(path: Path, seed: int, seconds: float = 6.0, fps: int = 15, width: int = 640, height: int = 360,
                variant: str = "standard", motion: str = "indexed") -> dict[str, Any]:
    """Write an mp4 (mp4v) video and its ground truth JSON next to it (same stem, .json)."""
    frames = round(seconds * fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter.fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot open {path}")
    truth: dict[str, Any] = {"labels": list(LABELS), "width": width, "height": height, "fps": fps,
                             "seed": seed, "variant": variant, "motion": motion, "frames": []}
    try:
        for i, (img, objs) in enumerate(iter_video(seed, frames, width, height, variant, motion)):
            writer.write(img)
            truth["frames"].append({"index": i, "objects": objs})
    finally:
        writer.release()
    path.with_suffix(".json").write_text(json.dumps(truth, separators=(",", ":")))
    return truth


# --------------------------------------------------------------------------------------------------
# counting clips: a belt that may stop and reverse, plates crossing a vertical counting line


@dataclass
class CountingClip:
    """How a counting clip moves. `moves`: (frames, px per frame) segments of belt motion, in order
    (negative: the belt runs backwards; 0: it stands still). `pitch`: belt distance between plate
    slots. `line_x`: the counting line (vertical, whole frame height). `start_phase`: where the slot
    centres start, as belt px to the right of the line. `touching`: slots hold two plates touching
    side by side (along the belt) or stacked across it, instead of one."""

    name: str
    moves: list[tuple[int, float]]
    pitch: int = 200
    line_x: int = 320
    start_phase: float = 100.0
    touching: bool = False
    width: int = 640
    height: int = 360
    variant: str = "standard"

    @property
    def frames(self) -> int:
        return sum(n for n, _ in self.moves)


# The standard set: each moves whole pitches, so every plate ends where plates started (away from the
# line), and turns only half way between two plates, so every crossing is a clear one.
COUNTING_CLIPS: tuple[CountingClip, ...] = (
    CountingClip("steady", [(4, 0.0), (100, 8.0), (4, 0.0)]),
    CountingClip("touching", [(4, 0.0), (105, 8.0), (4, 0.0)], pitch=280, start_phase=140.0, touching=True),
    CountingClip("reversal", [(4, 0.0), (50, 8.0), (3, 0.0), (25, -8.0), (3, 0.0), (25, 8.0), (4, 0.0)]),
    # stops with a plate's centre on the line (100 px moved: a plate started 100 px left of it), stands
    # 20 frames, goes on (one crossing); stops with the next plate on the line and goes back (none)
    CountingClip("stop_on_line", [(4, 0.0), (25, 4.0), (20, 0.0), (50, 4.0), (20, 0.0), (25, -4.0), (4, 0.0)]),
)


def _clip_offsets(clip: CountingClip) -> list[float]:
    offs, off = [], 0.0
    for n, v in clip.moves:
        for _ in range(n):
            off += v
            offs.append(off)
    return offs


def _clip_plates(clip: CountingClip, rng: np.random.Generator, lo: float, hi: float) -> list[Part]:
    """Plates whose belt x covers [lo, hi]; p.u is the plate's centre in belt coordinates at offset 0."""
    y0, y1 = _belt_rows(clip.height)
    plates: list[Part] = []
    first = math.floor((lo - clip.line_x - clip.start_phase) / clip.pitch) - 1
    last = math.ceil((hi - clip.line_x - clip.start_phase) / clip.pitch) + 1
    for k in range(first, last + 1):
        cx = clip.line_x + clip.start_phase + k * clip.pitch
        if not clip.touching:
            p = random_part(rng)
            p.u, p.y = cx, int(rng.integers(y0, max(y0 + 1, y1 - p.h)))
            plates.append(p)
            continue
        a, b = random_part(rng), random_part(rng)
        if k % 2 == 0:  # side by side along the belt, touching (0 or 1 px apart)
            gap = int(rng.integers(0, 2))
            a.u = cx - (a.w + gap + b.w) / 2 + a.w / 2
            b.u = a.u + a.w / 2 + gap + b.w / 2
            a.y = int(rng.integers(y0, max(y0 + 1, y1 - a.h)))
            b.y = int(rng.integers(y0, max(y0 + 1, y1 - b.h)))
        else:  # stacked across the belt, touching
            a.u = b.u = cx
            top = int(rng.integers(y0, max(y0 + 1, y1 - a.h - b.h - 1)))
            a.y, b.y = top, top + a.h + int(rng.integers(0, 2))
            if b.y + b.h > y1:
                plates.append(a)
                continue
        plates.extend((a, b))
    return plates


def iter_counting_clip(clip: CountingClip, seed: int) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Frames of `clip` and their objects; every object also carries `plate` (its index) and, for
    plates, `cx` (the true centre x) so that `counting_truth` can follow them."""
    rng = np.random.default_rng([seed, 15013])
    style = random_style(rng, clip.variant)
    W, H = clip.width, clip.height
    offs = _clip_offsets(clip)
    lo_off, hi_off = min([0.0, *offs]), max([0.0, *offs])
    plates = _clip_plates(clip, rng, -hi_off - 200, W - lo_off + 200)
    margin = 8
    strip = _belt_strip(rng, style, int(hi_off - lo_off) + W + 2 * margin, H)
    prev = 0.0
    for t, off in enumerate(offs):
        x0 = round(hi_off - off) + margin  # strip column shown at frame x = 0: the belt moves right
        img = strip[:, x0:x0 + W].copy()
        objects: list[dict[str, Any]] = []
        for i, p in enumerate(plates):
            x = round(p.u - p.w / 2 + off)
            if x + p.w + 6 < 0 or x - 6 > W:
                continue
            _draw_part(img, p, x, p.y)
            for o in _objects_of(p, x, p.y, W, H):
                o["plate"] = i
                if o["class_id"] == PART:
                    o["cx"] = x + p.w / 2
                objects.append(o)
        vel = off - prev
        prev = off
        gain = style.gain * (1 + style.flicker * math.sin(2 * math.pi * t / 45.0))
        blur = max(1, int(abs(vel) * EXPOSURE) | 1)
        yield _finish(img, style, np.random.default_rng([seed, 15017, t]), gain, blur), objects


def counting_truth(clip: CountingClip, seed: int, frames: list[list[dict[str, Any]]] | None = None) -> dict[str, int]:
    """{"in", "out"}: crossings of the plates' true centres over the line (left to right is `in`); a
    centre within 1 px of the line (plates are drawn at whole pixels, so a centre may sit half a pixel
    off) is on neither side: stopping there and going on counts once, going back counts nothing."""
    if frames is None:
        frames = [objs for _, objs in iter_counting_clip(clip, seed)]
    last: dict[int, int] = {}
    n_in = n_out = 0
    for objs in frames:
        for o in objs:
            if "cx" not in o:
                continue
            d = o["cx"] - clip.line_x
            s = (d > 1) - (d < -1)
            if s == 0:
                continue
            before = last.get(o["plate"])
            if before is not None and before != s:
                n_in += s > 0
                n_out += s < 0
            last[o["plate"]] = s
    return {"in": n_in, "out": n_out}


def write_counting_clip(path: Path, clip: CountingClip, seed: int, fps: int = 15) -> dict[str, Any]:
    """An MJPG .avi (or mp4v .mp4) of `clip` and its truth JSON beside it: {"clip", "seed", "line",
    "crossings": {"in", "out"}, "frames": [{"index", "objects"}]}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter.fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, float(fps), (clip.width, clip.height))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot open {path}")
    frames: list[list[dict[str, Any]]] = []
    try:
        for img, objs in iter_counting_clip(clip, seed):
            writer.write(img)
            frames.append(objs)
    finally:
        writer.release()
    truth: dict[str, Any] = {"clip": clip.name, "seed": seed, "fps": fps, "width": clip.width,
                             "height": clip.height, "line": [[clip.line_x, 0], [clip.line_x, clip.height]],
                             "crossings": counting_truth(clip, seed, frames),
                             "frames": [{"index": i, "objects": o} for i, o in enumerate(frames)]}
    path.with_suffix(".json").write_text(json.dumps(truth, separators=(",", ":")))
    return truth
