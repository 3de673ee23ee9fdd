"""The inspection handshake end to end: the agent's real Service (synthetic camera -> real ONNX Runtime
session on a tiny real model -> post thread -> fan-out) against a real mosquitto, driven by a PLC
simulator of real paho clients, MQTT 3.1.1 and MQTT 5 (tests/support/plc_sim.py).

The model outputs one "dent" (score 0.8) and one "part" (score 0.4) on every frame, so each recipe's
verdict is known in advance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import DEMO_MODEL, DEMO_VIDEO, AgentConfig, parse_config
from agent.plc.inspection import Inspection
from agent.service import Service
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector
from tests.support.plc_sim import Plc5, Plc311

BASE = "edge/dev1/cam0/inspect"
KEYS = ["id", "code", "pass", "counts", "ms", "model", "ts", "recipe", "overrun", "reason"]
RECIPES: dict[str, Any] = {
    "default": {"counts": {"dent": {"min": 1, "max": 1}}},
    "twoparts": {"counts": {"part": {"min": 2}}},
    "clean": {"forbidden": ["dent"]},
    "strict": {"min_score": 0.5, "counts": {"part": {"max": 0}, "dent": {"min": 1}}},
    "left": {"roi": [0.0, 0.0, 0.3, 1.0], "counts": {"dent": {"max": 0}}},
    "slow": {"frames": 15, "counts": {"dent": {"min": 1}}},
    "ghost": {"counts": {"cat": {"min": 1}}},
}


def make_cfg(tmp: Path, port: int, model: Path, inspection: dict[str, Any] | None = None,
             cameras: list[dict[str, Any]] | None = None) -> AgentConfig:
    insp = {"recipes": RECIPES, "deadline_ms": 3000, **(inspection or {})}
    return parse_config({
        "device_id": "dev1",
        "cameras": cameras or [{"id": "cam0", "source": "synthetic:160x120@10", "inspection": insp}],
        "model": {"path": str(model), "name": "fixed", "version": "7"},
        "engine": {"intra_op_threads": 1, "warmup_runs": 1},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect": {"initial_s": 0.05, "max_s": 0.2}},
        "telemetry": {"period_s": 60},
        "cache": {"dir": str(tmp / "cache")},
        "updates": {"enabled": False, "models_dir": str(tmp / "models")},
        "service": {"drain_s": 1, "watchdog": False},
    })


def fixed_model(tmp: Path) -> Path:
    # a 64x64 input: the dent's centre (32, 32) maps to the frame's centre, the part's (10, 10) to the left
    return fixed_yolov8_model(tmp / "fixed.onnx", [(32, 32, 16, 16, 1, 0.8), (10, 10, 8, 8, 0, 0.4)],
                              labels=["part", "dent"])


def start_service(cfg: AgentConfig) -> Service:
    svc = Service(cfg, use_cache=False)
    svc.start()
    deadline = time.monotonic() + 30
    while not (svc.mqtt is not None and svc.mqtt.connected and svc.camera_state("cam0") == "streaming"
               and all(p.processed > 0 for p in svc.pipelines)):
        if time.monotonic() > deadline:
            raise TimeoutError("service not serving")
        time.sleep(0.02)
    return svc


def inspection(svc: Service) -> Inspection:
    return next(c for c in svc.plc if isinstance(c, Inspection))


def check_shape(res: dict[str, Any], raw: bytes | None = None) -> None:
    assert list(res) == KEYS
    for key, value in res.items():
        assert len(json.dumps(value)) <= 256, key
    if raw is not None:  # compact ASCII JSON, one line
        assert raw == json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=True).encode()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Service, Plc311, Plc5]]:
    tmp = tmp_path_factory.mktemp("insp")
    broker = Broker(tmp).start()
    svc = start_service(make_cfg(tmp, broker.port, fixed_model(tmp)))
    plc = Plc311(broker.host, broker.port, BASE)
    plc5 = Plc5(broker.host, broker.port, BASE)
    try:
        yield broker, svc, plc, plc5
    finally:
        plc.close()
        plc5.close()
        svc.shutdown()
        broker.stop()


def test_311_trigger_ack_result(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, svc, plc, _ = rig
    plc.trigger("17")
    (res,) = plc.wait_result(17)
    assert b"17" in plc.acks()
    ack = plc.on(f"{BASE}/ack")[-1]
    result = next(a for a in plc.on(f"{BASE}/result") if a.json["id"] == 17)
    assert ack.at <= result.at  # acknowledged before answered
    check_shape(res, result.payload)
    assert res["code"] == 0 and res["pass"] is True and res["counts"] == {"dent": 1}
    assert res["model"] == "7" and res["recipe"] == "default" and res["overrun"] is False and res["reason"] == ""
    assert res["ts"] >= plc.sent_at[b"17"]  # judged on a frame captured after the trigger
    assert 0 < res["ms"] < 3000
    stats = svc.telemetry()["plc"]["inspection"]["cam0"]
    assert stats["ok"] >= 1 and stats["latency_ms"]["p99"] > 0


@pytest.mark.parametrize(("recipe", "passed", "counts"), [
    ("twoparts", False, {"part": 1}),
    ("clean", False, {"dent": 1}),
    ("strict", True, {"part": 0, "dent": 1}),  # the part (0.4) is under min_score
    ("left", True, {"dent": 0}),  # the dent's centre lies outside the ROI
])
def test_recipes_by_name(rig: tuple[Broker, Service, Plc311, Plc5], recipe: str, passed: bool,
                         counts: dict[str, int]) -> None:
    _, _, plc, _ = rig
    id_ = 100 + list(RECIPES).index(recipe)
    plc.trigger(f"{id_},{recipe}")
    (res,) = plc.wait_result(id_)
    assert (res["code"], res["pass"], res["counts"], res["recipe"]) == (0, passed, counts, recipe)
    assert bool(res["reason"]) == (not passed)


def test_rule_error_is_negative(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, plc, _ = rig
    plc.trigger("120,ghost")
    (res,) = plc.wait_result(120)
    assert res["code"] == -1 and res["pass"] is False and "cat" in res["reason"]


def test_metrics_and_change_notice_for_sparkplug(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, svc, plc, _ = rig
    comp = inspection(svc)
    calls: list[int] = []
    comp.add_change_listener(lambda: calls.append(1))
    assert set(comp.metrics()["cam0"]) == {"Inspection/Last ID", "Inspection/Last Code", "Inspection/Last Pass",
                                           "Inspection/Last ms", "Inspection/Results", "Inspection/Overruns"}
    plc.trigger("4242,twoparts")
    plc.wait_result(4242)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    m = comp.metrics()["cam0"]
    assert calls and (m["Inspection/Last ID"], m["Inspection/Last Code"], m["Inspection/Last Pass"]) == (4242, 0, False)


def test_mqtt5_request_response(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, _, plc5 = rig
    corr = plc5.request(b'{"recipe":"clean"}')
    res = plc5.wait_answer(corr)
    check_shape(res)
    assert res["code"] == 0 and res["pass"] is False and res["recipe"] == "clean" and 1 <= res["id"] <= 65535
    assert res["ts"] >= plc5.sent_at[corr]
    corr2 = plc5.request(b"4711")  # an id of the PLC's own
    assert plc5.wait_answer(corr2)["id"] == 4711
    corr3 = plc5.request(b"", correlation=b"\x00\xffbinary")  # no payload: the default recipe
    assert plc5.wait_answer(corr3)["pass"] is True
    # a short Message Expiry is the deadline: 15 frames at 10 fps cannot make 1 s
    corr4 = plc5.request(b'{"recipe":"slow"}', expiry_s=1)
    assert plc5.wait_answer(corr4)["code"] == 2


def test_mqtt5_request_without_response_topic_is_rejected_on_result(
        rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, plc, plc5 = rig
    plc5.request(b"55", response_topic=None)
    plc.wait_for(lambda a: any(x.topic == f"{BASE}/result" and b"Response Topic" in x.payload for x in a))


def test_busy_then_first_completes(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, plc, _ = rig
    plc.trigger("200,slow")  # 15 frames at 10 fps: ~1.5 s in flight
    plc.wait_for(lambda a: any(x.payload == b"200" for x in a))
    plc.trigger("201")
    (busy,) = plc.wait_result(201)
    assert busy["code"] == 1 and busy["pass"] is False and "200" in busy["reason"]
    (first,) = plc.wait_result(200)
    assert first["code"] == 0 and first["pass"] is True
    assert len([r for r in plc.results() if r["id"] == 201]) == 1


def test_timeout(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, plc, _ = rig
    plc.trigger('{"id":300,"recipe":"slow","deadline_ms":100}')
    (res,) = plc.wait_result(300)
    assert res["code"] == 2 and res["pass"] is False and "frames judged" in res["reason"]
    assert 100 <= res["ms"] < 1000


def test_ids_wrap_and_repeat(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, _, plc, _ = rig
    # wrap to 1, then the same id again later: a new inspection each time
    plc.trigger("65535")
    plc.wait_result(65535)
    plc.trigger("1")
    plc.wait_result(1)
    plc.trigger("1", key="1 again")
    plc.wait_result(1, count=2)
    assert [r["code"] for r in plc.results() if r["id"] in (65535, 1)] == [0, 0, 0]
    # the id in flight sent again (a QoS 1 retransmission): acknowledged twice, answered once
    plc.trigger("400,slow")
    plc.trigger("400,slow", key="again")
    plc.wait_result(400)
    time.sleep(0.3)
    assert len(plc.wait_result(400)) == 1 and plc.acks().count(b"400") == 2


MALFORMED = [
    (b"abc", 0, "decimal"),
    (b"0", 0, "1-65535"),
    (b"70000", 0, "1-65535"),
    (b"-5", 0, "decimal"),
    (b"1.5", 0, "decimal"),
    (b"", 0, "empty"),
    (b"9" * 100_000, 0, "too large"),
    (b"\xff\xfe12", 0, "ASCII"),
    (b"501,nope", 501, "unknown recipe"),
    (b"502,bad name!", 502, "recipe name"),
    (b'{"id":503,"colour":"red"}', 503, "unknown key"),
    (b'{"id":true}', 0, "integer"),
    (b"{not json", 0, "JSON"),
    (b'{"id":504,"deadline_ms":0}', 504, "deadline_ms"),
]


def test_malformed_triggers_rejected_nothing_else_disturbed(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    _, svc, plc, _ = rig
    frames_before = svc.pipelines[0].processed
    plc.trigger("600,slow")  # an inspection in flight that the bad requests must not disturb
    plc.wait_for(lambda a: any(x.payload == b"600" for x in a))
    for payload, id_, why in MALFORMED:
        n_before = len(plc.results())
        plc.trigger(payload, key=payload)
        plc.wait_for(lambda a, n=n_before: len([x for x in a if x.topic == f"{BASE}/result"]) > n)
        bad = plc.results()[n_before]
        check_shape(bad)
        assert (bad["id"], bad["code"], bad["pass"]) == (id_, 4, False), (payload[:20], bad)
        assert why in bad["reason"], (payload[:20], bad)
        if id_:
            assert str(id_).encode() in plc.acks()  # a readable id is acknowledged even when the rest is bad
    (done,) = plc.wait_result(600)
    assert done["code"] == 0 and done["pass"] is True and done["reason"] == ""
    assert svc.pipelines[0].processed > frames_before and svc.mqtt is not None and svc.mqtt.connected
    stats = inspection(svc).stats()["cam0"]
    assert stats["rejected"] >= len(MALFORMED) and stats["in_flight"] is False


def test_no_frame_when_camera_lost(tmp_path: Path, broker: Broker) -> None:
    cams = [{"id": "cam0", "source": "rtsp://127.0.0.1:9/none", "open_timeout_s": 0.5,
             "reconnect": {"initial_s": 0.1, "max_s": 0.2}, "inspection": {"recipes": RECIPES}}]
    svc = Service(make_cfg(tmp_path, broker.port, fixed_model(tmp_path), cameras=cams), use_cache=False)
    svc.start()
    plc = Plc311(broker.host, broker.port, BASE)
    try:
        plc.trigger("9")
        (res,) = plc.wait_result(9)
        assert res["code"] == 3 and res["pass"] is False and res["reason"].startswith("camera ")
        assert res["ms"] < 500  # answered at once, not at the deadline
    finally:
        plc.close()
        svc.shutdown()


def test_no_frame_when_camera_lost_mid_inspection(tmp_path: Path, broker: Broker) -> None:
    from tests.support.mjpeg import MjpegServer

    with MjpegServer(fps=10) as cam:  # a real HTTP MJPEG camera on loopback, unplugged mid-inspection
        cams = [{"id": "cam0", "source": cam.url, "read_timeout_s": 1, "reconnect": {"initial_s": 0.2, "max_s": 0.5},
                 "inspection": {"recipes": RECIPES, "deadline_ms": 10000}}]
        svc = start_service(make_cfg(tmp_path, broker.port, fixed_model(tmp_path), cameras=cams))
        plc = Plc311(broker.host, broker.port, BASE)
        try:
            plc.trigger("5,slow")  # 15 frames at 10 fps
            plc.wait_for(lambda a: any(x.payload == b"5" for x in a))
            time.sleep(0.3)
            cam.stop()
            (res,) = plc.wait_result(5)
            assert res["code"] == 3 and res["pass"] is False and res["reason"].startswith("camera "), res
            assert res["ms"] < 5000  # when the camera went, not at the 10 s deadline
        finally:
            plc.close()
            svc.shutdown()


def test_no_frame_when_camera_ended_before_the_trigger(tmp_path: Path, broker: Broker) -> None:
    # a 40-frame clip (real MJPG-in-AVI, decoded by OpenCV), paced at 25 fps: it ends while "slow" waits
    import cv2
    import numpy as np

    video = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (128, 96))
    for i in range(40):
        vw.write(np.full((96, 128, 3), i * 5, np.uint8))
    vw.release()
    cams = [{"id": "cam0", "source": str(video), "pace": True, "loop": False,
             "inspection": {"recipes": {**RECIPES, "slow": {"frames": 15}}, "deadline_ms": 5000}}]
    svc = start_service(make_cfg(tmp_path, broker.port, fixed_model(tmp_path), cameras=cams))
    plc = Plc311(broker.host, broker.port, BASE)
    try:
        plc.trigger("1,slow")
        plc.wait_result(1)
        while svc.camera_state("cam0") == "streaming":
            time.sleep(0.02)
        plc.trigger("2")
        res = plc.wait_result(2)[0]
        assert res["code"] == 3 and "ended" in res["reason"]
    finally:
        plc.close()
        svc.shutdown()


def test_results_survive_broker_restart_and_overrun(tmp_path: Path) -> None:
    conf = f"persistence true\npersistence_location {tmp_path}/\nautosave_interval 1\n"
    broker = Broker(tmp_path, extra_conf=conf).start()
    svc = start_service(make_cfg(tmp_path, broker.port, fixed_model(tmp_path),
                                 inspection={"buffer_size": 2, "retained_fields": True}))
    plc = Plc311(broker.host, broker.port, BASE, client_id="plc-persistent", clean=False)
    try:
        # 1: in flight when the broker goes; its answer waits in the buffer and arrives after the restart
        plc.trigger("1,slow")
        plc.wait_for(lambda a: any(x.payload == b"1" for x in a))
        broker.stop()
        cam = inspection(svc).cameras["cam0"]
        deadline = time.monotonic() + 10
        while cam.stats()["buffered"] < 1:
            assert time.monotonic() < deadline, cam.stats()
            time.sleep(0.02)
        # 2-4: triggers the broker delivered just before it went, answered while it is away, handed to the
        # component as paho would (no broker exists to carry them now): 4 answers, room for 2
        for id_ in (2, 3, 4):
            cam._on_trigger(f"{BASE}/trigger", str(id_).encode(), None)
            while cam.stats()["in_flight"]:
                time.sleep(0.02)
        assert cam.stats()["buffered"] == 2 and cam.stats()["overruns"] == 2
        broker.start()
        plc.wait_result(4, timeout=15)
        results = plc.results()
        assert [r["id"] for r in results] == [3, 4]  # 1 and 2 were overrun: the oldest go first
        assert [r["overrun"] for r in results] == [True, False] and all(r["code"] == 0 for r in results)
        # one more after the restart: delivered normally, not flagged
        plc.trigger("5")
        assert plc.wait_result(5)[0]["overrun"] is False
        # retained single values for PLCs without a JSON parser; id is written last: once it reads 5, every
        # field of result 5 is on the broker, and a subscriber arriving after that gets only retained copies
        # (one arriving earlier got some live, without the retain flag: failed once on 3.11)
        first = Collector(broker.host, broker.port, [f"{BASE}/last/id"])
        first.wait_for(lambda m: any(x.payload == b"5" for x in m))
        first.close()
        late = Collector(broker.host, broker.port, [f"{BASE}/last/#"])
        msgs = late.wait_for(lambda m: any(x.topic.endswith("/last/id") for x in m)
                             and any(x.topic.endswith("/count/dent") for x in m))
        last = {x.topic[len(BASE) + 6:]: x.payload for x in msgs}
        assert last["id"] == b"5" and last["code"] == b"0" and last["pass"] == b"1" and last["count/dent"] == b"1"
        assert all(x.retain for x in msgs)
        late.close()
    finally:
        plc.close()
        svc.shutdown()
        broker.stop()


def test_mqtt5_answers_survive_broker_restart(tmp_path: Path) -> None:
    conf = f"persistence true\npersistence_location {tmp_path}/\nautosave_interval 1\n"
    broker = Broker(tmp_path, extra_conf=conf).start()
    svc = start_service(make_cfg(tmp_path, broker.port, fixed_model(tmp_path)))
    plc5 = Plc5(broker.host, broker.port, BASE, client_id="plc5-persistent", clean=False)
    try:
        corr = plc5.request(b'{"recipe":"slow"}')
        time.sleep(0.15)
        broker.stop()
        time.sleep(0.8)  # the answer is decided while the broker is away
        broker.start()
        assert plc5.wait_answer(corr, timeout=15)["code"] == 0
    finally:
        plc5.close()
        svc.shutdown()
        broker.stop()


def test_agent_on_mqtt_311_serves_the_311_handshake(tmp_path: Path, broker: Broker) -> None:
    cfg = make_cfg(tmp_path, broker.port, fixed_model(tmp_path))
    cfg.mqtt.protocol = "3.1.1"
    svc = start_service(cfg)
    plc = Plc311(broker.host, broker.port, BASE)
    plc5 = Plc5(broker.host, broker.port, BASE)
    try:
        plc.trigger("77")
        assert plc.wait_result(77)[0]["code"] == 0
        # an MQTT 5 request reaches a 3.1.1 session without its properties: refused, said on .../result
        plc5.request(b"78")
        (res,) = plc.wait_result(0)
        assert res["code"] == 4 and "Response Topic" in res["reason"]
    finally:
        plc.close()
        plc5.close()
        svc.shutdown()


def test_demo_clip_result_is_the_judged_frames_detections(tmp_path: Path, broker: Broker) -> None:
    """The bundled demo clip through the bundled demo model: each result's counts are exactly the
    detections published for the frame it names (same capture time stamp), a frame after the trigger."""
    cams = [{"id": "cam0", "source": str(DEMO_VIDEO), "pace": True, "loop": True,
             "inspection": {"recipes": {"default": {}}}}]
    svc = start_service(make_cfg(tmp_path, broker.port, DEMO_MODEL, cameras=cams))
    det = Collector(broker.host, broker.port, ["edge/dev1/cam0/detections"])
    plc = Plc311(broker.host, broker.port, BASE)
    try:
        seen_labels: set[str] = set()
        for id_ in range(1, 6):
            plc.trigger(str(id_))
            (res,) = plc.wait_result(id_)
            assert res["code"] == 0 and res["pass"] is True and res["ts"] >= plc.sent_at[str(id_).encode()]
            msgs = det.wait_for(lambda m, ts=res["ts"]: any(json.loads(x.payload)["ts"] == ts for x in m))
            frame = next(json.loads(x.payload) for x in msgs if json.loads(x.payload)["ts"] == res["ts"])
            counts: dict[str, int] = {}
            for d in frame["detections"]:
                counts[d["label"]] = counts.get(d["label"], 0) + 1
            assert res["counts"] == dict(sorted(counts.items()))
            seen_labels |= set(counts)
            time.sleep(0.25)  # another part of the clip
        assert seen_labels, "the demo clip shows parts: some detections expected"
    finally:
        det.close()
        plc.close()
        svc.shutdown()


def test_reload_with_changed_inspection_needs_restart(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    from agent.service import apply_live

    _, svc, plc, _ = rig
    old = svc.cfg
    data = old.model_dump(mode="json")
    data["cameras"][0]["inspection"]["deadline_ms"] = 2000
    applied, restart = apply_live(svc, parse_config(data))
    try:
        assert "cameras[cam0].inspection" in restart and "cameras[cam0]" not in applied  # camera not reopened
        plc.trigger("4343")
        assert plc.wait_result(4343)[0]["code"] == 0
    finally:
        apply_live(svc, old)


def test_reload_with_changed_topic_prefix_needs_restart(rig: tuple[Broker, Service, Plc311, Plc5], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A prefix change is not applied live (subscriptions, update topics, the last will were set on the
    old one at start): the reload lists it as needing a restart and every topic stays where it was."""
    from agent.service import apply_live

    broker, svc, plc, _ = rig
    old = svc.cfg
    data = old.model_dump(mode="json")
    data["mqtt"]["topic_prefix"] = "plant7"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    col = Collector(broker.host, broker.port, ["edge/dev1/events", "edge/dev1/cam0/detections", "plant7/#"])
    moved = Plc311(broker.host, broker.port, "plant7/dev1/cam0/inspect")
    svc.config_path = path
    try:
        with caplog.at_level(logging.WARNING, logger="agent.service"):
            svc.reload()  # what SIGHUP runs
        warning = next(r.getMessage() for r in caplog.records if "need a restart" in r.getMessage())
        assert "mqtt.topic_prefix" in warning
        col.wait_for(lambda m: any(b"config_reloaded" in x.payload for x in m if x.topic == "edge/dev1/events"))
        event = next(json.loads(x.payload) for x in col.on("edge/dev1/events") if b"config_reloaded" in x.payload)
        assert "mqtt.topic_prefix" in event["needs_restart"] and "mqtt.topic_prefix" not in event["applied"]
        # the old topics keep answering: the PLC's trigger, the detections
        plc.trigger("4444")
        assert plc.wait_result(4444)[0]["code"] == 0
        n = len(col.on("edge/dev1/cam0/detections"))
        col.wait_for(lambda m: len([x for x in m if x.topic == "edge/dev1/cam0/detections"]) >= n + 3)
        # nothing half-moved: the new prefix carries nothing of the agent's, a trigger there is not answered
        moved.trigger("4445")
        time.sleep(1.0)
        assert moved.answers == []
        assert {x.topic for x in col.on("plant7/#")} == {"plant7/dev1/cam0/inspect/trigger"}
        # the running prefix is kept, so the next reload still lists the change until a restart
        assert svc.cfg.mqtt.topic_prefix == "edge" and svc.topics.prefix == "edge"
        assert "mqtt.topic_prefix" in apply_live(svc, parse_config(data))[1]
    finally:
        svc.config_path = None
        apply_live(svc, old)
        moved.close()
        col.close()


