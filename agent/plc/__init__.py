"""The PLC hand-off: what line PLCs read from the agent besides the per-frame detections.

Data flow: each camera's post thread hands every Result to the service's fan-out
(`Service.add_result_listener`), which gives it first to the detections publisher, then to every
PLC component registered for that camera (inspection handshake, zones and counting lines, the
Sparkplug B node). Components never reach into the pipeline's threads: they read results, publish
through the agent's MQTT client (Sparkplug through its own session), keep their own small state,
and report it for telemetry. A listener that raises is logged and skipped: it never stops the
detections of that frame or the next.

`start_plc` is the one place that decides which components run, from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.mqtt.client import MqttClient
    from agent.mqtt.topics import Topics
    from agent.vision.types import Result


class PlcHost(Protocol):
    """What a PLC component may use of the service (the service implements it)."""

    cfg: AgentConfig
    topics: Topics
    mqtt: MqttClient | None

    def emit(self, name: str, data: dict[str, object] | None = None) -> None: ...

    def add_result_listener(self, camera_id: str, sink: Callable[[Result], None]) -> None: ...

    def camera_state(self, camera_id: str) -> str: ...


class PlcComponent(Protocol):
    name: str

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def start_plc(host: PlcHost) -> list[PlcComponent]:
    """Start the PLC components the config turns on; each registers its own result listeners."""
    components: list[PlcComponent] = []
    return components


__all__ = ["PlcComponent", "PlcHost", "start_plc"]
