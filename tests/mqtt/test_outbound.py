"""agent/mqtt/outbound.py: the queue and the in-flight messages, driven step by step as the client drives them.

Each test plays the calls the client makes (publish -> offer, sender -> take / handed_over, paho's
on_publish -> acked, on_connect -> connected, on_disconnect -> disconnected) in an order that a real
broker produces only by chance; the same paths under a real mosquitto, including a SIGKILLed
broker, are in tests/mqtt/test_client.py.
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.outbound import Outbound, Outgoing

OK = ReasonCode(PacketTypes.PUBACK, "Success")
DENIED = ReasonCode(PacketTypes.PUBACK, "Not authorized")


def counts() -> dict[str, int]:
    return dict.fromkeys(("sent", "dropped", "dropped_qos0_offline", "resent", "publish_errors"), 0)


def msg(i: int, qos: int = 1) -> Outgoing:
    return Outgoing(f"t/{i}", str(i).encode(), qos, False)


def online(queue_size: int = 10, window: int = 10) -> tuple[Outbound, dict[str, int]]:
    n = counts()
    ob = Outbound(queue_size, window, n)
    ob.connected()
    return ob, n


def send_one(ob: Outbound, mid: int) -> Outgoing:
    out, epoch = ob.take()
    assert ob.handed_over(out, epoch, mid, ok=True) is None
    return out


def test_full_queue_drops_the_oldest() -> None:
    ob, n = online(queue_size=3)
    for i in range(5):
        assert ob.offer(msg(i), connected=True)
    assert [o.topic for o in ob.queue] == ["t/2", "t/3", "t/4"] and n["dropped"] == 2


def test_qos0_offline_is_dropped_at_once_qos1_waits() -> None:
    n = counts()
    ob = Outbound(10, 10, n)
    assert not ob.offer(msg(0, qos=0), connected=False)
    assert ob.offer(msg(1, qos=1), connected=False)
    assert n["dropped_qos0_offline"] == 1 and len(ob.queue) == 1


def test_window_bounds_what_paho_holds_and_puback_counts_sent() -> None:
    ob, n = online(window=2)
    for i in range(3):
        ob.offer(msg(i), connected=True)
    send_one(ob, 1)
    send_one(ob, 2)
    assert not ob.ready() and ob.pending_qos() == 2
    assert ob.acked(1, OK) is None
    assert ob.ready() and n["sent"] == 1


def test_a_puback_before_publish_returned_is_matched() -> None:
    ob, n = online()
    ob.offer(msg(0), connected=True)
    out, epoch = ob.take()
    assert ob.acked(7, OK) is None  # paho's thread was faster than publish() returning mid 7
    assert ob.handed_over(out, epoch, 7, ok=True) is None
    assert n["sent"] == 1 and not ob.pending


def test_a_rejection_is_counted_and_said() -> None:
    ob, n = online()
    ob.offer(msg(0), connected=True)
    send_one(ob, 1)
    reason = ob.acked(1, DENIED)
    assert reason is not None and "t/0" in reason and "Not authorized" in reason
    assert n["publish_errors"] == 1 and n["sent"] == 0


def test_paho_store_full_puts_the_message_back_first() -> None:
    ob, _ = online()
    for i in range(2):
        ob.offer(msg(i), connected=True)
    out, _ = ob.take()
    ob.put_back(out)
    assert [o.topic for o in ob.queue] == ["t/0", "t/1"]


def test_a_drop_loses_qos0_and_keeps_qos1_for_the_resend() -> None:
    ob, n = online()
    for i, qos in enumerate((0, 1, 0, 1)):
        ob.offer(msg(i, qos), connected=True)
    send_one(ob, 1)  # QoS 0, not yet written
    send_one(ob, 2)  # QoS 1, no PUBACK yet
    ob.disconnected()
    assert [o.topic for o in ob.queue] == ["t/3"] and list(ob.pending) == [2]
    assert n["dropped_qos0_offline"] == 2  # one in flight, one queued
    assert ob.connected() == 1 and n["resent"] == 1
    # new messages wait until paho's re-send is acknowledged: the publish order holds
    assert not ob.ready()
    ob.acked(2, OK)
    assert ob.ready()


def test_qos0_handed_to_a_gone_connection_counts_as_dropped() -> None:
    ob, n = online()
    ob.offer(msg(0, qos=0), connected=True)
    out, epoch = ob.take()
    ob.disconnected()
    ob.connected()
    assert ob.handed_over(out, epoch, 1, ok=True) is None
    assert n["dropped_qos0_offline"] == 1 and not ob.pending
    ob.offer(msg(1, qos=0), connected=True)
    out, epoch = ob.take()
    assert ob.handed_over(out, epoch, 2, ok=False) is None  # paho refused it: not connected
    assert n["dropped_qos0_offline"] == 2
