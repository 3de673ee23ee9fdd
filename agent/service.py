"""The service: wires config, engine, pipelines, MQTT, telemetry and systemd; owns the lifecycle.

Start order: MQTT first (its queue is ready even while the broker is away), then the engine (built
through the cache; systemd is asked for more start time while a build runs), then one pipeline per
camera. READY is sent once frames flow, the watchdog is fed only while every stage progresses.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.capture.reader import CaptureThread
from agent.config import AgentConfig, ModelConfig, load_config
from agent.engines.base import Engine
from agent.errors import AgentError, CacheError, ConfigError, EngineError, UpdateError
from agent.mqtt.client import MqttClient
from agent.mqtt.topics import Topics
from agent.pipeline import ModelRuntime, Pipeline, build_runtime
from agent.plc import PlcComponent, start_plc
from agent.publish import ResultPublisher, dumps
from agent.sdnotify import Notifier, Watchdog
from agent.telemetry.system import SystemReader, check_thresholds
from agent.vision.types import Result

if TYPE_CHECKING:
    from agent.models.layout import ModelVersion

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, object]], None]

STOP_CAMERAS_S = 10.0  # shutdown: all cameras' pipelines together, leaving room for the MQTT drain
_LAST_JOIN_S = 0.1  # a camera reached after the budget ran out: threads on their way out still end


class HookFailureLog:
    """Logs a failing result hook's traceback the first time, then at most once per `every_s` with the
    number not logged: a PLC component that fails on every frame must not flood the journal at the
    frame rate. Called from inside the `except` block (it logs the exception being handled)."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.count = 0
        self._next_log: dict[int, float] = {}  # id(hook) -> monotonic time of the next traceback
        self._not_logged: dict[int, int] = {}

    def failed(self, what: str, hook: object, camera_id: str, seq: int) -> None:
        self.count += 1
        key, now = id(hook), time.monotonic()
        if now < self._next_log.get(key, 0.0):
            self._not_logged[key] = self._not_logged.get(key, 0) + 1
            return
        self._next_log[key] = now + self.every_s
        skipped = self._not_logged.pop(key, 0)
        log.exception("%s %r failed on %s frame %d%s", what, hook, camera_id, seq,
                      f" ({skipped} failures since the last report not logged)" if skipped else "")


