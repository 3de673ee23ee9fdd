"""The agent end to end: a real agent process, a real mosquitto, real paho subscribers."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector, Msg


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # One "dent" at the centre with score 0.8, one "part" with score 0.4.
    return fixed_yolov8_model(tmp_path / "fixed.onnx", [(32, 32, 16, 16, 1, 0.8), (10, 10, 8, 8, 0, 0.4)],
                              labels=["part", "dent"])


def payloads(msgs: list[Msg], topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in msgs if m.topic == topic]


def test_contract_topics_and_clean_stop(tmp_path: Path, broker: Broker, model: Path) -> None:
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:320x240@20")
    col = Collector(broker.host, broker.port, ["edge/#"])
    agent = AgentProcess(cfg)
    try:
        col.wait_for(lambda m: len(payloads(m, "edge/dev1/cam0/detections")) >= 10
                     and any(x.topic == "edge/dev1/telemetry" for x in m), timeout=60)
        status = payloads(col.messages, "edge/dev1/status")[0]
        assert status["state"] == "online" and status["model"] == {"name": "fixed", "version": "1"}
        assert status["backend"] == "onnxruntime" and "agent_version" in status
        det = payloads(col.messages, "edge/dev1/cam0/detections")
        first = det[0]
        assert set(first) == {"seq", "ts", "camera", "frame", "model", "latency_ms", "detections"}
        assert first["frame"] == {"w": 320, "h": 240} and first["camera"] == "cam0"
        labels = sorted(d["label"] for d in first["detections"])
        assert labels == ["dent", "part"]  # default threshold 0.25 keeps both
        assert abs(time.time() - first["ts"]) < 60 and first["latency_ms"] > 0
        seqs = [d["seq"] for d in det]
        assert seqs == sorted(seqs)
        counts = {m.topic: m.payload for m in col.messages if "/count/" in m.topic}
        assert counts == {"edge/dev1/cam0/count/dent": b"1", "edge/dev1/cam0/count/part": b"1"}
        tele = payloads(col.messages, "edge/dev1/telemetry")[-1]
        for key in ("uptime_s", "fps", "frames_in", "frames_processed", "frames_dropped", "cameras", "mqtt",
                    "model", "engine", "system"):
            assert key in tele, key
        assert tele["cameras"][0]["latency_ms"]["e2e"]["p50"] > 0
    finally:
        code = agent.stop()
    assert code == 0, agent.output()
    col.wait_for(lambda m: payloads(m, "edge/dev1/status")[-1]["state"] == "offline", timeout=10)
    # Retained messages are what a PLC connecting later sees.
    late = Collector(broker.host, broker.port, ["edge/dev1/status", "edge/dev1/cam0/count/+"])
    late.wait_for(lambda m: len(m) >= 3)
    assert {m.topic for m in late.messages if m.retain} >= {"edge/dev1/status", "edge/dev1/cam0/count/dent"}
    assert json.loads(late.on("edge/dev1/status")[0].payload)["state"] == "offline"
    late.close()
    col.close()


def test_last_will_after_sigkill(tmp_path: Path, broker: Broker, model: Path) -> None:
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@10")
    col = Collector(broker.host, broker.port, ["edge/dev1/status"])
    agent = AgentProcess(cfg)
    try:
        col.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m), timeout=60)
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        col.wait_for(lambda m: json.loads(m[-1].payload)["state"] == "offline", timeout=10)
    finally:
        agent.stop()
        col.close()


def test_qos1_detections_published_while_broker_down_arrive_later(tmp_path: Path, model: Path) -> None:
    broker = Broker(tmp_path, persistence=True).start()
    try:
        cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@20",
                           mqtt={"detections_qos": 1})
        col = Collector(broker.host, broker.port, ["edge/dev1/cam0/detections"], client_id="plc1", clean=False)
        agent = AgentProcess(cfg)
        try:
            col.wait_for(lambda m: len(m) >= 5, timeout=60)
            broker.stop()  # graceful: the broker saves the PLC's persistent session
            time.sleep(2.0)  # ~40 frames are published while the broker is away
            broker.start()
            n_before = len(col.messages)
            col.wait_for(lambda m: len(m) >= n_before + 60, timeout=30)
        finally:
            agent.stop()
        seqs = sorted({json.loads(m.payload)["seq"] for m in col.messages})
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a QoS 1 detection was lost while the broker was away"
        col.close()
    finally:
        broker.stop()


def test_unreadable_model_is_a_clear_error(tmp_path: Path, broker: Broker) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model")
    cfg = write_config(tmp_path / "a.yaml", broker.port, bad, "synthetic:160x120@10")
    agent = AgentProcess(cfg)
    code = agent.wait(60)
    assert code == 2  # the configured model is a config mistake: exit 2, no restart loop under systemd
    assert "bad.onnx" in agent.output()


def test_camera_that_never_opens_does_not_stop_the_service(tmp_path: Path, broker: Broker, model: Path) -> None:
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "rtsp://127.0.0.1:9/none",
                       cameras=[{"id": "cam0", "source": "rtsp://127.0.0.1:9/none", "open_timeout_s": 1,
                                 "reconnect": {"initial_s": 0.1, "max_s": 0.3}}])
    col = Collector(broker.host, broker.port, ["edge/dev1/#"])
    agent = AgentProcess(cfg)
    try:
        col.wait_for(lambda m: any(x.topic == "edge/dev1/telemetry" for x in m)
                     and any(x.topic == "edge/dev1/events" and b"camera_lost" in x.payload for x in m), timeout=60)
        time.sleep(1.5)
        assert agent.proc.poll() is None, agent.output()
        tele = payloads(col.messages, "edge/dev1/telemetry")[-1]
        assert tele["cameras"][0]["camera_state"] != "streaming"
        assert tele["cameras"][0]["reconnects"] >= 1
    finally:
        assert agent.stop() == 0, agent.output()
        col.close()


def test_broker_refusing_connection_does_not_stop_inference(tmp_path: Path, model: Path) -> None:
    pw = tmp_path / "passwd"
    pw.write_text("")  # no user may log in
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {pw}\n").start()
    try:
        cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@50")
        agent = AgentProcess(cfg, "--max-frames", "30")
        code = agent.wait(60)
        out = agent.output()
        assert code == 0, out
        assert "refused" in out.lower() or "not authori" in out.lower(), out
    finally:
        broker.stop()


def test_sighup_changes_threshold_live_and_rejects_bad_config(tmp_path: Path, broker: Broker, model: Path) -> None:
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@20",
                       model={"path": str(model), "score_threshold": 0.3})
    col = Collector(broker.host, broker.port, ["edge/dev1/cam0/detections", "edge/dev1/events"])
    agent = AgentProcess(cfg)
    try:
        col.wait_for(lambda m: len(m) >= 3, timeout=60)
        assert len(payloads(col.messages, "edge/dev1/cam0/detections")[-1]["detections"]) == 2
        good = cfg.read_text().replace("score_threshold: 0.3", "score_threshold: 0.6")
        cfg.write_text(good)
        agent.signal(signal.SIGHUP)
        col.wait_for(lambda m: any(b"config_reloaded" in x.payload for x in m), timeout=20)
        n = len(col.messages)
        col.wait_for(lambda m: len(m) >= n + 5, timeout=20)
        assert len(payloads(col.messages, "edge/dev1/cam0/detections")[-1]["detections"]) == 1
        cfg.write_text(good.replace("score_threshold: 0.6", "score_threshold: 7"))
        agent.signal(signal.SIGHUP)
        col.wait_for(lambda m: any(b"reload_rejected" in x.payload for x in m), timeout=20)
        n = len(col.messages)
        col.wait_for(lambda m: len(m) >= n + 5, timeout=20)
        assert len(payloads(col.messages, "edge/dev1/cam0/detections")[-1]["detections"]) == 1
        assert agent.proc.poll() is None
    finally:
        assert agent.stop() == 0, agent.output()
        col.close()


def test_unreadable_trusted_key_is_a_config_error(tmp_path: Path, broker: Broker, model: Path) -> None:
    """Exit 2 (no systemd restart loop) with the real reason, not a crash while stopping."""
    cfg = write_config(tmp_path / "a.yaml", broker.port, model, "synthetic:160x120@10",
                       updates={"enabled": True, "trusted_keys": {"ops": str(tmp_path / "missing.pub")}})
    agent = AgentProcess(cfg)
    try:
        assert agent.wait(60) == 2, agent.output()
    finally:
        agent.stop()
    assert "trusted key 'ops'" in agent.output() and "Traceback" not in agent.output()


def test_a_hook_failing_on_every_frame_is_logged_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    from agent.service import HookFailureLog

    def broken(_result: object) -> None:
        raise ValueError("boom")

    failures = HookFailureLog(every_s=3600.0)
    with caplog.at_level(logging.ERROR, logger="agent.service"):
        for seq in range(100):
            try:
                broken(None)
            except ValueError:
                failures.failed("result listener", broken, "cam0", seq)
    records = [r for r in caplog.records if "result listener" in r.getMessage()]
    assert failures.count == 100
    assert len(records) == 1 and records[0].exc_info is not None  # the first traceback, then silence
    failures.every_s = 0.0
    failures._next_log.clear()  # the period is over
    try:
        broken(None)
    except ValueError:
        failures.failed("result listener", broken, "cam0", 100)
    assert "99 failures since the last report not logged" in caplog.records[-1].getMessage()
