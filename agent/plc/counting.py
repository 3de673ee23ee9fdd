"""Zones and counting lines on tracked objects: the geometry, the crossing rule, the counters' file.

Data flow (one camera, one frame at a time, on its post thread): tracked detections (label, track
id, box) -> each box's anchor point (bottom centre or centre) -> every `LineCounter` decides, per
track, which side of its line the anchor is on and whether a crossing completed -> `Crossing`s;
every `ZoneCounter` counts the anchors inside its polygon, per label. The component
(agent/plc/counting_service.py) publishes what changed; `CounterStore` keeps the line counters
on disk so they survive restarts.

The crossing rule, per line and track:
- an anchor is on the `in` side, the `out` side, or on neither: within `band_px` of the line (a
  dead band), or beyond the segment's ends;
- the first side a track is seen on is its reference; a crossing counts once the anchor has been
  on the other side for `min_frames` frames in a row (frames on neither side do not break the
  run; a frame back on the reference side does), and that side becomes the new reference;
- so a reversal counts `in` then `out`, flicker shorter than `min_frames` counts nothing, and an
  object that stops on the line (in the band) keeps its reference until it really leaves.

Why not supervision's LineZone: it has no dead band (an anchor jittering on the line flips sides,
and flips that outlast `min_frames` count in and out), and a band cannot be added from outside:
leaving out the anchors near the line makes it forget the track's side after a few such frames, so
a part that waits on the line and then goes on would not be counted. On the generated clips
(scripts/measure_counting.py) it double-counts parts stopping on the line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import LineConfig, ZoneConfig
from agent.fsutil import write_atomic

log = logging.getLogger(__name__)

UINT32 = 1 << 32
STATE_VERSION = 1
_MAX_TRACKS = 4096  # per line: states kept for tracks not seen lately are dropped oldest first


def anchor_of(box: tuple[float, float, float, float], anchor: str) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    if anchor == "center":
        return (x1 + x2) / 2, (y1 + y2) / 2
    return (x1 + x2) / 2, y2  # bottom_center


@dataclass(frozen=True, slots=True)
class Tracked:
    """One tracked object in one frame: what the counters need of a detection."""

    track_id: int
    label: str
    point: tuple[float, float]  # its anchor, source-frame pixels


@dataclass(frozen=True, slots=True)
class Crossing:
    line: str
    direction: str  # "in" | "out"
    label: str
    track_id: int


@dataclass(slots=True)
class _Side:
    ref: int  # +1 in side, -1 out side
    run: int = 0  # frames in a row on the other side
    seen: int = 0  # frame number last seen


class LineCounter:
    """Counts crossings of one line, per label, in and out."""

    def __init__(self, cfg: LineConfig, min_frames: int, band_px: float) -> None:
        self.name = cfg.name
        self.labels = frozenset(cfg.labels)
        self.min_frames = min_frames
        self.band = band_px
        (x1, y1), (x2, y2) = cfg.points
        self._p = (x1, y1)
        length = math.hypot(x2 - x1, y2 - y1)
        self._len = length
        self._d = ((x2 - x1) / length, (y2 - y1) / length)
        nx, ny = -self._d[1], self._d[0]  # a normal; flipped so that it points to the `in` side
        flip = {"left_to_right": nx < 0, "right_to_left": nx > 0, "top_to_bottom": ny < 0,
                "bottom_to_top": ny > 0}[cfg.direction]
        self._n = (-nx, -ny) if flip else (nx, ny)
        self.counts_in: Counter[str] = Counter()
        self.counts_out: Counter[str] = Counter()
        self._tracks: dict[int, _Side] = {}
        self._frame = 0

    def side(self, point: tuple[float, float]) -> int:
        """+1 on the `in` side, -1 on the `out` side, 0 in the dead band or beyond the segment's ends."""
        rx, ry = point[0] - self._p[0], point[1] - self._p[1]
        along = rx * self._d[0] + ry * self._d[1]
        if along < 0 or along > self._len:
            return 0
        across = rx * self._n[0] + ry * self._n[1]
        if abs(across) <= self.band:
            return 0
        return 1 if across > 0 else -1

    def update(self, objects: Iterable[Tracked]) -> list[Crossing]:
        """One frame's tracked objects -> the crossings completed in this frame."""
        self._frame += 1
        out: list[Crossing] = []
        for obj in objects:
            if self.labels and obj.label not in self.labels:
                continue
            s = self.side(obj.point)
            st = self._tracks.get(obj.track_id)
            if st is None:
                if s == 0:
                    continue  # no reference yet: wait until it is clearly on one side
                st = self._tracks[obj.track_id] = _Side(ref=s)
            st.seen = self._frame
            if s == 0:
                continue
            if s == st.ref:
                st.run = 0  # back where it was: the excursion was flicker
                continue
            st.run += 1
            if st.run >= self.min_frames:
                st.ref, st.run = s, 0
                direction = "in" if s > 0 else "out"
                (self.counts_in if s > 0 else self.counts_out)[obj.label] += 1
                out.append(Crossing(self.name, direction, obj.label, obj.track_id))
        self._forget()
        return out

    def _forget(self) -> None:
        if len(self._tracks) <= _MAX_TRACKS:
            return
        for tid, _ in sorted(self._tracks.items(), key=lambda kv: kv[1].seen)[: len(self._tracks) - _MAX_TRACKS]:
            del self._tracks[tid]

    def forget_unseen(self, frames: int) -> None:
        """Drop tracks not seen for `frames` frames (the tracker has let them go by then)."""
        cutoff = self._frame - frames
        for tid in [t for t, st in self._tracks.items() if st.seen < cutoff]:
            del self._tracks[tid]

    def totals(self) -> tuple[int, int]:
        """(in, out) over every label, as uint32 counters wrap."""
        return sum(self.counts_in.values()) % UINT32, sum(self.counts_out.values()) % UINT32

    def reset(self) -> None:
        self.counts_in.clear()
        self.counts_out.clear()


