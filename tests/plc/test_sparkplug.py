"""The Sparkplug B edge node end to end: the agent's real Service (synthetic camera -> real ONNX Runtime
session on a tiny real model -> post thread -> fan-out -> node), a real mosquitto, and a host-side
checker (tests/support/sparkplug_checker.py, a real paho MQTT 5 client) that decodes every message and
checks the specification's rules: bdSeq of NBIRTH and will, seq continuity and wrap, aliases only in
DATA, QoS / retain, births before data, rebirth on NCMD, Primary Host STATE.

To see the will (NDEATH) delivered, the node's connection has to die while the broker lives: the node
talks through a TCP proxy (tests/support/tcp_proxy.py) that the test closes, cutting the connection
under the node as a pulled cable would. A killed broker cannot deliver a will; that case checks the
reconnect (bdSeq + 1) instead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config
from agent.errors import ConfigError
from agent.plc import sparkplug_b_pb2 as pb
from agent.plc.sparkplug import BdSeqStore, SparkplugNode
from agent.plc.sparkplug_payload import (
    DataType,
    Out,
    coerce,
    datatype_of,
    death_payload,
    decode,
    decode_value,
    encode,
    same_value,
)
from agent.service import Service
from tests.support.broker import Broker, free_port
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector
from tests.support.sparkplug_checker import SparkplugChecker, connects_in_broker_log, read_value
from tests.support.tcp_proxy import DelayProxy

GROUP, NODE = "Line 1", "dev1"


def make_cfg(tmp: Path, port: int, model: Path, sparkplug: dict[str, Any] | None = None, cameras: int = 1,
             fps: int = 10, counting: dict[str, Any] | None = None,
             inspection: dict[str, Any] | None = None) -> AgentConfig:
    sp = {"enabled": True, "group_id": GROUP, "period_s": 0.1, "state_file": str(tmp / "sp.json"), **(sparkplug or {})}
    plc = {**({"counting": counting} if counting else {}), **({"inspection": inspection} if inspection else {})}
    return parse_config({
        "device_id": NODE,
        "cameras": [{"id": f"cam{i}", "source": f"synthetic:160x120@{fps}", **plc} for i in range(cameras)],
        "model": {"path": str(model), "name": "fixed", "version": "7"},
        "engine": {"intra_op_threads": 1, "warmup_runs": 1},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect": {"initial_s": 0.05, "max_s": 0.2}},
        "telemetry": {"period_s": 60},
        "cache": {"dir": str(tmp / "cache")},
        "updates": {"enabled": False, "models_dir": str(tmp / "models")},
        "service": {"drain_s": 1, "watchdog": False},
        "sparkplug": sp,
    })


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return fixed_yolov8_model(tmp_path / "fixed.onnx", [(32, 32, 16, 16, 1, 0.8), (10, 10, 8, 8, 0, 0.4)],
                              labels=["part", "dent"])


@pytest.fixture
def host(broker: Broker) -> Iterator[SparkplugChecker]:
    chk = SparkplugChecker(broker.host, broker.port, GROUP, NODE)
    try:
        yield chk
    finally:
        chk.close()


def start_service(cfg: AgentConfig) -> Service:
    svc = Service(cfg, use_cache=False)
    svc.start()
    deadline = time.monotonic() + 30
    while not all(p.processed > 0 for p in svc.pipelines):
        if time.monotonic() > deadline:
            svc.shutdown()
            raise TimeoutError("service not serving")
        time.sleep(0.02)
    return svc


def node_of(svc: Service) -> SparkplugNode:
    return next(c for c in svc.plc if isinstance(c, SparkplugNode))


def births(chk: SparkplugChecker) -> list[int]:
    return [m.values()["bdSeq"] for m in chk.of("NBIRTH")]


# ---- the node with a real service ------------------------------------------------------------------------
def test_births_data_and_clean_stop(tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    svc = start_service(make_cfg(tmp_path, broker.port, model))
    try:
        host.wait_count("DBIRTH", 1, device="cam0")
        nb = host.of("NBIRTH")[0]
        node = nb.values()
        assert node["bdSeq"] == 0 and node["Node Control/Rebirth"] is False
        assert node["Model/Name"] == "fixed" and node["Model/Version"] == "7" and node["Properties/Agent Version"]
        db = host.of("DBIRTH", "cam0")[0]
        dev = db.values()
        assert dev["Model/Version"] == "7" and dev["Camera/State"] in ("connecting", "streaming")
        assert {m.datatype for m in db.payload.metrics} <= {DataType.Double, DataType.String, DataType.Int64}  # type: ignore[union-attr]
        # report by exception: what changes after the birth comes in DDATA, by alias (the checker maps it back)
        host.wait_value("Camera/State", lambda v: v == "streaming", "cam0")
        host.wait_value("Detections/Count", lambda v: v == 2, "cam0")  # the model's dent and part
        host.wait_value("Inference/FPS", lambda v: 7 < v < 13, "cam0")  # a 10 fps camera
        stats = node_of(svc).stats()
        assert stats["connected"] and stats["bdseq"] == 0 and stats["devices_born"] == ["cam0"]
        assert svc.telemetry()["plc"]["sparkplug"]["births"] == 1
    finally:
        svc.shutdown()
    # a clean stop publishes the NDEATH itself (a DISCONNECT discards the will), with the session's bdSeq
    (death,) = host.wait_count("NDEATH", 1)
    assert death.values() == {"bdSeq": 0} and death.qos == 1 and not death.retain
    assert json.loads((tmp_path / "sp.json").read_text()) == {"bdseq": 0}
    host.assert_clean()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_cut_connection_delivers_the_will_and_reconnect_increments_bdseq(
        tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path, protocol: str) -> None:
    proxy = DelayProxy(("127.0.0.1", 0), (broker.host, broker.port)).start()
    port = proxy.port
    (tmp_path / "sp.json").write_text('{"bdseq": 41}')  # the last run's value: this one starts at 42
    svc = start_service(make_cfg(tmp_path, broker.port, model, {"port": port, "protocol": protocol}))
    try:
        host.wait_count("DBIRTH", 1)
        assert births(host) == [42]
        proxy.close()  # the node's TCP connection dies; the broker sees it go and publishes the will
        (will,) = host.wait_count("NDEATH", 1)
        assert will.values() == {"bdSeq": 42}  # the will registered in that CONNECT
        assert will.qos == 1 and not will.retain and will.seq is None
        time.sleep(0.5)  # reconnects meanwhile are refused (nothing listens): they send no CONNECT
        proxy = DelayProxy(("127.0.0.1", port), (broker.host, broker.port)).start()
        host.wait_count("DBIRTH", 2)
        assert births(host) == [42, 43]
        assert host.of("NBIRTH")[1].seq == 0
        assert json.loads((tmp_path / "sp.json").read_text()) == {"bdseq": 43}
    finally:
        svc.shutdown()
        proxy.close()
    host.wait_count("NDEATH", 2)
    host.assert_clean()
    # what the broker saw in each CONNECT: a clean session and the will at QoS 1, not retained
    connects = connects_in_broker_log(broker.log_text(), f"edge-agent-{NODE}-sparkplug")
    level = 5 if protocol == "5" else 4
    assert connects == [{"proto": level, "clean": 1, "will_retain": 0, "will_qos": 1}] * 2


def test_broker_killed_and_back_new_session_bdseq_plus_one(
        tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    svc = start_service(make_cfg(tmp_path, broker.port, model))
    try:
        host.wait_count("DBIRTH", 1)
        broker.kill()  # SIGKILL: no will can be delivered by a dead broker
        time.sleep(0.3)
        broker.start()
        # the host reconnects too and asks for a rebirth, so it sees the new session's birth whichever of
        # the two reconnected first
        host.wait_count("DBIRTH", 2, timeout=15)
        assert births(host)[0] == 0 and set(births(host)[1:]) == {1}  # refused connects sent no CONNECT
        assert node_of(svc).stats()["connects"] == 2 and host.resyncs == 1
    finally:
        svc.shutdown()
    host.wait_count("NDEATH", 1)
    host.assert_clean()


def test_rebirth_on_ncmd_and_bad_commands_ignored(
        tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    svc = start_service(make_cfg(tmp_path, broker.port, model))
    try:
        host.wait_count("DBIRTH", 1)
        host.send_ncmd(b"\xff\xff not protobuf")
        other = pb.Payload(timestamp=1)
        other.metrics.add(name="Node Control/Reboot", datatype=DataType.Boolean, boolean_value=True)
        host.send_ncmd(other.SerializeToString())
        host.request_rebirth()
        host.wait_count("DBIRTH", 2)
        nb = host.of("NBIRTH")
        assert [m.values()["bdSeq"] for m in nb] == [0, 0]  # same connection, same bdSeq
        after = host.messages[host.messages.index(nb[1]) + 1]
        assert nb[1].seq == 0 and (after.verb, after.seq) == ("DBIRTH", 1)  # the DBIRTHs right after the NBIRTH
        stats = node_of(svc).stats()
        assert stats["rebirth_requests"] == 1 and stats["bad_commands"] == 1 and stats["other_commands"] == 1
        assert stats["connects"] == 1
    finally:
        svc.shutdown()
    host.assert_clean()


def test_primary_host_state_gates_births(tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    svc = start_service(make_cfg(tmp_path, broker.port, model, {"primary_host_id": "scada"}))
    try:
        node = node_of(svc)
        deadline = time.monotonic() + 5
        while not node.stats()["connected"]:
            assert time.monotonic() < deadline, "node did not connect"
            time.sleep(0.02)
        time.sleep(0.5)
        assert host.of("NBIRTH") == []  # no STATE yet: no birth
        t0 = int(time.time() * 1000)
        host.publish_state("scada", True, t0)
        host.wait_count("DBIRTH", 1)
        host.publish_state("scada", False, t0 - 1000)  # older than the last STATE: stale, ignored
        time.sleep(0.5)
        assert host.of("NDEATH") == []
        host.publish_state("scada", False, t0 + 1)  # the host went offline: NDEATH, a new session that waits
        (death,) = host.wait_count("NDEATH", 1)
        assert death.values() == {"bdSeq": 0}
        deadline = time.monotonic() + 5
        while node.stats()["bdseq"] != 1 or not node.stats()["connected"]:
            assert time.monotonic() < deadline, "no new session"
            time.sleep(0.02)
        time.sleep(0.5)
        assert len(host.of("NBIRTH")) == 1  # the retained offline STATE holds the births back
        host.publish_state("scada", True, t0 + 2)
        host.wait_count("DBIRTH", 2)
        assert births(host) == [0, 1]
    finally:
        svc.shutdown()
    host.assert_clean()


# ---- metric sources: the PLC components' values -------------------------------------------------------------
def test_inspection_results_reach_the_host(tmp_path: Path, broker: Broker, host: SparkplugChecker,
                                           model: Path) -> None:
    """The real inspection component (agent/plc/inspection.py) through its metrics() and change notice."""
    recipes = {"default": {"counts": {"dent": {"min": 1, "max": 1}}}, "clean": {"forbidden": ["dent"]}}
    svc = start_service(make_cfg(tmp_path, broker.port, model, {"period_s": 30},  # only change notices publish
                                 inspection={"recipes": recipes, "deadline_ms": 3000}))
    plc = Collector(broker.host, broker.port, [f"edge/{NODE}/cam0/inspect/result"], client_id="plc-311")
    try:
        db = host.wait_count("DBIRTH", 1, device="cam0")[0].values()
        assert db["Inspection/Last ID"] == 0 and db["Inspection/Last Pass"] is False
        trigger = f"edge/{NODE}/cam0/inspect/trigger"
        plc.client.publish(trigger, b"17", qos=1).wait_for_publish(5)
        assert host.wait_value("Inspection/Last ID", lambda v: v == 17, "cam0") == 17
        latest = host.latest("cam0")
        assert latest["Inspection/Last Pass"] is True and latest["Inspection/Last Code"] == 0
        assert json.loads(plc.wait_for(lambda m: len(m) >= 1)[0].payload)["id"] == 17  # the PLC's own answer too
        plc.client.publish(trigger, b"18,clean", qos=1).wait_for_publish(5)  # the dent fails this recipe
        host.wait_value("Inspection/Last ID", lambda v: v == 18, "cam0")
        assert host.latest("cam0")["Inspection/Last Pass"] is False
    finally:
        plc.close()
        svc.shutdown()
    host.assert_clean()


def test_counting_component_counters_are_device_metrics(
        tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    """The real counting component (agent/plc/counting_service.py), read through its counters() as it is."""
    counting = {"zones": [{"name": "bay", "polygon": [[0, 0], [160, 0], [160, 120], [0, 120]]}],
                "lines": [{"name": "gate", "points": [[80, 0], [80, 120]]}],
                "state_file": str(tmp_path / "counters.json")}
    svc = start_service(make_cfg(tmp_path, broker.port, model, counting=counting))
    try:
        db = host.wait_count("DBIRTH", 1, device="cam0")[0]
        metrics = db.by_name()
        for name in ("zone/bay/count", "line/gate/in", "line/gate/out"):
            assert metrics[name].datatype == DataType.Int64, name
        # the dent (0.8) is tracked inside the zone; the part (0.4) is under the tracker's activation score
        host.wait_value("zone/bay/count", lambda v: v == 1, "cam0")
        assert host.latest("cam0")["line/gate/in"] == 0
    finally:
        svc.shutdown()
    host.assert_clean()


class Source:
    """A PLC component in the MetricSource form, as inspection or counting would write one."""

    name = "test-source"

    def __init__(self, cameras: list[str]) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, dict[str, Any]] = {c: {"Inspection/Last ID": 0, "Inspection/Last Pass": False,
                                                      "Inspection/Last Code": 0} for c in cameras}
        self.fail = False
        self.listeners: list[Any] = []

    def metrics(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            if self.fail:
                raise RuntimeError("source broken")
            return {c: dict(v) for c, v in self.values.items()}

    def add_change_listener(self, cb: Any) -> None:
        self.listeners.append(cb)

    def set(self, cam: str, values: dict[str, Any]) -> None:
        with self.lock:
            self.values[cam].update(values)
        for cb in self.listeners:
            cb(values)

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def manual_node(tmp: Path, port: int, model: Path, source: Source, cameras: int = 1,
                **sp: Any) -> tuple[Service, SparkplugNode]:
    """A real Service without its own node, and a node built on it with the test's metric source."""
    cfg = make_cfg(tmp, port, model, {"enabled": False, **sp}, cameras=cameras, fps=5)
    svc = start_service(cfg)
    return svc, SparkplugNode(svc, sources=[source])


