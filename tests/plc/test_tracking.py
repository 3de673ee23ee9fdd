"""ByteTrack through `trackers` (the real package): ids per detection, in our order."""

from __future__ import annotations

from agent.config import TrackerConfig
from agent.plc.tracking import Tracker
from agent.vision.types import Detection


def det(x: float, y: float, label: str = "part", score: float = 0.9) -> Detection:
    return Detection(class_id=0, label=label, score=score, box=(x, y, x + 60, y + 50))


def test_two_objects_keep_their_own_ids_while_moving() -> None:
    tr = Tracker(TrackerConfig())
    first = tr.update([det(10, 10), det(200, 100)])
    assert first == [None, None]  # a track is confirmed on its second frame
    seen: list[list[int | None]] = []
    for k in range(1, 10):
        # given in alternating order: the ids must follow the boxes, not the list positions
        a, b = det(10 + 6 * k, 10), det(200 + 6 * k, 100)
        ids = tr.update([a, b] if k % 2 else [b, a])
        seen.append(ids if k % 2 else ids[::-1])
    assert all(i is not None for ids in seen for i in ids)
    assert len({ids[0] for ids in seen}) == 1 and len({ids[1] for ids in seen}) == 1
    assert seen[0][0] != seen[0][1]


def test_empty_frames_and_a_new_object_get_a_new_id() -> None:
    tr = Tracker(TrackerConfig(lost_frames=2))
    assert tr.update([]) == []
    tr.update([det(10, 10)])
    (a,) = tr.update([det(12, 10)])
    for _ in range(10):
        tr.update([])
    tr.update([det(300, 200)])
    (b,) = tr.update([det(302, 200)])
    assert a is not None and b is not None and a != b


def test_low_scores_never_start_a_track() -> None:
    tr = Tracker(TrackerConfig(activation_score=0.5))
    for k in range(5):
        assert tr.update([det(10 + k, 10, score=0.3)]) == [None]
