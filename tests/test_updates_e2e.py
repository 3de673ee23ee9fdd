"""Model updates end to end: real agent processes, a real mosquitto, the operators' push code, real files.

The agent runs as a child process (`python -m agent.cli run`), models are tiny real ONNX files, and
every push goes through `agent.fleet.push` (what `edge-agent fleet push-model` runs). Each test
starts its own broker; states are read from the retained `edge/<dev>/model/state` topic.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.fleet.push import PushResult, build_manifest, connect, model_info, push_model, update_topic
from agent.updates.manifest import generate_keypair, load_private_key, sign_manifest
from scripts.bad_models import LABELS as BAD_LABELS
from scripts.bad_models import SIZE as BAD_SIZE
from scripts.bad_models import make_bad_models
from tests.support.agent_proc import AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector, Msg
from tests.support.update_rig import update_records

LABELS = ["part", "dent"]
FLOW = ["received", "downloading", "verifying", "building", "validating", "active"]
TERMINAL = ("active", "failed", "rolled_back")


# ---- keys and models ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    ops: Any  # Ed25519PrivateKey trusted by the devices as "ops"
    ops_pub: str
    rogue: Any  # a key no device trusts


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    ops = generate_keypair(d, "ops")
    rogue = generate_keypair(d, "rogue")
    return Keys(load_private_key(ops.private_path), ops.public_b64, load_private_key(rogue.private_path))


def make_model(path: Path, version: str, score: float = 0.8, anchors: int = 16) -> Path:
    return fixed_yolov8_model(path, [(32, 32, 16, 16, 1, score), (10, 10, 8, 8, 0, 0.4)], labels=LABELS,
                              version=version, anchors=anchors)


def slow_model(path: Path, version: str, layers: int, n: int = 512) -> Path:
    """Valid 64x64 yolov8 model whose output depends on a chain of `layers` [n,n]x[n,n] MatMuls.

    The weight comes from ConstantOfShape (the file stays a few KB) and the chain starts from the
    input, so ONNX Runtime cannot fold it away; values stay finite (W = 1/n keeps the scale)."""
    out = np.zeros((1, 6, 16), np.float32)
    out[0, :4, 0] = (32, 32, 16, 16)
    out[0, 5, 0] = 0.8
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Expand", ["mean", "nn"], ["x0"]),
        helper.make_node("ConstantOfShape", ["nn"], ["w"],
                         value=numpy_helper.from_array(np.array([1.0 / n], np.float32))),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"x{layers}"], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "zero"], ["z"]),
        helper.make_node("Add", ["const", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 16])],
        [numpy_helper.from_array(np.array([n, n], np.int64), "nn"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(out, "const")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"names": repr(dict(enumerate(LABELS))), "version": version}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def calibrated_slow_model(path: Path, version: str, target_ms: float = 250.0) -> Path:
    """A slow model sized on this CPU (one thread, like the agent's engine) to ~target_ms per inference."""
    import onnxruntime as ort

    def ms_per_run(layers: int) -> float:
        slow_model(path, version, layers)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, 3, 64, 64), np.float32)
        sess.run(None, {"images": x})
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sess.run(None, {"images": x})
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    probe = 4
    per_layer = ms_per_run(probe) / probe
    return slow_model(path, version, max(probe, min(2000, math.ceil(target_ms / max(per_layer, 0.05)))))


# ---- the agent under test -----------------------------------------------------------------------

def payloads(msgs: Iterable[Msg], suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in msgs if m.topic.endswith(suffix) and m.payload]


