from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.errors import ModelError
from agent.vision.labels import labels_from_metadata, load_labels


def test_ultralytics_dict_literal() -> None:
    assert labels_from_metadata({"names": "{0: 'person', 1: 'car', 2: \"traffic light\"}"}) == [
        "person", "car", "traffic light"]


def test_json_list_and_object_and_gaps() -> None:
    assert labels_from_metadata({"names": '["scratch", "dent"]'}) == ["scratch", "dent"]
    assert labels_from_metadata({"names": '{"0": "a", "1": "b"}'}) == ["a", "b"]
    assert labels_from_metadata({"labels": "['x']"}) == ["x"]
    assert labels_from_metadata({"names": "{0: 'a', 2: 'c'}"}) == ["a", "class_1", "c"]
    assert labels_from_metadata({}) is None
    assert labels_from_metadata({"names": "{0: 1, 1: 2}"}) is None
    assert labels_from_metadata({"names": "not a literal"}) is None


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {p}')",
    "{0: __import__('os').system('touch {p}')}",
    "[open('{p}', 'w')]",
    "(lambda: __import__('os').system('touch {p}'))()",
    "{0: 'a'} if __import__('os').system('touch {p}') else {}",
])
def test_malicious_metadata_is_not_executed(payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    assert labels_from_metadata({"names": payload.replace("{p}", str(marker))}) is None
    assert not marker.exists()


def test_huge_or_deep_metadata_is_ignored() -> None:
    assert labels_from_metadata({"names": "[" * 100_000 + "]" * 100_000}) is None
    assert labels_from_metadata({"names": "['a']" + " " * 2_000_000}) is None


def test_explicit_list(caplog: pytest.LogCaptureFixture) -> None:
    assert load_labels(["a", "b"], {"names": "{0: 'x', 1: 'y'}"}, 2) == ["a", "b"]
    assert load_labels(["a", "b"], {}, None) == ["a", "b"]
    with pytest.raises(ModelError, match="2 labels but the model outputs 3"):
        load_labels(["a", "b"], {}, 3)


def test_labels_file(tmp_path: Path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("person\n\n  car  \n\ndog\n", encoding="utf-8")
    assert load_labels(f, {}, 3) == ["person", "car", "dog"]
    with pytest.raises(ModelError, match="3 labels"):
        load_labels(f, {}, 80)
    with pytest.raises(ModelError, match="cannot read"):
        load_labels(tmp_path / "missing.txt", {}, None)


def test_metadata_then_fallback(caplog: pytest.LogCaptureFixture) -> None:
    meta = {"names": "{0: 'person', 1: 'car'}"}
    assert load_labels(None, meta, 2) == ["person", "car"]
    assert load_labels(None, meta, None) == ["person", "car"]
    with caplog.at_level(logging.WARNING, logger="agent.vision.labels"):
        assert load_labels(None, meta, 3) == ["class_0", "class_1", "class_2"]  # metadata disagrees
        assert load_labels(None, {}, 2) == ["class_0", "class_1"]
        assert load_labels(None, {}, None) == []
    assert len(caplog.records) == 3
