#!/usr/bin/env python3
"""GPU machine checks for many cameras on one engine with NVDEC (issue 17), in one call.

Data flow per check: clips made beforehand with PyAV (H.264 / HEVC, carried in --clips) ->
PyNvVideoCodec (NVDEC, NV12 on the device) or OpenCV (CPU) -> the agent's service / GPU frontend
-> detections and figures, written to $OUT/streams_check.json and printed as a short table.

0. nvdec_frames: every NVDEC frame of the 1080p demo clip, in order, equals OpenCV's decode.
1. nv12_kernel: one NVDEC-decoded 1080p frame letterboxed by the NV12 kernel vs the numpy
   reference of its arithmetic (must be equal), and NVDEC's colour vs OpenCV's decode (levels;
   0 expected: nv12_to_bgr is libswscale's x86 arithmetic, which OpenCV's decode runs).
2. detections: the service on the demo clip at 1080p H.264, nvdec vs CPU decoding (same classes,
   boxes within 1 px), the demo model on the CUDA EP with GPU preprocessing.
3. bad_input: an MPEG-4 part 2 file, a corrupt H.264 file, an H.264 stream that changes
   resolution mid-way, served at once with a good camera: each says what happened, the good
   camera keeps its rate.
4. shared (shared_cpu_decode): N cameras on one engine: one model load, GPU memory per extra
   camera, with NVDEC (and with CPU decoding, to tell the decoder's memory from the engine's).
5. swap: 8 NVDEC cameras on CUDA-graph lanes, the model swapped 6 times under load (the new lanes
   captured while every camera runs): no errors, every camera keeps serving.
6. lanes_detections: 3 cameras on CUDA-graph lanes, each its own clip: detections equal each clip
   served alone, frame by frame.
7. rtsp_detections: the demo clip served by the GStreamer RTSP server on loopback (agent.streams_rtsp;
   where GStreamer is not installed, its libraries and plugins in EDGE_AGENT_GSTREAMER_DIR), read
   over rtsp:// by NVDEC (PyAV's demuxer; RTP over TCP, and over UDP) and by the CPU decoder:
   every frame of the first pass through the clip gives the detections of the same frame of the
   file decoded on the CPU (a live camera drops frames while the service starts: counted, and at
   least 60 of the 90 must be there).
8. nvdec_damage: the demo clip at 1080p with pictures damaged or left out, and the resolution
   change, through NVDEC on PyAV's demuxer (the rtsp:// path): the read goes on past a picture
   NVDEC refuses (a new decoder from that keyframe or the next), and the frames after the last keyframe
   equal OpenCV's decode of the undamaged clip.

usage: PYTHONPATH=/tmp/site python3 scripts/streams_check.py --clips .carry/clips [--model M] [--only a,b]
Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "agent" / "data" / "demo"


def gpu_config(model: Path, cameras: list[dict[str, Any]], work: Path, **engine: Any) -> Any:
    from agent.config import AgentConfig

    return AgentConfig.model_validate({
        "device_id": "h200", "cameras": cameras,
        "model": {"path": str(model), **({"labels": str(DEMO / "labels.txt")} if model.parent == DEMO else {})},
        "engine": {"providers": [{"name": "CUDAExecutionProvider"}], "io_binding": True, "preprocess": "gpu",
                   "require_gpu": True, "warmup_runs": 3, **engine},
        "mqtt": {"enabled": False}, "cache": {"dir": str(work / "cache")},
        "updates": {"enabled": False, "models_dir": str(work / "models")}, "service": {"watchdog": False}})


def serve(cfg: Any, seconds: float | None = None) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """The service until its files end (or `seconds`): results per camera, telemetry before shutdown."""
    from agent.service import Service

    svc = Service(cfg, use_cache=False)
    results: dict[str, list[Any]] = {c.id: [] for c in cfg.cameras}
    lock = threading.Lock()
    for cam in cfg.cameras:
        def sink(r: Any, cid: str = cam.id) -> None:
            with lock:
                results[cid].append(r)
        svc.add_result_listener(cam.id, sink)
    try:
        svc.start()
        deadline = time.monotonic() + (seconds or 300)
        while time.monotonic() < deadline and not all(p.finished.is_set() for p in svc.pipelines):
            time.sleep(0.1)
        tele = svc.telemetry()
    finally:
        svc.shutdown()
    return results, tele


def check_nv12_kernel(clips: Path) -> dict[str, Any]:
    import cv2

    from agent.capture.sources import open_source
    from agent.config import CameraConfig
    from agent.engines import cuda
    from agent.vision.gpu import _KERNELS, _SOURCE, Nv12Frame, nv12_letterbox_reference, nv12_to_bgr

    clip = clips / "demo1080_h264.mp4"
    src = open_source(CameraConfig(source=str(clip), decode="nvdec", pace=False))
    src.open()
    try:
        frames = [src.read() for _ in range(10)]
    finally:
        pass
    f = frames[-1]
    assert isinstance(f, Nv12Frame), f"NVDEC gave {type(f).__name__} ({src.decode_path})"
    y, uv = f.planes()
    out: dict[str, Any] = {"decode_path": src.decode_path, "size": [f.width, f.height], "matrix": f.matrix,
                           "full_range": f.full_range}
    kernels = cuda.Kernel(_SOURCE, _KERNELS)
    stream = cuda.Stream()
    for (w, h) in ((640, 640), (320, 320)):
        from agent.vision.preprocess import letterbox_geometry, linear_taps

        new_w, new_h, left, top, _ = letterbox_geometry(f.width, f.height, w, h)
        xt = np.ascontiguousarray(np.stack(linear_taps(f.width, new_w), axis=1).astype(np.int32))
        yt = np.ascontiguousarray(np.stack(linear_taps(f.height, new_h), axis=1).astype(np.int32))
        lut = np.arange(256, dtype=np.uint8)
        bx, by, bl = cuda.DeviceBuffer(xt.nbytes), cuda.DeviceBuffer(yt.nbytes), cuda.DeviceBuffer(256)
        dst = cuda.DeviceBuffer(3 * w * h)
        for b, a in ((bx, xt), (by, yt), (bl, lut)):
            cuda.copy_htod_async(b, a, stream)
        from agent.vision.gpu import nv12_coefficients

        k = nv12_coefficients(f.matrix, f.full_range)
        launch = kernels.prepare("letterbox_nv12_u8", ((w + 31) // 32, (h + 7) // 8, 1), (32, 8, 1), [
            np.uint64(f.y_ptr), np.uint64(f.uv_ptr), np.int32(f.pitch), np.int32(f.pitch), np.uint64(bx.ptr),
            np.uint64(by.ptr), np.int32(new_w), np.int32(new_h), np.int32(left), np.int32(top), np.int32(w),
            np.int32(h), np.int32(114), np.uint64(bl.ptr), *(np.int32(v) for v in k), np.uint64(dst.ptr)])
        launch(stream)
        host = np.empty((3, h, w), np.uint8)
        stream.synchronize()
        cuda.copy_dtoh_ptr(host, dst.ptr)
        got = host.transpose(1, 2, 0)[..., ::-1]  # RGB planes -> BGR HWC
        ref = nv12_letterbox_reference(y, uv, w, h, f.matrix, f.full_range)
        diff = np.abs(got.astype(int) - ref.astype(int))
        out[f"kernel_vs_reference_{w}x{h}"] = {"max_diff": int(diff.max()), "pixels_differing": int((diff > 0).sum())}
        for b in (bx, by, bl, dst):
            b.free()
    # NVDEC's planes through the agent's colour conversion vs OpenCV's own decode of the same frame
    cap = cv2.VideoCapture(str(clip))
    for _ in range(10):
        _ok, bgr = cap.read()
    cap.release()
    mine = nv12_to_bgr(y, uv, f.matrix, f.full_range)
    d = np.abs(mine.astype(int) - bgr.astype(int))
    out["nvdec_vs_opencv_decode_levels"] = {"max": int(d.max()), "mean": round(float(d.mean()), 3),
                                            "p99": float(np.percentile(d, 99))}
    del frames, f
    src.close()
    kernels.free()
    stream.free()
    out["ok"] = all(v["max_diff"] == 0 for kk, v in out.items() if kk.startswith("kernel_vs"))
    return out


def check_nvdec_frames(clips: Path) -> dict[str, Any]:
    """Every frame NVDEC decodes, in order, through nv12_to_bgr vs OpenCV's decode of the same frame
    (bit-exact decoding and the same colour arithmetic: equal). A frame that differs is looked up
    among its neighbours: a frame delivered out of order shows as an offset."""
    import cv2

    from agent.capture.sources import open_source
    from agent.config import CameraConfig
    from agent.vision.gpu import Nv12Frame, nv12_to_bgr

    clip = clips / "demo1080_h264.mp4"
    cap = cv2.VideoCapture(str(clip))
    ref: list[np.ndarray] = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        ref.append(bgr)
    cap.release()
    src = open_source(CameraConfig(source=str(clip), decode="nvdec", pace=False, loop=False))
    src.open()
    equal, got = 0, 0
    offsets: dict[str, int | None] = {}
    try:
        for i in range(len(ref)):
            f = src.read()
            if f is None:
                break
            assert isinstance(f, Nv12Frame), f"NVDEC gave {type(f).__name__}"
            got += 1
            mine = nv12_to_bgr(*f.planes(), f.matrix, f.full_range)
            del f
            if np.array_equal(mine, ref[i]):
                equal += 1
                continue
            near = [j - i for j in range(max(0, i - 4), min(len(ref), i + 5)) if np.array_equal(mine, ref[j])]
            offsets[str(i)] = near[0] if near else None
    finally:
        src.close()
    return {"frames_opencv": len(ref), "frames_nvdec": got, "equal": equal, "differing": offsets,
            "ok": equal == len(ref) == got}


def _match(a: list[Any], b: list[Any]) -> tuple[bool, float]:
    """Same classes (as multisets) and, greedily by class, boxes within 1 px: (ok, worst box px)."""
    la, lb = sorted(d.label for d in a), sorted(d.label for d in b)
    if la != lb:
        return False, float("inf")
    worst = 0.0
    used: set[int] = set()
    for d in a:
        best, bi = float("inf"), -1
        for j, e in enumerate(b):
            if j in used or e.label != d.label:
                continue
            dist = max(abs(x - y) for x, y in zip(d.box, e.box, strict=True))
            if dist < best:
                best, bi = dist, j
        used.add(bi)
        worst = max(worst, best)
    return worst <= 1.0, worst


def check_detections(clips: Path, work: Path) -> dict[str, Any]:
    clip = str(clips / "demo1080_h264.mp4")
    out: dict[str, Any] = {}
    runs = {}
    for decode in ("cpu", "nvdec"):
        cfg = gpu_config(DEMO / "model.onnx", [{"id": "c", "source": clip, "pace": False, "decode": decode}], work)
        res, tele = serve(cfg)
        runs[decode] = res["c"]
        out[decode] = {"frames": len(res["c"]), "detections": sum(len(r.detections) for r in res["c"]),
                       "decode": tele["cameras"][0].get("decode"), "preprocess": tele["engine"].get("preprocess")}
    a, b = runs["cpu"], runs["nvdec"]
    bad, worst = [], 0.0
    for ra, rb in zip(a, b, strict=False):
        ok, w = _match(ra.detections, rb.detections)
        if not ok:
            i = rb.frame_seq  # which CPU-decoded frame this NVDEC result matches, if a neighbour does
            near = [r.frame_seq - i for r in a[max(0, i - 4):i + 5] if _match(r.detections, rb.detections)[0]]
            bad.append({"frame": ra.frame_seq, "cpu": len(ra.detections), "nvdec": len(rb.detections),
                        "box_px": round(w, 3) if w != float("inf") else "classes differ",
                        "nvdec_matches_cpu_offset": near})
        elif w != float("inf"):
            worst = max(worst, w)
    out["frames_compared"] = min(len(a), len(b))
    out["frames_mismatched"] = len(bad)
    out["mismatches"] = bad[:10]
    out["max_box_px_matched"] = round(worst, 4)
    out["ok"] = len(a) == len(b) == 90 and not bad
    return out


def check_rtsp_detections(clips: Path, work: Path) -> dict[str, Any]:
    from agent.streams_rtsp import RtspStreams

    clip = clips / "demo1080_h264.mp4"
    ref, _ = serve(gpu_config(DEMO / "model.onnx", [{"id": "c", "source": str(clip), "pace": False,
                                                     "decode": "cpu"}], work))
    # camera id: decode and RTP transport ("nvdec_udp": NVDEC, RTP over UDP; the others over TCP)
    ids = ("nvdec", "cpu", "nvdec_udp")
    with RtspStreams(clip, "h264", len(ids)) as server:
        cams = [{"id": cid, "source": url, "decode": cid.split("_")[0],
                 "rtsp_transport": "udp" if cid.endswith("_udp") else "tcp"}
                for cid, url in zip(ids, server.urls, strict=True)]
        got, tele = serve(gpu_config(DEMO / "model.onnx", cams, work), seconds=8.0)  # 90 frames at 30 fps: 3 s
    out: dict[str, Any] = {"frames_file_cpu": len(ref["c"])}
    ok = len(ref["c"]) == 90
    for c in tele["cameras"]:
        rows = [r for r in got[c["camera"]] if r.frame_seq < 90]  # the first pass through the clip
        bad = [r.frame_seq for r in rows if not _match(r.detections, ref["c"][r.frame_seq].detections)[0]]
        seqs = [r.frame_seq for r in rows]
        in_order = seqs == sorted(set(seqs))
        out[c["camera"]] = {"frames": len(rows), "mismatched": bad[:10], "in_order": in_order,
                            "detections": sum(len(r.detections) for r in rows), "decode": c.get("decode"),
                            "frames_dropped": c.get("frames_dropped"), "errors": c.get("errors"),
                            "decode_errors": c.get("decode_errors"), "reconnects": c.get("reconnects")}
        ok = ok and len(rows) >= 60 and not bad and in_order and c.get("decode") == c["camera"].split("_")[0]
    out["ok"] = ok
    return out


def _damage(src: Path, dst: Path, kind: str, packets: tuple[int, ...]) -> None:
    """`src` remuxed (PyAV) with `packets` (decode order) damaged as a network would: "slice_header"
    (32 bytes after the first NAL's header overwritten), "picture" (every byte after it), "dropped"
    (left out). The rest is copied as it is."""
    import av

    rng = np.random.default_rng(17)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for i, packet in enumerate(inp.demux(s_in)):
            if packet.dts is None:
                continue
            if i in packets:
                if kind == "dropped":
                    continue
                data, at = bytearray(bytes(packet)), 0
                while at + 5 <= len(data):  # NAL units, each after its 4-byte length: the lengths are kept
                    size = int.from_bytes(data[at:at + 4], "big")
                    if data[at + 4] & 0x1F in (1, 5):  # a slice: from just after its header
                        end = at + 4 + (min(size, 33) if kind == "slice_header" else size)
                        data[at + 5:end] = rng.integers(0, 256, max(0, end - at - 5), dtype=np.uint8).tobytes()
                    at += 4 + size
                packet.update(bytes(data))
            packet.stream = s_out
            out.mux(packet)


def check_nvdec_damage(clips: Path, work: Path) -> dict[str, Any]:
    """Damaged pictures through NVDEC on PyAV's demuxer (the path of rtsp:// streams): a picture NVDEC
    refuses starts a new decoder at that keyframe or the next (agent.capture.sources.nvdec), the read goes on
    (no SourceError), and the last 10 frames, after the clip's last keyframe, equal OpenCV's decode of
    the undamaged clip. The resolution change (reschange.h264: 720p, then 1080p) on the same path."""
    import collections

    import cv2

    from agent.capture.sources import nvdec, open_source
    from agent.config import CameraConfig
    from agent.errors import SourceError
    from agent.vision.gpu import nv12_to_bgr

    clean = clips / "demo1080_h264.mp4"
    cap, ref = cv2.VideoCapture(str(clean)), []
    while (got := cap.read())[0]:
        ref.append(got[1])
    cap.release()
    cases: dict[str, tuple[Path, int]] = {"clean": (clean, len(ref)), "reschange": (clips / "reschange.h264", 0)}
    # keyframes at 0, 30, 60 (g=30): a P picture, two in a row, the keyframe at 30, three left out
    for kind, packets in (("slice_header", (35,)), ("picture", (35, 36)), ("keyframe", (30,)),
                          ("dropped", (35, 36, 37))):
        name = kind if kind != "keyframe" else "keyframe_picture"
        _damage(clean, work / f"{name}.mp4", "picture" if kind == "keyframe" else kind, packets)
        cases[name] = (work / f"{name}.mp4", len(ref))
    saved, nvdec._FILE_DEMUX = nvdec._FILE_DEMUX, "pyav"  # files through PyAV's demuxer, as streams are
    out: dict[str, Any] = {"frames_clean_opencv": len(ref)}
    ok = True
    try:
        for name, (clip, compare) in cases.items():
            src: Any = open_source(CameraConfig(source=str(clip), decode="nvdec", pace=False, loop=False, fps=30))
            src.open()
            frames, equal, error = 0, 0, None
            tail: collections.deque[Any] = collections.deque(maxlen=10)  # frames, or their sizes
            try:
                while (f := src.read()) is not None:
                    if compare:
                        y, uv = f.planes()
                        tail.append(nv12_to_bgr(y, uv, f.matrix, f.full_range))
                        equal += frames < len(ref) and np.array_equal(tail[-1], ref[frames])
                    else:
                        tail.append((f.width, f.height))
                    frames += 1
                    del f
            except SourceError as exc:
                error = str(exc)[:300]
            finally:
                errors = src.decode_errors
                skipped = getattr(src._dmx, "skipped", None)
                src.close()
            row: dict[str, Any] = {"frames": frames, "decode_errors": errors, "skipped_packets": skipped,
                                   "source_error": error, "decode": src.decode_path}
            if compare:
                row["equal_in_place"] = equal  # the clean clip: every frame
                row["tail_equal"] = len(tail) == 10 and all(np.array_equal(a, b)
                                                            for a, b in zip(tail, ref[-10:], strict=True))
            else:
                row["last_size"] = tail[-1] if tail else None
            out[name] = row
            ok = ok and error is None and src.decode_path == "nvdec" and row.get("tail_equal", True)
    finally:
        nvdec._FILE_DEMUX = saved
    out["ok"] = (ok and out["clean"]["frames"] == out["clean"]["equal_in_place"] == len(ref)
                 and out["reschange"]["last_size"] == (1920, 1080))
    return out


def check_lanes_detections(clips: Path, work: Path) -> dict[str, Any]:
    """Three cameras on CUDA-graph lanes, each on its own clip (the demo clip and two flips, 1080p
    H.264, NVDEC, the demo model): each camera's detections, frame by frame in order, equal that clip
    served alone (one camera, one graph, no lanes): no cross-talk between cameras or lanes."""
    names = ["demo1080_h264.mp4", "demo1080_flip1_h264.mp4", "demo1080_flip0_h264.mp4"]
    cams = [{"id": f"c{i}", "source": str(clips / n), "pace": False, "decode": "nvdec"} for i, n in enumerate(names)]
    shared, tele = serve(gpu_config(DEMO / "model.onnx", cams, work, cuda_graph=True))
    out: dict[str, Any] = {"graph_lanes": tele["engine"].get("graph_lanes"),
                           "model_loads": tele["engine"].get("model_loads"), "cameras": {}}
    ok = bool(out["graph_lanes"]) and out["model_loads"] == 1
    for i, cam in enumerate(cams):
        alone, one = serve(gpu_config(DEMO / "model.onnx", [{**cam, "id": "c"}], work, cuda_graph=True))
        a, b = shared[f"c{i}"], alone["c"]
        bad = [r.frame_seq for r, q in zip(a, b, strict=False) if not _match(r.detections, q.detections)[0]]
        in_order = [r.frame_seq for r in a] == list(range(len(a)))
        out["cameras"][cam["id"]] = {"frames": len(a), "frames_alone": len(b), "mismatched": bad[:10],
                                     "detections": sum(len(r.detections) for r in a), "in_order": in_order,
                                     "graph_lanes_alone": one["engine"].get("graph_lanes")}
        ok = ok and len(a) == len(b) == 90 and not bad and in_order
    per_cam = [c["detections"] for c in out["cameras"].values()]
    rows = [[(d.label, d.box) for r in shared[f"c{i}"] for d in r.detections] for i in range(len(cams))]
    out["cameras_differ"] = rows[0] != rows[1] and rows[0] != rows[2]  # equal results are not an accident
    out["ok"] = ok and out["cameras_differ"] and all(per_cam)
    return out


def check_bad_input(clips: Path, work: Path) -> dict[str, Any]:
    cams = [{"id": "good", "source": str(clips / "live1080p30_h264.mp4"), "pace": True, "loop": True,
             "decode": "nvdec"},
            {"id": "mpeg4", "source": str(DEMO / "sample.mp4"), "pace": True, "loop": True, "decode": "nvdec"},
            {"id": "corrupt", "source": str(clips / "corrupt.mp4"), "pace": True, "loop": True, "decode": "nvdec"},
            {"id": "reschange", "source": str(clips / "reschange.h264"), "pace": True, "loop": True,
             "decode": "nvdec", "fps": 30},
            {"id": "missing", "source": str(clips / "nope.mp4"), "pace": True, "decode": "nvdec"}]
    cfg = gpu_config(DEMO / "model.onnx", cams, work)
    _, tele = serve(cfg, seconds=12.0)
    out: dict[str, Any] = {}
    for c in tele["cameras"]:
        out[c["camera"]] = {k: c.get(k) for k in ("frames_in", "frames_processed", "frames_dropped", "errors", "fps",
                                                  "camera_state", "decode", "reconnects")}
    good = out.get("good", {})
    out["ok"] = bool(good.get("fps") and good["fps"] >= 27 and good.get("errors") == 0)
    return out


def check_shared(clips: Path, work: Path, model: Path, counts: tuple[int, ...] = (1, 2, 8),
                 decode: str = "nvdec", **engine: Any) -> dict[str, Any]:
    from agent.engines import cuda

    clip = str(clips / "live1080p30_h264.mp4")
    out: dict[str, Any] = {}
    for n in counts:
        cams = [{"id": f"s{i}", "source": clip, "pace": True, "loop": True, "decode": decode} for i in range(n)]
        base = cuda.memory_used() or 0
        from agent.service import Service

        svc = Service(gpu_config(model, cams, work, **engine), use_cache=False)
        try:
            svc.start()
            time.sleep(4.0)
            used = (cuda.memory_used() or 0) - base
            tele = svc.telemetry()
        finally:
            svc.shutdown()
        out[str(n)] = {"gpu_mem_mb": round(used / 2**20, 1), "model_loads": tele["engine"]["model_loads"],
                       "cameras_on_engine": tele["engine"]["cameras_on_engine"],
                       "fps": [c["fps"] for c in tele["cameras"]]}
    one, last = out[str(counts[0])]["gpu_mem_mb"], out[str(counts[-1])]["gpu_mem_mb"]
    per_extra = (last - one) / (counts[-1] - counts[0])
    out["gpu_mem_first_camera_mb"] = one
    out["gpu_mem_per_extra_camera_mb"] = round(per_extra, 1)
    out["per_extra_vs_first"] = round(per_extra / one, 3) if one else None
    if len(counts) > 2:  # beyond the lanes (at most 4): what one more camera costs
        a, b = out[str(counts[-2])]["gpu_mem_mb"], last
        out["gpu_mem_per_extra_camera_beyond_mb"] = round((b - a) / (counts[-1] - counts[-2]), 1)
    out["decode"], out["engine"] = decode, engine
    out["ok"] = all(out[str(n)]["model_loads"] == 1 for n in counts)
    return out


def check_swap(clips: Path, work: Path, model: Path, cameras: int = 8, swaps: int = 6) -> dict[str, Any]:
    """CUDA-graph lanes and a model swap under load: `cameras` live NVDEC streams on one model with
    cuda_graph (lanes), then the model swapped `swaps` times as an update does it (new runtimes
    loaded and their lanes captured while every camera runs, a swap at a frame boundary, the old
    runtimes closed once drained). Every camera must keep its rate, with no errors and no crash."""
    from agent.service import Service
    from agent.updates.host import ServiceHost

    clip = str(clips / "live1080p30_h264.mp4")
    cams = [{"id": f"s{i}", "source": clip, "pace": True, "loop": True, "decode": "nvdec"} for i in range(cameras)]
    svc = Service(gpu_config(model, cams, work, cuda_graph=True), use_cache=False)
    out: dict[str, Any] = {"cameras": cameras, "swaps": []}
    try:
        svc.start()
        time.sleep(3.0)
        host = ServiceHost(svc)
        out["graph_lanes"] = svc.engine_info.get("graph_lanes")
        for k in range(swaps):
            before = [(p.processed, p.errors) for p in svc.pipelines]
            t0 = time.perf_counter()
            bundle = host.prepare_engine(None, None)
            t1 = time.perf_counter()
            host.activate(bundle, None)
            t2 = time.perf_counter()
            time.sleep(3.0)
            after = [(p.processed, p.errors) for p in svc.pipelines]
            window = time.perf_counter() - t0
            frames = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
            out["swaps"].append({"load_and_capture_s": round(t1 - t0, 2), "activate_s": round(t2 - t1, 2),
                                 "window_s": round(window, 2),
                                 # frames behind a 30 fps source over the window: the stall the swap caused
                                 "behind_frames": round(30 * window - min(frames), 1),
                                 "frames": frames,
                                 "errors": sum(a[1] - b[1] for a, b in zip(after, before, strict=True)),
                                 "model": [p.runtime.version for p in svc.pipelines][:1]})
            print(f"swap {k}: {out['swaps'][-1]}", flush=True)
        tele = svc.telemetry()
        out["fps"] = [c["fps"] for c in tele["cameras"]]
        out["engine"] = {k: tele["engine"].get(k) for k in ("model_loads", "cuda_graph", "graph_lanes")}
    finally:
        svc.shutdown()
    window = 3.0 * 30 * 0.9  # frames each camera must have served in the 3 s after a swap
    out["ok"] = all(s["errors"] == 0 and min(s["frames"]) >= window for s in out["swaps"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEMO / "model.onnx", help="model for the 'shared' check")
    ap.add_argument("--only", default="nv12_kernel,nvdec_frames,detections,bad_input,shared")
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(os.environ.get("OUT", "."))
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"ts": round(time.time(), 3), "onnxruntime": ort.__version__,
                               "providers": ort.get_available_providers()}
    try:
        import PyNvVideoCodec as nvc

        results["pynvvideocodec"] = getattr(nvc, "__version__", "?")
    except Exception as exc:
        results["pynvvideocodec"] = f"unavailable: {exc}"
    checks = {"nv12_kernel": lambda: check_nv12_kernel(args.clips),
              "nvdec_frames": lambda: check_nvdec_frames(args.clips),
              "detections": lambda: check_detections(args.clips, work),
              "bad_input": lambda: check_bad_input(args.clips, work),
              "shared": lambda: check_shared(args.clips, work, args.model),
              "swap": lambda: check_swap(args.clips, work, args.model),
              "lanes_detections": lambda: check_lanes_detections(args.clips, work),
              "rtsp_detections": lambda: check_rtsp_detections(args.clips, work),
              "nvdec_damage": lambda: check_nvdec_damage(args.clips, work),
              "shared_lanes": lambda: check_shared(args.clips, work, args.model, (1, 8, 16), cuda_graph=True),
              "shared_lanes_cpu_decode": lambda: check_shared(args.clips, work, args.model, (1, 8, 16), "cpu",
                                                              cuda_graph=True),
              "shared_cpu_decode": lambda: check_shared(args.clips, work, args.model, decode="cpu")}
    failed = False
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = checks[name]()
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        failed |= not results[name].get("ok", False)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}", flush=True)
        if "trace" in results[name]:
            print(results[name]["trace"], flush=True)
    (out_dir / "streams_check.json").write_text(json.dumps(results, indent=2, default=str))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