class Rig:
    """One agent process (restartable) + a collector on its topics."""

    def __init__(self, tmp: Path, broker: Broker, keys: Keys, v1: Path, device_id: str = "dev1",
                 groups: Iterable[str] = (), fps: int = 20, det_qos: int = 0, **updates: Any) -> None:
        self.dev = device_id
        self.dir = tmp / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = self.dir / "models"
        upd = {"enabled": True, "trusted_keys": {"ops": keys.ops_pub}, "models_dir": str(self.models_dir),
               "health_window_s": 2, "groups": list(groups), **updates}
        self.cfg = write_config(self.dir / "agent.yaml", broker.port, v1, f"synthetic:160x120@{fps}",
                                device_id=device_id, updates=upd, mqtt={"detections_qos": det_qos})
        self.col = Collector(broker.host, broker.port, [f"edge/{device_id}/#"])
        self.agent: AgentProcess | None = None
        self.mark = 0  # index into col.messages where the current process started

    def start(self) -> Rig:
        self.mark = len(self.col.messages)
        self.agent = AgentProcess(self.cfg)
        return self

    def since_start(self) -> list[Msg]:
        return self.col.messages[self.mark:]

    def wait_ready(self, timeout: float = 30) -> None:
        """Telemetry carrying update counters: the update manager runs and has subscribed."""
        def ok(m: list[Msg]) -> bool:
            return any(x.topic.endswith("/telemetry") and b'"manifests"' in x.payload for x in m[self.mark:])
        self.wait(ok, timeout)

    def wait(self, pred: Callable[[list[Msg]], bool], timeout: float = 20) -> list[Msg]:
        try:
            return self.col.wait_for(pred, timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log()[-6000:]}") from None

    def log(self) -> str:
        return self.agent.output() if self.agent is not None else ""

    def states(self, manifest_id: str | None = None, since: int = 0,
               version: str | None = None) -> list[dict[str, Any]]:
        """The update records (attempts, refusals) on model/state, each once."""
        msgs = list(self.col.messages)
        out = update_records(payloads(msgs[since:], "/model/state"), version,
                             before=payloads(msgs[:since], "/model/state"))
        return [s for s in out if manifest_id is None or s.get("manifest_id") == manifest_id]

    def wait_state(self, manifest_id: str, states: Iterable[str], timeout: float = 20) -> dict[str, Any]:
        want = set(states)
        self.wait(lambda m: any(s.get("state") in want for s in self.states(manifest_id)), timeout)
        return next(s for s in self.states(manifest_id) if s.get("state") in want)

    def dets(self, since: int = 0) -> list[dict[str, Any]]:
        return payloads(self.col.messages[since:], "/cam0/detections")

    def wait_dets(self, n: int, since: int | None = None, timeout: float = 20) -> list[dict[str, Any]]:
        start = self.mark if since is None else since
        self.wait(lambda m: len(payloads(m[start:], "/cam0/detections")) >= n, timeout)
        return self.dets(start)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in payloads(self.col.messages, "/events") if e.get("event") == name]

    def stop(self) -> int:
        assert self.agent is not None
        return self.agent.stop()

    def kill(self) -> None:
        assert self.agent is not None
        self.agent.signal(signal.SIGKILL)
        self.agent.wait(10)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.col.close()


def push(broker: Broker, key: Any, model: Path, version: str, *, key_id: str = "ops",
         devices: Iterable[str] = ("dev1",), groups: Iterable[str] = (), chunk_size: int = 256,
         now: float | None = None, wait_s: float = 15.0, info_fix: dict[str, Any] | None = None,
         progress: Callable[[int, int], None] | None = None, group_delay: float = 2.0) -> PushResult:
    """What `edge-agent fleet push-model` does: describe, sign, publish the manifest, then the chunks."""
    info = model_info(model)
    for k, v in (info_fix or {}).items():
        setattr(info, k, v)
    unsigned = build_manifest(info, name="fixed", version=version, devices=devices, groups=groups,
                              chunk_size=chunk_size, now=now)
    signed = sign_manifest(unsigned, key, key_id)
    client = connect(broker.host, broker.port)
    try:
        return push_model(client, signed, model, wait_s=wait_s, progress=progress, group_delay=group_delay)
    finally:
        client.disconnect()
        client.loop_stop()


