"""What `<prefix>/<device>/model/state` says (retained, QoS 1): the model that serves, and beside it
the last update attempt and the last refused manifest.

    update attempt -> UpdateStateReporter.transition -> attempt record ─┐
    refused manifest -> UpdateStateReporter.refuse -> refusal record ───┼─> compose -> publish (retained)
    host.current_model() (what serves now) ─────────────────────────────┘

The payload (contract, changed in 0.3.0 by issue 16):
`{"state", "name", "version", "ts", "last_attempt", "last_refused"}`, where `state`, `name` and
`version` always say what the device SERVES: `state` is `rolled_back` while it serves the model
it went back to after its last attempt's rollback, else `active`. An update in progress, a failure
or a refusal never replaces them. `last_attempt` is the update machine's record (or null):

    received -> downloading -> verifying -> building -> validating -> active
    any of received..validating -> failed (reason)
    active -> rolled_back (reason)              after a bad health window, or a restart in it
    idle / active / failed / rolled_back -> received   (the next update)

as `{"state", "version", "name", "manifest_id", "progress", "error", "detail", "ts", ...}` (what the
whole payload was up to 0.2.0); `downloading` may repeat (progress); `progress` is 0..1 or null,
`error` a short reason code (or null), `ts` Unix seconds; extra keys passed to a transition are
added as they are. `last_refused` is `{"state": "failed", "manifest_id", "error", "detail", "ts"}`
for the newest manifest refused before it became an attempt (bad signature, garbage, replay
excepted): it never moves the update machine, so unauthenticated input cannot hide a rollback.
`attempt_records` reads either form, for consumers that follow one manifest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import UpdateError

__all__ = ["STATES", "TERMINAL", "TRANSITIONS", "IllegalTransition", "UpdateStateReporter", "attempt_records",
           "record_for"]

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


Served = Callable[[], tuple[str | None, str | None]]


def attempt_records(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The update records a model/state payload carries: `last_attempt` and `last_refused` (0.3.0 on),
    or the payload itself when it comes from an older agent (where it was the attempt)."""
    if "last_attempt" not in payload and "last_refused" not in payload:
        return [payload]
    return [r for r in (payload.get("last_attempt"), payload.get("last_refused")) if isinstance(r, dict)]


def record_for(payload: dict[str, Any], manifest_id: str | None) -> dict[str, Any] | None:
    """The record of `manifest_id` in a model/state payload (the attempt first), or None."""
    return next((r for r in attempt_records(payload) if r.get("manifest_id") == manifest_id), None)


class UpdateStateReporter:
    """Walks the update state machine, refusing illegal steps, and hands each full model/state
    payload (what serves + the attempt + the last refusal) to `publish`.

    `served` says what serves now (name, version); `publish` is called outside the lock and its
    exceptions are swallowed (reporting must never break an update). Download progress is
    rate-limited to `min_interval_s` / `min_step`.
    """

    def __init__(self, publish: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.time,
                 min_interval_s: float = 0.5, min_step: float = 0.05, initial: str = "idle",
                 served: Served | None = None, last_attempt: dict[str, Any] | None = None) -> None:
        if initial not in TRANSITIONS:
            raise ValueError(f"unknown state {initial!r}")
        self._publish = publish
        self._clock = clock
        self._served = served
        self._lock = threading.Lock()
        self.state = initial
        self.version: str | None = None
        self.name: str | None = None
        self.manifest_id: str | None = None
        self.progress: float | None = None
        self.error: str | None = None
        self.detail: str | None = None
        # the attempt record last published (restored from the store at a start: shown, not resumed)
        self.last: dict[str, Any] | None = dict(last_attempt) if isinstance(last_attempt, dict) else None
        self.refused: dict[str, Any] | None = None
        self.history: list[str] = [initial]
        self._min_interval = min_interval_s
        self._min_step = min_step
        self._last_progress_at = 0.0

    def transition(self, new: str, *, version: str | None = None, name: str | None = None,
                   manifest_id: str | None = None, progress: float | None = None, error: str | None = None,
                   detail: str | None = None, **extra: Any) -> dict[str, Any]:
        """One step of the update machine; returns the attempt record (`last_attempt`)."""
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
            record: dict[str, Any] = {
                "state": new, "version": self.version, "name": self.name, "manifest_id": self.manifest_id,
                "progress": self.progress, "error": error, "detail": detail, "ts": round(self._clock(), 3),
            }
            record.update(extra)
            self.last = record
            self._last_progress_at = time.monotonic()
        self.publish()
        return record

    def refuse(self, reason: str, detail: str = "", manifest_id: str | None = None) -> dict[str, Any]:
        """A manifest refused before it became an attempt: reported beside what serves, never over it."""
        with self._lock:
            self.refused = {"state": "failed", "manifest_id": manifest_id, "error": reason, "detail": detail,
                            "ts": round(self._clock(), 3)}
            record = dict(self.refused)
        self.publish()
        return record

    def payload(self) -> dict[str, Any]:
        """The full model/state payload as it stands."""
        name: str | None = None
        version: str | None = None
        if self._served is not None:
            try:
                name, version = self._served()
            except Exception:  # no pipeline yet / shutting down: say nothing rather than guess
                pass
        with self._lock:
            attempt = dict(self.last) if self.last is not None else None
            refused = dict(self.refused) if self.refused is not None else None
        state = "active"
        if attempt is not None and attempt.get("state") == "rolled_back" \
                and (attempt.get("name"), attempt.get("version")) != (name, version):
            state = "rolled_back"  # serving what it went back to (a failed rollback still serves the trial)
        return {"state": state, "name": name, "version": version, "ts": round(self._clock(), 3),
                "last_attempt": attempt, "last_refused": refused}

    def publish(self) -> dict[str, Any]:
        """(Re)publish the full payload: at a start, and after every change."""
        payload = self.payload()
        try:
            self._publish(payload)
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
