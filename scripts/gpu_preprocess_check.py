#!/usr/bin/env python3
"""GPU preprocessing and device decoding against the CPU path, on the GPU machine, in one call.

1. Letterbox: the GPU kernel's input tensor vs the CPU Letterboxer's, per frame size and input dtype
   (max absolute difference, in units of 1/255).
2. Detections on the demo video (and on the same frames scaled to 1080p): the GPU path (CUDA EP,
   GPU letterbox, candidates selected on the device, host NMS) vs the all-CPU path (CPU EP): same
   classes, boxes within 2 px, scores within 0.01; with and without CUDA graphs.
3. Time per frame of the GPU frontend alone at 1080p (wall and host CPU), and of the alternative,
   a preprocessing graph run by ONNX Runtime on the CUDA EP (resize + pad + RGB + CHW + scale),
   to choose between them by measurement.

usage: PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_preprocess_check.py [--model M ...] [--runs 300]
Writes $OUT/gpu_preprocess_check.json; prints a table last; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.bench import load_frames  # noqa: E402
from agent.config import DEMO_MODEL, DEMO_VIDEO, EngineConfig, ModelConfig, ProviderConfig  # noqa: E402
from agent.engines import cuda  # noqa: E402
from agent.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from agent.pipeline import ModelRuntime, build_runtime  # noqa: E402
from agent.vision.types import Detection  # noqa: E402

CUDA_EP = [ProviderConfig(name="CUDAExecutionProvider"), ProviderConfig(name="CPUExecutionProvider")]


SCORE = {"default": 0.25}  # models without trained weights get a lower threshold (set in main)


def runtime(model: Path, gpu: bool, cuda_graph: bool = False, preprocess: str = "gpu") -> ModelRuntime:
    if gpu:
        ecfg = EngineConfig(providers=CUDA_EP, cuda_graph=cuda_graph, preprocess=preprocess)
    else:
        ecfg = EngineConfig(preprocess="cpu")
    mcfg = ModelConfig(path=model, score_threshold=SCORE.get(model.name, SCORE["default"]))
    rt = build_runtime(OnnxRuntimeEngine(model, ecfg), mcfg, model, preprocess=ecfg.preprocess)
    rt.warmup(3)
    return rt


def device_input(rt: ModelRuntime) -> np.ndarray:
    """The engine's bound input tensor, read back from the device."""
    fe = rt.frontend
    spec = rt.engine.input_spec
    host = np.empty(spec.shape, spec.dtype)
    fe.stream.synchronize()
    cuda.copy_dtoh_async(host, fe.inputs[(fe._staged - 1) % len(fe.inputs)], fe.stream)
    fe.stream.synchronize()
    return host


def check_letterbox(model: Path, frames: dict[str, np.ndarray]) -> dict[str, Any]:
    rt = runtime(model, gpu=True)
    out: dict[str, Any] = {"dtype": str(rt.engine.input_spec.dtype), "sizes": {}}
    try:
        for name, img in frames.items():
            rt.frontend(img)
            gpu = device_input(rt).astype(np.float32)
            cpu = rt.letterbox(img)[0].astype(np.float32)
            scale = 255.0 if rt.engine.input_spec.dtype != np.uint8 else 1.0
            d = np.abs(gpu - cpu) * scale
            out["sizes"][name] = {"max_abs_diff_levels": round(float(d.max()), 4),
                                  "pixels_differing": int((d > 1e-3).sum())}
    finally:
        rt.close()
    out["ok"] = all(v["max_abs_diff_levels"] <= 1.0 for v in out["sizes"].values())
    return out


def match(a: list[Detection], b: list[Detection]) -> tuple[bool, float, float]:
    """Same classes in the same order; worst box-corner and score differences."""
    if len(a) != len(b):
        return False, float("inf"), float("inf")
    box = score = 0.0
    for x, y in zip(a, b, strict=True):
        if x.class_id != y.class_id:
            return False, float("inf"), float("inf")
        box = max(box, *(abs(p - q) for p, q in zip(x.box, y.box, strict=True)))
        score = max(score, abs(x.score - y.score))
    return True, box, score


