"""The update state machine reported on `<prefix>/<device>/model/state` (retained, QoS 1).

    received -> downloading -> verifying -> building -> validating -> active
    any of received..validating -> failed (reason)
    active -> rolled_back (reason)              after a bad health window
    idle / active / failed / rolled_back -> received   (the next update)

`downloading` may repeat (progress). The payload is
`{"state", "version", "name", "manifest_id", "progress", "error", "detail", "ts"}` where `progress`
is 0..1 or null, `error` a short reason code (or null) and `ts` Unix seconds. Extra keys passed
to a transition are added as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import UpdateError

__all__ = ["STATES", "TERMINAL", "TRANSITIONS", "IllegalTransition", "UpdateStateReporter"]

STATES = ("idle", "received", "downloading", "verifying", "building", "validating", "active", "failed",
          "rolled_back")
TERMINAL = frozenset({"idle", "active", "failed", "rolled_back"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"received"}),
    "received": frozenset({"downloading", "verifying", "failed"}),
    "downloading": frozenset({"downloading", "verifying", "failed"}),
    "verifying": frozenset({"building", "failed"}),
    "building": frozenset({"validating", "failed"}),
    "validating": frozenset({"active", "failed"}),
    "active": frozenset({"received", "rolled_back"}),
    "failed": frozenset({"received"}),
    "rolled_back": frozenset({"received"}),
}


class IllegalTransition(UpdateError):
    def __init__(self, old: str, new: str) -> None:
        super().__init__("illegal_transition", f"{old} -> {new}")
        self.old, self.new = old, new


class UpdateStateReporter:
    """Walks the state machine, refusing illegal steps, and hands each payload to `publish`.

    `publish` is called outside the lock; exceptions from it are swallowed (reporting must never
    break an update). Download progress is rate-limited to `min_interval_s` / `min_step`.
    """

    def __init__(self, publish: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.time,
                 min_interval_s: float = 0.5, min_step: float = 0.05, initial: str = "idle") -> None:
        if initial not in TRANSITIONS:
            raise ValueError(f"unknown state {initial!r}")
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()
        self.state = initial
        self.version: str | None = None
        self.name: str | None = None
        self.manifest_id: str | None = None
        self.progress: float | None = None
        self.error: str | None = None
        self.detail: str | None = None
        self.last: dict[str, Any] | None = None
        self.history: list[str] = [initial]
        self._min_interval = min_interval_s
        self._min_step = min_step
        self._last_progress_at = 0.0

    def transition(self, new: str, *, version: str | None = None, name: str | None = None,
                   manifest_id: str | None = None, progress: float | None = None, error: str | None = None,
                   detail: str | None = None, **extra: Any) -> dict[str, Any]:
        with self._lock:
            if new not in TRANSITIONS.get(self.state, frozenset()):
                raise IllegalTransition(self.state, new)
            if new in ("failed", "rolled_back") and not error:
                raise UpdateError("illegal_transition", f"{new} needs an error reason")
            if new == "received":
                self.version, self.name, self.manifest_id = version, name, manifest_id
            else:
                self.version = version if version is not None else self.version
                self.name = name if name is not None else self.name
                self.manifest_id = manifest_id if manifest_id is not None else self.manifest_id
            if progress is not None:
                progress = min(1.0, max(0.0, float(progress)))
            self.progress = progress if progress is not None else (1.0 if new == "active" else None)
            self.error, self.detail = error, detail
            self.state = new
            if self.history[-1] != new:
                self.history.append(new)
            payload: dict[str, Any] = {
                "state": new, "version": self.version, "name": self.name, "manifest_id": self.manifest_id,
                "progress": self.progress, "error": error, "detail": detail, "ts": round(self._clock(), 3),
            }
            payload.update(extra)
            self.last = payload
            self._last_progress_at = time.monotonic()
        try:
            self._publish(dict(payload))
        except Exception:
            pass
        return payload

    def report_progress(self, done: int, total: int, **extra: Any) -> dict[str, Any] | None:
        """A `downloading` step, rate-limited; the final byte is always reported."""
        frac = (done / total) if total > 0 else 0.0
        now = time.monotonic()
        prev = self.progress or 0.0
        if (self.state == "downloading" and done < total and now - self._last_progress_at < self._min_interval
                and frac - prev < self._min_step):
            return None
        return self.transition("downloading", progress=frac, bytes=done, total=total, **extra)

    def fail(self, reason: str, detail: str = "") -> dict[str, Any]:
        return self.transition("failed", error=reason, detail=detail)

    @property
    def busy(self) -> bool:
        return self.state not in TERMINAL
