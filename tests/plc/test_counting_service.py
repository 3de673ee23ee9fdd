"""Counting through the real pipeline: generated conveyor clips (scripts/scenes.py), OpenCV decoding,
the bundled demo model on ONNX Runtime, ByteTrack, a real mosquitto and real paho clients."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import parse_config
from agent.service import Service
from scripts import scenes
from tests.support.broker import Broker
from tests.support.mqtt import Collector

LINE = {"name": "l1", "points": [[320, 0], [320, 360]], "direction": "left_to_right", "labels": ["part"]}
ZONE = {"name": "right", "polygon": [[330, 0], [640, 0], [640, 360], [330, 360]], "labels": ["part"]}

# Small clips (whole pitches moved, so plates end away from the line): name -> (clip, true in, true out)
CLIPS = {
    "steady": scenes.CountingClip("steady", [(3, 0.0), (50, 8.0), (3, 0.0)]),
    "touching": scenes.CountingClip("touching", [(3, 0.0), (35, 8.0), (3, 0.0)], pitch=280, start_phase=140.0,
                                    touching=True),
    "reversal": scenes.CountingClip("reversal", [(3, 0.0), (25, 8.0), (3, 0.0), (25, -8.0), (3, 0.0), (25, 8.0),
                                                 (3, 0.0)]),
    "stop_on_line": scenes.CountingClip("stop_on_line", [(3, 0.0), (25, 4.0), (15, 0.0), (25, 4.0), (3, 0.0)]),
}
SEED = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, int]]]:
    out = tmp_path_factory.mktemp("clips")
    made = {}
    for name, clip in CLIPS.items():
        truth = scenes.write_counting_clip(out / f"{name}.avi", clip, SEED)  # MJPG: decoded by OpenCV
        made[name] = (out / f"{name}.avi", truth["crossings"])
    return made


def config(tmp_path: Path, source: Path, port: int | None = None, **counting: Any) -> Any:
    data: dict[str, Any] = {
        "device_id": "dev1",
        "cameras": [{"id": "cam0", "source": str(source), "pace": False,
                     "counting": {"anchor": "center", "lines": [LINE], "zones": [ZONE],
                                  "state_file": str(tmp_path / "state" / "counters-cam0.json"), **counting}}],
        "engine": {"intra_op_threads": 1, "warmup_runs": 1},
        "updates": {"enabled": False},
        "service": {"watchdog": False, "drain_s": 3},
        "mqtt": {"enabled": False} if port is None else {"host": "127.0.0.1", "port": port,
                                                         "reconnect": {"initial_s": 0.1, "max_s": 0.5}},
    }
    return parse_config(data)


def run_to_end(cfg: Any) -> Service:
    svc = Service(cfg, use_cache=False)
    svc.run()
    return svc


def test_clips_have_the_crossings_they_were_made_for(clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    assert {k: v[1] for k, v in clips.items()} == {
        "steady": {"in": 2, "out": 0}, "touching": {"in": 2, "out": 0},
        "reversal": {"in": 2, "out": 1}, "stop_on_line": {"in": 1, "out": 0}}


@pytest.mark.parametrize("name", list(CLIPS))
def test_counts_are_exact_through_the_real_pipeline(name: str, tmp_path: Path,
                                                    clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    path, truth = clips[name]
    svc = run_to_end(config(tmp_path, path))
    (comp,) = svc.plc
    got = comp.counters()  # type: ignore[attr-defined]
    assert (got["line/l1/in"], got["line/l1/out"]) == (truth["in"], truth["out"]), comp.stats()
    assert comp.n["frames"] == CLIPS[name].frames  # type: ignore[attr-defined]


def _v5_request(port: int, topic: str, response: str, corr: bytes) -> dict[str, Any]:
    got: dict[str, Any] = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        got["payload"] = json.loads(msg.payload)
        got["corr"] = getattr(msg.properties, "CorrelationData", None)
        done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe(response, qos=1)[1]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response
        props.CorrelationData = corr
        c.publish(topic, b"", qos=1, properties=props).wait_for_publish(5)
        assert done.wait(10), "no reply on the Response Topic"
    finally:
        c.loop_stop()
        c.disconnect()
    return got


def test_topics_events_reset_and_restart(tmp_path: Path, broker: Broker,
                                          clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    path, _ = clips["steady"]
    col = Collector(broker.host, broker.port, ["edge/#"])
    cfg = config(tmp_path, path, broker.port, track_ids=True)
    svc = Service(cfg, use_cache=False)
    svc.start()
    try:
        assert all(p.finished.wait(60) for p in svc.pipelines)
        base = "edge/dev1/cam0"
        col.wait_for(lambda m: any(x.topic == f"{base}/line/l1/in" and x.payload == b"2" for x in m))
        events = [json.loads(m.payload) for m in col.on(f"{base}/line/l1/event")]
        assert [(e["seq"], e["dir"], e["label"], e["in"], e["out"]) for e in events] == [
            (1, "in", "part", 1, 0), (2, "in", "part", 2, 0)]
        assert all(not m.retain for m in col.on(f"{base}/line/l1/event"))
        dets = [json.loads(m.payload) for m in col.on(f"{base}/detections")]
        assert any("track_id" in d for p in dets for d in p["detections"])
        assert {e["track"] for e in events} <= {d.get("track_id") for p in dets for d in p["detections"]}
        zone = [m.payload for m in col.on(f"{base}/zone/right/count")]
        assert zone and all(z.isdigit() for z in zone)
        # 3.1.1-style request (any payload) -> reply on .../reset/reply; an unknown line -> a clear error
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.publish(f"{base}/line/nope/reset", b"1", qos=1).wait_for_publish(5)
        c.publish(f"{base}/line/l1/reset", b"1", qos=1).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        col.wait_for(lambda m: len([x for x in m if x.topic.endswith("/reset/reply")]) >= 2)
        bad = json.loads(col.on(f"{base}/line/nope/reset/reply")[0].payload)
        assert bad["ok"] is False and "no line 'nope'" in bad["error"] and "l1" in bad["error"]
        good = json.loads(col.on(f"{base}/line/l1/reset/reply")[0].payload)
        assert good["ok"] is True and (good["in"], good["out"]) == (0, 0)
        col.wait_for(lambda m: [x.payload for x in m if x.topic == f"{base}/line/l1/in"][-1] == b"0")
        assert svc.plc[0].counters()["line/l1/in"] == 0  # type: ignore[attr-defined]
        # MQTT 5: the answer also goes to the Response Topic with the Correlation Data
        reply = _v5_request(broker.port, f"{base}/line/l1/reset", "plc/replies/1", b"\x00corr-7")
        assert reply["payload"]["ok"] is True and reply["corr"] == b"\x00corr-7"
    finally:
        svc.shutdown()
    # a restart: the counters and the event seq go on from the file (reset included)
    state = json.loads((tmp_path / "state" / "counters-cam0.json").read_text())
    assert state["seq"] == 2 and state["lines"]["l1"] == {"in": {}, "out": {}}
    svc2 = run_to_end(config(tmp_path, path, broker.port))
    col.wait_for(lambda m: [json.loads(x.payload)["seq"] for x in m if x.topic.endswith("/event")][-1] == 4)
    assert svc2.plc[0].counters()["line/l1/in"] == 2  # type: ignore[attr-defined]
    late = Collector(broker.host, broker.port, ["edge/dev1/cam0/line/#", "edge/dev1/cam0/zone/#"])
    late.wait_for(lambda m: {"edge/dev1/cam0/line/l1/in", "edge/dev1/cam0/line/l1/in/part",
                             "edge/dev1/cam0/line/l1/out", "edge/dev1/cam0/zone/right/count"}
                  <= {x.topic for x in m if x.retain})
    retained = {m.topic: m.payload for m in late.messages if m.retain}
    assert retained["edge/dev1/cam0/line/l1/in"] == b"2" and retained["edge/dev1/cam0/line/l1/out"] == b"0"
    assert retained["edge/dev1/cam0/line/l1/in/part"] == b"2"
    late.close()
    col.close()


def test_change_listener_and_payload_without_track_ids(tmp_path: Path,
                                                       clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    path, _ = clips["steady"]
    lines: list[str] = []
    cfg = config(tmp_path, path)
    svc = Service(cfg, use_cache=False, echo=lines.append)
    changes: list[dict[str, int]] = []
    real_start = svc.start

    def start() -> None:
        real_start()
        svc.plc[0].add_change_listener(changes.append)  # type: ignore[attr-defined]

    svc.start = start  # type: ignore[method-assign]
    svc.run()
    assert [c["line/l1/in"] for c in changes if "line/l1/in" in c] == [1, 2]
    assert any("zone/right/count" in c for c in changes)
    assert lines and all("track_id" not in line for line in lines)  # off by default: payload as before


def test_damaged_counters_file_starts_from_zero_with_an_event(tmp_path: Path,
                                                              clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    path, _ = clips["steady"]
    state = tmp_path / "state" / "counters-cam0.json"
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    events: list[str] = []
    svc = Service(config(tmp_path, path), use_cache=False)
    real_emit = svc.emit
    svc.emit = lambda name, data=None: (events.append(name), real_emit(name, data))[1]  # type: ignore[method-assign]
    svc.run()
    assert "counters_reset_by_damage" in events
    assert svc.plc[0].counters()["line/l1/in"] == 2  # type: ignore[attr-defined]
    assert json.loads(state.read_text())["seq"] == 2
    assert (state.parent / "counters-cam0.json.bad").read_text() == "{not json"


def test_reload_reports_a_counting_change_as_needing_a_restart(tmp_path: Path,
                                                               clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    from agent.service import apply_live

    path, _ = clips["steady"]
    svc = Service(config(tmp_path, path), use_cache=False)
    svc.start()
    try:
        assert all(p.finished.wait(60) for p in svc.pipelines)
        applied, restart = apply_live(svc, config(tmp_path, path, min_frames=5))
        assert "cameras[cam0].counting" in restart
        assert "cameras[cam0]" not in applied  # the camera is not reopened for it
    finally:
        svc.shutdown()


def retained_on_broker(broker: Broker, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
    """A subscriber arriving now is handed `payload` as the broker's retained value. One that
    subscribed before the publish reached the broker gets it live, without the retain flag: such a
    subscriber proves nothing about what is retained, so a new one asks again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = Collector(broker.host, broker.port, [topic])
        try:
            probe.wait_for(lambda m: any(x.retain and x.payload == payload for x in m), timeout=1.0)
            return True
        except TimeoutError:
            continue
        finally:
            probe.close()
    return False