def test_metric_sources_are_published_by_alias_on_change(
        tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    src = Source(["cam0"])
    svc, node = manual_node(tmp_path, broker.port, model, src, period_s=30)  # only change notices publish
    try:
        db = host.wait_count("DBIRTH", 1)[0]
        born = db.values()
        assert born["Inspection/Last ID"] == 0 and born["Inspection/Last Pass"] is False
        aliases = {n: m.alias for n, m in db.by_name().items()}
        t0 = time.monotonic()
        src.set("cam0", {"Inspection/Last ID": 17, "Inspection/Last Pass": True, "Inspection/Last Code": -3})
        msgs = host.wait_for(lambda ms: ms[-1].verb == "DDATA", timeout=5)
        assert time.monotonic() - t0 < 1.0  # the change notice, not the 30 s period
        data = msgs[-1].payload
        assert data is not None
        got = {m.alias: read_value(m) for m in data.metrics}
        assert got[aliases["Inspection/Last ID"]] == 17 and got[aliases["Inspection/Last Pass"]] is True
        assert got[aliases["Inspection/Last Code"]] == -3  # Int64, two's complement on the wire
        # a new metric name: that device is born again with it (DDEATH + DBIRTH), the node is not
        src.set("cam0", {"Zone/a/Count": 2})
        host.wait_count("DBIRTH", 2)
        assert host.of("DDEATH", "cam0") and len(host.of("NBIRTH")) == 1
        assert host.of("DBIRTH")[1].values()["Zone/a/Count"] == 2
        # a failing source keeps its last values: no re-birth, no gap, the node goes on
        src.fail = True
        node.wake()
        time.sleep(0.3)
        assert len(host.of("DBIRTH")) == 2 and node.stats()["source_errors"] >= 1
        # a bad value type is skipped, the rest still flows
        src.fail = False
        src.set("cam0", {"Inspection/Last ID": 18, "Bad/Value": [1, 2]})
        host.wait_for(lambda ms: any(m.verb == "DDATA" and any(read_value(x) == 18 for x in m.payload.metrics)  # type: ignore[union-attr]
                                     for m in ms), timeout=5)
    finally:
        node.close()
        svc.shutdown()
    host.assert_clean()


def test_seq_wraps_at_255(tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    cams = [f"cam{i}" for i in range(4)]
    src = Source(cams)
    svc, node = manual_node(tmp_path, broker.port, model, src, cameras=4, period_s=0.05)
    stop = threading.Event()

    def churn() -> None:  # every camera's value changes all the time: a DDATA per camera per tick
        n = 0
        while not stop.is_set():
            n += 1
            for c in cams:
                with src.lock:
                    src.values[c]["Inspection/Last ID"] = n
            time.sleep(0.005)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        host.wait_for(lambda ms: host.wraps >= 1 and len(ms) > 300, timeout=30, what="a seq wrap")
    finally:
        stop.set()
        t.join()
        node.close()
        svc.shutdown()
    seqs = [m.seq for m in host.messages if m.seq is not None]
    i = seqs.index(255)
    assert seqs[i + 1] == 0 and host.messages[i + 1].verb != "NBIRTH"
    host.assert_clean()


# ---- pieces --------------------------------------------------------------------------------------------
def test_payload_round_trip_by_datatype() -> None:
    ts = 1_700_000_000_000
    raw = encode([Out("a", 1, DataType.Int64, -5, ts), Out("b", 2, DataType.Boolean, True, ts),
                  Out("c", 3, DataType.Double, 2.5, ts), Out("d", 4, DataType.String, "x", ts),
                  Out(None, 5, DataType.Int32, -7, ts), Out(None, 6, DataType.UInt32, 7, ts)], seq=9, ts=ts)
    p = decode(raw)
    assert p.seq == 9 and p.timestamp == ts
    assert [decode_value(m) for m in p.metrics] == [-5, True, 2.5, "x", -7, 7]
    assert p.metrics[0].long_value == 2**64 - 5  # two's complement in the unsigned field
    assert not p.metrics[4].HasField("name") and p.metrics[4].alias == 5
    death = decode(death_payload(3, ts=ts))
    assert not death.HasField("seq") and len(death.metrics) == 1
    assert (death.metrics[0].name, death.metrics[0].datatype, death.metrics[0].long_value) == ("bdSeq", 4, 3)
    assert datatype_of(True) == DataType.Boolean and datatype_of(3) == DataType.Int64
    assert coerce(3, DataType.Double) == 3.0
    with pytest.raises(TypeError):
        coerce("x", DataType.Int64)
    with pytest.raises(TypeError):
        datatype_of(2**70)
    with pytest.raises(ValueError, match="not a Sparkplug B payload"):
        decode(b"\xff\xff\xff")
    assert same_value(10.0, 10.3, 0.5) and not same_value(10.0, 10.6, 0.5)
    assert same_value(float("nan"), float("nan")) and not same_value(1, True)


def test_checker_catches_broken_rules(broker: Broker) -> None:
    """The checker itself: each crafted violation is reported (a checker that passes everything proves nothing)."""
    chk = SparkplugChecker(broker.host, broker.port, GROUP, NODE, client_id="checker-self-test")
    try:
        base = f"spBv1.0/{GROUP}"
        ts = 1_700_000_000_000
        birth = [Out("bdSeq", 1, DataType.Int64, 5, ts), Out("Node Control/Rebirth", None, DataType.Boolean, False, ts),
                 Out("x", 2, DataType.Int64, 1, ts)]
        chk.feed(f"{base}/NDATA/{NODE}", encode([Out(None, 2, DataType.Int64, 1, ts)], seq=1), 0, False)
        chk.feed(f"{base}/NBIRTH/{NODE}", encode(birth, seq=3), 0, True)  # seq not 0, retained
        chk.feed(f"{base}/NDATA/{NODE}", encode([Out("x", 2, DataType.Int64, 2, ts)], seq=5), 0, False)  # name, gap
        chk.feed(f"{base}/DDATA/{NODE}/cam0", encode([Out(None, 2, DataType.Int64, 2, ts)], seq=6), 0, False)
        chk.feed(f"{base}/NDEATH/{NODE}", death_payload(4), 0, False)  # QoS 0, wrong bdSeq
        text = "\n".join(chk.violations)
        for needle in ("not born", "NBIRTH seq 3", "published with retain", "carries its name", "seq 5, expected 1",
                       "DDATA before the device's DBIRTH", "QoS 0", "does not match the session's NBIRTH bdSeq 5"):
            assert needle in text, needle
        with pytest.raises(AssertionError):
            chk.assert_clean()
    finally:
        chk.close()


def test_config_and_bdseq_store(tmp_path: Path, model: Path) -> None:
    with pytest.raises(ConfigError, match="group_id is required"):
        parse_config({"cameras": [{"source": "x.mp4"}], "sparkplug": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"sparkplug\.group_id"):
        parse_config({"cameras": [{"source": "x.mp4"}], "sparkplug": {"group_id": "a/b"}})
    with pytest.raises(ConfigError, match=r"sparkplug\.period_s"):
        parse_config({"cameras": [{"source": "x.mp4"}], "sparkplug": {"group_id": "a", "period_s": 0}})
    cfg = parse_config({"cameras": [{"source": "x.mp4"}]})
    assert cfg.sparkplug.enabled is False
    store = BdSeqStore(tmp_path / "state" / "sp.json")
    assert store.load() is None
    store.save(255)
    assert store.load() == 255
    (tmp_path / "state" / "sp.json").write_text("{broken")
    assert store.load() is None  # unreadable: start again at 0, said in the log
    (tmp_path / "state" / "sp.json").write_text('{"bdseq": 300}')
    assert store.load() is None


def test_bdseq_wraps_from_255_to_0(tmp_path: Path, broker: Broker, host: SparkplugChecker, model: Path) -> None:
    (tmp_path / "sp.json").write_text('{"bdseq": 255}')
    svc = start_service(make_cfg(tmp_path, broker.port, model))
    try:
        host.wait_count("NBIRTH", 1)
        assert births(host) == [0]
    finally:
        svc.shutdown()
    host.assert_clean()


def test_unreachable_broker_never_blocks_the_service(tmp_path: Path, model: Path) -> None:
    """Sparkplug broker down: the node retries in its own thread; the pipeline and the service run on."""
    dead = free_port()
    cfg = make_cfg(tmp_path, free_port(), model, {"port": dead})
    svc = start_service(cfg)
    try:
        node = node_of(svc)
        before = svc.pipelines[0].processed
        time.sleep(0.5)
        assert svc.pipelines[0].processed > before
        st = node.stats()
        assert not st["connected"] and st["connects"] == 0 and "cannot connect" in (st["last_error"] or "")
    finally:
        t0 = time.monotonic()
        svc.shutdown()
        assert time.monotonic() - t0 < 10
