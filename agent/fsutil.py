"""Durability helpers shared by the engine cache, the model store, the update transfers and the PLC state files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory so that a rename or create inside it survives a power cut.

    Filesystems that cannot fsync (some FUSE or network mounts) are tolerated: nothing more can be
    done there, and the caller's atomic rename still keeps readers from seeing half a file.
    """
    try:
        fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o666, tmp: Path | None = None,
                 sync_dir: bool = True) -> None:
    """`data` becomes the whole of `path`, or `path` stays as it was: a temp file beside it (`tmp`, by
    default a hidden name with the pid), fsync, rename, fsync the directory. `mode` is the new file's
    mode before the umask (the cache and the model store pass 0o600: owner-only whatever the umask
    allows). Raises OSError; the temp file is removed then."""
    tmp = tmp if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)
