"""Getting a model's bytes onto the disk: HTTP(S) / file:// downloads, and MQTT chunk reassembly.

Both stream to disk within a size cap, never hold a whole model in memory, survive an agent restart
(an HTTP download resumes with a Range request from its `.part` file; a chunked transfer keeps a
bitmap of the chunks it holds), and turn a full disk into UpdateError("disk_full") with the partial
file removed. Integrity is checked later (sha256 against the signed manifest, in validate.py).

Reasons raised: too_large, size_mismatch, download_failed, download_timeout, disk_full, io_error,
bad_url, bad_chunk, bad_transfer, incomplete.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agent.errors import UpdateError
from agent.fsutil import fsync_dir

__all__ = ["ChunkAssembler", "Progress", "download_url"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes expected)
BLOCK = 64 * 1024
TRANSFER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _io_error(exc: OSError, what: str) -> UpdateError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UpdateError("disk_full", f"{what}: {exc.strerror or exc}")
    return UpdateError("io_error", f"{what}: {exc.strerror or exc}")


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


# ---- downloads --------------------------------------------------------------------------------

def download_url(
    url: str,
    dest: Path,
    expected_size: int,
    max_bytes: int,
    timeout: float,
    progress: Progress | None = None,
    total_timeout: float | None = None,
) -> Path:
    """Fetch `url` (http, https or file) to `dest`; resumes from `dest`'s `.part` file.

    `timeout` bounds every socket operation; `total_timeout` (optional) bounds the whole download,
    so a server dripping one byte per `timeout` cannot hold the update forever. The partial file is
    kept on network errors and timeouts (the next attempt resumes) and removed on a full disk, a
    size violation or a server that answers something else than what was asked.
    """
    if expected_size <= 0:
        raise UpdateError("size_mismatch", f"expected size {expected_size}")
    if expected_size > max_bytes:
        raise UpdateError("too_large", f"{expected_size} bytes exceed the cap of {max_bytes}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = dest.with_name(dest.name + ".part")
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    deadline = None if total_timeout is None else time.monotonic() + total_timeout
    if scheme == "file":
        _copy_file(parsed, part, expected_size, progress)
    elif scheme in ("http", "https"):
        _download_http(url, part, expected_size, timeout, progress, deadline)
    else:
        raise UpdateError("bad_url", f"unsupported scheme {scheme!r}")
    size = part.stat().st_size
    if size != expected_size:
        _remove(part)
        raise UpdateError("size_mismatch", f"got {size} bytes, expected {expected_size}")
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise _io_error(exc, f"rename {part.name}") from None
    fsync_dir(dest.parent)
    return dest


def _open_part(part: Path, append: bool) -> IO[bytes]:
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


def _stream(src: IO[bytes], part: Path, append: bool, start: int, expected: int, progress: Progress | None,
            deadline: float | None, announced_end: int | None = None) -> None:
    done = start
    try:
        with _open_part(part, append) as out:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise UpdateError("download_timeout", f"not complete in time ({done}/{expected} bytes)")
                block = src.read(min(BLOCK, expected - done + 1))
                if not block:
                    break
                done += len(block)
                if done > expected:
                    raise UpdateError("too_large", f"more than the announced {expected} bytes")
                out.write(block)
                if progress is not None:
                    progress(done, expected)
            out.flush()
            os.fsync(out.fileno())
        if announced_end is not None and done < min(announced_end, expected):
            # the body ended before its Content-Length: a lost connection; keep the partial to resume
            raise UpdateError("download_failed", f"connection closed at {done}/{expected} bytes")
    except UpdateError as exc:
        if exc.reason not in ("download_timeout", "download_failed"):
            _remove(part)
        raise
    except TimeoutError:
        raise UpdateError("download_timeout", f"no data for the socket timeout ({done}/{expected} bytes)") from None
    except http.client.HTTPException as exc:
        raise UpdateError("download_failed", f"connection lost at {done}/{expected} bytes: {exc!r}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _remove(part)
            raise _io_error(exc, "writing the download") from None
        if isinstance(exc, urllib.error.URLError | ConnectionError) or exc.errno is None:
            raise UpdateError("download_failed", f"connection lost at {done}/{expected} bytes: {exc}") from None
        raise _io_error(exc, "writing the download") from None


def _copy_file(parsed: urllib.parse.SplitResult, part: Path, expected: int, progress: Progress | None) -> None:
    if parsed.netloc not in ("", "localhost"):
        raise UpdateError("bad_url", f"file URL with a remote host {parsed.netloc!r}")
    src_path = Path(urllib.request.url2pathname(parsed.path))
    try:
        size = src_path.stat().st_size
        if size > expected:
            raise UpdateError("too_large", f"{src_path} has {size} bytes, the manifest says {expected}")
        with open(src_path, "rb") as src:
            _stream(src, part, False, 0, expected, progress, None)
    except UpdateError:
        raise
    except OSError as exc:
        raise UpdateError("download_failed", f"cannot read {src_path}: {exc.strerror or exc}") from None


def _download_http(url: str, part: Path, expected: int, timeout: float, progress: Progress | None,
                   deadline: float | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > expected:
        _remove(part)
        have = 0
    if have == expected:
        return  # a previous run got everything and died before the rename
    for _attempt in range(2):
        headers = {"User-Agent": "edge-agent", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and have:
                log.info("server refused the range %d-; restarting the download", have)
                _remove(part)
                have = 0
                continue
            raise UpdateError("download_failed", f"HTTP {exc.code} {exc.reason}") from None
        except TimeoutError:
            raise UpdateError("download_timeout", f"no answer in {timeout:g} s") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError | socket.timeout):
                raise UpdateError("download_timeout", f"no answer in {timeout:g} s") from None
            raise UpdateError("download_failed", f"{reason}") from None
        with resp:
            status = resp.status
            length = resp.headers.get("Content-Length")
            if status == 206 and have:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != have:
                    _remove(part)
                    raise UpdateError("download_failed", f"server resumed at {start}, asked {have}")
                append = True
            elif status == 200:
                if have:
                    log.info("server ignored the Range request; downloading from the start")
                have, append = 0, False
            else:
                raise UpdateError("download_failed", f"unexpected HTTP status {status}")
            if length is not None and length.isdigit() and have + int(length) > expected:
                _remove(part)
                raise UpdateError("too_large", f"server announces {have + int(length)} bytes, expected {expected}")
            end = have + int(length) if length is not None and length.isdigit() else None
            _stream(resp, part, append, have, expected, progress, deadline, end)
        return
    raise UpdateError("download_failed", "the server refused the range twice")


def _content_range_start(value: str) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value)
    return int(m.group(1)) if m else None


# ---- MQTT chunks ------------------------------------------------------------------------------

class ChunkAssembler:
    """Reassembles a chunked transfer into `dir/<transfer_id>.part`, in any order, resumable.

    Each chunk is written at its offset of a preallocated (sparse) file. A bitmap of the chunks
    held is saved atomically to `dir/<transfer_id>.state` - only after the data it claims has been
    fsynced - every `persist_every` new chunks, so after a crash at most those last chunks are
    wanted again, and chunks already held are never needed twice. A state file whose parameters
    differ (another model with the same transfer id) is discarded.
    """

    STATE_VERSION = 1

    def __init__(self, dir: Path, transfer_id: str, chunk_size: int, chunks: int, expected_size: int,
                 max_bytes: int, progress: Progress | None = None, persist_every: int = 16) -> None:
        if not isinstance(transfer_id, str) or not TRANSFER_ID.match(transfer_id):
            raise UpdateError("bad_transfer", f"unsafe transfer id {str(transfer_id)[:80]!r}")
        if chunk_size <= 0 or chunks <= 0 or expected_size <= 0:
            raise UpdateError("bad_transfer", "chunk size, chunk count and size must be positive")
        if expected_size > max_bytes:
            raise UpdateError("too_large", f"{expected_size} bytes exceed the cap of {max_bytes}")
        if chunks != math.ceil(expected_size / chunk_size):
            raise UpdateError("bad_transfer", f"{chunks} chunks of {chunk_size} cannot hold {expected_size} bytes")
        self.dir = Path(dir)
        self.transfer_id = transfer_id
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.expected_size = expected_size
        self.progress = progress
        self.persist_every = max(1, persist_every)
        self.part_path = self.dir / f"{transfer_id}.part"
        self.state_path = self.dir / f"{transfer_id}.state"
        self._lock = threading.Lock()
        self._bits = bytearray((chunks + 7) // 8)
        self._count = 0
        self._unsaved = 0
        self._fd: int | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._open()
        except OSError as exc:
            self.close()
            raise _io_error(exc, f"preparing {self.part_path}") from None

    # -- state ---------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"v": self.STATE_VERSION, "transfer_id": self.transfer_id, "chunk_size": self.chunk_size,
                "chunks": self.chunks, "size": self.expected_size}

    def _open(self) -> None:
        resumed = False
        if self.state_path.exists() and self.part_path.exists():
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
                bits = base64.b64decode(state.get("bitmap", ""), validate=True)
                if ({k: state.get(k) for k in self._params()} == self._params() and len(bits) == len(self._bits)
                        and self.part_path.stat().st_size == self.expected_size):
                    self._bits = bytearray(bits)
                    self._count = sum(bin(b).count("1") for b in self._bits)
                    resumed = True
            except (OSError, ValueError, AttributeError, TypeError, RecursionError):  # deep nesting in a damaged file
                resumed = False
        flags = os.O_RDWR | os.O_CREAT | (0 if resumed else os.O_TRUNC)
        self._fd = os.open(self.part_path, flags, 0o600)
        if not resumed:
            _remove(self.state_path)
            os.ftruncate(self._fd, self.expected_size)  # sparse: no blocks until written
            self._bits = bytearray(len(self._bits))
            self._count = 0
        else:
            log.info("transfer %s resumed with %d/%d chunks", self.transfer_id, self._count, self.chunks)

    def _save_state(self, sync: bool = True) -> None:
        """Save the bitmap. Every chunk is saved unsynced: the broker got our PUBACK, so a killed
        process must not forget the chunk (the page cache outlives the process). Every
        `persist_every` chunks data and bitmap are fsynced too, against power cuts; what a power cut
        still loses is caught by the sha256 check and resumed by a re-push."""
        assert self._fd is not None
        if sync:
            os.fsync(self._fd)  # data first, then the bitmap that claims it
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        body = dict(self._params(), bitmap=base64.b64encode(bytes(self._bits)).decode("ascii"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(body).encode())
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        if sync:
            fsync_dir(self.dir)
            self._unsaved = 0

    # -- API -----------------------------------------------------------------------------------
    def chunk_length(self, index: int) -> int:
        if index == self.chunks - 1:
            return self.expected_size - self.chunk_size * (self.chunks - 1)
        return self.chunk_size

    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Store one chunk; True when it was new, False for a duplicate. Bad chunks raise bad_chunk."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.chunks:
            raise UpdateError("bad_chunk", f"index {index!r} outside 0..{self.chunks - 1}")
        want = self.chunk_length(index)
        if len(data) != want:
            raise UpdateError("bad_chunk", f"chunk {index} has {len(data)} bytes, expected {want}")
        with self._lock:
            if self._fd is None:
                raise UpdateError("bad_transfer", "assembler closed")
            if self.has(index):
                return False
            try:
                view = memoryview(data)
                off = index * self.chunk_size
                while view:
                    n = os.pwrite(self._fd, view, off)
                    view, off = view[n:], off + n
                self._bits[index >> 3] |= 1 << (index & 7)
                self._count += 1
                self._unsaved += 1
                self._save_state(sync=self._unsaved >= self.persist_every or self._count == self.chunks)
            except OSError as exc:
                err = _io_error(exc, f"writing chunk {index}")
                if err.reason == "disk_full":
                    self._discard_locked()
                raise err from None
            done = self.received_bytes
        if self.progress is not None:
            self.progress(done, self.expected_size)
        return True

    @property
    def received(self) -> int:
        return self._count

    @property
    def received_bytes(self) -> int:
        n = self._count * self.chunk_size
        if self.chunks and self.has(self.chunks - 1):
            n -= self.chunk_size - self.chunk_length(self.chunks - 1)
        return n

    @property
    def complete(self) -> bool:
        return self._count == self.chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if not self.has(i)]

    def flush(self) -> None:
        """Persist the bitmap now (call at shutdown so held chunks survive)."""
        with self._lock:
            if self._fd is not None and self._unsaved:
                try:
                    self._save_state()
                except OSError as exc:
                    raise _io_error(exc, "saving transfer state") from None

    def finalize(self, dest: Path | None = None) -> Path:
        """Move the assembled file to `dest` (default `dir/<transfer_id>.bin`) after a size check."""
        with self._lock:
            if self._count != self.chunks:
                raise UpdateError("incomplete", f"{self.chunks - self._count} of {self.chunks} chunks missing")
            assert self._fd is not None
            try:
                os.fsync(self._fd)
                size = os.fstat(self._fd).st_size
                if size != self.expected_size:
                    raise UpdateError("size_mismatch", f"assembled {size} bytes, expected {self.expected_size}")
                os.close(self._fd)
                self._fd = None
                out = Path(dest) if dest is not None else self.dir / f"{self.transfer_id}.bin"
                os.replace(self.part_path, out)
                _remove(self.state_path)
                fsync_dir(self.dir)
                if out.parent != self.dir:
                    fsync_dir(out.parent)
            except OSError as exc:
                raise _io_error(exc, "finalizing the transfer") from None
            return out

    def _discard_locked(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        _remove(self.part_path)
        _remove(self.state_path)
        _remove(self.state_path.with_name(self.state_path.name + ".tmp"))

    def discard(self) -> None:
        """Drop the partial transfer and its state."""
        with self._lock:
            self._discard_locked()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    if self._unsaved:
                        self._save_state()
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ChunkAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clean_stale_transfers(dir: Path, keep: set[str], max_age_s: float = 7 * 86400) -> list[str]:
    """Remove `.part` / `.state` files of transfers not in `keep` and older than `max_age_s`."""
    removed: list[str] = []
    if not Path(dir).is_dir():
        return removed
    now = time.time()
    for p in Path(dir).iterdir():
        tid = p.name.split(".", 1)[0]
        if tid in keep or p.suffix not in (".part", ".state", ".tmp"):
            continue
        try:
            if now - p.stat().st_mtime > max_age_s:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
                removed.append(p.name)
        except OSError:
            pass
    return removed