class Service:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None, *,
                 echo: Callable[[str], None] | None = None, max_frames: int | None = None,
                 duration: float | None = None, use_cache: bool = True) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.echo = echo
        self.max_frames = max_frames
        self.duration = duration
        self.use_cache = use_cache
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.notifier = Notifier()
        self.mqtt: MqttClient | None = None
        self.pipelines: list[Pipeline] = []
        self.publishers: list[ResultPublisher] = []
        self.cache: Any = None
        self.engine_info: dict[str, object] = {}
        self.started_at = time.monotonic()
        self.ready = False
        self._first_frame_seen: float | None = None
        self._ready_logged = False
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._freeze = threading.Event()
        self._telemetry_thread: threading.Thread | None = None
        self._watchdog: Watchdog | None = None
        self._system = SystemReader([cfg.cache.dir, cfg.updates.models_dir])
        self._threshold_state: dict[str, bool] = {}
        self.updates: Any = None
        self.update_host: Any = None
        self.exit_code = 0
        self._prometheus: Any = None
        self.store: Any = None
        self._result_listeners: dict[str, list[Callable[[Result], None]]] = {c.id: [] for c in cfg.cameras}
        self._result_steps: dict[str, list[Callable[[Result], None]]] = {c.id: [] for c in cfg.cameras}
        self.plc: list[PlcComponent] = []
        self._hook_failures = HookFailureLog()
        self.model_loads = 0  # engines loaded since start (cameras on one model share one load)
        self._engine_overrides: dict[str, object] = {}

    # ---- events -----------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, object] | None = None) -> None:
        """A notable event: logged, and published on `events` (QoS 1)."""
        data = data or {}
        log.info("event %s %s", name, dumps(data))
        if self.mqtt is not None:
            self.mqtt.publish(self.topics.events, dumps({"event": name, "ts": round(time.time(), 3), **data}), qos=1)

    # ---- start ----------------------------------------------------------------------------
    def start(self) -> None:
        self.notifier.status("starting")
        if self.cfg.mqtt.enabled:
            self.mqtt = MqttClient(self.cfg.mqtt, self.cfg.client_id, will_topic=self.topics.status,
                                   will_payload=self._status_payload("offline").encode(),
                                   on_connect=self._on_mqtt_connect)
        path, name, version, mcfg = self._initial_model()
        if path == self.cfg.model.path:  # the configured model: a missing file or a misfit decoder is a
            from agent.checks import model_errors  # config mistake (exit 2, no restart loop)

            problems = model_errors(mcfg)
            if problems:
                raise ConfigError(problems)
        self._graphs_for_cameras(len(self.cfg.cameras))
        runtimes = self.load_runtimes(path, name, version, mcfg, len(self.cfg.cameras))
        self.engine_info = {**runtimes[0].engine.info.to_json(), "preprocess": runtimes[0].preprocess}
        for cam, rt in zip(self.cfg.cameras, runtimes, strict=True):
            capture = CaptureThread(cam, on_event=self.emit)
            publisher = ResultPublisher(self.mqtt, self.topics, cam.id, self.cfg.mqtt.detections_qos, echo=self.echo)
            publisher.labels = rt.labels
            pipe = Pipeline(cam.id, capture, rt, self._fanout(cam.id, publisher), on_event=self.emit,
                            max_frames=self.max_frames)
            self.publishers.append(publisher)
            self.pipelines.append(pipe)
        # Handlers first, connection second: what the broker kept for us while we were down
        # (a manifest, update chunks) arrives right at connect and must find its handler.
        self._start_updates()
        self.plc = start_plc(self)
        if self.mqtt is not None:
            self.mqtt.start()  # "online" is published by _on_mqtt_connect, once per connection
        if self.cfg.telemetry.prometheus_port is not None:
            from agent.telemetry.prometheus import PrometheusExporter

            self._prometheus = PrometheusExporter(self.cfg.telemetry.prometheus_port)
        for pipe in self.pipelines:
            pipe.start()
        self._telemetry_thread = threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True)
        self._telemetry_thread.start()
        if self.cfg.service.watchdog:
            # Under systemd the pings stop and systemd restarts us; without a watchdog (a container,
            # a shell) a stuck stage makes the service exit non-zero so the supervisor restarts it.
            interval = None if self.notifier.watchdog_interval() is not None else self.cfg.service.stall_s / 2
            self._watchdog = Watchdog(self.notifier, stall_s=self.cfg.service.stall_s, interval_s=interval,
                                      on_stall=self._on_stall)
            for pipe in self.pipelines:
                for name, probe in pipe.progress_probes().items():
                    self._watchdog.add_probe(name, probe)
            self._watchdog.start()

    def _on_stall(self, stages: list[str]) -> None:
        self.emit("pipeline_stalled", {"stages": stages})
        if self.notifier.watchdog_interval() is None:
            log.critical("stages %s are stuck and no systemd watchdog watches: exiting for a restart", stages)
            self.exit_code = 1
            self._stop.set()

    def _initial_model(self) -> tuple[Path, str, str, ModelConfig]:
        """The installed active model if updates are on and it is complete, else the configured one."""
        cfg = self.cfg.model
        if not self.cfg.updates.enabled:
            return cfg.path, cfg.name, cfg.version, cfg
        from agent.models.store import ModelStore

        try:
            self.store = ModelStore(self.cfg.updates.models_dir, self.cfg.updates.keep_versions)
            active = self.store.recover()
        except OSError as exc:
            log.error("model store %s unusable (%s): serving the configured model, updates off",
                      self.cfg.updates.models_dir, exc)
            self.emit("model_store_unusable", {"error": str(exc)[:200]})
            self.store = None
            return cfg.path, cfg.name, cfg.version, cfg
        if active is not None:
            log.info("serving installed model %s", active.key)
        return resolve_model(self.cfg, active)

    def _graphs_for_cameras(self, cameras: int) -> None:
        """Several cameras on one ONNX Runtime model: CUDA-graph lanes, or graphs off and a stream per
        run (agent.engines.factory.shared_engine_settings says which, and why)."""
        from agent.engines.factory import shared_engine_settings

        overrides, event = shared_engine_settings(self.cfg.engine, cameras)
        self._engine_overrides.update(overrides)
        if event is not None:
            self.emit(*event)

    def load_runtimes(self, path: Path | None, name: str | None, version: str | None,
                      model_cfg: ModelConfig | None, count: int) -> list[ModelRuntime]:
        """One runtime per camera, all on ONE loaded model where the backend can share it (own
        buffers, bindings and letterbox per camera), else one load each. Warmed up one at a time."""
        first = self.load_runtime(path, name, version, model_cfg)
        runtimes = [first]
        try:
            for _ in range(count - 1):
                try:
                    engine = first.engine.share()
                except EngineError as exc:
                    if len(runtimes) == 1:
                        self.emit("engine_not_shared", {"reason": str(exc)[:200]})
                    runtimes.append(self.load_runtime(path, name, version, model_cfg))
                    continue
                runtimes.append(self._runtime_on(engine, path or self.cfg.model.path, name, version, model_cfg))
        except AgentError:
            for rt in runtimes:
                rt.close()
            raise
        return runtimes

    def _runtime_on(self, engine: Engine, path: Path, name: str | None, version: str | None,
                    model_cfg: ModelConfig | None) -> ModelRuntime:
        try:
            rt = build_runtime(engine, model_cfg or self.cfg.model, path, name=name, version=version,
                               preprocess=self.cfg.engine.preprocess)
        except AgentError:
            engine.close()
            raise
        rt.warmup(self.cfg.engine.warmup_runs)
        return rt

    def load_runtime(self, path: Path | None = None, name: str | None = None, version: str | None = None,
                     model_cfg: ModelConfig | None = None) -> ModelRuntime:
        """Engine (through the cache) + letterbox + decoder for one pipeline, warmed up."""
        path = path or self.cfg.model.path
        engine = self._make_engine(path)
        try:
            rt = build_runtime(engine, model_cfg or self.cfg.model, path, name=name, version=version,
                               preprocess=self.cfg.engine.preprocess)
        except AgentError:
            engine.close()
            raise
        t0 = time.perf_counter()
        rt.warmup(self.cfg.engine.warmup_runs)
        log.info("model %s %s loaded (%s, warm-up %.0f ms)", rt.name, rt.version,
                 ",".join(engine.info.providers), (time.perf_counter() - t0) * 1e3)
        self.model_loads += 1
        return rt

    def _make_engine(self, path: Path) -> Engine:
        from agent.engines.factory import create_engine

        cache = self._engine_cache()

        def progress(done: float, note: str = "") -> None:
            # A first engine build can take minutes on a Jetson: ask systemd for more start time.
            self.notifier.extend_timeout(60.0)
            self.notifier.status(f"building engine {done:.0%} {note}".strip())

        cfg = self.cfg.engine.model_copy(update=self._engine_overrides) if self._engine_overrides else self.cfg.engine
        return create_engine(path, cfg, cache, on_event=self.emit, progress=progress)

    def _engine_cache(self) -> Any:
        if not self.use_cache:
            return None
        if self.cache is None:
            from agent.cache.store import EngineCache

            try:
                self.cache = EngineCache(self.cfg.cache.dir, self.cfg.cache.max_mb * 1024 * 1024, on_event=self.emit)
            except CacheError as exc:
                # Run uncached rather than not at all, but say loudly what it costs.
                log.error("%s; running without an engine cache", exc)
                self.emit("engine_cache_unusable", {"error": str(exc)})
                self.use_cache = False
                return None
        return self.cache

    def _start_updates(self) -> None:
        if self.store is None or self.mqtt is None:
            return
        if not self.cfg.updates.trusted_keys:
            log.warning("updates are enabled but no key is trusted (updates.trusted_keys): none will be accepted")
            return
        from agent.updates.host import start_updates

        try:
            self.updates, self.update_host = start_updates(self, self.store)
        except UpdateError as exc:
            if exc.reason == "bad_key":  # the operator's file, not a transient fault: no restart loop
                raise ConfigError([f"updates.trusted_keys: {exc.detail}"]) from exc
            raise

    def on_model_activated(self, rt: ModelRuntime) -> None:
        """After a swap: status, labels for the count topics, protected cache entries."""
        old_key = str(self.engine_info.get("engine_key", ""))
        self.engine_info = {**rt.engine.info.to_json(), "preprocess": rt.preprocess}
        for pub in self.publishers:
            pub.labels = rt.labels
        self._publish_status()
        if self.cache is not None:
            keys = [k for k in (rt.engine.info.engine_key, old_key) if k]
            try:
                self.cache.set_protected(keys)
            except AgentError as exc:
                log.warning("could not protect engines %s: %s", keys, exc)

    # ---- results to the PLC hand-off -----------------------------------------------------------
    def add_result_listener(self, camera_id: str, sink: Callable[[Result], None]) -> None:
        """`sink` gets every result of that camera on its post thread, after the detections are published."""
        _camera_hooks(self._result_listeners, camera_id).append(sink)

    def add_result_step(self, camera_id: str, step: Callable[[Result], None]) -> None:
        """`step` gets every result of that camera BEFORE the detections are published and may annotate
        it (track ids); a step that raises is logged and the detections go out unannotated."""
        _camera_hooks(self._result_steps, camera_id).append(step)

    def latest_image(self, camera_id: str) -> Any:
        """The newest frame handed to that camera's detector (BGR numpy array), or None."""
        for p in self.pipelines:
            if p.camera_id == camera_id and p.recent_frames:
                return p.recent_frames[-1]
        return None

    def camera_state(self, camera_id: str) -> str:
        for p in self.pipelines:
            if p.camera_id == camera_id:
                return p.capture.state
        return "unknown"

    def model_labels(self, camera_id: str) -> list[str]:
        """The labels of the model serving that camera now (empty when unknown)."""
        for p in self.pipelines:
            if p.camera_id == camera_id:
                return list(p.runtime.labels)
        return []

    def _fanout(self, camera_id: str, publisher: ResultPublisher) -> Callable[[Result], None]:
        listeners = self._result_listeners[camera_id]
        steps = self._result_steps[camera_id]

        def deliver(result: Result) -> None:
            for step in steps:
                try:
                    step(result)
                except Exception:  # a PLC component's fault never stops the detections
                    self._hook_failures.failed("result step", step, camera_id, result.frame_seq)
            publisher(result)
            for sink in listeners:
                try:
                    sink(result)
                except Exception:  # a PLC component's fault never stops the detections
                    self._hook_failures.failed("result listener", sink, camera_id, result.frame_seq)

        return deliver

    # ---- MQTT ---------------------------------------------------------------------------------
    def _on_mqtt_connect(self) -> None:
        # Retained status again after every reconnect: the will may have replaced it meanwhile.
        self._publish_status()

    def _status_payload(self, state: str) -> str:
        model = {"name": self.cfg.model.name, "version": self.cfg.model.version}
        if self.pipelines:
            rt = self.pipelines[0].runtime
            model = {"name": rt.name, "version": rt.version}
        return dumps({"state": state, "ts": round(time.time(), 3), "agent_version": __version__,
                      "device_id": self.cfg.device_id, "model": model,
                      "backend": self.engine_info.get("backend", self.cfg.engine.backend),
                      "providers": self.engine_info.get("providers", []),
                      "cameras": [c.id for c in self.cfg.cameras]})

    def _publish_status(self) -> None:
        if self.mqtt is not None:
            self.mqtt.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)

    # ---- telemetry ----------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Any]:
        cams = [p.stats() for p in self.pipelines]
        system = self._system.read()
        return {
            "ts": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "fps": round(sum(c["fps"] for c in cams), 2),
            "frames_in": sum(c["frames_in"] for c in cams),
            "frames_processed": sum(c["frames_processed"] for c in cams),
            "frames_dropped": sum(c["frames_dropped"] for c in cams),
            "cameras": cams,
            "mqtt": self.mqtt.stats() if self.mqtt is not None else {"enabled": False},
            "model": {"name": self.pipelines[0].runtime.name, "version": self.pipelines[0].runtime.version}
            if self.pipelines else {},
            "engine": {**self.engine_info, "model_loads": self.model_loads,
                       "cameras_on_engine": self.pipelines[0].runtime.engine.contexts if self.pipelines else 0},
            "updates": dict(self.updates.counters) if self.updates is not None else {"enabled": False},
            **({"plc": {c.name: c.stats() for c in self.plc}} if self.plc else {}),
            "system": system,
        }

    def _telemetry_loop(self) -> None:
        next_at = time.monotonic() + min(self.cfg.telemetry.period_s, 1.0)
        next_sample = 0.0
        while not self._stop.wait(0.1):
            self._maybe_ready()
            if self.update_host is not None and time.monotonic() >= next_sample:
                self.update_host.sample()
                next_sample = time.monotonic() + 0.5
            if time.monotonic() < next_at:
                continue
            next_at = time.monotonic() + self.cfg.telemetry.period_s
            try:
                snap = self.telemetry()
                if self.mqtt is not None:
                    self.mqtt.publish(self.topics.telemetry, dumps(snap), qos=0)
                if self._prometheus is not None:
                    self._prometheus.update(snap)
                # fps under target means nothing before the first frame (READY)
                fps = snap["fps"] if self.ready else None
                for name, data in check_thresholds(snap["system"], self.cfg.telemetry, fps, self._threshold_state):
                    self.emit(name, data)
                self.notifier.status(self._status_line())
            except Exception:  # telemetry must never take the service down
                log.exception("telemetry failed")

    def _status_line(self, fps: bool = True) -> str:
        parts = []
        for p in self.pipelines:
            s = p.stats()
            parts.append(f"{p.camera_id} {s['camera_state']}" + (f" {s['fps']} fps" if fps else ""))
        rt = self.pipelines[0].runtime if self.pipelines else None
        model = f"{rt.name} v{rt.version}" if rt else "-"
        mq = "mqtt up" if self.mqtt is not None and self.mqtt.connected else "mqtt down"
        return f"{model}; {'; '.join(parts)}; {mq}"

    def _maybe_ready(self) -> None:
        if self._ready_logged or not any(p.processed > 0 for p in self.pipelines):
            return
        now = time.monotonic()
        if not self.ready:  # READY as soon as the first frame went through; no fps to tell yet
            self.ready = True
            self._first_frame_seen = now
            self.notifier.ready(self._status_line(fps=False))
            return
        # the log's ready line reports fps, measured over the first second of frames (two frames
        # give 0 to 30 fps for a 15 fps video), or over what came in 5 s for a slow camera
        first = self._first_frame_seen or now
        if now - first < 1.0 or (now - first < 5.0 and not any(p.processed > 2 for p in self.pipelines)):
            return
        self._ready_logged = True
        line = self._status_line()
        self.notifier.status(line)
        log.info("ready: %s", line)

    # ---- signals, reload, stop ------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        if os.environ.get("EDGE_AGENT_TEST_HOOKS") == "1":
            signal.signal(signal.SIGUSR2, lambda s, f: self._freeze.set())

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Start, serve until stopped (signal, end of file source, --max-frames, --duration), stop."""
        try:
            self.start()
        except AgentError:
            self.shutdown()
            raise
        deadline = time.monotonic() + self.duration if self.duration else None
        while not self._stop.wait(0.1):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self._freeze.is_set():
                self._freeze.clear()
                for p in self.pipelines:
                    p.freeze()
            if all(p.finished.is_set() for p in self.pipelines):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        self.shutdown()
        return self.exit_code

    def reload(self) -> None:
        """SIGHUP: apply what can change live; a bad config is rejected and the old one stays."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected, the running config stays in force:\n  %s", "\n  ".join(exc.errors))
            self.emit("reload_rejected", {"errors": exc.errors[:20]})
            self.notifier.ready_after_reload()
            return
        applied, restart = apply_live(self, new)
        self.emit("config_reloaded", {"applied": applied, "needs_restart": restart})
        self.notifier.ready_after_reload()

    def shutdown(self) -> None:
        self.notifier.stopping()
        self._stop.set()
        if self.updates is not None:
            self.updates.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        for p in self.pipelines:  # all cameras at once: one slow to stop does not delay the others' stop
            p.request_stop()
        # One budget for all cameras together (all have been stopping since the line above): each
        # camera stuck in a read used to cost its own 10 s (more: capture, then each thread), so a
        # few of them could run past systemd's TimeoutStopSec (30 s) before the MQTT drain and be
        # SIGKILLed. After the budget, a camera gets only a last short join.
        deadline = time.monotonic() + STOP_CAMERAS_S
        for p in self.pipelines:
            p.stop(max(_LAST_JOIN_S, deadline - time.monotonic()))
        for component in self.plc:
            try:
                component.close()
            except Exception:
                log.exception("closing %s failed", component.name)
        if self._telemetry_thread is not None:
            self._telemetry_thread.join(2)
        if self.mqtt is not None:
            self.mqtt.publish(self.topics.telemetry, dumps(self.telemetry()), qos=0)
            self.mqtt.stop(self.cfg.service.drain_s,
                           final=(self.topics.status, self._status_payload("offline").encode()))
        for p in self.pipelines:
            p.runtime.close()
        if self._prometheus is not None:
            self._prometheus.close()


