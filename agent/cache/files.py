"""Files of the engine cache: atomic writes, temp-file names, sizes, and telling a full disk.

    bytes -> write_atomic (temp in the same dir, fsync, rename, fsync dir) -> the file, whole or absent

Shared by the cache store (engines, meta.json, protected.json), the timing cache and the
quarantine. `no_space` tells a failed write on a full disk from other failures, because ONNX
Runtime reports one as "Protobuf serialization failed", with no errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from pathlib import Path

from agent.fsutil import write_atomic as fsutil_write_atomic

__all__ = ["ENGINE_FILE", "FULL_BELOW_BYTES", "META_FILE", "TMP_MARK", "dir_size", "no_space", "slug", "tmp_name",
           "write_atomic"]

ENGINE_FILE = "engine.bin"
META_FILE = "meta.json"
TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` atomically (agent.fsutil.write_atomic), 0600 whatever the umask: the cache
    holds the device's engines (owner-only, like the model store); temp names carry TMP_MARK so a
    crash's leftovers are recognised and removed."""
    fsutil_write_atomic(path, data, mode=0o600, tmp=tmp_name(path), sync_dir=sync_dir)


def dir_size(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for p in path.iterdir():
            with contextlib.suppress(OSError):
                if p.is_file():
                    total += p.stat().st_size
    return total


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


# Below this much space left for us, a failed write into the cache is blamed on a full disk.
# ONNX Runtime reports a failed write of its optimised model as "Protobuf serialization failed",
# without an errno, so the file system is asked instead (before the partial file is removed).
FULL_BELOW_BYTES = 1 << 20


def no_space(exc: BaseException, where: Path) -> bool:
    """Whether `exc` (raised while writing into `where`) means the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES
