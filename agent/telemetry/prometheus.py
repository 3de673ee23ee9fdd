"""Optional Prometheus exporter: the telemetry snapshot as ``edge_agent_*`` gauges on ``/metrics``.

prometheus-client is imported only when an exporter is created (``telemetry.prometheus_port`` set);
it comes with the ``metrics`` extra. Mapping of a telemetry dict:

- numbers (and booleans, as 0 / 1) become gauges named by their key path joined with ``_``:
  ``{"mqtt": {"queued": 3}}`` -> ``edge_agent_mqtt_queued 3``;
- a list of dicts that carry an identity (``camera``, ``id``, ``path`` or ``name``) becomes labelled
  gauges: ``{"cameras": [{"camera": "cam0", "fps": 30}]}`` -> ``edge_agent_cameras_fps{camera="cam0"} 30``;
- strings and other lists are left out (they belong to the MQTT telemetry, not to time series).
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from agent.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["PrometheusExporter", "flatten"]

PREFIX = "edge_agent_"
_IDENTITY_KEYS = ("camera", "id", "path", "name")
_BAD = re.compile(r"[^a-zA-Z0-9_]+")

Labels = tuple[tuple[str, str], ...]


def _name(parts: list[str]) -> str:
    return _BAD.sub("_", "_".join(parts)).strip("_").lower()


def flatten(data: dict[str, Any], parts: list[str] | None = None,
            labels: Labels = ()) -> Iterator[tuple[str, Labels, float]]:
    """(metric name without prefix, labels, value) for every numeric leaf of `data`."""
    parts = parts or []
    for key, value in data.items():
        path = [*parts, str(key)]
        if isinstance(value, bool):
            yield _name(path), labels, 1.0 if value else 0.0
        elif isinstance(value, (int, float)):
            yield _name(path), labels, float(value)
        elif isinstance(value, dict):
            yield from flatten(value, path, labels)
        elif isinstance(value, list):
            for item in value:
                if not isinstance(item, dict):
                    continue
                ident = next((k for k in _IDENTITY_KEYS if isinstance(item.get(k), str)), None)
                if ident is None:
                    continue
                rest = {k: v for k, v in item.items() if k != ident}
                yield from flatten(rest, path, (*labels, (_name([ident]), str(item[ident]))))


class PrometheusExporter:
    """Serves ``/metrics`` on `port` (own registry, own thread); `update()` sets the gauges."""

    def __init__(self, port: int, addr: str = "0.0.0.0", *, prefix: str = PREFIX) -> None:
        try:
            self._prom: Any = importlib.import_module("prometheus_client")
        except ImportError:
            raise ConfigError([
                f"telemetry.prometheus_port: set to {port} but prometheus-client is not installed "
                "(pip install 'edge-agent[metrics]', or remove prometheus_port)"
            ]) from None
        self.prefix = prefix
        self.port = port
        self.registry = self._prom.CollectorRegistry()
        self._gauges: dict[str, Any] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        started = self._prom.start_http_server(port, addr=addr, registry=self.registry)
        # prometheus-client >= 0.17 returns (server, thread); keep the server to shut it down.
        self._server = started[0] if isinstance(started, tuple) else None
        if isinstance(started, tuple):  # its default "Thread-N" says nothing in CPU per thread
            started[1].name = "prometheus-http"

    def update(self, telemetry: dict[str, Any]) -> None:
        with self._lock:
            for name, labels, value in flatten(telemetry):
                full = self.prefix + name
                label_names = tuple(k for k, _ in labels)
                gauge = self._gauges.get(full)
                if gauge is None:
                    try:
                        gauge = self._prom.Gauge(full, f"edge-agent telemetry field {name}", label_names,
                                                 registry=self.registry)
                    except ValueError as exc:  # a name clash: skip the field rather than fail telemetry
                        log.debug("metric %s skipped: %s", full, exc)
                        continue
                    self._gauges[full] = gauge
                    self._label_names[full] = label_names
                if self._label_names[full] != label_names:
                    continue
                (gauge.labels(*(v for _, v in labels)) if labels else gauge).set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
