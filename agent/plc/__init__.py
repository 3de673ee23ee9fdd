"""The PLC hand-off: what line PLCs read from the agent besides the per-frame detections.

Data flow: each camera's post thread hands every Result to the service's fan-out
(`Service.add_result_listener`), which gives it first to the detections publisher, then to every
PLC component registered for that camera (inspection handshake, zones and counting lines, the
Sparkplug B node). Components never reach into the pipeline's threads: they read results, publish
through the agent's MQTT client (Sparkplug through its own session), keep their own small state,
and report it for telemetry. A listener that raises is logged and skipped: it never stops the
detections of that frame or the next. A step (`Service.add_result_step`) runs before the publisher
and may annotate the result: the counting tracker writes track ids there.

`start_plc` is the one place that decides which components run, from the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.mqtt.client import MqttClient
    from agent.mqtt.topics import Topics
    from agent.vision.types import Result

log = logging.getLogger(__name__)


class PlcHost(Protocol):
    """What a PLC component may use of the service (the service implements it)."""

    cfg: AgentConfig
    topics: Topics
    mqtt: MqttClient | None

    def emit(self, name: str, data: dict[str, object] | None = None) -> None: ...

    def add_result_listener(self, camera_id: str, sink: Callable[[Result], None]) -> None: ...

    def camera_state(self, camera_id: str) -> str: ...

    def add_result_step(self, camera_id: str, step: Callable[[Result], None]) -> None: ...

    def latest_image(self, camera_id: str) -> Any: ...

    def model_labels(self, camera_id: str) -> list[str]: ...


class PlcComponent(Protocol):
    name: str

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class MetricSource(Protocol):
    """Optional, for a PLC component whose values the Sparkplug node publishes (agent/plc/sparkplug.py).

    `metrics()` returns {camera id: {metric name: value}}, values bool / int / float / str (born as
    Boolean / Int64 / Double / String); names are Sparkplug paths ("Inspection/Last ID"). It is called
    from the node's thread every `sparkplug.period_s`: return a copy, quickly, under the component's own
    lock. Keep the set of names stable from the start (give counters their 0): a new name re-births
    that camera's Sparkplug device. A component may also offer `add_change_listener(callback)`; the node
    passes a callback that makes it publish within ~50 ms instead of at the next period. (The counting
    component's `counters()` + `camera_id` are read as they are.)
    """

    def metrics(self) -> dict[str, dict[str, bool | int | float | str]]: ...


def start_plc(host: PlcHost) -> list[PlcComponent]:
    """Start the PLC components the config turns on; each registers its own result listeners.

    If one fails to start, those already started are closed, last first, before the error goes on:
    a service that does not start must not leave a listening port, a thread or a session behind.
    """
    components: list[PlcComponent] = []
    try:
        if any(c.inspection is not None and c.inspection.enabled for c in host.cfg.cameras):
            from agent.plc.inspection import Inspection

            components.append(Inspection(host))
        if any(c.counting is not None and c.counting.enabled for c in host.cfg.cameras):
            from agent.plc.counting_service import start_counting  # imports the tracker: only when counting

            components.extend(start_counting(host))  # closes its own on failure
        if host.cfg.commissioning.http_port is not None:
            from agent.plc.snapshot import CommissioningServer

            components.append(CommissioningServer(host, components))
        if host.cfg.sparkplug.enabled:  # last: it reads the metrics of the components started above
            try:
                from agent.plc.sparkplug import SparkplugNode
            except ImportError as exc:
                raise ConfigError([f"sparkplug.enabled: {exc}"]) from None
            components.append(SparkplugNode(host, sources=list(components)))
    except BaseException:
        _close_started(components)
        raise
    return components


def _close_started(components: list[PlcComponent]) -> None:
    """Close in reverse start order (a later component may read an earlier one); a close that fails is logged,
    so that the others still close and the start error is the one that surfaces."""
    for component in reversed(components):
        try:
            component.close()
        except Exception:
            log.exception("closing %s after a failed PLC start failed", component.name)


__all__ = ["MetricSource", "PlcComponent", "PlcHost", "start_plc"]
