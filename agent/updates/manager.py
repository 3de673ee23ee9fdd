"""The device side of model updates: manifest in, state machine out, health window, rollback.

The service builds one UpdateManager and gives it an `UpdateHost` (the service's side: frames,
engines, the frame-boundary swap, health). Everything here runs in the manager's own worker thread,
one update at a time; the MQTT callbacks only verify a manifest (cheap) and queue it, or write a
chunk to its assembler (a pwrite). A newer manifest supersedes one still queued.

Order of one update (each step reported on `model/state`, retained):
  received     signature, expiry, targets, replay, size cap, not-newer checked (again, in the worker)
  downloading  URL (resumable) or MQTT chunks (bitmap on disk; a stall of download_timeout_s fails)
  verifying    size + sha256 + ONNX checker + IO contract; then installed (atomic) in the ModelStore
  building     host.prepare_engine (engine cache); the old engine keeps serving meanwhile
  validating   host.smoke on recent frames (finite outputs, latency budget)
  active       host.activate swaps at a frame boundary; the store records it "on trial"
then a health window of `health_window_s`; a bad window -> `rolled_back` to the previous version
(or the bundled default), a good one -> `last_good`. A restart during the window rolls back too
(ModelStore.recover), so a model that kills the process cannot crash-loop the device.
Beside it: `ports` (host, MQTT), `chunks` (MQTT transfers), `health` (the verdict), `state`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import UpdatesConfig
from agent.errors import UpdateError
from agent.models.store import ModelStore, ModelVersion
from agent.updates.chunks import ChunkTransfers
from agent.updates.health import HealthPolicy
from agent.updates.manifest import DEFAULT_CLOCK_SKEW_S, Manifest, load_trusted_keys, verify_manifest
from agent.updates.ports import MqttLike, TopicsLike, UpdateHost
from agent.updates.state import TERMINAL as TERMINAL_STATES
from agent.updates.state import UpdateStateReporter
from agent.updates.transfer import _io_error as io_update_error
from agent.updates.transfer import clean_stale_transfers, download_url
from agent.updates.validate import validate_model

# HealthPolicy and the Protocols are re-exported: the tests and the host import them from here
__all__ = ["HealthPolicy", "MqttLike", "TopicsLike", "UpdateHost", "UpdateManager"]

log = logging.getLogger(__name__)

SEEN_MAX = 256
TRANSIENT = frozenset({"download_failed", "download_timeout"})


@dataclass
class _Job:
    manifest: Manifest
    raw: bytes
    received_at: float


class UpdateManager:
    def __init__(self, cfg: UpdatesConfig, device_id: str, topics: TopicsLike, mqtt: MqttLike, store: ModelStore,
                 host: UpdateHost, *, clock: Callable[[], float] = time.time,
                 clock_skew_s: float = DEFAULT_CLOCK_SKEW_S, health: HealthPolicy | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.topics = topics
        self.mqtt = mqtt
        self.store = store
        self.host = host
        self.clock = clock
        self.clock_skew_s = clock_skew_s
        self.health = health or HealthPolicy()
        self.trusted = load_trusted_keys(cfg.trusted_keys)
        self.max_bytes = cfg.max_model_mb * 1024 * 1024
        self.download_dir = Path(cfg.models_dir) / "downloads"
        # A restart during a health window rolled the trial back (ModelStore.recover): say so on
        # model/state, or the retained state would still claim the abandoned version is active.
        last = store.recall("last_attempt")
        self._persisted: dict[str, Any] | None = last if isinstance(last, dict) else None
        self.reporter = UpdateStateReporter(self._publish_state, clock=clock,
                                            initial="active" if store.recovered_from_trial else "idle",
                                            served=host.current_model, last_attempt=self._persisted)
        self._cv = threading.Condition()
        self._queued: _Job | None = None
        self._current: _Job | None = None
        self._chunks = ChunkTransfers(self._cv, self.download_dir, self.max_bytes, self._chunk_progress)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        seen = store.recall("seen_ids", [])
        self._seen: list[str] = [str(x) for x in seen][-SEEN_MAX:] if isinstance(seen, list) else []
        self.counters = {"manifests": 0, "rejected": 0, "superseded": 0, "chunks": 0, "chunks_dropped": 0,
                         "chunks_bad": 0, "activated": 0, "rolled_back": 0, "failed": 0}

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.download_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        clean_stale_transfers(self.download_dir, keep=set())
        if self.store.recovered_from_trial:
            name, _, version = self.store.recovered_from_trial.rpartition("-")
            with contextlib.suppress(UpdateError):
                self.reporter.transition("rolled_back", error="restart_during_trial", name=name, version=version,
                                         detail="the agent restarted during the model's health window")
            self._event("model_rolled_back", name=name, version=version, reason="restart_during_trial")
            # The manifest of that trial may still be pending (killed before it was cleared):
            # resuming it would put the abandoned version straight back on trial. A newer manifest
            # that arrived during the trial is pending instead, and goes on.
            pending = self.store.recall("pending")
            with contextlib.suppress(UpdateError, TypeError, UnicodeEncodeError):
                if isinstance(pending, str) and \
                        Manifest.parse_unverified(pending).label == self.store.recovered_from_trial:
                    self.store.forget("pending", only_if=pending)
        else:
            # what serves now: the retained state of the last process may name an update it never finished
            self.reporter.publish()
        pending = self.store.recall("pending")
        if isinstance(pending, str) and pending:
            self._resume_pending(pending.encode("utf-8"))
        self.mqtt.subscribe(self.topics.model_update, self._on_manifest, 1)
        self.mqtt.subscribe(self.topics.chunk_filter(), self._on_chunk, 1)
        for g in self.cfg.groups:
            self.mqtt.subscribe(self.topics.group_model_update(g), self._on_manifest, 1)
            self.mqtt.subscribe(self.topics.group_chunk_filter(g), self._on_chunk, 1)
        self._thread = threading.Thread(target=self._run, name="updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._chunks.close_all()  # persists the bitmaps: chunks held survive the restart

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._current is not None or self._queued is not None

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy:
                return True
            time.sleep(0.02)
        return not self.busy

    # ---- reporting ----------------------------------------------------------------------------
    def _publish_state(self, payload: dict[str, Any]) -> None:
        self.mqtt.publish(self.topics.model_state, json.dumps(payload, separators=(",", ":"), default=str),
                          qos=1, retain=True)
        attempt = payload.get("last_attempt")
        if isinstance(attempt, dict) and attempt.get("state") in TERMINAL_STATES and attempt != self._persisted:
            # the end of an attempt outlives a restart: the next start reports it beside what serves
            try:
                self.store.remember("last_attempt", attempt)
                self._persisted = attempt
            except (OSError, TypeError, ValueError) as exc:
                log.warning("could not persist the last update attempt: %s", exc)

    def _event(self, event: str, **fields: Any) -> None:
        body = {"event": event, "ts": round(self.clock(), 3), **fields}
        try:
            self.mqtt.publish(self.topics.events, json.dumps(body, separators=(",", ":"), default=str), qos=1)
        except Exception:
            log.exception("could not publish event %s", event)

    # ---- intake (MQTT callbacks: must stay quick) ------------------------------------------------
    def _verify(self, raw: bytes, own_id: str | None = None) -> Manifest:
        seen = {s for s in self._seen if s != own_id}
        return verify_manifest(raw, self.trusted, self.device_id, self.cfg.groups,
                               current_version=self.host.current_model()[1], seen_ids=seen, now=self.clock(),
                               clock_skew_s=self.clock_skew_s, max_model_bytes=self.max_bytes)

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        self.counters["manifests"] += 1
        try:
            m = self._verify(payload)
        except UpdateError as exc:
            self._rejected(payload, exc)
            return
        except Exception as exc:  # never let a bad message kill the MQTT thread
            log.exception("manifest handling failed")
            self._rejected(payload, UpdateError("internal", str(exc)[:200]))
            return
        # Seen AND pending in one atomic write, before this callback returns (and paho acknowledges
        # the message): a kill from here on finds the update pending at the next start. Written
        # later, a kill in between lost the update unreported (acknowledged, or refused as replayed).
        self._remember_seen(m.id, pending=bytes(payload))
        log.info("update %s %s accepted (manifest %s, key %s)", m.model.name, m.model.version, m.id, m.key_id)
        self._enqueue(_Job(m, bytes(payload), self.clock()))

    def _rejected(self, payload: bytes, exc: UpdateError) -> None:
        self.counters["rejected"] += 1
        mid = None
        with contextlib.suppress(Exception):
            doc = json.loads(payload[:65536])
            mid = str(doc.get("id"))[:64] if isinstance(doc, dict) else None
        log.warning("update manifest rejected: %s", exc)
        self._event("update_rejected", reason=exc.reason, detail=exc.detail, manifest_id=mid)
        if exc.reason == "replayed":
            return  # a re-delivery (retained group manifest after a reconnect): not news
        # beside what serves and the running attempt, never over them: unauthenticated input must
        # not move the update machine (a rollback in a health window would be lost)
        self.reporter.refuse(exc.reason, exc.detail, manifest_id=mid)

    def _enqueue(self, job: _Job) -> None:
        mq = job.manifest.source.mqtt
        with self._cv:
            if mq is not None:
                try:
                    self._chunks.open(mq, job.manifest.model.size)
                except UpdateError as exc:
                    self._clear_pending(job.raw)
                    self._rejected(job.raw, exc)
                    return
            old, self._queued = self._queued, job  # queued first: a new job on the same transfer keeps its assembler
            if old is not None:
                self.counters["superseded"] += 1
                self._event("update_superseded", manifest_id=old.manifest.id, by=job.manifest.id)
                self._drop_assembler(old)
            self._cv.notify_all()

    def _drop_assembler(self, job: _Job) -> None:
        """Close `job`'s transfer unless the running or another queued job needs it (condition held)."""
        mq = job.manifest.source.mqtt
        if mq is None:
            return
        others = [j for j in (self._current, self._queued) if j is not None and j is not job]
        self._chunks.release(mq.transfer_id, [j.manifest.source.mqtt.transfer_id for j in others
                                              if j.manifest.source.mqtt is not None])

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_chunk_topic(topic)
        if parsed is None:
            return
        got = self._chunks.add(parsed[0], parsed[1], payload)
        if got != "duplicate":
            self.counters[{"added": "chunks", "dropped": "chunks_dropped", "bad": "chunks_bad"}[got]] += 1

    def _url_progress(self, done: int, total: int) -> None:
        self.reporter.report_progress(done, total)

    def _chunk_progress(self, done: int, total: int) -> None:
        with contextlib.suppress(UpdateError):
            if self.reporter.state in ("received", "downloading"):
                self.reporter.report_progress(done, total)

    def _remember_seen(self, mid: str, pending: bytes | None = None) -> None:
        self._seen = [*[s for s in self._seen if s != mid][-(SEEN_MAX - 1):], mid]
        values: dict[str, Any] = {"seen_ids": self._seen}
        if pending is not None:
            values["pending"] = pending.decode("utf-8")  # the newest accepted manifest: resumed after a crash
        try:
            self.store.remember_all(values)
        except OSError as exc:
            log.error("could not persist processed manifest ids: %s", exc)

    def _clear_pending(self, raw: bytes) -> None:
        """Forget the pending manifest, unless a newer one replaced it meanwhile (that one must stay)."""
        try:
            self.store.forget("pending", only_if=raw.decode("utf-8"))
        except OSError as exc:
            log.error("could not clear the pending update: %s", exc)

    def _resume_pending(self, raw: bytes) -> None:
        """An update interrupted by a restart: re-check it (expiry, newer) and queue it again."""
        try:
            m = Manifest.parse_unverified(raw)
            m = self._verify(raw, own_id=m.id)
        except UpdateError as exc:
            # said on model/state: an accepted update must end visibly, not vanish at a restart
            log.warning("interrupted update not resumed: %s", exc)
            self._clear_pending(raw)
            self._rejected(raw, exc)
            return
        log.info("resuming the interrupted update to %s %s", m.model.name, m.model.version)
        self._enqueue(_Job(m, raw, self.clock()))

    # ---- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while self._queued is None and not self._stop.is_set():
                    self._cv.wait(0.5)
                if self._stop.is_set():
                    return
                job, self._queued = self._queued, None
                self._current = job
                self._chunks.error = None
            assert job is not None
            try:
                self._process(job)
            except Exception as exc:
                log.exception("update worker failed")
                self._fail(job, UpdateError("internal", f"{type(exc).__name__}: {str(exc)[:160]}"))
            finally:
                with self._cv:
                    self._current = None
                    self._drop_assembler(job)

    def _fail(self, job: _Job, exc: UpdateError) -> None:
        self.counters["failed"] += 1
        log.error("update to %s failed: %s", job.manifest.label, exc)
        with contextlib.suppress(UpdateError):
            if self.reporter.busy:
                self.reporter.fail(exc.reason, exc.detail)
            else:
                self.reporter.transition("received", version=job.manifest.model.version,
                                         name=job.manifest.model.name, manifest_id=job.manifest.id)
                self.reporter.fail(exc.reason, exc.detail)
        self._event("update_failed", reason=exc.reason, detail=exc.detail, manifest_id=job.manifest.id,
                    version=job.manifest.model.version)
        if exc.reason == "disk_full":
            self._discard_transfer(job)  # give the space back; a later push starts the transfer anew
        if exc.reason not in TRANSIENT and exc.reason != "stopped":
            self._clear_pending(job.raw)

    def _discard_transfer(self, job: _Job) -> None:
        mq = job.manifest.source.mqtt
        if mq is None:
            return
        with self._cv:
            queued = self._queued.manifest.source.mqtt if self._queued is not None else None
            if queued is not None and queued.transfer_id == mq.transfer_id:
                return  # the next update needs the same bytes: keep what was received
        self._chunks.discard(mq.transfer_id)

    def _process(self, job: _Job) -> None:
        m = job.manifest
        try:
            m = self._verify(job.raw, own_id=m.id)  # the world may have moved while it was queued
        except UpdateError as exc:
            self._fail(job, exc)
            return
        r = self.reporter
        r.transition("received", version=m.model.version, name=m.model.name, manifest_id=m.id)
        try:
            # `pending` was written when the manifest was accepted (_on_manifest): not again here,
            # where it would overwrite a newer manifest that arrived meanwhile
            self.store.set_desired(m.model.name, m.model.version, m.id)
        except OSError as exc:  # the store's disk is full (or failing): say so, not "internal"
            self._fail(job, io_update_error(exc, "writing the model store's state"))
            return
        mv = self.store.version(m.model.name, m.model.version)
        bundle: object | None = None
        installed_now = False
        try:
            if mv is not None and self.store.is_complete(mv):
                r.transition("verifying")  # installed before (a rollback to it, or a re-push)
            else:
                path = self._download(m)
                r.transition("verifying")
                validate_model(path, m)
                staged = self.store.stage(path, job.raw)
                mv = self.store.install(staged)
                installed_now = True
            r.transition("building")
            bundle = self.host.prepare_engine(mv.model_path, m)
            r.transition("validating")
            smoke = self.host.smoke(bundle, self.host.recent_frames())
            if self._stop.is_set():
                raise UpdateError("stopped", "the agent is stopping")
            before = self.host.health_since(self.clock() - max(self.cfg.health_window_s, 1.0))
            try:
                self.host.activate(bundle, mv)
            except UpdateError:
                raise
            except Exception as exc:
                raise UpdateError("activation_failed", f"{type(exc).__name__}: {str(exc)[:160]}") from None
            bundle = None  # serving now: no longer ours to release
            self.store.activate(mv, trial=True)
        except (UpdateError, OSError) as exc:
            if isinstance(exc, OSError):  # staging / installing on a full or failing disk
                exc = io_update_error(exc, "model store")
            if bundle is not None:
                with contextlib.suppress(Exception):
                    self.host.release(bundle)
            if installed_now and mv is not None and self.store.discard(mv):
                log.info("removed %s, which failed before serving", mv.key)  # the disk as it was
            self._fail(job, exc)
            return
        t0 = self.clock()
        self.counters["activated"] += 1
        r.transition("active", smoke=smoke)
        self._event("model_activated", name=m.model.name, version=m.model.version, manifest_id=m.id)
        self._clear_pending(job.raw)
        self._health_window(m, mv, t0, before)

    def _download(self, m: Manifest) -> Path:
        if m.source.url is not None:
            dest = self.download_dir / f"{m.model.sha256[:32]}.onnx"
            attempts = 3
            for attempt in range(1, attempts + 1):
                try:
                    self.reporter.report_progress(0, m.model.size)
                    return download_url(m.source.url, dest, m.model.size, self.max_bytes,
                                        self.cfg.download_timeout_s,
                                        progress=self._url_progress)
                except UpdateError as exc:
                    if exc.reason not in TRANSIENT or attempt == attempts or self._stop.wait(2.0 * attempt):
                        raise
                    log.warning("download attempt %d failed (%s); resuming", attempt, exc)
            raise AssertionError("unreachable")
        mq = m.source.mqtt
        if mq is None:  # the manifest schema requires exactly one source
            raise UpdateError("bad_transfer", "the manifest names no source")
        return self._chunks.wait_complete(mq, m.model.size, self.cfg.download_timeout_s, self._stop,
                                          self.download_dir / f"{m.model.sha256[:32]}.onnx")

    def _health_window(self, m: Manifest, mv: ModelVersion, t0: float, before: dict[str, Any]) -> None:
        if self._stop.wait(self.cfg.health_window_s):
            return  # stopping: the trial stays open, and the next start rolls back (safe side)
        after = self.host.health_since(t0)
        bad = self.health.judge(before, after)
        if bad is None:
            self.store.end_trial(good=True)
            self._event("model_kept", name=m.model.name, version=m.model.version, health=after)
            removed = self.store.prune()
            if removed:
                log.info("pruned model versions %s", removed)
            return
        log.error("model %s failed its health window: %s; rolling back", mv.key, bad)
        self.counters["rolled_back"] += 1
        prev = self.store.rollback(bad)
        detail = bad
        try:
            prev_manifest = None
            if prev is not None:
                with contextlib.suppress(UpdateError):
                    prev_manifest = Manifest.parse_unverified(json.dumps(prev.manifest))
            bundle = self.host.prepare_engine(prev.model_path if prev is not None else None, prev_manifest)
            self.host.activate(bundle, prev)
        except Exception as exc:
            log.exception("rollback engine could not be activated")
            detail = f"{bad}; the rollback failed: {type(exc).__name__}: {str(exc)[:120]}"
            self._event("rollback_failed", detail=f"{type(exc).__name__}: {str(exc)[:160]}")
        # reported once the previous model serves, so the retained state names what serves
        try:
            self.reporter.transition("rolled_back", error="health", detail=detail,
                                     restored=None if prev is None else {"name": prev.name, "version": prev.version})
        except UpdateError as exc:  # cannot happen while the worker owns the machine; say so if it does
            log.error("the rollback of %s could not be reported: %s", mv.key, exc)
        self._event("model_rolled_back", name=m.model.name, version=m.model.version, reason=bad,
                    to=None if prev is None else prev.key)
