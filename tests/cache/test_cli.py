"""`edge-agent cache list | verify | prune` on folders it cannot read, and on damaged entries, through
the real console script: exit 2 with the reason and no traceback for a folder it cannot read; `list`
(metadata and size only) never calls an entry it has not checksummed ok."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.support.cli import ROOT, assert_clean, edge_agent, without_dac_override

MODEL = ROOT / "agent" / "data" / "demo" / "model.onnx"


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the demo model's engine, built once by `edge-agent build-engine`."""
    root = tmp_path_factory.mktemp("cache") / "engines"
    assert_clean(edge_agent("build-engine", str(MODEL), "--cache-dir", str(root)), 0)
    return root


def _states(table: str) -> list[str]:
    """The STATE column of `cache list` / `verify`."""
    lines = table.splitlines()
    col = lines[0].index("STATE")
    return [ln[col:].split("  ")[0].strip() for ln in lines[1:] if re.match(r"[0-9a-f]{12}  ", ln)]


def _copy(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    dst = tmp_path / "engines"
    shutil.copytree(cache, dst)
    entry = next(p for p in dst.iterdir() if (p / "meta.json").exists())
    return dst, entry


@pytest.mark.parametrize("action", ["list", "verify", "prune"])
def test_not_a_directory(action: str) -> None:
    assert_clean(edge_agent("cache", action, "--cache-dir", "/etc/passwd"), 2, "/etc/passwd is not a directory")


@pytest.mark.parametrize("action", ["list", "verify", "prune"])
def test_unreadable_folder(tmp_path: Path, action: str) -> None:
    folder = tmp_path / "engines"
    folder.mkdir()
    folder.chmod(0)
    try:
        res = edge_agent("cache", action, "--cache-dir", str(folder), prefix=without_dac_override())
    finally:
        folder.chmod(0o700)
    assert_clean(res, 2, f"cannot read {folder}", "Permission denied")


def test_unreadable_entry(built_cache: Path, tmp_path: Path) -> None:
    root, entry = _copy(built_cache, tmp_path)
    entry.chmod(0)
    try:
        res = edge_agent("cache", "list", "--cache-dir", str(root), prefix=without_dac_override())
    finally:
        entry.chmod(0o700)
    assert_clean(res, 2, "Permission denied")


def test_list_does_not_call_an_unchecked_entry_ok(built_cache: Path, tmp_path: Path) -> None:
    root, entry = _copy(built_cache, tmp_path)
    res = edge_agent("cache", "list", "--cache-dir", str(root))
    assert_clean(res, 0)
    assert _states(res.stdout) == ["unverified"], res.stdout
    assert "cache verify" in res.stdout  # says what list checked and what does the rest
    res = edge_agent("cache", "verify", "--cache-dir", str(root))
    assert_clean(res, 0)
    assert _states(res.stdout) == ["ok"], res.stdout

    engine = entry / "engine.bin"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, same metadata: only the checksum can tell
    engine.write_bytes(bytes(data))
    listed = edge_agent("cache", "list", "--cache-dir", str(root))
    assert_clean(listed, 0)
    assert _states(listed.stdout) == ["unverified"], listed.stdout
    verified = edge_agent("cache", "verify", "--cache-dir", str(root))
    assert_clean(verified, 1)
    assert _states(verified.stdout) == ["corrupt"] and "checksum" in verified.stdout, verified.stdout

    engine.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the cheap check finds it
    listed = edge_agent("cache", "list", "--cache-dir", str(root))
    assert_clean(listed, 0)
    assert _states(listed.stdout) == ["corrupt"] and "size" in listed.stdout, listed.stdout


def test_missing_folder_is_an_empty_cache(tmp_path: Path) -> None:
    res = edge_agent("cache", "list", "--cache-dir", str(tmp_path / "none"))
    assert_clean(res, 0)
    assert res.stdout.startswith("0 entries")
