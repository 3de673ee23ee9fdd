"""What the update side needs from the rest of the agent, as Protocols: the arrows run one way.

    agent.service ──(start_updates(svc, store))──▶ agent.updates.host ──▶ agent.updates.manager
                                                        │ reads / calls          │ calls
                                                        ▼                        ▼
                                              UpdateService            UpdateHost, MqttLike, TopicsLike

`agent.service.Service` satisfies `UpdateService` structurally; nothing under agent/updates/ imports
agent.service. The Protocols name only what the host touches: the camera pipelines (frames,
counters, the frame-boundary swap), the config, the runtimes loader, the post-swap bookkeeping, and
the MQTT client and topics the manager reports on. `UpdateHost` is what the manager needs from the
host (the real one is `agent.updates.host.ServiceHost`; the tests give it a double).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from agent.config import AgentConfig, ModelConfig
    from agent.models.store import ModelVersion
    from agent.pipeline import ModelRuntime, SwapTicket
    from agent.updates.manifest import Manifest

__all__ = ["MqttLike", "TopicsLike", "UpdateHost", "UpdatePipeline", "UpdateService"]


class UpdateHost(Protocol):
    """What the manager needs from the running service."""

    def recent_frames(self) -> list[np.ndarray]:
        """A few recent camera frames (BGR, HxWx3 uint8) for the smoke test; may be empty."""
        ...

    def current_model(self) -> tuple[str, str]:
        """(name, version) of the model serving now."""
        ...

    def prepare_engine(self, model_path: Path | None, manifest: Manifest | None) -> object:
        """Build / load an engine (through the engine cache) while the old one keeps serving.

        `model_path` None means the bundled default model. Returns an opaque ready bundle.
        """
        ...

    def smoke(self, bundle: object, frames: list[np.ndarray]) -> dict[str, Any]:
        """Run the bundle on `frames` (validate.smoke_test); raise UpdateError when it fails."""
        ...

    def activate(self, bundle: object, version: ModelVersion | None) -> None:
        """Swap to `bundle` at a frame boundary; return once it serves (None: the bundled default)."""
        ...

    def release(self, bundle: object) -> None:
        """Free a bundle that will never serve (failed smoke test, failed swap)."""
        ...

    def health_since(self, t0: float) -> dict[str, Any]:
        """{"frames", "errors", "fps"} counted since the wall-clock time `t0`."""
        ...


class MqttLike(Protocol):
    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool: ...

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None], qos: int = 1) -> None: ...


class TopicsLike(Protocol):
    @property
    def model_state(self) -> str: ...

    @property
    def model_update(self) -> str: ...

    @property
    def events(self) -> str: ...

    def group_model_update(self, group: str) -> str: ...

    def chunk_filter(self) -> str: ...

    def group_chunk_filter(self, group: str) -> str: ...

    def parse_chunk_topic(self, topic: str) -> tuple[str, int] | None: ...


class UpdatePipeline(Protocol):
    """One camera pipeline as the update host sees it."""

    processed: int
    errors: int
    recent_frames: deque[np.ndarray]

    @property
    def runtime(self) -> ModelRuntime: ...

    def request_swap(self, runtime: ModelRuntime) -> SwapTicket: ...


class UpdateService(Protocol):
    """The running service as the update host sees it."""

    cfg: AgentConfig

    @property
    def pipelines(self) -> Sequence[UpdatePipeline]: ...

    @property
    def mqtt(self) -> MqttLike | None: ...

    @property
    def topics(self) -> TopicsLike: ...

    def load_runtimes(self, path: Path | None, name: str | None, version: str | None,
                      model_cfg: ModelConfig | None, count: int) -> list[ModelRuntime]:
        """One warmed-up runtime per camera (sharing one loaded model where it can)."""
        ...

    def on_model_activated(self, rt: ModelRuntime) -> None: ...
