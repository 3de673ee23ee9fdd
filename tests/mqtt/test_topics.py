from __future__ import annotations

import pytest

from agent.mqtt.topics import Topics, sanitize_level


@pytest.fixture
def t() -> Topics:
    return Topics("edge", "D")


def test_fixed_topics(t: Topics) -> None:
    assert t.status == "edge/D/status"
    assert t.telemetry == "edge/D/telemetry"
    assert t.events == "edge/D/events"
    assert t.model_state == "edge/D/model/state"
    assert t.model_update == "edge/D/model/update"
    assert t.detections("cam0") == "edge/D/cam0/detections"
    assert t.group_model_update("line1") == "edge/group/line1/model/update"


def test_count_label_is_sanitised(t: Topics) -> None:
    assert t.count("cam0", "scratch") == "edge/D/cam0/count/scratch"
    assert t.count("cam0", "a/b+c#d") == "edge/D/cam0/count/a_b_c_d"
    assert t.count("cam0", "x\x00y\ty\n\x7f") == "edge/D/cam0/count/x_y_y__"
    assert t.count("cam0", "") == "edge/D/cam0/count/_"
    assert t.count("cam0", "traffic light") == "edge/D/cam0/count/traffic light"
    assert sanitize_level("défaut") == "défaut"


def test_chunks_and_filters(t: Topics) -> None:
    assert t.chunks("tx1", 7) == "edge/D/model/chunks/tx1/7"
    assert t.chunk_filter() == "edge/D/model/chunks/+/+"
    assert t.group_chunk_filter("g") == "edge/group/g/model/chunks/+/+"
    assert t.group_chunks("g", "tx1", 0) == "edge/group/g/model/chunks/tx1/0"
    assert t.parse_chunk_topic(t.chunks("tx1", 7)) == ("tx1", 7)
    assert t.parse_chunk_topic("edge/group/g/model/chunks/tx2/0") == ("tx2", 0)
    for bad in ("edge/D/model/chunks/tx1", "edge/D/model/chunks/tx1/-1", "edge/D/model/chunks/tx1/x",
                "edge/D/model/chunks/tx1/01", "edge/E/model/chunks/tx1/1", "other/D/model/chunks/tx1/1",
                "edge/D/model/chunk/tx1/1", "edge/D/model/chunks//1", "edge/group//model/chunks/t/1",
                "edge/D/model/chunks/tx1/1/2"):
        assert t.parse_chunk_topic(bad) is None, bad


def test_prefix_with_levels() -> None:
    t = Topics("plant/a", "D")
    assert t.status == "plant/a/D/status"
    assert t.parse_chunk_topic("plant/a/D/model/chunks/t/3") == ("t", 3)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#"])
def test_invalid_levels_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics("edge", bad)
    with pytest.raises(ValueError):
        Topics("edge", "D").detections(bad)
    with pytest.raises(ValueError):
        Topics("edge", "D").chunks(bad, 1)