def check_detections(model: Path, frames: list[np.ndarray], cuda_graph: bool, ref: str = "cpu") -> dict[str, Any]:
    """GPU path vs a reference: "cpu" (all on the CPU EP) or "cuda_cpu_pre" (same CUDA EP, CPU letterbox)."""
    ref_rt = runtime(model, gpu=False) if ref == "cpu" else runtime(model, gpu=True, preprocess="cpu")
    gpu_rt = runtime(model, gpu=True, cuda_graph=cuda_graph)
    worst_box = worst_score = 0.0
    mismatched, total = [], 0
    try:
        for i, img in enumerate(frames):
            t, lb = ref_rt.letterbox(img)
            want = ref_rt.post(ref_rt.engine.infer(t), lb)
            cand, lb2 = gpu_rt.frontend(img)
            got = gpu_rt.post(cand, lb2)
            total += len(want)
            same, box, score = match(want, got)
            if not same or box > 2.0 or score > 0.01:
                mismatched.append({"frame": i, "ref": len(want), "gpu": len(got), "box": box, "score": score})
            if same:
                worst_box, worst_score = max(worst_box, box), max(worst_score, score)
    finally:
        ref_rt.close()
        gpu_rt.close()
    return {"frames": len(frames), "detections": total, "frames_mismatched": len(mismatched),
            "mismatches": mismatched[:10], "max_box_px": round(worst_box, 4), "max_score": round(worst_score, 5),
            "cuda_graph": cuda_graph, "reference": ref, "ok": not mismatched and total > 0}


def time_frontend(model: Path, frame: np.ndarray, runs: int, cuda_graph: bool, pinned: bool = False) -> dict[str, Any]:
    rt = runtime(model, gpu=True, cuda_graph=cuda_graph)
    if pinned:  # a frame decoded into page-locked memory: the upload needs no host copy
        buf = cuda.PinnedBuffer(frame.shape, frame.dtype)
        np.copyto(buf.array, frame)
        frame = buf.array
    try:
        for _ in range(20):
            rt.frontend(frame)
        ms = []
        cpu0 = time.process_time()
        t_all = time.perf_counter()
        for _ in range(runs):
            t0 = time.perf_counter()
            rt.frontend(frame)
            ms.append((time.perf_counter() - t0) * 1e3)
        wall = time.perf_counter() - t_all
        cpu = time.process_time() - cpu0
    finally:
        rt.close()
    return {"fps": round(runs / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / runs, 3), "cuda_graph": cuda_graph, "pinned": pinned}


def preprocess_graph(src_w: int, src_h: int, size: int, path: Path) -> Path:
    """The alternative: letterbox as an ONNX graph (uint8 HWC BGR in, float NCHW RGB out)."""
    import onnx
    from onnx import TensorProto, helper

    from agent.vision.preprocess import letterbox_geometry

    new_w, new_h, left, top, _ = letterbox_geometry(src_w, src_h, size, size)
    c = [helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 3, new_h, new_w]),
         helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, top, left, 0, 0, size - new_h - top,
                                                             size - new_w - left]),
         helper.make_tensor("padv", TensorProto.FLOAT, [], [114.0]),
         helper.make_tensor("rgb", TensorProto.INT64, [3], [2, 1, 0]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255])]
    nodes = [helper.make_node("Cast", ["frame"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["chw"], perm=[2, 0, 1]),
             helper.make_node("Gather", ["chw", "rgb"], ["rgbchw"], axis=0),
             helper.make_node("Unsqueeze", ["rgbchw", "axes"], ["nchw"]),
             helper.make_node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode="linear",
                              coordinate_transformation_mode="half_pixel"),
             helper.make_node("Pad", ["resized", "pads", "padv"], ["padded"]),
             helper.make_node("Mul", ["padded", "scale"], ["images"])]
    c.append(helper.make_tensor("axes", TensorProto.INT64, [1], [0]))
    g = helper.make_graph(nodes, "letterbox", [helper.make_tensor_value_info("frame", TensorProto.UINT8,
                                                                               [src_h, src_w, 3])],
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                          initializer=c)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


def time_graph_alternative(model: Path, frame: np.ndarray, runs: int, work: Path) -> dict[str, Any]:
    """ONNX Runtime running the letterbox graph on the CUDA EP: frame uploaded, result left on the GPU."""
    import onnxruntime as ort

    eng = OnnxRuntimeEngine(model, EngineConfig(preprocess="cpu"))
    eng.load()
    size = int(eng.input_spec.shape[-1])
    eng.close()
    h, w = frame.shape[:2]
    g = preprocess_graph(w, h, size, work / "letterbox.onnx")
    sess = ort.InferenceSession(str(g), providers=["CUDAExecutionProvider"])
    binding = sess.io_binding()
    x = ort.OrtValue.ortvalue_from_numpy(frame, "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([1, 3, size, size], np.float32, "cuda", 0)
    binding.bind_ortvalue_input("frame", x)
    binding.bind_ortvalue_output("images", y)
    for _ in range(20):
        x.update_inplace(frame)
        sess.run_with_iobinding(binding)
    ms = []
    cpu0 = time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        x.update_inplace(frame)  # the frame upload, as the kernel path does it
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        ms.append((time.perf_counter() - t0) * 1e3)
    cpu = time.process_time() - cpu0
    # agreement with the CPU letterbox (ONNX Resize is float bilinear, not cv2's fixed point)
    rt = runtime(model, gpu=False)
    ref = rt.letterbox(frame)[0]
    rt.close()
    diff = float(np.abs(y.numpy() - ref).max() * 255)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / runs, 3), "max_abs_diff_levels_vs_cpu": round(diff, 3)}


