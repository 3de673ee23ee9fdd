"""Chunked MQTT transfers in flight on the device: one ChunkAssembler per transfer id.

    accepted manifest (source.mqtt) -> open (an assembler, bitmap on disk) -> add (MQTT thread: a
    pwrite per chunk) -> wait_complete (update worker: complete | first write error | stall) -> the file

The update manager owns the condition shared here: the MQTT thread notifies it on every chunk, the
worker waits on it. A transfer outlives the job that opened it while another queued or running job
needs the same bytes (`release` keeps it then); closed, its state stays on disk, so a later push of
the same model resumes; `discard` gives the space back (a full disk).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.errors import UpdateError
from agent.updates.manifest import MqttSource
from agent.updates.transfer import ChunkAssembler

__all__ = ["ChunkTransfers"]

log = logging.getLogger(__name__)

# write errors that end the transfer (a refused single chunk - a bad index, a wrong size - does not)
FATAL = frozenset({"disk_full", "io_error", "bad_transfer"})


class ChunkTransfers:
    """The assemblers of the transfers in flight, guarded by the manager's condition `cv`."""

    def __init__(self, cv: threading.Condition, download_dir: Path, max_bytes: int,
                 progress: Callable[[int, int], None]) -> None:
        self._cv = cv
        self.download_dir = download_dir
        self.max_bytes = max_bytes
        self._progress = progress
        self.assemblers: dict[str, ChunkAssembler] = {}
        self.error: UpdateError | None = None  # the first fatal write error of the running transfer
        self.last_chunk_at = 0.0

    def open(self, mq: MqttSource, size: int) -> None:
        """An assembler for `mq` (kept when one is open already). Call with the condition held."""
        if mq.transfer_id not in self.assemblers:
            self.assemblers[mq.transfer_id] = ChunkAssembler(self.download_dir, mq.transfer_id, mq.chunk_size,
                                                             mq.chunks, size, self.max_bytes,
                                                             progress=self._progress)

    def add(self, tid: str, idx: int, payload: bytes) -> str:
        """One chunk from the MQTT thread: "added", "duplicate", "dropped" (no such transfer) or "bad"."""
        with self._cv:
            asm = self.assemblers.get(tid)
        if asm is None:
            return "dropped"
        try:
            added = asm.add(idx, payload)
        except UpdateError as exc:
            if exc.reason in FATAL:
                with self._cv:
                    # the first error is the cause: chunks still arriving at the closed assembler
                    # would otherwise replace "disk_full" by "bad_transfer: assembler closed"
                    if self.error is None:
                        self.error = exc
                    self._cv.notify_all()
            else:
                log.debug("chunk %s/%d refused: %s", tid, idx, exc)
            return "bad"
        with self._cv:
            self.last_chunk_at = time.monotonic()
            self._cv.notify_all()
        return "added" if added else "duplicate"

    def release(self, tid: str, needed: Iterable[str]) -> None:
        """Close the transfer unless a job still needs it (`needed`: their transfer ids). Call with
        the condition held; the state stays on disk, so a later push of the same model resumes."""
        if tid in set(needed):
            return
        asm = self.assemblers.pop(tid, None)
        if asm is not None:
            asm.close()

    def discard(self, tid: str) -> None:
        """Remove the transfer and its bytes (a full disk gives the space back)."""
        with self._cv:
            asm = self.assemblers.pop(tid, None)
        if asm is not None:
            asm.discard()

    def close_all(self) -> None:
        """At stop: persist every bitmap (chunks held survive the restart). Call with the condition held."""
        for asm in self.assemblers.values():
            asm.close()
        self.assemblers.clear()

    def wait_complete(self, mq: MqttSource, size: int, timeout_s: float, stop: threading.Event,
                      dest: Path) -> Path:
        """Block the worker until every chunk is in (-> the finished file at `dest`), the first
        fatal write error, `timeout_s` without a chunk (transfer_stalled), or `stop`."""
        with self._cv:
            asm = self.assemblers.get(mq.transfer_id)
        if asm is None:
            raise UpdateError("bad_transfer", "no assembler for the transfer")
        self._progress(asm.received_bytes, size)
        with self._cv:
            self.last_chunk_at = time.monotonic()
            while not asm.complete:
                if stop.is_set():
                    raise UpdateError("stopped", "the agent is stopping")
                if self.error is not None:
                    err, self.error = self.error, None
                    raise err
                if time.monotonic() - self.last_chunk_at > timeout_s:
                    missing = len(asm.missing())
                    raise UpdateError("transfer_stalled", f"{missing} of {mq.chunks} chunks missing after "
                                                          f"{timeout_s:g} s without a chunk; push again to resume")
                self._cv.wait(0.2)
        return asm.finalize(dest)