def test_topics() -> None:
    from agent.mqtt.topics import Topics

    t = Topics("edge", "dev1")
    assert (t.inspect("cam0"), t.inspect_trigger("cam0"), t.inspect_ack("cam0"), t.inspect_result("cam0")) == (
        BASE, f"{BASE}/trigger", f"{BASE}/ack", f"{BASE}/result")
    assert t.inspect_last("cam0", "id") == f"{BASE}/last/id"
    assert t.inspect_last("cam0", "count/a/b+#") == f"{BASE}/last/count/a_b__"
    with pytest.raises(ValueError):
        t.inspect_last("cam0", "a/b")


def test_a_change_not_applied_is_listed_again_at_the_next_reload(rig: tuple[Broker, Service, Plc311, Plc5]) -> None:
    """What is in force after a reload keeps the old broker and model settings (not applied live), so
    a second reload of the same file still says they need a restart; thresholds are applied."""
    from agent.service import apply_live

    _, svc, _, _ = rig
    old = svc.cfg
    data = old.model_dump(mode="json")
    data["mqtt"]["keepalive_s"] = old.mqtt.keepalive_s + 7
    data["model"]["version"] = "99"
    data["model"]["score_threshold"] = 0.4
    new = parse_config(data)
    try:
        for _ in range(2):
            _, restart = apply_live(svc, new)
            assert "mqtt connection" in restart and any(r.startswith("model (") for r in restart)
            assert svc.cfg.mqtt.keepalive_s == old.mqtt.keepalive_s and svc.cfg.model.version == old.model.version
            assert svc.cfg.model.score_threshold == 0.4
    finally:
        apply_live(svc, old)
