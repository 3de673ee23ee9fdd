"""Measure a model update on this machine: swap latency, frames across the swap, chunked-MQTT throughput.

    python scripts/measure_update.py [--source synthetic:640x480@30 | VIDEO] [--large-mb 20] [--json OUT]

Starts mosquitto on a free loopback port and one real agent (CPU execution provider), then pushes
through the operators' code path (`agent.fleet.push`, as `edge-agent fleet push-model` does):

1. v2 of the bundled demo model (`agent/data/demo/model.onnx` -> `model_v2.onnx`; when those are
   absent, tiny fixed test models, and it says so) over chunked MQTT, and reports
   - manifest publish -> first detections message carrying the new version (ms),
   - frames captured vs processed across the swap window (telemetry counters) and the detections'
     seq numbers over that window (no gap expected),
   - transfer throughput (first chunk published -> `verifying` on model/state; MB/s);
2. a large valid ONNX model (a `--large-mb` MB initializer read by a cheap Gather) as v3, for the
   transfer throughput of a realistic size on loopback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from agent.fleet.push import build_manifest, connect, model_info, push_model  # noqa: E402
from agent.updates.manifest import generate_keypair, load_private_key, sign_manifest  # noqa: E402
from agent.updates.state import record_for  # noqa: E402
from tests.support.agent_proc import AgentProcess, write_config  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.models import fixed_yolov8_model  # noqa: E402
from tests.support.mqtt import Collector, Msg  # noqa: E402

DEMO = ROOT / "agent" / "data" / "demo"
TERMINAL = ("active", "failed", "rolled_back")


def large_model(path: Path, mb: float, size: int = 64, labels: tuple[str, ...] = ("part", "dent")) -> Path:
    """A valid yolov8-layout model carrying a `mb` MB random initializer that a Gather reads."""
    n = max(1, int(mb * 1024 * 1024 / 4))
    big = np.random.default_rng(0).random(n, dtype=np.float32)
    out = np.zeros((1, 4 + len(labels), 16), np.float32)
    out[0, :4, 0] = (size / 2, size / 2, size / 4, size / 4)
    out[0, 5, 0] = 0.8
    nodes = [
        helper.make_node("Gather", ["big", "idx"], ["g"]),
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "g"], ["mg"]),
        helper.make_node("Mul", ["mg", "zero"], ["z"]),
        helper.make_node("Add", ["const", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "large",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + len(labels), 16])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(np.array(0, np.int64), "idx"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(out, "const")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = model.metadata_props.add()
    p.key, p.value = "names", repr(dict(enumerate(labels)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def payloads(msgs: list[Msg], suffix: str) -> list[tuple[float, dict[str, Any]]]:
    return [(m.at, json.loads(m.payload)) for m in msgs if m.topic.endswith(suffix) and m.payload]


class Session:
    def __init__(self, work: Path, source: str, chunk_size: int) -> None:
        self.work = work
        self.chunk_size = chunk_size
        self.broker = Broker(work).start()
        kp = generate_keypair(work / "keys", "ops")
        self.key = load_private_key(kp.private_path)
        if (DEMO / "model.onnx").is_file() and (DEMO / "model_v2.onnx").is_file():
            self.v1, self.v2, self.name, self.fallback = DEMO / "model.onnx", DEMO / "model_v2.onnx", "demo", False
        else:
            boxes = [(32.0, 32.0, 16.0, 16.0, 1, 0.8)]
            self.v1 = fixed_yolov8_model(work / "v1.onnx", boxes, labels=["part", "dent"], version="1")
            self.v2 = fixed_yolov8_model(work / "v2.onnx", [(30.0, 30.0, 16.0, 16.0, 1, 0.7)],
                                         labels=["part", "dent"], version="2")
            self.name, self.fallback = "fixed", True
        self.cfg = write_config(work / "agent.yaml", self.broker.port, self.v1, source,
                                model={"path": str(self.v1), "name": self.name, "version": "1"},
                                engine={"intra_op_threads": 0, "warmup_runs": 1},
                                mqtt={"detections_qos": 1},
                                updates={"enabled": True, "trusted_keys": {"ops": kp.public_b64},
                                         "models_dir": str(work / "models"), "health_window_s": 2})
        self.col = Collector(self.broker.host, self.broker.port, ["edge/dev1/#"])
        self.agent = AgentProcess(self.cfg)

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        try:
            self.col.wait_for(pred, timeout)
        except TimeoutError:
            raise SystemExit(f"measure_update: timed out waiting for {what}\n{self.agent.output()[-4000:]}") from None

    def push(self, model: Path, version: str) -> dict[str, Any]:
        info = model_info(model)
        signed = sign_manifest(build_manifest(info, name=self.name, version=version, devices=["dev1"],
                                              chunk_size=self.chunk_size), self.key, "ops")
        mid = signed["id"]
        first_chunk: list[float] = []

        def progress(done: int, total: int) -> None:
            if not first_chunk:
                first_chunk.append(time.monotonic())

        client = connect(self.broker.host, self.broker.port)
        try:
            t0 = time.monotonic()
            push_model(client, signed, model, progress=progress)
        finally:
            client.disconnect()
            client.loop_stop()

        def states() -> list[tuple[float, dict[str, Any]]]:
            recs = ((t, record_for(s, mid)) for t, s in payloads(self.col.messages, "/model/state"))
            return [(t, r) for t, r in recs if r is not None]  # the attempt, beside what serves

        self.wait(lambda m: any(s["state"] in TERMINAL for _, s in states()), 120, f"v{version} to finish")
        final = states()[-1][1]
        verifying = next((t for t, s in states() if s["state"] == "verifying"), None)
        transfer_s = (verifying - first_chunk[0]) if verifying is not None and first_chunk else None
        return {"manifest_id": mid, "t_publish": t0, "size": info.size, "final": final,
                "transfer_s": round(transfer_s, 3) if transfer_s is not None else None,
                "mb_per_s": round(info.size / 1e6 / transfer_s, 2) if transfer_s else None,
                "chunks": -(-info.size // self.chunk_size)}

    def close(self) -> None:
        self.agent.stop()
        self.col.close()
        self.broker.stop()


def measure(source: str, large_mb: float, chunk_size: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="measure-update-"))
    s = Session(work, source, chunk_size)
    try:
        s.wait(lambda m: any(x.topic.endswith("/telemetry") and b'"manifests"' in x.payload for x in m), 120,
               "the agent to start")
        s.wait(lambda m: len(payloads(m, "/cam0/detections")) >= 20, 60, "detections")
        tele_before = payloads(s.col.messages, "/telemetry")[-1][1]
        r2 = s.push(s.v2, "2")
        if r2["final"]["state"] != "active":
            raise SystemExit(f"measure_update: v2 did not activate: {r2['final']}")
        # let the health window run and a telemetry sample land after the swap
        s.wait(lambda m: any(e.get("event") in ("model_kept", "model_rolled_back")
                             for _, e in payloads(m, "/events")), 30, "the health window")
        n = len(s.col.messages)
        s.wait(lambda m: any(x.topic.endswith("/telemetry") for x in m[n:]), 10, "telemetry")
        tele_after = payloads(s.col.messages, "/telemetry")[-1][1]
        dets = payloads(s.col.messages, "/cam0/detections")
        first_new = next((t for t, d in dets if d["model"]["version"] == "2"), None)
        swap_ms = round((first_new - r2["t_publish"]) * 1e3, 1) if first_new is not None else None
        window = [d for t, d in dets if t >= r2["t_publish"] - 1.0]  # 1 s before the manifest .. now
        seqs = [d["seq"] for d in window]
        gaps = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        versions = [d["model"]["version"] for d in window]
        switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
        captured = tele_after["frames_in"] - tele_before["frames_in"]
        processed = tele_after["frames_processed"] - tele_before["frames_processed"]
        dropped = tele_after["frames_dropped"] - tele_before["frames_dropped"]

        big = large_model(work / "large.onnx", large_mb)
        r3 = s.push(big, "3")
        return {
            "device": "CPU (onnxruntime CPUExecutionProvider)",
            "models": {"v1": str(s.v1), "v2": str(s.v2),
                       "fallback": "fixed test models (no bundled demo model)" if s.fallback else None},
            "source": source,
            "chunk_size": chunk_size,
            "swap": {
                "manifest_to_first_v2_detection_ms": swap_ms,
                "window_frames_captured": captured, "window_frames_processed": processed,
                "window_frames_dropped": dropped,
                "window_detections": len(window), "seq_first": seqs[0] if seqs else None,
                "seq_last": seqs[-1] if seqs else None, "seq_gaps": gaps, "version_switches": switches,
            },
            "transfer_v2": {"bytes": r2["size"], "chunks": r2["chunks"],
                            "first_chunk_to_verifying_s": r2["transfer_s"], "mb_per_s": r2["mb_per_s"]},
            "transfer_large": {"bytes": r3["size"], "chunks": r3["chunks"],
                               "first_chunk_to_verifying_s": r3["transfer_s"], "mb_per_s": r3["mb_per_s"],
                               "final_state": r3["final"]["state"], "error": r3["final"].get("error")},
        }
    finally:
        s.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="synthetic:640x480@30", help="camera source (synthetic:... or a video)")
    ap.add_argument("--large-mb", type=float, default=20.0, help="size of the large model for throughput")
    ap.add_argument("--chunk-size", type=int, default=256 * 1024, help="bytes per MQTT chunk")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    r = measure(args.source, args.large_mb, args.chunk_size)
    if r["models"]["fallback"]:
        print(f"note: {r['models']['fallback']}: measured with {r['models']['v1']} -> {r['models']['v2']}")
    sw, t2, tl = r["swap"], r["transfer_v2"], r["transfer_large"]
    print(f"source {r['source']}, {r['device']}, chunk size {r['chunk_size']} B")
    print(f"manifest publish -> first v2 detection: {sw['manifest_to_first_v2_detection_ms']} ms")
    print(f"swap window: captured {sw['window_frames_captured']}, processed {sw['window_frames_processed']}, "
          f"dropped {sw['window_frames_dropped']} (telemetry); detections seq {sw['seq_first']}..{sw['seq_last']}"
          f" ({sw['window_detections']} messages), seq gaps {sw['seq_gaps']}, version switches "
          f"{sw['version_switches']}")
    print(f"v2 transfer: {t2['bytes']} B in {t2['chunks']} chunks, {t2['first_chunk_to_verifying_s']} s, "
          f"{t2['mb_per_s']} MB/s")
    print(f"large transfer: {tl['bytes'] / 1e6:.1f} MB in {tl['chunks']} chunks, "
          f"{tl['first_chunk_to_verifying_s']:.2f} s, {tl['mb_per_s']} MB/s (ended {tl['final_state']}"
          f"{' ' + tl['error'] if tl['error'] else ''})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    ok = sw["seq_gaps"] == 0 and sw["version_switches"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