def resolve_model(cfg: AgentConfig, active: ModelVersion | None) -> tuple[Path, str, str, ModelConfig]:
    """(path, name, version, model config) to serve: the installed `active` version (its file, name and
    version; labels and decoder from its manifest, the configured ones where it has none), or the
    configured model when none is installed. Pure: `edge-agent snapshot` resolves through it too."""
    m = cfg.model
    if active is None:
        return m.path, m.name, m.version, m
    model = active.manifest.get("model", {})
    mcfg = m.model_copy(update={"labels": active.labels or m.labels, "decoder": model.get("decoder", m.decoder)})
    return active.model_path, active.name, active.version, mcfg


def _camera_hooks(table: dict[str, list[Callable[[Result], None]]], camera_id: str) -> list[Callable[[Result], None]]:
    """That camera's list in `table`; a camera the config does not have is a ConfigError naming those it has."""
    if camera_id not in table:
        raise ConfigError([f"no camera {camera_id!r} (cameras: {', '.join(table)})"])
    return table[camera_id]


def apply_live(svc: Service, new: AgentConfig) -> tuple[list[str], list[str]]:
    """Apply the live-changeable parts of `new`; return (applied, needing a restart)."""
    old = svc.cfg
    applied: list[str] = []
    restart: list[str] = []
    m_old, m_new = old.model, new.model
    if (m_old.score_threshold, m_old.class_thresholds, m_old.iou_threshold) != (
            m_new.score_threshold, m_new.class_thresholds, m_new.iou_threshold):
        for p in svc.pipelines:
            p.runtime.post.set_thresholds(m_new.score_threshold, m_new.class_thresholds, m_new.iou_threshold)
        applied.append("model thresholds")
    if old.mqtt.topic_prefix != new.mqtt.topic_prefix:
        # Not live: the inspection and line-reset subscriptions, the update topics, the last will and
        # the retained status were all set on the old prefix at start; moving only the outgoing topics
        # would leave PLC triggers on the new prefix unanswered. One restart moves them all together.
        restart.append("mqtt.topic_prefix")
    if old.mqtt.detections_qos != new.mqtt.detections_qos:
        for pub in svc.publishers:
            pub.qos = new.mqtt.detections_qos
        applied.append("mqtt.detections_qos")
    if old.telemetry != new.telemetry:
        applied.append("telemetry")
    old_cams = {c.id: c for c in old.cameras}
    for pipe, cam in zip(svc.pipelines, new.cameras, strict=False):
        was = old_cams.get(cam.id)
        if was is not None and was.counting != cam.counting:  # the counting component holds its config
            restart.append(f"cameras[{cam.id}].counting")
        if was is not None and was.inspection != cam.inspection:  # the inspection component holds its config
            restart.append(f"cameras[{cam.id}].inspection")
        if cam.id == pipe.camera_id and was is not None and was.model_copy(
                update={"counting": cam.counting, "inspection": cam.inspection}) != cam:
            pipe.capture.set_source(cam)
            applied.append(f"cameras[{cam.id}]")
    if [c.id for c in old.cameras] != [c.id for c in new.cameras]:
        restart.append("cameras (added, removed or renamed)")
    for section in ("engine", "cache", "updates", "service", "sparkplug"):
        if getattr(old, section) != getattr(new, section):
            restart.append(section)
    if old.device_id != new.device_id:
        restart.append("device_id")
    mq_old = old.mqtt.model_dump(exclude={"topic_prefix", "detections_qos"})
    if mq_old != new.mqtt.model_dump(exclude={"topic_prefix", "detections_qos"}):
        restart.append("mqtt connection")
    if (m_old.path, m_old.labels, m_old.decoder, m_old.name, m_old.version) != (
            m_new.path, m_new.labels, m_new.decoder, m_new.name, m_new.version):
        restart.append("model (path, labels, decoder, name, version)")
    # Keep the new config for what was applied and the old for what was not (the next reload compares
    # with what is in force, so it lists an unapplied change again until a restart).
    unapplied_model = {k: getattr(m_old, k) for k in ("path", "labels", "decoder", "name", "version")}
    svc.cfg = new.model_copy(update={"device_id": old.device_id, "engine": old.engine, "cache": old.cache,
                                     "updates": old.updates, "service": old.service, "sparkplug": old.sparkplug,
                                     "mqtt": old.mqtt.model_copy(update={"detections_qos": new.mqtt.detections_qos}),
                                     "model": m_new.model_copy(update=unapplied_model)})
    if restart:
        log.warning("reload: these changes need a restart and were not applied: %s", ", ".join(restart))
    return applied, restart




__all__ = ["Service", "apply_live", "resolve_model"]
