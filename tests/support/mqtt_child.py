"""Runs an agent MqttClient in its own process, for tests that kill it (SIGKILL) to see the last will.

    python -m tests.support.mqtt_child HOST PORT CLIENT_ID STATUS_TOPIC WILL_PAYLOAD [PROTOCOL]

Publishes `online` (retained, QoS 1) on STATUS_TOPIC at every connect, prints READY once that is
acknowledged, then idles until killed. Exits 0 on SIGTERM after a clean stop with `offline`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import MqttConfig  # noqa: E402
from agent.mqtt.client import MqttClient  # noqa: E402


def main(argv: list[str]) -> int:
    host, port, client_id, status, will = argv[:5]
    protocol = argv[5] if len(argv) > 5 else "5"
    cfg = MqttConfig(host=host, port=int(port), protocol=protocol, keepalive_s=5)
    holder: dict[str, MqttClient] = {}

    def on_connect() -> None:
        holder["c"].publish(status, b"online", qos=1, retain=True)

    client = MqttClient(cfg, client_id, will_topic=status, will_payload=will.encode(), on_connect=on_connect)
    holder["c"] = client
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    client.start()
    deadline = time.monotonic() + 20
    while client.stats()["sent"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    print("READY" if client.stats()["sent"] >= 1 else "NOT-READY", flush=True)
    done.wait()
    client.stop(2.0, final=(status, b"offline"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
