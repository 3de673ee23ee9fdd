#!/usr/bin/env python3
"""TensorRT acceptance checks on a real Jetson Orin, in one command:

    python3 scripts/jetson_acceptance.py [MODEL] [--calib DIR] [--runs 200] [--out DIR]

Data flow: fingerprint (L4T, TensorRT, system CUDA, GPU name / CC / SM count, board) -> per
variant (fp32, fp16, int8 from a Q/DQ model quantized here, and fp16 on each DLA core the device
has): build the native engine through the engine cache (timed), load it again (a cache hit,
timed), run it on a real frame and compare with ONNX Runtime's CPU EP on the same ONNX model with
a tolerance that fits the precision, time `--runs` inferences -> an engine damaged past the
cache's size and checksum checks (its first 16 bytes, TensorRT's plan header, zeroed; same length;
the checksum in meta.json rewritten), so only TensorRT's deserialize can refuse it: it must be
quarantined and rebuilt -> `cache verify` all ok -> DIR/jetson_acceptance.json and a Markdown
table (stdout and DIR/jetson_acceptance.md) to paste into the README. Exit 1 on any failure.

Without MODEL the bundled demo model is used, calibrated on frames of the bundled sample video
(--calib DIR: a folder of images instead). Tolerances are max |TensorRT - CPU| / max |CPU|:
fp32 1e-3 (TF32 is off in fp32 engines), fp16 2e-2, DLA fp16 3e-2, int8 5e-2 (against the CPU EP
running the same Q/DQ model). These are first estimates, to be replaced by what real Orins show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "dla-fp16": 3e-2, "int8": 5e-2}
FINGERPRINT_FIELDS = ("board", "l4t", "tensorrt", "cuda_system", "gpu_name", "gpu_cc", "gpu_sm_count")


@dataclass(frozen=True)
class Variant:
    name: str  # fp32 | fp16 | int8 | dla0-fp16 ...
    precision: str
    model: Path  # what TensorRT builds and the CPU EP runs as the reference
    tolerance: float
    dla_core: int | None = None


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (0 for identical arrays)."""
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return float(d.max() / max(float(np.abs(ref).max()), 1e-12))


def latency(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def variants(model: Path, qdq: Path | None, dla_cores: int) -> list[Variant]:
    out = [Variant("fp32", "fp32", model, TOLERANCE["fp32"]), Variant("fp16", "fp16", model, TOLERANCE["fp16"])]
    if qdq is not None:
        out.append(Variant("int8", "int8", qdq, TOLERANCE["int8"]))
    out += [Variant(f"dla{c}-fp16", "fp16", model, TOLERANCE["dla-fp16"], c) for c in range(dla_cores)]
    return out


def calibration_frames(model: Path, calib: Path | None, n: int = 32) -> list[np.ndarray]:
    """BGR frames: a folder of images, the bundled sample video, or (a synthetic model) noise."""
    from agent.config import DEMO_VIDEO
    from agent.engines.quantize import load_frames

    if calib is not None:
        return load_frames(calib, n)
    try:
        import cv2

        cap = cv2.VideoCapture(str(DEMO_VIDEO))
        frames: list[np.ndarray] = []
        while len(frames) < n:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(img)
        cap.release()
        if frames:
            return frames
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(n)]


def damage_past_size_check(cache: Any, key: str) -> Path:
    """Zero the plan's first 16 bytes (TensorRT's header: magic tag, version), keep the length,
    and rewrite the checksum in meta.json: the cache's size and sha256 checks pass, so only
    TensorRT's deserialize_cuda_engine can refuse it."""
    from agent.cache.keys import file_sha256
    from agent.cache.store import ENGINE_FILE, META_FILE

    path = cache.root / key / ENGINE_FILE
    data = bytearray(path.read_bytes())
    size = len(data)
    data[:16] = bytes(16) if any(data[:16]) else b"\xff" * 16
    path.write_bytes(bytes(data))
    meta_path = cache.root / key / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["engine_sha256"] = file_sha256(path)
    meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    assert path.stat().st_size == size == meta["size"]
    return path


