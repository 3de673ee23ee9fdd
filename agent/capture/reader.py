"""The capture thread: reads one FrameSource, timestamps frames, hands them on, reconnects.

Hand-off to the consumer (`get()`):
- live sources (cameras, streams, synthetic): a one-slot "latest" mailbox. A new frame replaces an
  unconsumed one, which is counted in `frames_dropped`; the consumer always gets the newest frame
  and nothing stale ever queues up.
- file sources (lossless): a small bounded queue (`FILE_QUEUE`). The capture thread waits when it
  is full (backpressure), so every frame is delivered exactly once, in order, however slow the
  consumer is. A paced file waits for its schedule too, but still drops nothing.

Failures: a source that fails to open, raises, or (live) returns None is closed and opened again
after a delay from `agent.backoff.Backoff` (exponential, jittered, capped at `reconnect.max_s`; reset
once frames flow). Events through `on_event(name, data)`: `camera_lost` (with `reason`) once per
outage, `camera_restored` (with `downtime_s`) when frames flow again, `camera_ended` when a file
without `loop` reaches its end (no reconnect then). Nothing raises out of the thread.

Reads that block: the network sources bound each read by `read_timeout_s` (see sources.py), and
the thread checks for stop / source switches between reads. A read that blocks anyway (a wedged
driver) leaves `last_progress` behind, which the service watchdog notices; `stop()` then returns
after its timeout and leaves the daemon thread behind rather than hang the service.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable

from agent.backoff import Backoff
from agent.capture.sources import FrameSource, open_source, redact
from agent.config import CameraConfig
from agent.vision.types import Frame

log = logging.getLogger(__name__)

FILE_QUEUE = 3  # frames buffered ahead for a lossless (file) source

EventSink = Callable[[str, dict[str, object]], None]
# takes a frame on the capture thread itself (True) or leaves it to the mailbox (False); bool: the source is live
DirectSink = Callable[[Frame, bool], bool]


class _Mailbox:
    """Frames from the capture thread to one consumer: latest-only (live) or bounded FIFO (files)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._q: collections.deque[Frame] = collections.deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._q)

    def put_latest(self, frame: Frame) -> None:
        with self._cond:
            self.dropped += len(self._q)
            self._q.clear()
            self._q.append(frame)
            self._cond.notify_all()

    def put_wait(self, frame: Frame, capacity: int, abort: Callable[[], bool], waiting: Callable[[], None]) -> bool:
        """Append, waiting while full; False (frame not queued) when `abort()` turned true."""
        with self._cond:
            while len(self._q) >= capacity:
                if abort():
                    return False
                waiting()
                self._cond.wait(0.1)
            self._q.append(frame)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Frame | None:
        return self.pop() if self.wait(timeout) else None

    def wait(self, timeout: float) -> bool:
        """True once a frame is queued (left there), False after `timeout` seconds without one."""
        with self._cond:
            return bool(self._q) or self._cond.wait_for(lambda: bool(self._q), timeout=max(0.0, timeout))

    def pop(self) -> Frame | None:
        """The oldest queued frame, or None: never waits."""
        with self._cond:
            if not self._q:
                return None
            frame = self._q.popleft()
            self._cond.notify_all()
            return frame

    def clear(self) -> int:
        with self._cond:
            n = len(self._q)
            self._q.clear()
            self._cond.notify_all()
            return n

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _Outcome:
    STOPPED = "stopped"
    SWITCH = "switch"
    ENDED = "ended"
    FAILED = "failed"