def test_counters_are_published_again_after_the_broker_lost_them(
        tmp_path: Path, broker: Broker, clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    path, _ = clips["steady"]
    state = tmp_path / "state" / "counters-cam0.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"version": 1, "camera": "cam0", "seq": 9,
                                 "lines": {"l1": {"in": {"part": 41}, "out": {"part": 2}}}}))
    cfg = config(tmp_path, path, broker.port)
    cfg.cameras[0].loop, cfg.cameras[0].pace = True, True  # a live-like source that keeps going
    svc = Service(cfg, use_cache=False)
    svc.start()
    topic = "edge/dev1/cam0/line/l1/out"
    try:
        assert retained_on_broker(broker, topic, b"2")  # restored, published at start
        broker.stop()  # no persistence: the broker forgets every retained value
        broker.start()
        late = Collector(broker.host, broker.port, [topic])
        late.wait_for(lambda m: any(x.payload == b"2" for x in m), timeout=20)
        late.close()
    finally:
        svc.shutdown()


def test_retained_messages_are_rebuilt_only_when_a_count_changed(
        tmp_path: Path, broker: Broker, clips: dict[str, tuple[Path, dict[str, int]]]) -> None:
    """Most frames change no count: their retained topics are neither rebuilt nor published again."""
    path, truth = clips["steady"]
    svc = Service(config(tmp_path, path, broker.port), use_cache=False)
    builds: list[int] = []
    real_start = svc.start

    def start() -> None:
        real_start()
        comp = svc.plc[0]  # type: ignore[attr-defined]
        real_build = comp._retained_messages

        def build() -> tuple[dict[str, str], int]:
            msgs, version = real_build()
            builds.append(version)
            return msgs, version

        comp._retained_messages = build

    svc.start = start  # type: ignore[method-assign]
    svc.run()
    comp = svc.plc[0]  # type: ignore[attr-defined]
    frames = comp.n["frames"]
    assert comp.counters()["line/l1/in"] == truth["in"] >= 1
    assert 1 <= len(builds) <= comp._version + 2  # at most one per change (and one after connecting)
    assert len(builds) < frames / 2, f"{len(builds)} rebuilds for {frames} frames"
    assert builds == sorted(builds) and len(set(builds)) == len(builds)  # each for a newer state
    assert retained_on_broker(broker, "edge/dev1/cam0/line/l1/in", str(truth["in"]).encode())
