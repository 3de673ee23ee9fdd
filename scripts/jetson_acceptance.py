#!/usr/bin/env python3
"""TensorRT acceptance checks on a real Jetson (issue 6 item 7), in one command:

    python3 scripts/jetson_acceptance.py [MODEL] [--calib DIR] [--runs 200] [--out DIR]

1. fingerprint: L4T, TensorRT, CUDA, GPU read and trustworthy for the tensorrt backend;
2. per precision (fp32, fp16, and int8 when --calib is given: Q/DQ model made here): build the
   native TensorRT engine through the cache (time), load it again (cache hit, time), check outputs
   against ONNX Runtime's CPU EP where onnxruntime is installed, median / p99 latency;
3. a damaged engine (truncated) is quarantined and rebuilt; `cache verify` is all ok after.
Writes DIR/jetson_acceptance.json (default: ./jetson-acceptance-<time>), prints a table, exit 1 on
any failure. Without MODEL a synthetic 640x640 conv net is used (from scripts/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    from gpu_check import rel_diff, stats, synthetic_model

    from agent.cache.store import ENGINE_FILE, EngineCache
    from agent.config import EngineConfig
    from agent.engines.factory import create_engine
    from agent.engines.fingerprint import is_trustworthy, read_fingerprint
    from agent.engines.tensorrt import tensorrt_available

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--calib", help="folder of calibration images: also test int8 (Q/DQ)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=f"jetson-acceptance-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"checks": []}

    def record(name: str, ok: bool, **data: Any) -> None:
        report["checks"].append({"name": name, "ok": ok, **data})
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {json.dumps(data, default=str)[:160]}", flush=True)

    fp = read_fingerprint("tensorrt", ["TensorRT"])
    report["fingerprint"] = fp
    record("fingerprint trustworthy", is_trustworthy(fp, "tensorrt", ["TensorRT"]),
           **{k: fp[k] for k in ("l4t", "tensorrt", "cuda_runtime", "gpu_name", "gpu_cc")})
    if tensorrt_available() is None:
        record("tensorrt installed", False, hint="JetPack's python3-libnvinfer")
        (out / "jetson_acceptance.json").write_text(json.dumps(report, indent=1, default=str))
        return 1
    model = Path(args.model) if args.model else synthetic_model(out / "synthetic.onnx")
    cache = EngineCache(out / "cache", 8 << 30)
    try:
        import onnxruntime as ort

        cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception:
        cpu = None
    variants = [("fp32", model), ("fp16", model)]
    if args.calib:
        from agent.engines.quantize import quantize_int8

        variants.append(("int8", quantize_int8(model, out / "model.int8.qdq.onnx", Path(args.calib), "tensorrt")))
    for precision, path in variants:
        try:
            cfg = EngineConfig(backend="tensorrt", precision=precision)
            t0 = time.perf_counter()
            engine = create_engine(path, cfg, cache, progress=lambda f, n: print(f"  {f:4.0%} {n}", end="\r"))
            build_s = time.perf_counter() - t0
            key = engine.info.engine_key
            engine.close()
            t0 = time.perf_counter()
            engine = create_engine(path, cfg, cache)
            load_s = time.perf_counter() - t0
            spec = engine.input_spec
            x = np.random.default_rng(0).random(spec.shape, dtype=np.float32)
            key2 = engine.info.engine_key
            y = engine.infer(x)[0]
            diff = rel_diff(y, cpu.run(None, {cpu.get_inputs()[0].name: x})[0]) if cpu is not None else {}
            for _ in range(20):
                engine.infer(x)
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                engine.infer(x)
                times.append((time.perf_counter() - t) * 1e3)
            engine.close()
            tol = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1}[precision]
            ok = key == key2 and (not diff or diff["max_rel_to_range"] < tol)
            record(f"tensorrt {precision}", ok, build_s=round(build_s, 1), load_s=round(load_s, 2),
                   latency=stats(times), diff_vs_cpu=diff, key=key[:16])
        except Exception as exc:
            record(f"tensorrt {precision}", False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    # damaged engine -> quarantined -> rebuilt
    try:
        events: list[str] = []
        cache2 = EngineCache(cache.root, 8 << 30, on_event=lambda n, d: events.append(n))
        engine = create_engine(model, EngineConfig(backend="tensorrt", precision="fp16"), cache2)
        engine_file = cache2.root / engine.info.engine_key / ENGINE_FILE
        engine.close()
        engine_file.write_bytes(engine_file.read_bytes()[:4096])
        engine = create_engine(model, EngineConfig(backend="tensorrt", precision="fp16"), cache2)
        engine.close()
        states = [i.state for i in cache2.verify()]
        record("damaged engine quarantined and rebuilt", "engine_quarantined" in events and "engine_built" in events
               and set(states) == {"ok"}, events=events, states=states)
    except Exception as exc:
        record("damaged engine quarantined and rebuilt", False, error=f"{type(exc).__name__}: {exc}")
    (out / "jetson_acceptance.json").write_text(json.dumps(report, indent=1, default=str))
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    n = len(report["checks"])
    print(f"\n{n - len(failed)}/{n} passed; report {out / 'jetson_acceptance.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
