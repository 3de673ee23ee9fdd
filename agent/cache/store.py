"""The engine cache on disk: content-derived keys, atomic writes, checksums, quarantine, LRU eviction.

Layout under `root`:

    <key>/engine.bin        the built engine (TensorRT plan, or ONNX Runtime's optimised model)
    <key>/meta.json         every key field, the engine's sha256 and size, build time and duration,
                            last use; written LAST: an entry is valid only when its meta exists and
                            matches the key and the engine's checksum
    quarantine/             entries that failed to verify or load (kept for a post-mortem, bounded)
    locks/<key>.lock        flock per key: builds of one key are serialised across processes
    protected.json          keys eviction must never remove (the active and previous models' engines)
    timing.cache            TensorRT timing cache, merged under locks/timing.cache.lock

Protocol of `get_or_build`: under a shared lock, verify (meta, fields, size, sha256) and load; on
any failure take the exclusive lock, look again (another process may have rebuilt it meanwhile),
quarantine what is there, build into a temp file in the entry's directory, fsync, rename, fsync the
directory, then write meta.json the same way. A process killed at any point leaves either no valid
entry (temp files, or an engine without meta, both cleaned or quarantined later) or a complete one.

Beside it: `files` (atomic writes, telling a full disk), `entries` (one entry's checks, quarantine,
removal), `keys` (the key), `lock` (the file locks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from agent.cache.entries import Entry, EntryInfo, quarantine_entry, remove_entry, verify_entry
from agent.cache.files import ENGINE_FILE, META_FILE, TMP_MARK, dir_size, no_space, tmp_name, write_atomic
from agent.cache.keys import cache_key as _cache_key
from agent.cache.keys import file_sha256
from agent.cache.lock import FileLock
from agent.engines.fingerprint import CACHE_FORMAT_VERSION, key_fingerprint
from agent.errors import CacheError
from agent.fsutil import fsync_dir

# Entry, EntryInfo, ENGINE_FILE, META_FILE, write_atomic and fsync_dir are re-exported: callers import
# them from here
__all__ = ["ENGINE_FILE", "META_FILE", "EngineCache", "Entry", "EntryInfo", "EventSink", "fsync_dir",
           "write_atomic"]

log = logging.getLogger(__name__)

T = TypeVar("T")
EventSink = Callable[[str, dict[str, Any]], None]
FingerprintFn = Callable[[str, list[str]], dict[str, str]]
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class _CacheFull(Exception):
    """The cache's file system ran out of space while an entry was written (handled in get_or_build)."""


