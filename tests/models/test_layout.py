"""The model store's layout helpers: safe names, the version record, the atomic write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import UpdateError
from agent.models.layout import ModelVersion, safe_name, sha256_file, write_atomic


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden", "", "a..b", "x" * 65, "a\x00b"])
def test_names_that_could_leave_the_store_are_refused(name: str) -> None:
    with pytest.raises(UpdateError) as err:
        safe_name(name, "name")
    assert err.value.reason == "unsafe_name"


def test_safe_names_pass_and_the_version_record_reads_its_manifest(tmp_path: Path) -> None:
    assert safe_name("widgets_v2.1", "name") == "widgets_v2.1"
    mv = ModelVersion("w", "2", tmp_path, {"model": {"sha256": "ab", "labels": ["a", 3]}})
    assert (mv.key, mv.model_path, mv.sha256, mv.labels) == ("w-2", tmp_path / "model.onnx", "ab", ["a", "3"])
    assert ModelVersion("w", "2", tmp_path, {"model": {"labels": "not a list"}}).labels == []


def test_write_atomic_replaces_whole_owner_only_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and os.stat(p).st_mode & 0o777 == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]
    assert sha256_file(p) == "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"
