"""The service side of model updates: the real UpdateHost over the running pipelines.

    service ──start_updates──▶ ServiceHost(UpdateService) ──▶ UpdateManager (its worker thread)
    manager ──prepare_engine / smoke / activate──▶ host ──load_runtimes / request_swap──▶ service, pipelines

The host sees the service only through `agent.updates.ports.UpdateService`, so this package never
imports agent.service (the service imports it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError, UpdateError
from agent.models.store import ModelStore, ModelVersion
from agent.pipeline import ModelRuntime
from agent.updates.manager import UpdateManager
from agent.updates.manifest import Manifest
from agent.updates.ports import UpdateService
from agent.updates.validate import smoke_test

log = logging.getLogger(__name__)

SWAP_TIMEOUT_S = 30.0


@dataclass
class Bundle:
    """One runtime per camera pipeline, all on the same model."""

    name: str
    version: str
    runtimes: list[ModelRuntime]
    engine_key: str

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()


class ServiceHost:
    """UpdateHost for the real service: builds engines through the cache, swaps between frames."""

    def __init__(self, svc: UpdateService) -> None:
        self.svc = svc
        # (wall time, frames processed, errors) every ~0.5 s, an hour deep: health windows look back
        self._history: deque[tuple[float, int, int]] = deque(maxlen=7200)
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Called periodically by the service: one point of the health history."""
        frames = sum(p.processed for p in self.svc.pipelines)
        errors = sum(p.errors for p in self.svc.pipelines)
        with self._lock:
            self._history.append((time.time(), frames, errors))

    # ---- UpdateHost -------------------------------------------------------------------------
    def recent_frames(self) -> list[np.ndarray]:
        frames: list[np.ndarray] = []
        for p in self.svc.pipelines:
            frames.extend(list(p.recent_frames))
        return frames[-8:]

    def current_model(self) -> tuple[str, str]:
        rt = self.svc.pipelines[0].runtime
        return rt.name, rt.version

    def prepare_engine(self, model_path: Path | None, manifest: Manifest | None) -> object:
        cfg = self.svc.cfg.model
        if model_path is None or manifest is None:
            path, name, version, mcfg = model_path or cfg.path, cfg.name, cfg.version, cfg
        else:
            path, name, version = model_path, manifest.model.name, manifest.model.version
            mcfg = cfg.model_copy(update={"labels": list(manifest.model.labels), "decoder": manifest.model.decoder})
        try:  # one loaded model shared by every camera (load_runtimes closes what it made on failure)
            runtimes = self.svc.load_runtimes(path, name, version, mcfg, len(self.svc.pipelines))
        except AgentError as exc:
            raise UpdateError("engine_failed", str(exc)[:300]) from None
        return Bundle(name, version, runtimes, runtimes[0].engine.info.engine_key)

    def smoke(self, bundle: object, frames: list[np.ndarray]) -> dict[str, Any]:
        assert isinstance(bundle, Bundle)
        rt = bundle.runtimes[0]
        if not frames:  # camera down: still prove the engine runs, on a grey frame
            frames = [np.full((rt.letterbox.height, rt.letterbox.width, 3), 114, np.uint8)]
        tensors = [rt.letterbox(f)[0].copy() for f in frames]
        result = smoke_test(rt.engine.infer, tensors, self.svc.cfg.updates.latency_budget_ms)
        # The decoder must accept the outputs too: a model that runs but cannot be decoded is bad.
        lb = rt.letterbox(frames[0])[1]
        try:
            rt.post(rt.engine.infer(tensors[0]), lb)
        except Exception as exc:
            raise UpdateError("io_mismatch", f"outputs cannot be decoded: {str(exc)[:200]}") from None
        return result

    def activate(self, bundle: object, version: ModelVersion | None) -> None:
        assert isinstance(bundle, Bundle)
        tickets = [p.request_swap(rt) for p, rt in zip(self.svc.pipelines, bundle.runtimes, strict=True)]
        for t in tickets:
            if not t.applied.wait(SWAP_TIMEOUT_S):
                raise UpdateError("activation_failed", "a pipeline did not take the new model in time")
        for t in tickets:
            # Close the old runtime only once its last frame is published: until then the post
            # thread may still read its outputs (on the GPU path, from its device buffers).
            if t.old is None:
                continue
            if t.drained.wait(SWAP_TIMEOUT_S):
                t.old.close()
            else:  # a stuck post thread: leaking one runtime beats freeing memory still in use
                log.warning("the old model %s %s still has frames in flight: left open", t.old.name, t.old.version)
        try:
            self.svc.on_model_activated(bundle.runtimes[0])
        except Exception:
            # The new model serves already: an error here (a full disk under the cache's
            # protected.json, say) must not make the manager release the bundle that now serves.
            log.exception("bookkeeping after the swap to %s %s failed", bundle.name, bundle.version)

    def release(self, bundle: object) -> None:
        assert isinstance(bundle, Bundle)
        bundle.close()

    def health_since(self, t0: float) -> dict[str, Any]:
        self.sample()
        with self._lock:
            hist = list(self._history)
        now, frames_now, errors_now = hist[-1]
        start = next((h for h in hist if h[0] >= t0), hist[-1])
        span = max(now - start[0], 1e-3)
        frames = frames_now - start[1]
        return {"frames": frames, "errors": errors_now - start[2], "fps": round(frames / span, 2),
                "span_s": round(span, 2)}


def start_updates(svc: UpdateService, store: ModelStore) -> tuple[UpdateManager, ServiceHost]:
    host = ServiceHost(svc)
    if svc.mqtt is None:
        raise UpdateError("no_mqtt", "updates need the MQTT connection")
    mgr = UpdateManager(svc.cfg.updates, svc.cfg.device_id, svc.topics, svc.mqtt, store, host)
    mgr.start()
    return mgr, host
