#!/usr/bin/env python3
"""GPU machine checks for the engine layer (see shared/gpu/README.md), in one call:

1. CUDA memory layer (agent.engines.cuda): pinned -> device -> pinned round trip, event timing.
2. ONNX Runtime CUDA EP on MODEL: session.run with numpy, IO binding (input and output on the
   GPU), and IO binding fed from an agent.engines.cuda DeviceBuffer; median / p99 over --runs,
   max relative difference vs the CPU EP.
3. Engine cache round trip for the CUDA EP: build (optimised model saved), hit, outputs equal.

usage: PYTHONPATH=/tmp/site python3 scripts/gpu_check.py [MODEL] [--runs 200]
Without MODEL a synthetic 640x640 conv net is generated. Prints a short table last; writes
$OUT/gpu_check.json (or ./gpu_check.json when OUT is not set). Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_model(path: Path, size: int = 640) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, ch = [], [], "images", 3
    for i, out_ch in enumerate((16, 32, 64, 64, 128, 128)):
        w = numpy_helper.from_array(rng.normal(0, (2 / (ch * 9)) ** 0.5, (out_ch, ch, 3, 3)).astype(np.float32),
                                    f"w{i}")
        b = numpy_helper.from_array(np.zeros(out_ch, np.float32), f"b{i}")
        inits += [w, b]
        stride = 2 if i % 2 == 0 else 1
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        nodes.append(helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]))
        nodes.append(helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"]))  # SiLU, as in YOLO
        prev, ch = f"a{i}", out_ch
    nodes.append(helper.make_node("Identity", [prev], ["output0"]))
    out = size // 8
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 [1, 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, ch, out, out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "n": len(samples_ms)}


def check_cuda_layer() -> dict[str, Any]:
    from agent.engines import cuda

    n = cuda.device_count()
    if n == 0:
        return {"ok": False, "error": "no CUDA device"}
    shape = (1, 3, 640, 640)
    src = np.random.default_rng(1).random(shape, dtype=np.float32)
    with cuda.Stream() as stream, cuda.PinnedBuffer(shape, np.float32) as h_in, \
            cuda.PinnedBuffer(shape, np.float32) as h_out, cuda.DeviceBuffer(src.nbytes) as dev, \
            cuda.Event() as e0, cuda.Event() as e1, cuda.Event() as e2:
        np.copyto(h_in.array, src)
        times_htod, times_dtoh = [], []
        for _ in range(50):
            e0.record(stream)
            cuda.copy_htod_async(dev, h_in, stream)
            e1.record(stream)
            cuda.copy_dtoh_async(h_out, dev, stream)
            e2.record(stream)
            stream.synchronize()
            times_htod.append(e1.elapsed_ms(e0))
            times_dtoh.append(e2.elapsed_ms(e1))
        equal = bool(np.array_equal(h_out.array, src))
    gbps = src.nbytes / (float(np.median(times_htod)) * 1e-3) / 1e9
    return {"ok": equal, "devices": n, "bytes": int(src.nbytes), "htod": stats(times_htod), "dtoh": stats(times_dtoh),
            "htod_gb_s": gbps, "freed": bool(dev.closed and h_in.closed and stream.closed)}


def ort_session(model: Path, providers: list[str], optimized_out: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(model), sess_options=so, providers=providers)


def timed(fn: Any, runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def rel_diff(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs": float(d.max()), "max_rel_to_range": float(d.max() / max(np.abs(ref).max(), 1e-12)),
            "max_rel_elementwise": float((d / (np.abs(ref) + 1e-3)).max())}


def check_ort(model: Path, runs: int) -> dict[str, Any]:
    import onnxruntime as ort

    res: dict[str, Any] = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res["error"] = "CUDAExecutionProvider not available (install onnxruntime-gpu into /tmp/site)"
        return res
    cpu = ort_session(model, ["CPUExecutionProvider"])
    gpu = ort_session(model, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    res["providers_in_use"] = gpu.get_providers()
    inp = gpu.get_inputs()[0]
    out_name = gpu.get_outputs()[0].name
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    ref = cpu.run([out_name], {inp.name: x})[0]
    res["cpu_ep"] = stats(timed(lambda: cpu.run([out_name], {inp.name: x}), max(20, runs // 4), warmup=5))

    y = gpu.run([out_name], {inp.name: x})[0]
    res["diff_numpy_vs_cpu"] = rel_diff(y, ref)
    res["cuda_numpy"] = stats(timed(lambda: gpu.run([out_name], {inp.name: x}), runs))

    io = gpu.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    io.bind_ortvalue_input(inp.name, x_dev)
    io.bind_output(out_name, "cuda", 0)
    gpu.run_with_iobinding(io)
    res["diff_iobinding_vs_cpu"] = rel_diff(io.copy_outputs_to_cpu()[0], ref)
    res["cuda_iobinding"] = stats(timed(lambda: gpu.run_with_iobinding(io), runs))

    # the agent's own CUDA layer feeding ORT: pinned frame -> DeviceBuffer (our stream) -> bound input
    from agent.engines import cuda

    with cuda.Stream() as stream, cuda.PinnedBuffer(tuple(shape), np.float32) as pinned, \
            cuda.DeviceBuffer(x.nbytes) as dev:
        np.copyto(pinned.array, x)
        io2 = gpu.io_binding()
        io2.bind_input(inp.name, "cuda", 0, np.float32, shape, dev.ptr)
        io2.bind_output(out_name, "cuda", 0)

        def step() -> None:
            cuda.copy_htod_async(dev, pinned, stream)
            stream.synchronize()
            gpu.run_with_iobinding(io2)

        step()
        res["diff_agent_cuda_vs_cpu"] = rel_diff(io2.copy_outputs_to_cpu()[0], ref)
        res["cuda_iobinding_agent_buffers_incl_htod"] = stats(timed(step, runs))
    return res


def check_cache(model: Path) -> dict[str, Any]:
    """CUDA EP engine cache round trip: through agent.engines.factory when pydantic is there,
    otherwise EngineCache directly with the same build / load steps."""
    import onnxruntime as ort

    from agent.cache.store import EngineCache

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"ok": False, "error": "CUDAExecutionProvider not available"}
    x = None
    with tempfile.TemporaryDirectory(prefix="gpu-check-cache-") as tmp:
        events: list[str] = []
        cache = EngineCache(Path(tmp), 1 << 30, on_event=lambda n, d: events.append(n))
        try:
            from agent.config import EngineConfig, ProviderConfig
            from agent.engines.factory import create_engine
        except ImportError as exc:
            via = f"EngineCache directly (factory needs {exc.name})"
            fields = {"model_sha256": "gpu-check", "backend": "onnxruntime",
                      "providers": "CUDAExecutionProvider,CPUExecutionProvider"}

            def build(p: Path) -> None:
                ort_session(model, ["CUDAExecutionProvider", "CPUExecutionProvider"], optimized_out=p)

            def load(p: Path) -> Any:
                return ort_session(p, ["CUDAExecutionProvider", "CPUExecutionProvider"])

            outs, times, built = [], [], []
            for _ in range(2):
                t0 = time.perf_counter()
                sess, entry = cache.get_or_build(fields, build, load)
                times.append((time.perf_counter() - t0) * 1e3)
                built.append(entry.built)
                inp = sess.get_inputs()[0]
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
                x = np.random.default_rng(3).random(shape, dtype=np.float32) if x is None else x
                outs.append(sess.run(None, {inp.name: x})[0])
            key = entry.key
        else:
            via = "agent.engines.factory.create_engine"
            cfg = EngineConfig(providers=[ProviderConfig(name="CUDAExecutionProvider"),
                                          ProviderConfig(name="CPUExecutionProvider")])
            outs, times, built = [], [], []
            for _ in range(2):
                t0 = time.perf_counter()
                engine = create_engine(model, cfg, cache)
                times.append((time.perf_counter() - t0) * 1e3)
                built.append(not engine.info.extra.get("engine_cached", False))
                spec = engine.input_spec
                x = np.random.default_rng(3).random(spec.shape, dtype=np.float32) if x is None else x
                outs.append(engine.infer(x)[0])
                key = engine.info.engine_key
                events.append("providers=" + ",".join(engine.info.providers))
                engine.close()
        states = [i.state for i in cache.verify()]
    same = bool(np.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5))
    return {"ok": built == [True, False] and same and states == ["ok"], "via": via, "built": built,
            "first_ms": times[0], "second_ms": times[1], "outputs_equal": same, "states": states,
            "key": key[:16], "events": events}


def check_agent_engine(model: Path, runs: int) -> dict[str, Any]:
    """The agent's own OnnxRuntimeEngine on the CUDA EP, IO binding on and off, vs the CPU EP."""
    from agent.config import EngineConfig, ProviderConfig
    from agent.engines.onnxruntime import OnnxRuntimeEngine

    cuda = [ProviderConfig(name="CUDAExecutionProvider")]
    x = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
    cpu = OnnxRuntimeEngine(model, EngineConfig())
    cpu.load()
    if cpu.input_spec.shape != x.shape:
        x = np.random.default_rng(1).random(cpu.input_spec.shape, dtype=np.float32)
    ref = cpu.infer(x)[0]
    out: dict[str, Any] = {"ok": True}
    for io in (True, False):
        eng = OnnxRuntimeEngine(model, EngineConfig(providers=cuda, io_binding=io, require_gpu=True))
        eng.load()
        key = "agent_engine_iobinding" if io else "agent_engine_run"
        out[key] = stats(timed(lambda e=eng: e.infer(x), runs))
        out[key]["io_binding"] = eng.info.extra.get("io_binding")
        out[f"diff_{key}_vs_cpu"] = rel_diff(eng.infer(x)[0], ref)
        out["ok"] = out["ok"] and out[f"diff_{key}_vs_cpu"]["max_rel_to_range"] < 1e-3
        eng.close()
    cpu.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="ONNX model (default: a synthetic 640x640 conv net)")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA / cuDNN libraries of the machine's pip packages
    out_dir = Path(os.environ.get("OUT") or ".")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model = Path(args.model) if args.model else synthetic_model(work / "synthetic.onnx")
    report: dict[str, Any] = {"host": platform.node(), "python": sys.version.split()[0], "model": str(model),
                              "runs": args.runs}
    for name, fn in (("cuda_layer", check_cuda_layer), ("ort", lambda: check_ort(model, args.runs)),
                     ("cache", lambda: check_cache(model)),
                     ("agent_engine", lambda: check_agent_engine(model, args.runs))):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    rows = []
    cl, o, c = report["cuda_layer"], report["ort"], report["cache"]
    if "htod" in cl:
        rows.append(("cuda layer HtoD 4.9 MB", f"{cl['htod']['median_ms']:.3f}", f"{cl['htod']['p99_ms']:.3f}",
                     f"{cl['htod_gb_s']:.1f} GB/s, round trip {'equal' if cl['ok'] else 'DIFFERENT'}"))
    for k, label in (("cpu_ep", "ORT CPU EP"), ("cuda_numpy", "ORT CUDA EP, numpy in/out"),
                     ("cuda_iobinding", "ORT CUDA EP, IO binding"),
                     ("cuda_iobinding_agent_buffers_incl_htod", "ORT CUDA EP, agent buffers + HtoD")):
        if k in o:
            diff = {"cuda_numpy": "diff_numpy_vs_cpu", "cuda_iobinding": "diff_iobinding_vs_cpu",
                    "cuda_iobinding_agent_buffers_incl_htod": "diff_agent_cuda_vs_cpu"}.get(k)
            note = f"max rel {o[diff]['max_rel_to_range']:.2e}" if diff and diff in o else ""
            rows.append((label, f"{o[k]['median_ms']:.3f}", f"{o[k]['p99_ms']:.3f}", note))
    ae = report["agent_engine"]
    for k, label in (("agent_engine_run", "agent engine, CUDA EP, run()"),
                     ("agent_engine_iobinding", "agent engine, CUDA EP, IO binding")):
        if k in ae:
            rows.append((label, f"{ae[k]['median_ms']:.3f}", f"{ae[k]['p99_ms']:.3f}",
                         f"max rel {ae[f'diff_{k}_vs_cpu']['max_rel_to_range']:.2e} ({ae[k]['io_binding']})"))
    if "first_ms" in c:
        rows.append(("cache build / hit (CUDA EP)", f"{c['first_ms']:.0f} / {c['second_ms']:.0f}", "",
                     f"{'ok' if c['ok'] else 'FAILED'} via {c['via']}"))
    print(f"\nmodel {model.name}, {args.runs} runs, onnxruntime {o.get('onnxruntime', '?')}")
    print(f"{'path':38} {'median ms':>10} {'p99 ms':>8}  note")
    for r in rows:
        print(f"{r[0]:38} {r[1]:>10} {r[2]:>8}  {r[3]}")
    for name in ("cuda_layer", "ort", "cache", "agent_engine"):
        if report[name].get("error"):
            print(f"{name}: {report[name]['error']}")
    print(f"json: {out_dir / 'gpu_check.json'}")
    ok = cl.get("ok") and "error" not in o and c.get("ok") and ae.get("ok")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