def check_variant(v: Variant, cache: Any, x_for: Callable[[tuple[int, ...]], np.ndarray], runs: int) -> dict[str, Any]:
    import onnxruntime as ort

    from agent.config import EngineConfig
    from agent.engines.factory import create_engine

    cfg = EngineConfig(backend="tensorrt", precision=v.precision, dla_core=v.dla_core)
    t0 = time.perf_counter()
    engine = create_engine(v.model, cfg, cache)
    build_s = time.perf_counter() - t0
    key = engine.info.engine_key
    built = engine.info.extra.get("engine_cached") is False
    engine.close()
    t0 = time.perf_counter()
    engine = create_engine(v.model, cfg, cache)
    load_s = time.perf_counter() - t0
    try:
        hit = engine.info.extra.get("engine_cached") is True and engine.info.engine_key == key
        x = x_for(engine.input_spec.shape)
        got = engine.infer(x)
        cpu = ort.InferenceSession(str(v.model), providers=["CPUExecutionProvider"])
        ref = cpu.run(None, {cpu.get_inputs()[0].name: x})
        diff = max(rel_diff(g, r) for g, r in zip(got, ref, strict=True))
        for _ in range(min(20, runs)):
            engine.infer(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            engine.infer(x)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        engine.close()
    ok = built and hit and diff <= v.tolerance
    return {"name": f"tensorrt {v.name}", "ok": ok, "precision": v.precision, "dla_core": v.dla_core,
            "build_s": round(build_s, 2), "load_s": round(load_s, 3), "built_then_cached": built and hit,
            "max_diff_vs_cpu": diff, "tolerance": v.tolerance, **latency(times), "key": key[:16]}


def check_damaged(model: Path, cache_root: Path) -> dict[str, Any]:
    from agent.cache.store import EngineCache
    from agent.config import EngineConfig
    from agent.engines.factory import create_engine

    events: list[tuple[str, dict[str, Any]]] = []
    cache = EngineCache(cache_root, 8 << 30, on_event=lambda n, d: events.append((n, d)))
    cfg = EngineConfig(backend="tensorrt", precision="fp16")
    engine = create_engine(model, cfg, cache)
    key = engine.info.engine_key
    engine.close()
    damage_past_size_check(cache, key)
    events.clear()
    engine = create_engine(model, cfg, cache)
    engine.close()
    names = [n for n, _ in events]
    reasons = [str(d.get("reason", "")) for n, d in events if n == "engine_quarantined"]
    refused_by_trt = len(reasons) == 1 and "cannot deserialize" in reasons[0]
    states = sorted({i.state for i in cache.verify()})
    ok = refused_by_trt and "engine_built" in names and states == ["ok"]
    return {"name": "damaged engine refused by TensorRT, quarantined, rebuilt", "ok": ok, "events": names,
            "quarantine_reason": reasons[0] if reasons else "", "cache_states": states}


def markdown(report: dict[str, Any]) -> str:
    fp = report["fingerprint"]
    lines = [f"Seen {report['date']} on {fp.get('board', '?')} (L4T {fp.get('l4t')}, TensorRT {fp.get('tensorrt')}, "
             f"CUDA {fp.get('cuda_system')}, GPU {fp.get('gpu_name')} CC {fp.get('gpu_cc')} with "
             f"{fp.get('gpu_sm_count')} SMs), commit {report['commit']}, model {report['model']}:", "",
             "| check | build s | load s | median ms | p99 ms | max diff / range | tolerance | result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["checks"]:
        if "max_diff_vs_cpu" in c:
            lines.append(f"| {c['name']} | {c['build_s']} | {c['load_s']} | {c['median_ms']} | {c['p99_ms']} | "
                         f"{c['max_diff_vs_cpu']:.2e} | {c['tolerance']:.0e} | {'PASS' if c['ok'] else 'FAIL'} |")
        else:
            detail = c.get("quarantine_reason") or c.get("error") or c.get("hint") or ""
            lines.append(f"| {c['name']} | | | | | {str(detail)[:60]} | | {'PASS' if c['ok'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    from agent.cache.store import EngineCache
    from agent.config import DEMO_MODEL
    from agent.engines.fingerprint import is_trustworthy, read_fingerprint
    from agent.engines.trt_common import logger, tensorrt_available
    from agent.vision.preprocess import Letterboxer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="ONNX model (default: the bundled demo model)")
    ap.add_argument("--calib", type=Path, help="folder of calibration images for int8 (default: the sample video)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 (Q/DQ) variant")
    ap.add_argument("--out", type=Path, default=Path(f"jetson-acceptance-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else DEMO_MODEL
    fp = read_fingerprint("tensorrt", ["TensorRT"], fresh=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _commit(),
                              "model": model.name, "fingerprint": fp, "checks": []}

    def record(row: dict[str, Any]) -> None:
        report["checks"].append(row)
        shown = {k: v for k, v in row.items() if k not in ("name", "ok", "trace")}
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['name']}  {json.dumps(shown, default=str)[:200]}", flush=True)

    record({"name": "fingerprint read (key portable to identical devices)",
            "ok": is_trustworthy(fp, "tensorrt", ["TensorRT"]), **{k: fp.get(k) for k in FINGERPRINT_FIELDS}})
    if tensorrt_available() is None:
        record({"name": "tensorrt installed", "ok": False, "hint": "apt-get install python3-libnvinfer (JetPack)"})
    else:
        import tensorrt as trt

        dla_cores = int(trt.Runtime(logger()).num_DLA_cores)
        frames = calibration_frames(model, args.calib)
        qdq = None
        if not args.no_int8:
            from agent.engines.quantize import quantize_int8

            try:
                qdq = quantize_int8(model, out / f"{model.stem}.int8.qdq.onnx", frames, "tensorrt")
            except Exception as exc:
                record({"name": "tensorrt int8", "ok": False, "error": f"quantization: {type(exc).__name__}: {exc}"})

        def x_for(shape: tuple[int, ...]) -> np.ndarray:
            return Letterboxer(shape)(frames[0])[0].copy()  # a real frame, as the agent feeds it

        cache = EngineCache(out / "cache", 8 << 30)
        for v in variants(model, qdq, dla_cores):
            try:
                record(check_variant(v, cache, x_for, args.runs))
            except Exception as exc:
                record({"name": f"tensorrt {v.name}", "ok": False, "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()})
        try:
            record(check_damaged(model, out / "cache"))
        except Exception as exc:
            record({"name": "damaged engine refused by TensorRT, quarantined, rebuilt", "ok": False,
                    "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    table = markdown(report)
    (out / "jetson_acceptance.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "jetson_acceptance.md").write_text(table, encoding="utf-8")
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    n = len(report["checks"])
    print("\n" + table)
    print(f"{n - len(failed)}/{n} passed; report {out / 'jetson_acceptance.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
