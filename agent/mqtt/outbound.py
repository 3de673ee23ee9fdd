"""The outbound side of the agent's MQTT client: a bounded queue, and every message paho holds until its PUBACK.

Data flow: `MqttClient.publish` -> `Outbound.offer` (QoS 0 while offline is dropped at once and
counted "dropped_qos0_offline": detections and telemetry are "latest state" data, and replaying
minutes-old frames to a PLC after a reconnect is worse than a gap; a full queue drops its OLDEST,
counted "dropped") -> the client's sender thread, while connected and while `ready()`, `take()`s the
next one and hands it to paho -> `handed_over` records it by mid as pending (paho's own queue is
unbounded while offline, so at most `window` messages are ever in paho's hands) -> `acked` when
paho reports its PUBACK (`on_publish`; that may come before `publish()` returned: such early acks
are kept by mid and matched in `handed_over`) -> counted "sent", or "publish_errors" with a reason
when the broker rejected it.

Across a drop: QoS 0 messages in flight or queued are gone (`disconnected`). QoS 1 messages handed
to paho but not acknowledged are re-sent by paho 2.x (DUP set) after any successful reconnect,
whether or not the broker kept the session (measured with a broker killed by SIGKILL:
tests/mqtt/test_client.py). `connected` counts them ("resent") and holds new messages back until
they are acknowledged (at most `RESEND_HOLD_S`), so the order stays the publish order. Duplicates
are possible, but only of messages in flight at the moment of a drop.

Not thread-safe on its own: the client calls every method with its lock held, so the queue, the
pending messages and the counters change together.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from paho.mqtt.properties import Properties

from agent.mqtt.connection import is_failure

RESEND_HOLD_S = 5.0  # after a reconnect, new messages wait at most this long for re-sends' PUBACKs
_EARLY_KEPT = 10_000  # acks seen before their publish() returned; more means those mids were never ours


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None


@dataclass
class Pending:
    out: Outgoing
    epoch: int  # connection number it was handed over on


class Outbound:
    """The queue and the in-flight messages of one client; counts into the client's `counts`."""

    def __init__(self, queue_size: int, window: int, counts: dict[str, int]) -> None:
        self.queue_size = queue_size
        self.window = max(1, window)
        self._n = counts
        self.queue: deque[Outgoing] = deque()
        self.pending: dict[int, Pending] = {}
        self._early: OrderedDict[int, Any] = OrderedDict()
        self.epoch = 0  # connection number, +1 per successful CONNACK
        self._hold_until = 0.0

    # ---- from publish() to paho -----------------------------------------------------------------
    def offer(self, out: Outgoing, connected: bool) -> bool:
        """Queue a message; False when it is dropped at once (QoS 0 while offline)."""
        if out.qos == 0 and not connected:
            self._n["dropped_qos0_offline"] += 1
            return False
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self._n["dropped"] += 1
        self.queue.append(out)
        return True

    def ready(self) -> bool:
        """Whether the sender may hand the next message to paho (the caller checks the connection)."""
        return bool(self.queue) and len(self.pending) < self.window and not self._resends_outstanding()

    def take(self) -> tuple[Outgoing, int]:
        """The next message and the connection number it is handed over on."""
        return self.queue.popleft(), self.epoch

    def put_back(self, out: Outgoing) -> None:
        """paho's store was full: this one goes out first, later."""
        self.queue.appendleft(out)

    def handed_over(self, out: Outgoing, epoch: int, mid: int, ok: bool) -> str | None:
        """paho took `out` as `mid` (`ok`: it wrote it or queued it). Returns a broker rejection, if any."""
        if out.qos == 0 and not ok:
            self._n["dropped_qos0_offline"] += 1
            self._early.pop(mid, None)
            return None
        # QoS > 0: paho holds it now (also on NO_CONN: it sends it after the reconnect) until PUBACK.
        reason = self._early.pop(mid, None)
        if reason is not None:
            return self._finish(out, reason)
        if out.qos == 0 and epoch != self.epoch:
            self._n["dropped_qos0_offline"] += 1  # handed to a connection that is gone
        else:
            self.pending[mid] = Pending(out, epoch)
        return None

    def acked(self, mid: int, reason: Any) -> str | None:
        """paho's on_publish for `mid`. Returns a broker rejection, if any."""
        p = self.pending.pop(mid, None)
        if p is None:
            self._early[mid] = reason
            while len(self._early) > _EARLY_KEPT:
                self._early.popitem(last=False)
            return None
        return self._finish(p.out, reason)

    def _finish(self, out: Outgoing, reason: Any) -> str | None:
        if is_failure(reason):
            self._n["publish_errors"] += 1
            return f"broker rejected a message on {out.topic!r}: {reason}"
        self._n["sent"] += 1
        return None

    # ---- the connection comes and goes ----------------------------------------------------------------
    def connected(self) -> int:
        """A new connection: returns how many unacknowledged QoS > 0 messages paho re-sends on it."""
        self.epoch += 1
        self._drop_qos0_pending(connected=True)
        resend = self.pending_qos()
        self._n["resent"] += resend
        self._hold_until = time.monotonic() + RESEND_HOLD_S if resend else 0.0
        return resend

    def disconnected(self) -> None:
        """The connection ended: QoS 0 messages, in flight or queued, are gone."""
        self._drop_qos0_pending(connected=False)
        lost0 = sum(1 for o in self.queue if o.qos == 0)
        if lost0:
            self.queue = deque(o for o in self.queue if o.qos > 0)
            self._n["dropped_qos0_offline"] += lost0

    def pending_qos(self) -> int:
        """Messages paho holds that it re-sends after a reconnect (QoS > 0, not yet acknowledged)."""
        return sum(1 for p in self.pending.values() if p.out.qos > 0)

    def _resends_outstanding(self) -> bool:
        if time.monotonic() >= self._hold_until:
            return False
        return any(p.epoch < self.epoch and p.out.qos > 0 for p in self.pending.values())

    def _drop_qos0_pending(self, connected: bool) -> None:
        """QoS 0 messages not yet written when a connection ends are gone (paho does not keep them)."""
        lost = [mid for mid, p in self.pending.items()
                if p.out.qos == 0 and not (connected and p.epoch == self.epoch)]
        for mid in lost:
            del self.pending[mid]
        self._n["dropped_qos0_offline"] += len(lost)