def _inside(point: tuple[float, float], poly: list[tuple[float, float]]) -> bool:
    """Even-odd rule (a ray to +x): points on an edge may fall either way, as with any pixel grid."""
    x, y = point
    inside = False
    j = len(poly) - 1
    for i in range(len(poly)):
        xi, yi = poly[i]
        xj, yj = poly[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


class ZoneCounter:
    """Objects whose anchor lies inside a polygon in the latest frame, per label."""

    def __init__(self, cfg: ZoneConfig) -> None:
        self.name = cfg.name
        self.labels = frozenset(cfg.labels)
        self.polygon = list(cfg.polygon)
        self.counts: Counter[str] = Counter()

    def contains(self, point: tuple[float, float]) -> bool:
        return _inside(point, self.polygon)

    def update(self, objects: Iterable[Tracked]) -> None:
        self.counts = Counter(o.label for o in objects
                              if (not self.labels or o.label in self.labels) and _inside(o.point, self.polygon))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class CounterStore:
    """The line counters of one camera in one JSON file, replaced atomically (temp, fsync, rename, fsync dir).

    {"version": 1, "camera": "cam0", "seq": 812, "lines": {"<name>": {"in": {"<label>": n}, "out": {...}}}}
    A file that cannot be read is moved aside (`.bad`) and counting starts from zero: the caller says so.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[dict[str, Any] | None, str | None]:
        """(state, problem): state None when there is none; problem says why a file was set aside."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as exc:
            return None, self._set_aside(f"cannot read {self.path}: {exc}")
        try:
            data = json.loads(text)
            _check_state(data)
        except ValueError as exc:
            return None, self._set_aside(f"{self.path} is not a counters file: {exc}")
        return data, None

    def _set_aside(self, problem: str) -> str:
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".bad"))
        except OSError:
            pass
        return problem

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(state, separators=(",", ":"), sort_keys=True).encode())


def _check_state(data: object) -> None:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"expected an object with version {STATE_VERSION}")
    if not isinstance(data.get("seq"), int) or data["seq"] < 0:
        raise ValueError("seq must be a non-negative integer")
    lines = data.get("lines")
    if not isinstance(lines, dict):
        raise ValueError("lines must be an object")
    for name, line in lines.items():
        if not isinstance(line, dict):
            raise ValueError(f"line {name!r} must be an object")
        for direction in ("in", "out"):
            counts = line.get(direction, {})
            if not isinstance(counts, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in counts.items()):
                raise ValueError(f"line {name!r} {direction} must map labels to non-negative integers")


__all__ = ["UINT32", "CounterStore", "Crossing", "LineCounter", "Tracked", "ZoneCounter", "anchor_of"]
