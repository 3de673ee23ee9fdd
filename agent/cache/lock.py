"""Advisory file locks (`fcntl.flock`) with a bounded wait.

flock locks belong to the open file description: the kernel drops them when the process dies
(SIGKILL and power cuts included), so a crashed builder never leaves a key locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from agent.errors import CacheError

__all__ = ["FileLock"]


class FileLock:
    """Exclusive (or shared) lock on `path`, created if missing.

    `timeout_s=None` waits without end; otherwise CacheError after that long. `on_wait` is called
    once when the lock is held by someone else (to report "waiting for another build").
    """

    def __init__(self, path: Path, shared: bool = False, timeout_s: float | None = 3600.0,
                 on_wait: Callable[[], None] | None = None, poll_s: float = 0.05) -> None:
        self.path = Path(path)
        self.shared = shared
        self.timeout_s = timeout_s
        self.on_wait = on_wait
        self.poll_s = poll_s
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            raise CacheError(f"lock {self.path} is already held by this object")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open lock file {self.path}: {exc.strerror or exc}") from exc
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, mode)
                self._fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise CacheError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            if not blocking:
                os.close(fd)
                return False
            if not waited:
                waited = True
                if self.on_wait is not None:
                    self.on_wait()
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise CacheError(f"timed out after {self.timeout_s:.0f} s waiting for lock {self.path}")
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