class EngineCache:
    """Engine cache under `root`, capped at `max_bytes` (LRU eviction, protected keys kept).

    `fingerprint(backend, providers)` gives the key fingerprint of this device (default:
    `agent.engines.fingerprint.key_fingerprint`); `list_entries` uses it to mark entries stale.
    Events: engine_cache_hit, engine_build_waiting, engine_build_started, engine_built,
    engine_build_failed, engine_quarantined, engine_evicted, engine_pruned.

    The constructor checks that `root` is writable (CacheError otherwise); `check=False` defers
    that to the first operation that needs it (the CLI lists a read-only cache that way).
    """

    def __init__(self, root: Path, max_bytes: int, on_event: EventSink | None = None,
                 fingerprint: FingerprintFn | None = None, lock_timeout_s: float | None = 3600.0,
                 keep_quarantined: int = 8, check: bool = True) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.on_event = on_event
        self._fingerprint: FingerprintFn = fingerprint or key_fingerprint
        self._fp_memo: dict[tuple[str, str], dict[str, str]] = {}
        self.lock_timeout_s = lock_timeout_s
        self.keep_quarantined = keep_quarantined
        self._protected: set[str] = set()
        self._ready = False
        if check:  # fail at start, loudly, rather than rebuild silently on every boot
            self.ensure_ready()

    # ---- paths -----------------------------------------------------------------------------
    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    # ---- start-up check ----------------------------------------------------------------------
    def ensure_ready(self) -> None:
        """Create the layout and prove the directory is writable (CacheError saying what it means)."""
        if self._ready:
            return
        probe = self.root / f".write-test{TMP_MARK}{os.getpid()}"
        try:
            for d in (self.root, self.quarantine_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise CacheError(
                f"engine cache directory {self.root} is not writable ({exc.strerror or exc}): built engines "
                "cannot be kept, so every start would rebuild them from ONNX (minutes with TensorRT). "
                "Fix its owner / permissions, or point cache.dir at a writable directory."
            ) from exc
        self._ready = True

    # ---- keys ----------------------------------------------------------------------------------
    @staticmethod
    def cache_key(fields: dict[str, str]) -> str:
        return _cache_key(fields)

    @staticmethod
    def _full_fields(fields: dict[str, str]) -> dict[str, str]:
        return {"cache_format": CACHE_FORMAT_VERSION, **fields}

    def set_protected(self, keys: Iterable[str]) -> None:
        """Keys eviction never removes (the active and previous models' engines). Persisted in
        protected.json so that other processes (the CLI) honour them too."""
        self.ensure_ready()
        self._protected = {k for k in keys if k}
        try:
            write_atomic(self.root / "protected.json", json.dumps(sorted(self._protected)).encode())
        except OSError as exc:  # a full disk: this process still honours them (kept in memory)
            raise CacheError(f"cannot record protected engines in {self.root}: {exc.strerror or exc}") from exc

    def protected_keys(self) -> set[str]:
        keys = set(self._protected)
        with contextlib.suppress(OSError, ValueError, TypeError):
            keys |= {str(k) for k in json.loads((self.root / "protected.json").read_text(encoding="utf-8"))}
        return keys

    # ---- events / locks ------------------------------------------------------------------------
    def _emit(self, name: str, **data: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, data)
        except Exception:  # a broken sink must not break the cache
            log.exception("engine cache event sink failed on %s", name)

    def _lock(self, key: str, shared: bool, wait_event: bool = False) -> FileLock:
        on_wait = (lambda: self._emit("engine_build_waiting", key=key)) if wait_event else None
        return FileLock(self.locks_dir / f"{key}.lock", shared=shared, timeout_s=self.lock_timeout_s,
                        on_wait=on_wait)

    # ---- verification --------------------------------------------------------------------------
    def _verify(self, key: str, deep: bool = True) -> tuple[dict[str, Any] | None, str]:
        return verify_entry(self.entry_dir(key), key, deep)

    def _touch(self, key: str, meta: dict[str, Any]) -> None:
        meta = {**meta, "last_use": time.time()}
        try:
            write_atomic(self.entry_dir(key) / META_FILE, json.dumps(meta, indent=1).encode(), sync_dir=False)
        except OSError as exc:  # the entry stays valid; only its LRU rank is older
            log.warning("cannot record last use of engine %s: %s", key[:12], exc)

    # ---- lookup / build ------------------------------------------------------------------------
    def lookup(self, fields: dict[str, str]) -> Entry | None:
        """The valid entry for these fields (checksum verified), or None. Builds nothing."""
        self.ensure_ready()
        key = self.cache_key(fields)
        with self._lock(key, shared=True):
            meta, _ = self._verify(key)
        return Entry(key, self.entry_dir(key), meta) if meta is not None else None

    def get_or_build(self, fields: dict[str, str], build: Callable[[Path], object],
                     load: Callable[[Path], T]) -> tuple[T, Entry]:
        """Load the engine for `fields`, building it first when there is no valid one.

        `build(path)` must write the engine to `path`; `load(path)` turns a file into the object
        returned. An entry that fails to verify or to load is quarantined (event
        engine_quarantined) and rebuilt. Builds of one key are serialised across processes.
        """
        self.ensure_ready()
        full = self._full_fields(fields)
        key = self.cache_key(full)
        d = self.entry_dir(key)
        load_failed_sha: str | None = None
        reason = ""
        with self._lock(key, shared=True):
            meta, reason = self._verify(key)
            if meta is not None:
                try:
                    obj = load(d / ENGINE_FILE)
                except Exception as exc:
                    load_failed_sha = meta["engine_sha256"]
                    reason = f"load failed: {type(exc).__name__}: {str(exc)[:300]}"
                else:
                    self._touch(key, meta)
                    self._emit("engine_cache_hit", key=key, size=meta.get("size"))
                    return obj, Entry(key, d, meta)
        with self._lock(key, shared=False, wait_event=True):
            meta, now_reason = self._verify(key)
            if meta is not None and meta["engine_sha256"] != load_failed_sha:
                try:  # built by another process while we waited, or a good one we misjudged
                    obj = load(d / ENGINE_FILE)
                except Exception as exc:
                    reason = f"load failed: {type(exc).__name__}: {str(exc)[:300]}"
                else:
                    self._touch(key, meta)
                    self._emit("engine_cache_hit", key=key, size=meta.get("size"), waited=True)
                    return obj, Entry(key, d, meta)
            elif meta is None and now_reason != "missing":
                reason = now_reason
            if (d / META_FILE).exists() or (d / ENGINE_FILE).exists():
                self._quarantine(key, reason or "invalid entry")
            else:
                self._clean_tmp(d)
            try:
                obj, entry = self._build(key, full, build, load)
            except _CacheFull as exc:
                # A full disk must not stop the agent from serving (it would crash-loop at every
                # start): run on an engine built outside the cache, and say what that costs.
                self._remove_dir(d)
                return self._build_uncached(key, full, build, load, str(exc))
        self.evict(exclude={key})
        return obj, entry

    def _build_uncached(self, key: str, fields: dict[str, str], build: Callable[[Path], object],
                        load: Callable[[Path], T], why: str) -> tuple[T, Entry]:
        """Build into a private temp dir, load, remove the file: an engine that is not cached."""
        tmpdir = Path(tempfile.mkdtemp(prefix="edge-agent-uncached-"))
        try:
            path = tmpdir / ENGINE_FILE
            build(path)
            obj = load(path)  # both backends read the whole file at load: it can go afterwards
        except Exception as exc:
            raise CacheError(f"engine cache {self.root} is full ({why}), and the engine could not be built outside "
                             f"it either: {type(exc).__name__}: {str(exc)[:300]}") from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        log.error("engine cache %s is full (%s): engine %s runs uncached and is rebuilt at every start until "
                  "space is freed", self.root, why, key[:12])
        self._emit("engine_cache_full", key=key, dir=str(self.root), error=why)
        meta = {"format": CACHE_FORMAT_VERSION, "key": key, "fields": fields, "uncached": True}
        return obj, Entry(key, tmpdir, meta, built=True)

    def _clean_tmp(self, d: Path) -> None:
        with contextlib.suppress(OSError):
            for p in d.iterdir():
                if TMP_MARK in p.name:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def _build(self, key: str, fields: dict[str, str], build: Callable[[Path], object],
               load: Callable[[Path], T]) -> tuple[T, Entry]:
        d = self.entry_dir(key)
        d.mkdir(exist_ok=True, mode=0o700)
        fsync_dir(self.root)
        tmp = tmp_name(d / ENGINE_FILE)
        self._emit("engine_build_started", key=key, backend=fields.get("backend", ""))
        t0 = time.monotonic()
        try:
            build(tmp)
            if not tmp.is_file():
                raise CacheError(f"the engine build for key {key[:12]} wrote no file")
            os.chmod(tmp, 0o600)  # the runtime wrote it with the process umask
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            digest, size = file_sha256(tmp), tmp.stat().st_size
            os.replace(tmp, d / ENGINE_FILE)
            fsync_dir(d)
        except BaseException as exc:
            full = isinstance(exc, Exception) and no_space(exc, d)  # asked before the partial file goes
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._emit("engine_build_failed", key=key, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if full:
                raise _CacheFull(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
            raise
        build_s = time.monotonic() - t0
        now = time.time()
        meta: dict[str, Any] = {"format": CACHE_FORMAT_VERSION, "key": key, "fields": fields,
                                "engine_sha256": digest, "size": size, "built_at": now,
                                "build_s": round(build_s, 3), "last_use": now}
        try:
            write_atomic(d / META_FILE, json.dumps(meta, indent=1).encode())
        except OSError as exc:
            if no_space(exc, d):
                raise _CacheFull(f"writing the metadata: {exc.strerror or exc}") from exc
            raise
        self._emit("engine_built", key=key, size=size, build_s=round(build_s, 3),
                   backend=fields.get("backend", ""))
        try:
            obj = load(d / ENGINE_FILE)
        except Exception as exc:
            self._quarantine(key, f"fresh build does not load: {type(exc).__name__}: {str(exc)[:300]}")
            raise CacheError(f"the engine just built for key {key[:12]} does not load: {exc}") from exc
        return obj, Entry(key, d, meta, built=True)

    def _quarantine(self, key: str, reason: str) -> None:
        quarantine_entry(self.entry_dir(key), self.quarantine_dir, self.root, key, reason, self.keep_quarantined)
        self._emit("engine_quarantined", key=key, reason=reason)

    @staticmethod
    def _remove_dir(d: Path) -> None:
        remove_entry(d)

    # ---- listing, verification, eviction, pruning --------------------------------------------------
    def _keys(self) -> Iterator[str]:
        with contextlib.suppress(FileNotFoundError):
            for p in sorted(self.root.iterdir()):
                if p.is_dir() and _KEY_RE.match(p.name):
                    yield p.name

    def current_fingerprint(self, backend: str, providers: list[str]) -> dict[str, str]:
        memo = (backend, ",".join(providers))
        if memo not in self._fp_memo:
            self._fp_memo[memo] = self._fingerprint(backend, providers)
        return self._fp_memo[memo]

    def _stale_reason(self, fields: dict[str, str]) -> str:
        providers = [p for p in fields.get("providers", "").split(",") if p]
        current = self.current_fingerprint(fields.get("backend", ""), providers)
        diffs = [f"{k}: {fields.get(k, '-')} -> {current.get(k, '-')}"
                 for k in sorted(set(current) | {"portable", "host_id"})
                 if fields.get(k) != current.get(k)]
        return "; ".join(diffs)

    def _info(self, key: str, deep: bool) -> EntryInfo:
        d = self.entry_dir(key)
        protected = key in self.protected_keys()
        lock = self._lock(key, shared=True)
        try:
            got = lock.acquire(blocking=False)
        except CacheError:  # read-only cache directory: look without the lock
            got = True
        if not got:
            return EntryInfo(key, "building", "locked by a build", size=dir_size(d), protected=protected)
        try:
            meta, problem = self._verify(key, deep=deep)
        finally:
            lock.release()
        if meta is None:
            try:
                mtime, files = d.stat().st_mtime, [p.name for p in d.iterdir()]
            except OSError:
                mtime, files = 0.0, []
            if problem == "missing":
                problem = "incomplete build (temporary files only)" if files else "empty directory"
            return EntryInfo(key, "corrupt", problem, size=dir_size(d), last_use=mtime, protected=protected)
        fields = {str(k): str(v) for k, v in meta["fields"].items()}
        stale = self._stale_reason(fields)
        return EntryInfo(key, "stale" if stale else "ok", stale, fields, int(meta["size"]),
                         float(meta.get("last_use", 0.0)), float(meta.get("built_at", 0.0)),
                         str(meta["engine_sha256"]), protected)

    def list_entries(self) -> list[EntryInfo]:
        """Every entry with its state (ok / stale / corrupt / building); checksums not read. Works on
        a read-only cache directory too."""
        return [self._info(k, deep=False) for k in self._keys()]

    def verify(self) -> list[EntryInfo]:
        """Like list_entries, reading every engine to check its sha256."""
        return [self._info(k, deep=True) for k in self._keys()]

    def _remove_if_unlocked(self, key: str) -> bool:
        lock = self._lock(key, shared=False)
        if not lock.acquire(blocking=False):
            return False
        try:
            self._remove_dir(self.entry_dir(key))
        finally:
            lock.release()
        return True

    def total_bytes(self) -> int:
        return sum(dir_size(self.entry_dir(k)) for k in self._keys())

    def evict(self, exclude: Iterable[str] = ()) -> list[str]:
        """Remove least recently used entries until the cache is under max_bytes. Protected keys,
        `exclude` and entries locked by another process are never removed."""
        self.ensure_ready()
        infos = [self._info(k, deep=False) for k in self._keys()]
        total = sum(i.size for i in infos)
        keep = self.protected_keys() | set(exclude)
        removed: list[str] = []
        for info in sorted(infos, key=lambda i: i.last_use):
            if total <= self.max_bytes:
                break
            if info.key in keep or info.state == "building":
                continue
            if self._remove_if_unlocked(info.key):
                total -= info.size
                removed.append(info.key)
                self._emit("engine_evicted", key=info.key, size=info.size, last_use=info.last_use)
        if total > self.max_bytes:
            log.warning("engine cache %s holds %d bytes, over its %d byte cap, with nothing left to evict",
                        self.root, total, self.max_bytes)
        return removed

    def prune(self, stale: bool = True, corrupt: bool = True, quarantine: bool = True) -> list[str]:
        """Remove stale and / or corrupt entries (and the quarantine folder's content)."""
        self.ensure_ready()
        states = {s for s, on in (("stale", stale), ("corrupt", corrupt)) if on}
        removed = []
        for info in self.list_entries():
            if info.state in states and self._remove_if_unlocked(info.key):
                removed.append(info.key)
                self._emit("engine_pruned", key=info.key, state=info.state, reason=info.reason)
        if quarantine:
            with contextlib.suppress(OSError):
                for p in self.quarantine_dir.iterdir():
                    shutil.rmtree(p, ignore_errors=True)
        return removed
