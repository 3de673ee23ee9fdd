"""One cache entry's checks, quarantine and removal, on real files (no cache object around them)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from agent.cache.entries import quarantine_entry, read_meta, remove_entry, verify_entry
from agent.cache.files import ENGINE_FILE, META_FILE, write_atomic
from agent.cache.keys import cache_key, file_sha256
from agent.engines.fingerprint import CACHE_FORMAT_VERSION


def entry(root: Path, engine: bytes = b"engine bytes") -> tuple[Path, str]:
    fields = {"cache_format": CACHE_FORMAT_VERSION, "model_sha256": "x", "backend": "onnxruntime"}
    key = cache_key(fields)
    d = root / key
    d.mkdir(parents=True)
    (d / ENGINE_FILE).write_bytes(engine)
    meta = {"format": CACHE_FORMAT_VERSION, "key": key, "fields": fields, "size": len(engine),
            "engine_sha256": file_sha256(d / ENGINE_FILE)}
    write_atomic(d / META_FILE, json.dumps(meta).encode())
    return d, key


def test_a_complete_entry_verifies_and_each_kind_of_damage_says_why(tmp_path: Path) -> None:
    d, key = entry(tmp_path)
    assert verify_entry(d, key)[1] == ""
    assert read_meta(tmp_path / ("0" * 64), "0" * 64) == (None, "missing")
    (d / ENGINE_FILE).write_bytes(b"engine bytez")  # same size, other bytes
    assert read_meta(d, key)[1] == ""  # the cheap check cannot see it
    assert verify_entry(d, key) == (None, "engine checksum mismatch")
    assert verify_entry(d, "f" * 64)[1] == "metadata does not belong to this key / format"
    (d / ENGINE_FILE).write_bytes(b"short")
    assert "differs from the recorded" in read_meta(d, key)[1]
    (d / META_FILE).unlink()
    assert read_meta(d, key)[1] == "engine without metadata (interrupted write)"


def test_quarantine_moves_the_entry_aside_with_its_reason_and_keeps_the_newest(tmp_path: Path) -> None:
    q = tmp_path / "quarantine"
    for i in range(3):
        d, key = entry(tmp_path / f"r{i}")
        quarantine_entry(d, q, d.parent, key, f"reason {i}", keep=2)
        assert not d.exists()
        time.sleep(0.01)  # mtimes apart: the oldest goes first
    kept = sorted(q.iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(kept) == 2
    assert (kept[-1] / "reason.txt").read_text() == "reason 2\n" and kept[-1].name.endswith(".reason-2")


def test_remove_takes_the_metadata_first_and_write_atomic_leaves_owner_only_files(tmp_path: Path) -> None:
    d, _ = entry(tmp_path)
    assert os.stat(d / META_FILE).st_mode & 0o777 == 0o600
    remove_entry(d)
    assert not d.exists()
    remove_entry(d)  # already gone: nothing to do, nothing raised