class CaptureThread:
    """Owns one daemon thread reading `cfg.source`; see the module docstring."""

    def __init__(
        self,
        cfg: CameraConfig,
        on_event: EventSink | None = None,
        source_factory: Callable[[CameraConfig], FrameSource] = open_source,
    ) -> None:
        self._cfg = cfg
        self._on_event = on_event
        self._factory = source_factory
        self._box = _Mailbox()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reading: FrameSource | None = None  # the source being read, for request_stop to interrupt
        self._wake = threading.Event()
        self._pending: CameraConfig | None = None
        self._direct: DirectSink | None = None
        self._thread: threading.Thread | None = None
        self._state = "connecting"
        self._describe = redact(cfg.source)
        self._decode = "cpu"
        self._seq = 0
        self._frames_in = 0
        self._reconnects = 0
        self._decode_errors = 0  # of the sources read before this one
        self._last_error: str | None = None
        self._last_frame_mono: float | None = None
        self._lost_since: float | None = None
        self._rng = random.Random()
        self.last_progress = time.monotonic()

    # ---- control (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._state = "connecting"
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self._cfg.id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Tell the thread to stop, without waiting for it (stop() waits)."""
        self._stop.set()
        self._wake.set()
        self._box.wake()
        src = self._reading
        if src is not None:  # a paced file waiting for its next frame time returns at once
            src.interrupt()

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning("camera %s: capture thread still blocked in a read after %.1f s; leaving it",
                            self._cfg.id, timeout)
        self._state = "stopped"

    def set_source(self, cfg: CameraConfig) -> None:
        """Switch to another source (config reload): the thread closes the old one and opens this."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._cfg = cfg
                self._describe = redact(cfg.source)
                return
            self._pending = cfg
        self._wake.set()
        self._box.wake()

    # ---- consumer side ----------------------------------------------------------------------
    def get(self, timeout: float) -> Frame | None:
        """The next frame (live: the newest), or None when none arrived within `timeout` seconds."""
        return self._box.get(timeout)

    def wait_frame(self, timeout: float) -> bool:
        """True once a frame waits to be taken (`take()`), False after `timeout` seconds without one."""
        return self._box.wait(timeout)

    def take(self) -> Frame | None:
        """The next waiting frame, or None: never blocks."""
        return self._box.pop()

    @property
    def queued(self) -> int:
        """Frames waiting to be taken."""
        return len(self._box)

    def set_direct(self, sink: DirectSink | None) -> None:
        """Offer each new frame to `sink` on the capture thread before the mailbox: a consumer that can
        take it at once saves a hand-off between threads. The sink must decline (False) while frames
        wait in the mailbox (order), and a declined frame goes the usual way (latest-wins or FIFO)."""
        self._direct = sink

    @property
    def ended(self) -> bool:
        """A file without `loop` reached its end and every frame of it was taken."""
        return self._state == "ended" and len(self._box) == 0

    @property
    def state(self) -> str:
        return self._state

    def stats(self) -> dict[str, object]:
        last, reading = self._last_frame_mono, self._reading
        return {
            "camera": self._cfg.id,
            "source": self._describe,
            "decode": self._decode,
            "state": self._state,
            "frames_in": self._frames_in,
            "frames_dropped": self._box.dropped,
            "reconnects": self._reconnects,
            "decode_errors": self._decode_errors + (reading.decode_errors if reading is not None else 0),
            "queued": len(self._box),
            "last_frame_age_s": None if last is None else round(time.monotonic() - last, 3),
            "last_error": self._last_error,
        }

    # ---- the thread -------------------------------------------------------------------------
    def _emit(self, name: str, **data: object) -> None:
        payload: dict[str, object] = {"camera": self._cfg.id, "source": self._describe, **data}
        if self._on_event is None:
            return
        try:
            self._on_event(name, payload)
        except Exception:
            log.exception("camera %s: event handler failed on %s", self._cfg.id, name)

    def _take_pending(self) -> bool:
        self._wake.clear()  # a wake-up from stop() / set_source() is seen through _interrupted()
        with self._lock:
            cfg, self._pending = self._pending, None
        if cfg is None:
            return False
        self._cfg = cfg
        self._describe = redact(cfg.source)
        stale = self._box.clear()
        self._box.dropped += stale
        self._lost_since = None
        self._state = "connecting"
        log.info("camera %s: switching source to %s", cfg.id, self._describe)
        return True

    def _interrupted(self) -> bool:
        return self._stop.is_set() or self._pending is not None

    def _sleep(self, delay: float) -> None:
        """Sleep up to `delay`, cut short by stop() or set_source()."""
        if not self._interrupted():
            self._wake.wait(delay)
        self._wake.clear()

    def _lost(self, reason: str) -> None:
        self._last_error = reason
        self._state = "lost"
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            log.warning("camera %s lost (%s): %s", self._cfg.id, self._describe, reason)
            self._emit("camera_lost", reason=reason)
        else:
            log.debug("camera %s: still lost: %s", self._cfg.id, reason)

    def _run(self) -> None:
        delays = Backoff(self._cfg.reconnect, self._rng)
        retry = False  # the next open follows a failure: it counts as a reconnect
        try:
            while not self._stop.is_set():
                if self._take_pending():
                    delays, retry = Backoff(self._cfg.reconnect, self._rng), False
                if retry:
                    self._reconnects += 1
                src: FrameSource | None = None
                try:
                    src = self._factory(self._cfg)
                    self._describe = src.describe()
                    src.open()
                    self._decode = str(getattr(src, "decode_path", "cpu"))  # after open: a fallback is known
                except Exception as e:  # SourceError, and anything a backend throws
                    self._close(src)
                    self._lost(str(e) or type(e).__name__)
                    retry = True
                    self._sleep(next(delays))
                    continue
                self._reading = src
                if self._stop.is_set():  # stopped while opening: request_stop saw no source
                    src.interrupt()
                try:
                    outcome, reason, got_frames = self._stream(src)
                finally:
                    self._reading = None
                    self._decode_errors += src.decode_errors
                self._close(src)
                if got_frames:  # frames flowed: the next outage starts from initial_s again
                    delays.reset()
                if outcome == _Outcome.FAILED:
                    self._lost(reason)
                    retry = True
                    self._sleep(next(delays))
                elif outcome == _Outcome.ENDED:
                    self._state = "ended"
                    log.info("camera %s: %s ended after %d frames", self._cfg.id, self._describe, self._frames_in)
                    self._emit("camera_ended", frames=self._frames_in)
                    while not self._interrupted():
                        self._sleep(0.5)
                # STOPPED ends the loop; SWITCH (also after ENDED) is taken at the loop top
        except Exception:  # never out of the thread
            log.exception("camera %s: capture thread failed", self._cfg.id)
        finally:
            self._state = "stopped"

    @staticmethod
    def _close(src: FrameSource | None) -> None:
        if src is None:
            return
        try:
            src.close()
        except Exception:
            log.debug("closing a source failed", exc_info=True)

    def _stream(self, src: FrameSource) -> tuple[str, str, bool]:
        """Read until stopped, switched, ended or failed; return (outcome, reason, any frame read)."""
        first = True
        live = src.live
        while True:
            if self._stop.is_set():
                return _Outcome.STOPPED, "", not first
            if self._pending is not None:
                return _Outcome.SWITCH, "", not first
            try:
                img = src.read()
            except Exception as e:
                return _Outcome.FAILED, f"read failed: {e or type(e).__name__}", not first
            if img is None:
                if not live:
                    return _Outcome.ENDED, "", not first
                return _Outcome.FAILED, "no frame (stream closed, or no data within read_timeout_s)", not first
            mono = time.monotonic()
            frame = Frame(image=img, ts=time.time(), seq=self._seq, mono=mono)
            self._seq += 1
            self._frames_in += 1
            self._last_frame_mono = mono
            self.last_progress = mono
            if first:
                first = False
                self._on_streaming()
            direct = self._direct
            if direct is not None and direct(frame, live):
                continue
            if live:
                self._box.put_latest(frame)
            elif not self._box.put_wait(frame, FILE_QUEUE, self._interrupted, self._backpressure):
                continue  # stop or switch: checked at the loop top

    def _backpressure(self) -> None:
        # waiting on the consumer is not a stalled camera (the watchdog reads last_progress)
        self.last_progress = time.monotonic()

    def _on_streaming(self) -> None:
        self._state = "streaming"
        self._last_error = None
        if self._lost_since is not None:
            downtime = round(time.monotonic() - self._lost_since, 3)
            self._lost_since = None
            log.info("camera %s restored after %.1f s (%s)", self._cfg.id, downtime, self._describe)
            self._emit("camera_restored", downtime_s=downtime)
