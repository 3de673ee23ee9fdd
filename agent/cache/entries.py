"""One cache entry on disk: whether it is valid, and how an invalid one leaves.

    <root>/<key>/meta.json + engine.bin -> read_meta (shape, key, fields hash, size) -> verify_entry
    (+ the engine's sha256) -> (meta, "") for a valid entry, or (None, why not)
    invalid -> quarantine_entry (moved aside with its reason, bounded) | remove_entry (meta first)

`Entry` is what a lookup or a build returns; `EntryInfo` what listing and verification report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cache.files import ENGINE_FILE, META_FILE, slug, write_atomic
from agent.cache.keys import cache_key, file_sha256
from agent.engines.fingerprint import CACHE_FORMAT_VERSION
from agent.fsutil import fsync_dir

__all__ = ["Entry", "EntryInfo", "quarantine_entry", "read_meta", "remove_entry", "verify_entry"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """A valid cache entry, as returned by `get_or_build` / `lookup`."""

    key: str
    dir: Path
    meta: dict[str, Any]
    built: bool = False  # built by this call (False: taken from the cache)

    @property
    def engine_path(self) -> Path:
        return self.dir / ENGINE_FILE


@dataclass(slots=True)
class EntryInfo:
    """One directory of the cache as `list_entries` / `verify` see it."""

    key: str
    state: str  # "ok" | "stale" | "corrupt" | "building"
    reason: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0
    last_use: float = 0.0
    built_at: float = 0.0
    engine_sha256: str = ""
    protected: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "state": self.state, "reason": self.reason, "fields": dict(self.fields),
                "size": self.size, "last_use": self.last_use, "built_at": self.built_at,
                "engine_sha256": self.engine_sha256, "protected": self.protected}


def read_meta(d: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """The entry `key` in directory `d`: (meta, "") for a complete entry, (None, "missing") when
    there is none, (None, reason) when what is there is not a valid entry. Checks everything but
    the engine's sha256."""
    meta_path, engine_path = d / META_FILE, d / ENGINE_FILE
    has_meta, has_engine = meta_path.exists(), engine_path.exists()
    if not has_meta and not has_engine:
        return None, "missing"
    if not has_meta:
        return None, "engine without metadata (interrupted write)"
    if not has_engine:
        return None, "metadata without an engine"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"metadata unreadable: {exc}"
    if not isinstance(meta, dict):
        return None, "metadata is not an object"
    if meta.get("format") != CACHE_FORMAT_VERSION or meta.get("key") != key:
        return None, "metadata does not belong to this key / format"
    fields = meta.get("fields")
    if not isinstance(fields, dict) or cache_key({str(k): str(v) for k, v in fields.items()}) != key:
        return None, "metadata fields do not hash to the key"
    try:
        size = engine_path.stat().st_size
    except OSError as exc:
        return None, f"engine unreadable: {exc.strerror or exc}"
    if size != meta.get("size"):
        return None, f"engine size {size} differs from the recorded {meta.get('size')}"
    if not isinstance(meta.get("engine_sha256"), str):
        return None, "metadata has no engine checksum"
    return meta, ""



def verify_entry(d: Path, key: str, deep: bool = True) -> tuple[dict[str, Any] | None, str]:
    """read_meta, and with `deep` the engine's sha256 against the recorded one."""
    meta, problem = read_meta(d, key)
    if meta is None or not deep:
        return meta, problem
    try:
        digest = file_sha256(d / ENGINE_FILE)
    except OSError as exc:
        return None, f"engine unreadable: {exc.strerror or exc}"
    if digest != meta["engine_sha256"]:
        return None, "engine checksum mismatch"
    return meta, ""


def remove_entry(d: Path) -> None:
    """Remove an entry: meta first (the entry stops being valid at once), then the rest."""
    with contextlib.suppress(OSError):
        (d / META_FILE).unlink()
    shutil.rmtree(d, ignore_errors=True)


def quarantine_entry(src: Path, quarantine_dir: Path, root: Path, key: str, reason: str, keep: int) -> None:
    """Move the entry in `src` aside (with reason.txt), keeping the newest `keep` quarantined."""
    dst = quarantine_dir / f"{key}.{int(time.time())}.{os.getpid()}.{slug(reason)}"
    try:
        quarantine_dir.mkdir(exist_ok=True, mode=0o700)
        os.replace(src, dst)
        fsync_dir(root)
        write_atomic(dst / "reason.txt", (reason + "\n").encode(), sync_dir=False)
    except OSError as exc:  # could not move it: remove it, a bad engine must not stay valid
        log.warning("cannot quarantine engine %s (%s); removing it", key[:12], exc)
        remove_entry(src)
    log.warning("engine %s quarantined: %s", key[:12], reason)
    try:
        items = sorted(quarantine_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for p in items[: max(0, len(items) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
