"""The crossing rule, zones and the counters file (agent/plc/counting.py), on hand-made tracks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import LineConfig, ZoneConfig, parse_config
from agent.errors import ConfigError
from agent.plc.counting import UINT32, CounterStore, LineCounter, Tracked, ZoneCounter, anchor_of


def vertical(min_frames: int = 2, band: float = 2.0, labels: list[str] | None = None,
             direction: str = "left_to_right") -> LineCounter:
    cfg = LineConfig(name="l1", points=((100.0, 0.0), (100.0, 200.0)), direction=direction,  # type: ignore[arg-type]
                     labels=labels or [])
    return LineCounter(cfg, min_frames, band)


def walk(line: LineCounter, xs: list[float], track: int = 1, label: str = "part", y: float = 100.0) -> list[str]:
    """Feed one track's anchor x per frame; the crossings' directions in order."""
    out = []
    for x in xs:
        out += [c.direction for c in line.update([Tracked(track, label, (x, y))])]
    return out


def test_a_crossing_counts_once_after_min_frames_on_the_new_side() -> None:
    line = vertical(min_frames=3)
    assert walk(line, [80, 90, 98, 104, 110]) == []  # two frames on the new side: not yet
    assert walk(line, [116, 130, 150]) == ["in"]
    assert line.totals() == (1, 0) and dict(line.counts_in) == {"part": 1}


def test_flicker_shorter_than_min_frames_counts_nothing() -> None:
    line = vertical(min_frames=3)
    assert walk(line, [90, 105, 106, 95, 105, 94, 90]) == []
    assert line.totals() == (0, 0)


def test_reversal_counts_in_then_out() -> None:
    line = vertical()
    assert walk(line, [60, 80, 110, 120, 130, 120, 90, 80, 70]) == ["in", "out"]
    assert line.totals() == (1, 1)


def test_an_object_stopping_on_the_line_is_counted_once() -> None:
    line = vertical(min_frames=2, band=2.0)
    # jitter within the band for a long stop, then on; and a stop that jitters across the band's edge
    stop = [100.0 + d for d in (1.5, -1.8, 0.3, -0.9, 2.0, -2.0) * 10]
    assert walk(line, [80, 90, *stop, 110, 120]) == ["in"]
    assert walk(line, [130, 101, 103, 99, 104, 101, 103, 120], track=2) == []  # starts on the in side
    assert walk(line, [80, 97, 101, 103, 99, 104, 101, 103, 120], track=3) == ["in"]
    assert line.totals() == (2, 0)


def test_stopping_on_the_line_and_going_back_counts_nothing() -> None:
    line = vertical()
    assert walk(line, [70, 90, 99, 100, 101, 100, 99, 90, 70]) == []


def test_passing_beyond_the_segment_ends_does_not_cross() -> None:
    line = vertical(min_frames=1)
    assert walk(line, [80, 120], y=250) == []  # below the segment's lower end
    assert walk(line, [80, 120], track=2, y=150) == ["in"]


def test_labels_filter_and_per_label_counts() -> None:
    line = vertical(min_frames=1, labels=["part", "dent"])
    walk(line, [80, 120], track=1, label="part")
    walk(line, [80, 120], track=2, label="dent")
    walk(line, [120, 80], track=3, label="part")
    walk(line, [80, 120], track=4, label="scratch")  # not counted by this line
    assert dict(line.counts_in) == {"part": 1, "dent": 1}
    assert dict(line.counts_out) == {"part": 1}


@pytest.mark.parametrize(("points", "direction", "path", "expected"), [
    (((100, 0), (100, 200)), "left_to_right", [(80, 100), (120, 100)], "in"),
    (((100, 200), (100, 0)), "left_to_right", [(80, 100), (120, 100)], "in"),  # point order does not matter
    (((100, 0), (100, 200)), "right_to_left", [(80, 100), (120, 100)], "out"),
    (((0, 100), (200, 100)), "top_to_bottom", [(50, 80), (50, 120)], "in"),
    (((0, 100), (200, 100)), "bottom_to_top", [(50, 80), (50, 120)], "out"),
    (((0, 0), (200, 200)), "left_to_right", [(120, 80), (80, 120)], "out"),  # slanted: towards smaller x
    (((0, 0), (200, 200)), "top_to_bottom", [(120, 80), (80, 120)], "in"),  # ... and larger y
])
def test_direction_decides_in_and_out(points: tuple, direction: str, path: list, expected: str) -> None:
    line = LineCounter(LineConfig(name="l", points=points, direction=direction), 1, 2.0)
    got = []
    for p in path:
        got += [c.direction for c in line.update([Tracked(1, "part", p)])]
    assert got == [expected]


def test_tracks_are_independent_and_forgotten_when_unseen() -> None:
    line = vertical(min_frames=2)
    for x1, x2 in [(80, 150), (90, 140), (110, 130), (120, 90), (130, 80)]:
        line.update([Tracked(1, "part", (x1, 100)), Tracked(2, "part", (x2, 100))])
    assert line.totals() == (1, 1)
    for _ in range(20):
        line.update([])
    line.forget_unseen(10)
    assert line._tracks == {}
    assert line.totals() == (1, 1)  # counters stay


def test_totals_wrap_as_uint32() -> None:
    line = vertical()
    line.counts_in["part"] = UINT32 + 5
    assert line.totals() == (5, 0)


def test_zone_counts_anchors_inside_per_label() -> None:
    zone = ZoneCounter(ZoneConfig(name="z", polygon=[(0, 0), (100, 0), (100, 100), (0, 100)], labels=["part", "dent"]))
    zone.update([Tracked(1, "part", (50, 50)), Tracked(2, "part", (150, 50)), Tracked(3, "dent", (10, 90)),
                 Tracked(4, "scratch", (20, 20))])
    assert dict(zone.counts) == {"part": 1, "dent": 1} and zone.total == 2
    zone.update([])
    assert zone.total == 0
    concave = ZoneCounter(ZoneConfig(name="c", polygon=[(0, 0), (100, 0), (100, 100), (50, 40), (0, 100)]))
    assert concave.contains((50, 20)) and not concave.contains((50, 80))


def test_anchor_points() -> None:
    assert anchor_of((10, 20, 30, 60), "bottom_center") == (20, 60)
    assert anchor_of((10, 20, 30, 60), "center") == (20, 40)


def test_store_round_trip_and_damaged_file_set_aside(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "state" / "counters-cam0.json")
    assert store.load() == (None, None)
    state = {"version": 1, "camera": "cam0", "seq": 7, "lines": {"l1": {"in": {"part": 5}, "out": {}}}}
    store.save(state)
    assert store.load() == (state, None)
    assert [p.name for p in store.path.parent.iterdir()] == ["counters-cam0.json"]  # no temp file left
    for bad in ("{", json.dumps({"version": 1, "seq": -1, "lines": {}}),
                json.dumps({"version": 1, "seq": 1, "lines": {"l1": {"in": {"part": "5"}}}})):
        store.path.write_text(bad)
        got, problem = store.load()
        assert got is None and problem is not None and "not a counters file" in problem
        assert (store.path.parent / "counters-cam0.json.bad").read_text() == bad
        assert not store.path.exists()


def test_config_errors_name_the_field() -> None:
    def errors(counting: dict) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            parse_config({"cameras": [{"source": "x.mp4", "counting": counting}]})
        return exc.value.errors

    assert any("cameras[0].counting.lines[0]" in e and "not horizontal" in e
               for e in errors({"lines": [{"name": "a", "points": [[0, 5], [100, 5]]}]}))
    assert any("unknown key" in e for e in errors({"lines": [{"name": "a", "points": [[0, 0], [0, 9]], "dir": 1}]}))
    assert any("no area" in e for e in errors({"zones": [{"name": "z", "polygon": [[0, 0], [5, 5], [10, 10]]}]}))
    assert any("unique" in e for e in errors({"lines": [{"name": "a", "points": [[0, 0], [0, 9]]}] * 2}))
    assert any("cameras[0].counting.zones[0].name" in e
               for e in errors({"zones": [{"name": "a/b", "polygon": [[0, 0], [5, 0], [5, 5]]}]}))
    assert any("min_frames" in e for e in errors({"min_frames": 0}))
    assert any("0..16384" in e for e in errors({"lines": [{"name": "a", "points": [[-1, 0], [0, 9]]}]}))