def versions_snapshot(models_dir: Path) -> dict[str, str]:
    root = models_dir / "versions"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def store_state(models_dir: Path) -> dict[str, Any]:
    p = models_dir / "state.json"
    return json.loads(p.read_text()) if p.exists() else {}


def squeeze(xs: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return make_model(tmp_path / "v1.onnx", "1")


# ---- 1. the happy path --------------------------------------------------------------------------

def test_push_v2_swaps_between_frames_and_survives_restart(tmp_path: Path, broker: Broker, keys: Keys,
                                                           v1: Path) -> None:
    v2 = make_model(tmp_path / "v2.onnx", "2", score=0.7)
    rig = Rig(tmp_path, broker, keys, v1, det_qos=1).start()
    try:
        rig.wait_ready()
        rig.wait_dets(10)
        res = push(broker, keys.ops, v2, "2", chunk_size=256)  # 673 bytes: 3 chunks
        assert res.ok, res.states
        mid = res.manifest["id"]
        rig.wait(lambda m: any(e.get("version") == "2" for e in rig.events("model_kept")), timeout=15)
        n = len(rig.col.messages)
        rig.wait_dets(10, since=n)

        assert squeeze(s["state"] for s in rig.states(mid)) == FLOW
        dets = rig.dets()
        # from the push on (after the 10 detections waited for before it): no frame lost across the
        # swap. Before that a live source may drop a frame at start-up by design (newest frame wins,
        # counted in frames_dropped): seen once in CI on a loaded machine, seq 1 never inferred.
        seqs = [d["seq"] for d in dets[10:]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a detections seq gap across the swap"
        versions = [d["model"]["version"] for d in dets]
        assert squeeze(versions) == ["1", "2"], squeeze(versions)
        assert {d["model"]["name"] for d in dets} == {"fixed"}
        late = Collector(broker.host, broker.port, ["edge/dev1/status", "edge/dev1/model/state"])
        try:
            late.wait_for(lambda m: len(m) >= 2)
            assert payloads(late.messages, "/status")[-1]["model"] == {"name": "fixed", "version": "2"}
            st = payloads(late.messages, "/model/state")[-1]
            assert (st["state"], st["version"], st["last_attempt"]["manifest_id"]) == ("active", "2", mid)
        finally:
            late.close()
        assert store_state(rig.models_dir)["active"] == "fixed-2"

        assert rig.stop() == 0, rig.log()
        rig.start()
        after = rig.wait_dets(5)
        assert {d["model"]["version"] for d in after} == {"2"}, rig.log()
        assert payloads(rig.since_start(), "/status")[-1]["model"]["version"] == "2"
    finally:
        rig.close()


# ---- 2. a group ---------------------------------------------------------------------------------

def test_group_push_reaches_every_member(tmp_path: Path, broker: Broker, keys: Keys, v1: Path) -> None:
    v2 = make_model(tmp_path / "v2.onnx", "2", score=0.7)
    rigs = [Rig(tmp_path, broker, keys, v1, device_id=f"dev{i}", groups=["line3"], fps=10) for i in (1, 2, 3)]
    try:
        for r in rigs:
            r.start()
        for r in rigs:
            r.wait_ready()
        res = push(broker, keys.ops, v2, "2", devices=(), groups=["line3"], wait_s=0, group_delay=0.5)
        mid = res.manifest["id"]
        for r in rigs:
            st = r.wait_state(mid, TERMINAL, timeout=20)
            assert (st["state"], st["version"]) == ("active", "2"), (r.dev, st)
            n = len(r.col.messages)
            assert {d["model"]["version"] for d in r.wait_dets(3, since=n)} == {"2"}
    finally:
        for r in rigs:
            r.close()


# ---- 3. rejections ------------------------------------------------------------------------------

def test_rejections_leave_the_running_model_and_the_store_untouched(tmp_path: Path, broker: Broker, keys: Keys,
                                                                    v1: Path) -> None:
    v2 = make_model(tmp_path / "v2.onnx", "2", score=0.7)
    bad = make_bad_models(tmp_path / "bad", source=v1)  # `truncated` cuts v1 in half: tiny
    rig = Rig(tmp_path, broker, keys, v1).start()
    try:
        rig.wait_ready()
        before = versions_snapshot(rig.models_dir)

        def expect(res: PushResult, reason: str, state: str = "failed") -> None:
            st = rig.wait_state(res.manifest["id"], TERMINAL, timeout=15)
            assert (st["state"], st["error"]) == (state, reason), (st, rig.log()[-3000:])
            assert versions_snapshot(rig.models_dir) == before, reason
            n = len(rig.col.messages)
            assert {d["model"]["version"] for d in rig.wait_dets(3, since=n)} == {"1"}, reason

        # manifests refused before a byte is transferred
        expect(push(broker, keys.rogue, v2, "2", key_id="ops"), "bad_signature")
        expect(push(broker, keys.rogue, v2, "2", key_id="rogue"), "unknown_key")
        expect(push(broker, keys.ops, v2, "2", now=time.time() - 7200), "expired")  # expired an hour ago
        expect(push(broker, keys.ops, v2, "1"), "not_newer")
        # aimed at dev9 but (mis)delivered to dev1's topic
        stray = sign_manifest(build_manifest(model_info(v2), name="fixed", version="2", devices=["dev9"]),
                              keys.ops, "ops")
        c = connect(broker.host, broker.port)
        try:
            c.publish(update_topic("edge", device="dev1"), json.dumps(stray), qos=1).wait_for_publish(5)
        finally:
            c.disconnect()
            c.loop_stop()
        expect(PushResult(stray), "not_for_this_device")

        # models that arrive whole but are bad: refused by the static checks (nothing installed)
        fix = {"width": BAD_SIZE, "height": BAD_SIZE, "labels": list(BAD_LABELS), "decoder": "yolov8"}
        expect(push(broker, keys.ops, bad["wrong_input_shape"], "2", info_fix=fix), "io_mismatch")
        expect(push(broker, keys.ops, bad["wrong_output_layout"], "2", info_fix=fix), "io_mismatch")
        expect(push(broker, keys.ops, bad["truncated"], "2", info_fix=fix), "onnx_invalid")
        expect(push(broker, keys.ops, bad["checker_fails"], "2", info_fix=fix), "onnx_invalid")

        # NaN outputs pass the static checks and fail the smoke inference
        res = push(broker, keys.ops, bad["nan_outputs"], "2", info_fix=fix)
        st = rig.wait_state(res.manifest["id"], TERMINAL, timeout=15)
        assert (st["state"], st["error"]) == ("failed", "non_finite_output"), st
        assert squeeze(s["state"] for s in rig.states(res.manifest["id"])) == [*FLOW[:5], "failed"]
        state = store_state(rig.models_dir)
        assert state.get("active") is None and state.get("trial") is None
        n = len(rig.col.messages)
        assert {d["model"]["version"] for d in rig.wait_dets(3, since=n)} == {"1"}
        # A model that failed before serving leaves the store exactly as it was.
        assert versions_snapshot(rig.models_dir) == before
        assert "fixed-2" not in (state.get("active"), state.get("previous"), state.get("last_good"))
        assert rig.agent is not None and rig.agent.proc.poll() is None
    finally:
        rig.close()


# ---- 4. health window ---------------------------------------------------------------------------

def test_slow_model_fails_its_health_window_and_rolls_back(tmp_path: Path, broker: Broker, keys: Keys,
                                                           v1: Path) -> None:
    # ~500 ms per frame: ~4 frames in the 2 s window, too few to judge fps on their own, where the
    # old model's 20 fps predicts 40 (a model this slow was once kept: CI, 2026-12-03); the smoke
    # test's budget leaves room for a loaded machine (its speed is not what this test is about)
    slow = calibrated_slow_model(tmp_path / "slow.onnx", "2", 500.0)
    rig = Rig(tmp_path, broker, keys, v1, latency_budget_ms=3000).start()
    try:
        rig.wait_ready()
        rig.wait_dets(20)
        res = push(broker, keys.ops, slow, "2", chunk_size=1024)
        mid = res.manifest["id"]
        st = rig.wait_state(mid, ("rolled_back", "failed"), timeout=30)
        assert st["state"] == "rolled_back", st
        assert st["error"] == "health" and "fps fell" in st["detail"], st
        assert squeeze(s["state"] for s in rig.states(mid)) == [*FLOW, "rolled_back"]
        assert st["restored"] is None  # nothing installed before: back to the configured model
        rig.wait(lambda m: bool(rig.events("model_activated")) and bool(rig.events("model_rolled_back")))
        n = len(rig.col.messages)
        dets = rig.wait_dets(10, since=n)
        assert {d["model"]["version"] for d in dets[2:]} == {"1"}
        assert squeeze(d["model"]["version"] for d in rig.dets()) == ["1", "2", "1"]
        assert store_state(rig.models_dir)["active"] is None
        assert "fixed-2" in store_state(rig.models_dir)["bad"]
    finally:
        rig.close()


def test_garbage_during_a_health_window_leaves_the_served_model_and_the_rollback_retained(
        tmp_path: Path, broker: Broker, keys: Keys, v1: Path) -> None:
    """Issue 16, point 10: `not json` on the update topic right after a slow model goes active.

    The retained model/state must end saying what serves (v1 again, after the rollback), with the
    rollback as the last attempt and the refusal beside it; `fleet status` shows the same."""
    from agent.fleet.status import collect_status, format_table

    slow = calibrated_slow_model(tmp_path / "slow.onnx", "2")  # ~250 ms per frame: ~4 fps against 20
    rig = Rig(tmp_path, broker, keys, v1, latency_budget_ms=1000).start()
    try:
        rig.wait_ready()
        rig.wait_dets(20)
        res = push(broker, keys.ops, slow, "2", chunk_size=1024, wait_s=0)
        mid = res.manifest["id"]
        rig.wait_state(mid, ("active", "failed"), timeout=30)
        c = connect(broker.host, broker.port)
        try:
            c.publish(update_topic("edge", device="dev1"), b"not json", qos=1).wait_for_publish(5)
        finally:
            c.disconnect()
            c.loop_stop()
        st = rig.wait_state(mid, ("rolled_back", "failed"), timeout=30)
        assert st["state"] == "rolled_back", st
        n = len(rig.col.messages)
        assert {d["model"]["version"] for d in rig.wait_dets(10, since=n)[2:]} == {"1"}
        time.sleep(0.5)

        late = Collector(broker.host, broker.port, ["edge/dev1/model/state"])
        try:
            late.wait_for(lambda m: len(m) >= 1)
            final = payloads(late.messages, "/model/state")[-1]
        finally:
            late.close()
        # what serves, never the refusal over it
        assert (final["state"], final["name"], final["version"]) == ("rolled_back", "fixed", "1"), final
        attempt = final["last_attempt"]
        assert (attempt["state"], attempt["version"], attempt["manifest_id"], attempt["error"]) == \
            ("rolled_back", "2", mid, "health"), final
        assert final["last_refused"]["error"] == "malformed", final
        rows = collect_status(broker.host, broker.port, "edge", timeout=3)
        table = format_table(rows).splitlines()
        assert "fixed:1" in table[1] and "rolled_back" in table[1] and "malformed" in table[1], table
        assert "failed" not in table[1], table
    finally:
        rig.close()


# ---- 5. crashes in the middle of an update ------------------------------------------------------

def test_sigkill_at_each_step_of_an_update_leaves_a_complete_model(tmp_path: Path, broker: Broker, keys: Keys,
                                                                   v1: Path) -> None:
    rig = Rig(tmp_path, broker, keys, v1, download_timeout_s=2).start()
    served = "1"
    try:
        rig.wait_ready()
        # (how to time the kill, model anchors (size), chunk size)
        plan: list[tuple[str, int, int]] = [
            # ~98 KB in 97 chunks: killed by the pusher at 50 % sent; the rest waits in the broker for the
            # agent's session and the restarted agent resumes from its chunk bitmap.
            ("download-half", 4096, 1024),
            ("download-start", 4096, 1024),  # killed at the first `downloading` state
            ("verifying", 16, 256),
            ("building", 16, 256),
            ("validating", 16, 256),
            # inside the health window: the restart rolls the trial back and says so on model/state.
            ("active", 16, 256),
        ]
        for i, (point, anchors, chunk) in enumerate(plan):
            version = str(i + 2)
            model = make_model(tmp_path / f"m{version}.onnx", version, score=0.5 + 0.05 * i, anchors=anchors)
            mark = len(rig.col.messages)
            killed = {"done": False}

            def kill_now(killed: dict[str, bool] = killed) -> None:
                if not killed["done"]:
                    killed["done"] = True
                    rig.kill()

            def on_progress(done: int, total: int, point: str = point) -> None:
                if point == "download-half" and done >= total // 2:
                    kill_now()

            want = {"download-start": "downloading"}.get(point, point)

            def watch(m: list[Msg], want: str = want, mark: int = mark) -> bool:
                return any(s.get("state") == want for s in update_records(payloads(m[mark:], "/model/state")))

            if point == "download-half":
                push(broker, keys.ops, model, version, chunk_size=chunk, progress=on_progress, wait_s=0)
            else:
                t = threading.Thread(target=push, args=(broker, keys.ops, model, version),
                                     kwargs={"chunk_size": chunk, "wait_s": 0}, daemon=True)
                t.start()
                rig.wait(watch, timeout=20)
                kill_now()
                t.join(20)
            assert killed["done"], point
            assert rig.agent is not None and rig.agent.proc.returncode == -signal.SIGKILL

            rig.start()
            rig.wait_ready()
            # not stuck: the last retained state is final (a resumed transfer without chunks fails)
            def settled(m: list[Msg], mark: int = mark, version: str = version) -> bool:
                sts = rig.states(since=mark, version=version)
                return bool(sts) and sts[-1]["state"] in TERMINAL

            rig.wait(settled, timeout=20)
            time.sleep(0.3)
            last = rig.states(since=mark, version=version)[-1]
            assert last["state"] in TERMINAL, (point, last)
            # serving a complete model: v-old or v-new, and the store agrees with what serves
            n = len(rig.col.messages)
            now_serving = {d["model"]["version"] for d in rig.wait_dets(5, since=n)}
            assert len(now_serving) == 1 and now_serving <= {served, version}, (point, now_serving, served)
            served = now_serving.pop()
            if point == "download-half":
                assert (last["state"], last["version"], served) == ("active", version, version), last
            if point == "active":
                assert (last["state"], last["error"]) == ("rolled_back", "restart_during_trial"), last
            print(f"kill at {point}: model/state ends {last['state']} {last.get('version')} {last.get('error')}; "
                  f"serving v{served}")
            state = store_state(rig.models_dir)
            for name in sorted((rig.models_dir / "versions").iterdir()):
                man = json.loads((name / "manifest.json").read_text())["model"]
                assert hashlib.sha256((name / "model.onnx").read_bytes()).hexdigest() == man["sha256"], name
            assert not list((rig.models_dir / "staging").iterdir())
            active = state.get("active")
            assert (active or "fixed-1") == f"fixed-{served}", (point, state, served)
            # wait out a health window still running (a resumed update that reached `active`)
            if last["state"] == "active" and last.get("version") == served and served == version:
                def kept(m: list[Msg], v: str = version) -> bool:
                    return any(e.get("version") == v for e in rig.events("model_kept"))

                rig.wait(kept, timeout=10)
    finally:
        rig.close()
