"""The model store's on-disk layout: file names, safe names, the version record, atomic writes.

    versions/<name>-<version>/{model.onnx, manifest.json, labels.txt} <-> ModelVersion
    bytes -> write_atomic (temp beside it, fsync, os.replace, fsync the directory) -> state.json

Names that become paths go through `safe_name` first (no '/', no '..', no leading dot), so a
manifest cannot point the store outside its root.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import UpdateError
from agent.fsutil import write_atomic as fsutil_write_atomic

__all__ = ["HISTORY_MAX", "LABELS_FILE", "MANIFEST_FILE", "MODEL_FILE", "SAFE", "STATE_FILE", "ModelVersion",
           "safe_name", "sha256_file", "write_atomic"]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
STATE_FILE = "state.json"
SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HISTORY_MAX = 32


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def safe_name(part: str, what: str) -> str:
    if not isinstance(part, str) or not SAFE.match(part) or ".." in part:
        raise UpdateError("unsafe_name", f"{what} {str(part)[:80]!r} is not a safe name")
    return part


def write_atomic(path: Path, data: bytes) -> None:
    """agent.fsutil.write_atomic, owner-only (0600), with a temp name unique per call."""
    fsutil_write_atomic(path, data, mode=0o600, tmp=path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"))


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path  # the version's directory
    manifest: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def sha256(self) -> str:
        return str(self.manifest.get("model", {}).get("sha256", ""))

    @property
    def labels(self) -> list[str]:
        labels = self.manifest.get("model", {}).get("labels", [])
        return [str(x) for x in labels] if isinstance(labels, list) else []
