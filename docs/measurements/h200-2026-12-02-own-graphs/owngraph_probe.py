"""Experiment (not shipped): capture one plain ONNX Runtime run into our own CUDA graph and replay it.

Questions: does the capture work (no sync inside Run with disable_synchronize_execution_providers),
what node types does the graph hold, are the outputs equal to a plain run on new inputs, and what
host CPU does a launch cost vs ORT's own graph replay."""

import ctypes
import sys
import threading
import time

import numpy as np
import onnxruntime as ort

from agent.engines import cuda

model = sys.argv[1]
mode = int(sys.argv[2]) if len(sys.argv) > 2 else 1  # 0 global, 1 thread-local, 2 relaxed
cuda.use_device(0)
lib = ctypes.CDLL("libcuda.so.1")
vp, u64 = ctypes.c_void_p, ctypes.c_uint64


def chk(rc: int, what: str) -> None:
    if rc:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what}: {name.value} ({rc})")


def session(stream: cuda.Stream) -> ort.InferenceSession:
    opts = {"device_id": "0", "user_compute_stream": str(stream.handle), "has_user_compute_stream": "1",
            "enable_cuda_graph": "1"}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=[("CUDAExecutionProvider", opts)])


def bound(sess: ort.InferenceSession):
    inp, outs = sess.get_inputs()[0], sess.get_outputs()
    ib = cuda.DeviceBuffer(int(np.prod(inp.shape)) * 4)
    obs = [cuda.DeviceBuffer(int(np.prod(o.shape)) * 4) for o in outs]
    b = sess.io_binding()
    b.bind_input(inp.name, "cuda", 0, np.float32, list(inp.shape), ib.ptr)
    for o, buf in zip(outs, obs, strict=True):
        b.bind_output(o.name, "cuda", 0, np.float32, list(o.shape), buf.ptr)
    return b, ib, obs, inp, outs


def ro(gid: str, nosync: bool = False) -> ort.RunOptions:
    r = ort.RunOptions()
    r.add_run_config_entry("gpu_graph_id", gid)
    if nosync:
        r.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return r


def fetch(obs, outs, stream):
    host = [np.empty(o.shape, np.float32) for o in outs]
    for h, b in zip(host, obs, strict=True):
        cuda.copy_dtoh_async(h, b, stream)
    stream.synchronize()
    return host


def own_graph(sess, b, stream):
    for _ in range(3):
        sess.run_with_iobinding(b, ro("-1"))
    stream.synchronize()
    chk(lib.cuStreamBeginCapture_v2(vp(stream.ptr), ctypes.c_int(mode)), "cuStreamBeginCapture")
    try:
        sess.run_with_iobinding(b, ro("-1", nosync=True))
    finally:
        graph = vp()
        rc = lib.cuStreamEndCapture(vp(stream.ptr), ctypes.byref(graph))
    chk(rc, "cuStreamEndCapture")
    n = ctypes.c_size_t(0)
    chk(lib.cuGraphGetNodes(graph, None, ctypes.byref(n)), "cuGraphGetNodes")
    nodes = (vp * n.value)()
    chk(lib.cuGraphGetNodes(graph, nodes, ctypes.byref(n)), "cuGraphGetNodes")
    types: dict[int, int] = {}
    for i in range(n.value):
        t = ctypes.c_int()
        chk(lib.cuGraphNodeGetType(vp(nodes[i]), ctypes.byref(t)), "cuGraphNodeGetType")
        types[t.value] = types.get(t.value, 0) + 1
    print("graph nodes", n.value, "by type", types)
    exe = vp()
    chk(lib.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, u64(0)), "cuGraphInstantiateWithFlags")
    return exe


s1 = cuda.Stream()
sess = session(s1)
b, ib, obs, inp, outs = bound(sess)
rng = np.random.default_rng(0)
x0 = rng.random(inp.shape, dtype=np.float32)
cuda.copy_htod_async(ib, x0, s1)
s1.synchronize()
try:
    exe = own_graph(sess, b, s1)
except Exception as exc:
    print("CAPTURE FAILED", exc)
    raise
# correctness on new inputs: plain run vs our graph
for trial in range(3):
    x = rng.random(inp.shape, dtype=np.float32)
    cuda.copy_htod_async(ib, x, s1)
    sess.run_with_iobinding(b, ro("-1"))
    ref = fetch(obs, outs, s1)
    for o in obs:
        cuda.memset_async(o, 0, s1)
    chk(lib.cuGraphLaunch(exe, vp(s1.ptr)), "cuGraphLaunch")
    got = fetch(obs, outs, s1)
    print("trial", trial, "max abs diff", [float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True)],
          "ref max", [float(np.abs(r).max()) for r in ref])

# host CPU per inference: ORT graph replay (graph id 1) vs own graph launch + event sync
N = 2000
for _ in range(5):
    sess.run_with_iobinding(b, ro("1"))
c0, w0 = time.thread_time(), time.perf_counter()
opt1 = ro("1")
for _ in range(N):
    sess.run_with_iobinding(b, opt1)
c1, w1 = time.thread_time(), time.perf_counter()
print(f"ORT replay: wall {1e3 * (w1 - w0) / N:.3f} ms, thread cpu {1e3 * (c1 - c0) / N:.3f} ms per run")
ev = cuda.Event(timing=False)
launch = lib.cuGraphLaunch
c0, w0 = time.thread_time(), time.perf_counter()
for _ in range(N):
    chk(launch(exe, vp(s1.ptr)), "launch")
    ev.record(s1)
    ev.synchronize()
c1, w1 = time.thread_time(), time.perf_counter()
print(f"own graph: wall {1e3 * (w1 - w0) / N:.3f} ms, thread cpu {1e3 * (c1 - c0) / N:.3f} ms per run")
c0, w0 = time.thread_time(), time.perf_counter()
for _ in range(N):
    chk(launch(exe, vp(s1.ptr)), "launch")
s1.synchronize()
c1, w1 = time.thread_time(), time.perf_counter()
print(f"own graph, launches only: wall {1e3 * (w1 - w0) / N:.3f} ms, thread cpu {1e3 * (c1 - c0) / N:.3f} ms")

# 4 lanes: 4 sessions, 4 own graphs, 4 threads launching, throughput
lanes = []
for _ in range(4):
    st = cuda.Stream()
    se = session(st)
    bb = bound(se)
    lanes.append((st, se, bb, own_graph(se, bb[0], st)))
done = [0]


def drive(st, exe_, n):
    e = cuda.Event(timing=False)
    for _ in range(n):
        chk(lib.cuGraphLaunch(exe_, vp(st.ptr)), "launch")
        e.record(st)
        e.synchronize()


c0, w0 = time.process_time(), time.perf_counter()
ts = [threading.Thread(target=drive, args=(st, ex, 1000)) for st, _, _, ex in lanes]
for t in ts:
    t.start()
for t in ts:
    t.join()
c1, w1 = time.process_time(), time.perf_counter()
print(f"4 own-graph lanes: {4000 / (w1 - w0):.0f} inf/s, process cpu {1e3 * (c1 - c0) / 4000:.3f} ms per inference")
print("OK")
