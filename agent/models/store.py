"""Installed model versions on disk, with `active` / `previous` pointers that survive crashes.

Layout under `root` (dirs 0700, files 0600)::

    versions/<name>-<version>/   model.onnx, manifest.json (the signed manifest as received),
                                 labels.txt, any extra files; a directory here is always complete
    staging/                     versions being assembled; emptied at every start
    trash/                       versions being deleted (rename first, then rmtree); emptied at start
    state.json                   {"active", "previous", "history", "bad", "desired", "last_good"}

Pointer choice: ONE small JSON file, replaced atomically (temp file in `root`, fsync, os.replace,
fsync of `root`), rather than two symlinks. `active` and `previous` change together on every
activate / rollback; with two symlinks a crash between the two renames would leave a state that
was never meant (previous == active, or a lost previous). One file makes the switch of both, and of
`desired` / `last_good`, a single atomic step. Readers never see a half-written file.

Install: a staged directory (under `staging/`, same filesystem) has every file fsynced, its model
checked against its manifest's sha256, then is renamed into `versions/` in one os.rename and the
directory fsynced. A crash leaves either no version directory or a complete one; a stale staging
directory is deleted at the next start.

The names, the version record and the atomic write are in `agent.models.layout`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agent.errors import UpdateError
from agent.fsutil import fsync_path
from agent.models.layout import (
    HISTORY_MAX,
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SAFE,
    STATE_FILE,
    ModelVersion,
    safe_name,
    sha256_file,
    write_atomic,
)

# ModelVersion and sha256_file are re-exported: the updates code and the tests import them from here
__all__ = ["ModelStore", "ModelVersion", "sha256_file"]

log = logging.getLogger(__name__)

class ModelStore:
    """Installed versions, active / previous pointers, desired / last-good memory. Thread-safe."""

    def __init__(self, root: Path | str, keep: int = 3) -> None:
        if keep < 2:
            raise ValueError("keep must be >= 2 (active and previous)")
        self.root = Path(root)
        self.keep = keep
        self.recovered_from_trial: str | None = None  # set by recover() when it rolled a trial back
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.trash_dir = self.root / "trash"
        self.state_path = self.root / STATE_FILE
        self._lock = threading.RLock()
        for d in (self.root, self.versions_dir, self.staging_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)

    # ---- state file ---------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("model store state %s unreadable (%s); starting from the bundled model", self.state_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, sort_keys=True, indent=1).encode())

    # ---- versions -----------------------------------------------------------------------------
    def _load_version(self, key: str | None) -> ModelVersion | None:
        if not key or not isinstance(key, str) or not SAFE.match(key) or ".." in key:
            return None
        d = self.versions_dir / key
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
            model = manifest["model"]
            return ModelVersion(str(model["name"]), str(model["version"]), d, manifest)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def version(self, name: str, version: str) -> ModelVersion | None:
        return self._load_version(f"{name}-{version}")

    def is_complete(self, mv: ModelVersion) -> bool:
        """The model file exists and matches the manifest's sha256 (and size, when given)."""
        try:
            model = mv.manifest["model"]
            if mv.model_path.stat().st_size != int(model.get("size", mv.model_path.stat().st_size)):
                return False
            return sha256_file(mv.model_path) == model["sha256"]
        except (OSError, KeyError, TypeError, ValueError):
            return False

    def installed_versions(self) -> list[ModelVersion]:
        out = []
        with contextlib.suppress(OSError):
            for d in sorted(self.versions_dir.iterdir()):
                mv = self._load_version(d.name)
                if mv is not None:
                    out.append(mv)
        return out

    def active(self) -> ModelVersion | None:
        return self._load_version(self._read_state().get("active"))

    def previous(self) -> ModelVersion | None:
        return self._load_version(self._read_state().get("previous"))

    # ---- staging / install -----------------------------------------------------------------
    def new_staging_dir(self, name: str, version: str) -> Path:
        d = self.staging_dir / f"{safe_name(name, 'name')}-{safe_name(version, 'version')}.{uuid.uuid4().hex[:8]}"
        d.mkdir(mode=0o700)
        return d

    def stage(self, model_file: Path, manifest_raw: bytes | dict[str, Any], move: bool = True,
              extra: dict[str, bytes] | None = None) -> Path:
        """A staging dir holding `model.onnx` (moved or copied), `manifest.json`, `labels.txt`."""
        manifest = json.loads(manifest_raw) if isinstance(manifest_raw, bytes | str) else manifest_raw
        raw = manifest_raw if isinstance(manifest_raw, bytes) else json.dumps(manifest, sort_keys=True).encode()
        model = manifest["model"]
        d = self.new_staging_dir(model["name"], model["version"])
        try:
            dst = d / MODEL_FILE
            if move:
                try:
                    os.replace(model_file, dst)
                except OSError:
                    shutil.copyfile(model_file, dst)
                    Path(model_file).unlink()
            else:
                shutil.copyfile(model_file, dst)
            os.chmod(dst, 0o600)
            files = {MANIFEST_FILE: raw, LABELS_FILE: ("\n".join(model.get("labels", [])) + "\n").encode()}
            files.update(extra or {})
            for fname, data in files.items():
                fd = os.open(d / safe_name(fname, "file name"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    view = memoryview(data)
                    while view:  # os.write may write less than asked (and a full disk raises)
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
        except BaseException:
            # a half-staged version (disk full, say) would wait for the next start's recover()
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d

    def install(self, staged_dir: Path) -> ModelVersion:
        """Move a complete staged dir into `versions/` atomically; returns the installed version."""
        staged = Path(staged_dir)
        with self._lock:
            if staged.resolve().parent != self.staging_dir.resolve():
                raise UpdateError("install_failed", f"{staged} is not under {self.staging_dir}")
            try:
                manifest = json.loads((staged / MANIFEST_FILE).read_text(encoding="utf-8"))
                model = manifest["model"]
                name, version = safe_name(model["name"], "name"), safe_name(model["version"], "version")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UpdateError("install_failed", f"staged manifest unreadable: {exc}") from None
            mv = ModelVersion(name, version, staged, manifest)
            if not self.is_complete(mv):
                raise UpdateError("checksum_mismatch", f"staged {name}-{version} does not match its manifest")
            for p in staged.iterdir():
                os.chmod(p, 0o600)
                fsync_path(p)
            os.chmod(staged, 0o700)
            fsync_path(staged, directory=True)
            target = self.versions_dir / f"{name}-{version}"
            if target.exists():
                existing = self._load_version(target.name)
                if existing is not None and self.is_complete(existing):
                    self._trash(staged)
                    return existing
                self._trash(target)  # damaged copy: replace it
            try:
                os.rename(staged, target)
            except OSError as exc:
                raise UpdateError("install_failed", f"rename into versions/: {exc.strerror or exc}") from None
            fsync_path(self.versions_dir, directory=True)
            fsync_path(self.staging_dir, directory=True)
            return ModelVersion(name, version, target, manifest)

    def _trash(self, d: Path) -> None:
        dst = self.trash_dir / f"{d.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, dst)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            return
        fsync_path(d.parent, directory=True)
        shutil.rmtree(dst, ignore_errors=True)

    # ---- pointers -----------------------------------------------------------------------------
    def _key_of(self, version: ModelVersion | str) -> str:
        key = version.key if isinstance(version, ModelVersion) else version
        if self._load_version(key) is None:
            raise UpdateError("not_installed", f"{key} is not installed")
        return key

    def activate(self, version: ModelVersion | str, trial: bool = False) -> ModelVersion:
        """Make `version` active; the old active becomes previous. One atomic state write.

        `trial`: the version is on trial (health window) until `end_trial`; `recover()` after a
        restart during the trial rolls it back.
        """
        with self._lock:
            key = self._key_of(version)
            state = self._read_state()
            old = state.get("active")
            if old != key:
                state["previous"] = old if self._load_version(old) is not None else state.get("previous")
                state["active"] = key
            hist = [h for h in state.get("history", []) if h != key] + [key]
            state["history"] = hist[-HISTORY_MAX:]
            state["bad"] = [b for b in state.get("bad", []) if b != key]
            state["activated_at"] = time.time()
            state["trial"] = key if trial else None
            self._write_state(state)
            mv = self._load_version(key)
            assert mv is not None
            return mv

    def rollback(self, reason: str = "") -> ModelVersion | None:
        """previous -> active; the bad active is remembered and never chosen again as previous.

        Returns the new active version, or None: serve the bundled default model.
        """
        with self._lock:
            state = self._read_state()
            bad = state.get("active")
            new_active = state.get("previous")
            if self._load_version(new_active) is None:
                new_active = None
            bad_list = [b for b in state.get("bad", []) if b != bad] + ([bad] if bad else [])
            state["bad"] = bad_list[-HISTORY_MAX:]
            state["active"] = new_active
            state["previous"] = self._pick_previous(state, exclude={new_active, bad})
            state["rolled_back"] = {"from": bad, "to": new_active, "reason": reason, "ts": time.time()}
            state["trial"] = None
            self._write_state(state)
            return self._load_version(new_active)

    def _pick_previous(self, state: dict[str, Any], exclude: set[str | None]) -> str | None:
        for key in reversed(state.get("history", [])):
            if key in exclude or key in state.get("bad", []):
                continue
            if self._load_version(key) is not None:
                return str(key)
        return None

    def recover(self) -> ModelVersion | None:
        """At start: clean staging / trash, then return the version to serve (None: bundled default).

        An active version whose directory is gone or whose model does not match its manifest is
        replaced by the previous one (if complete), else by the bundled default.
        """
        with self._lock:
            for d in (self.staging_dir, self.trash_dir):
                for p in list(d.iterdir()):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            p.unlink()
            for p in self.root.glob(f".{STATE_FILE}.*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
            state = self._read_state()
            active = self._load_version(state.get("active"))
            trial = state.get("trial")
            if active is not None and trial and trial == active.key:
                # the agent died while a new model was on trial (its health window): never trust it
                # again blindly, or a model that crashes the process would crash-loop the device
                log.error("model %s was on trial when the agent stopped; rolling back", trial)
                self.recovered_from_trial = str(trial)
                state["trial"] = None
                self._write_state(state)
                active = None
            elif active is not None and self.is_complete(active):
                return active
            if state.get("active"):
                log.error("active model %s is missing or damaged; falling back", state.get("active"))
            prev = self._load_version(state.get("previous"))
            if prev is not None and self.is_complete(prev):
                bad = state.get("active")
                state["active"] = prev.key
                if bad:
                    state["bad"] = ([b for b in state.get("bad", []) if b != bad] + [bad])[-HISTORY_MAX:]
                state["previous"] = self._pick_previous(state, exclude={prev.key, bad})
                self._write_state(state)
                return prev
            if state.get("active") is not None or state.get("previous") is not None:
                state["active"] = None
                state["previous"] = None
                self._write_state(state)
            return None

    # ---- trial (health window) -----------------------------------------------------------------
    def end_trial(self, good: bool) -> None:
        """Close the trial; a good one becomes `last_good`."""
        with self._lock:
            state = self._read_state()
            key = state.get("trial")
            state["trial"] = None
            if good and key and self._load_version(key) is not None:
                state["last_good"] = key
            self._write_state(state)

    def on_trial(self) -> str | None:
        t = self._read_state().get("trial")
        return str(t) if t else None

    # ---- desired / last good -----------------------------------------------------------------
    def set_desired(self, name: str, version: str, manifest_id: str = "") -> None:
        with self._lock:
            state = self._read_state()
            state["desired"] = {"name": name, "version": version, "manifest_id": manifest_id, "ts": time.time()}
            self._write_state(state)

    def desired(self) -> dict[str, Any] | None:
        d = self._read_state().get("desired")
        return d if isinstance(d, dict) else None

    def mark_good(self, version: ModelVersion | str) -> None:
        with self._lock:
            key = self._key_of(version)
            state = self._read_state()
            state["last_good"] = key
            self._write_state(state)

    def last_good(self) -> ModelVersion | None:
        return self._load_version(self._read_state().get("last_good"))

    def bad_versions(self) -> list[str]:
        return [str(b) for b in self._read_state().get("bad", [])]

    def remember(self, key: str, value: Any) -> None:
        """Store a small JSON value in the state file (e.g. processed manifest ids)."""
        with self._lock:
            state = self._read_state()
            extra = state.setdefault("extra", {})
            extra[key] = value
            self._write_state(state)

    def remember_all(self, values: dict[str, Any]) -> None:
        """Store several small JSON values in ONE atomic state write (no crash can keep half of them)."""
        with self._lock:
            state = self._read_state()
            extra = state.setdefault("extra", {})
            extra.update(values)
            self._write_state(state)

    def forget(self, key: str, only_if: Any) -> bool:
        """Clear `key` when it still holds `only_if` (one check-and-write under the lock); True if cleared."""
        with self._lock:
            state = self._read_state()
            extra = state.get("extra", {})
            if not isinstance(extra, dict) or extra.get(key) != only_if:
                return False
            extra[key] = None
            self._write_state(state)
            return True

    def recall(self, key: str, default: Any = None) -> Any:
        extra = self._read_state().get("extra", {})
        return extra.get(key, default) if isinstance(extra, dict) else default

    # ---- prune --------------------------------------------------------------------------------
    def discard(self, mv: ModelVersion) -> bool:
        """Remove a version that never served (it failed validation); referenced versions stay."""
        with self._lock:
            state = self._read_state()
            if mv.key in {state.get("active"), state.get("previous"), state.get("last_good")}:
                return False
            if not mv.path.is_dir():
                return False
            self._trash(mv.path)
            return True

    def prune(self) -> list[str]:
        """Keep `keep` versions: always active, previous and last_good, then the most recently used."""
        with self._lock:
            state = self._read_state()
            protected = [k for k in (state.get("active"), state.get("previous"), state.get("last_good")) if k]
            installed = {mv.key: mv for mv in self.installed_versions()}
            hist = [h for h in reversed(state.get("history", [])) if h in installed]

            def mtime(k: str) -> float:
                try:
                    return installed[k].path.stat().st_mtime
                except OSError:
                    return 0.0

            rest = sorted((k for k in installed if k not in hist), key=mtime, reverse=True)
            kept: list[str] = []
            for k in [*protected, *hist, *rest]:
                if k in installed and k not in kept and (k in protected or len(kept) < self.keep):
                    kept.append(k)
            removed = [k for k in installed if k not in kept]
            for k in removed:
                self._trash(installed[k].path)
            return removed