def time_kernel_alone(model: Path, frame: np.ndarray, runs: int) -> dict[str, Any]:
    """Upload (pageable frame, one host copy) + letterbox kernel only, timed like the graph alternative."""
    rt = runtime(model, gpu=True)
    fe = rt.frontend
    s = fe._size(frame.shape[1], frame.shape[0])
    ms = []
    try:
        for i in range(runs + 20):
            if i == 20:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            np.copyto(s.pinned[0].array, frame)
            cuda.copy_htod_async(s.frames[0], s.pinned[0], fe.stream)
            s.letterbox[0][0](fe.stream)
            fe.stream.synchronize()
            if i >= 20:
                ms.append((time.perf_counter() - t0) * 1e3)
        cpu = time.process_time() - cpu0
    finally:
        rt.close()
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / runs, 3)}


def main() -> int:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", default=None)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--untrained-score", type=float, default=0.02,
                    help="score threshold for models outside agent/data/demo (random weights score low)")
    args = ap.parse_args()
    models = args.model or [DEMO_MODEL, DEMO_MODEL.with_name("model_fp16.onnx")]
    for m in models:
        if m.resolve().parent != DEMO_MODEL.resolve().parent:
            SCORE[m.name] = args.untrained_score
    out_dir = Path(os.environ.get("OUT", "."))
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    video = load_frames(DEMO_VIDEO, 90)
    hd = [cv2.resize(f, (1920, 1080), interpolation=cv2.INTER_LINEAR) for f in video]
    rng = np.random.default_rng(0)
    sizes = {"640x360 (demo)": video[10], "1920x1080": hd[10], "1280x720": cv2.resize(video[10], (1280, 720)),
             "333x517 (odd)": rng.integers(0, 256, (517, 333, 3), dtype=np.uint8),
             "200x120 (upscale)": cv2.resize(video[10], (200, 120))}
    results: dict[str, Any] = {"models": {}}
    ok = True
    for model in models:
        r: dict[str, Any] = {}
        steps = [("letterbox", lambda m=model: check_letterbox(m, sizes)),
                 ("detections_demo", lambda m=model: check_detections(m, video, cuda_graph=False)),
                 ("detections_1080p", lambda m=model: check_detections(m, hd, cuda_graph=False)),
                 ("detections_1080p_cuda_graph", lambda m=model: check_detections(m, hd, cuda_graph=True)),
                 ("detections_vs_cuda_cpu_letterbox",
                  lambda m=model: check_detections(m, hd, cuda_graph=False, ref="cuda_cpu_pre")),
                 ("frontend_1080p", lambda m=model: time_frontend(m, hd[10], args.runs, cuda_graph=False)),
                 ("frontend_1080p_cuda_graph", lambda m=model: time_frontend(m, hd[10], args.runs, cuda_graph=True)),
                 ("frontend_1080p_cuda_graph_pinned",
                  lambda m=model: time_frontend(m, hd[10], args.runs, cuda_graph=True, pinned=True)),
                 ("kernel_alone_1080p", lambda m=model: time_kernel_alone(m, hd[10], args.runs)),
                 ("graph_alternative_1080p", lambda m=model: time_graph_alternative(m, hd[10], args.runs, work))]
        for name, fn in steps:
            try:
                r[name] = fn()
            except Exception as exc:
                traceback.print_exc()
                r[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "ok": False}
            if r[name].get("ok") is False:
                ok = False
            print(f"{model.name} {name}: {json.dumps(r[name])[:600]}", flush=True)
        results["models"][model.name] = r
    (out_dir / "gpu_preprocess_check.json").write_text(json.dumps(results, indent=2))
    print("\nmodel            check                          result")
    for m, r in results["models"].items():
        for name, v in r.items():
            brief = {k: v[k] for k in list(v)[:6] if k not in ("mismatches", "sizes")}
            print(f"{m:<16} {name:<30} {brief}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
