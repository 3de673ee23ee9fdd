"""ONNX Runtime backend: an ordered execution-provider list, reporting what the session really got.

One model, many cameras: `share()` gives another camera its own context on the loaded session
(its own IO binding, buffers, CUDA graph ids and CUDA stream) while the session and its weights
stay one. With a user compute stream every run of the session goes on that one stream, one after
another (measured on the H200: 10 cameras on YOLOv8n 330 inferences/s); so with several cameras
the service asks for none (has_user_compute_stream "0"): ONNX Runtime then takes a stream per
run and the runs overlap on the GPU, and each camera's own stream is ordered against the run by
the host (synchronised before the run; the run returns when the GPU is done). ONNX Runtime's
Run is thread-safe: the contexts' runs go through MAX_CONCURRENT_RUNS worker threads. CUDA
graphs are for one camera: the service turns them off for several (an event says why); should a
graph-enabled session be shared anyway, its runs are serialised by a lock (ONNX Runtime does not
support Run from several threads with CUDA graphs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import EngineConfig
from agent.engines import cuda
from agent.engines.base import Engine, EngineInfo, TensorSpec
from agent.engines.ort_lanes import OrtLanes
from agent.errors import EngineError, ModelError

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, object]], None]

_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}
_GPU_EPS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def physical_cores() -> int:
    """Physical core count (intra-op threads beyond it only add contention)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = ""
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
    except OSError:
        pass
    return len(cores) or (os.cpu_count() or 1)


# Runs of one shared session go through this many worker threads (measured on the H200, YOLOv8n
# 1080p30 NVDEC streams, ORT 1.31.1, docs/measurements/h200-2026-12-01): with every camera's
# thread running on streams of ONNX Runtime's own, 32 cameras crashed the process with an
# illegal memory access inside cuDNN, and so did 8 worker threads at 30 cameras; 1 and 2
# workers never did (engine alone 517 / 640-749 inferences/s) and used ~110 MB per extra camera
# instead of ~200. 2 is the default until a higher count is shown safe; the variable is for
# measurement only.
MAX_CONCURRENT_RUNS = max(1, int(os.environ.get("EDGE_AGENT_ORT_RUN_WORKERS", "2") or 2))
_CAPTURE_RUNS = 3  # ONNX Runtime runs once plainly, then captures: a thread's first runs hold the GPU alone


class _SharedSession:
    """What the contexts of one loaded session share: who holds it, CUDA graph ids, the run locks."""

    def __init__(self) -> None:
        self.refs = 1
        self.contexts = 1
        self.lock = threading.Lock()
        self.run_lock = threading.Lock()  # taken around runs only when CUDA graphs are on
        self.workers = ThreadPoolExecutor(MAX_CONCURRENT_RUNS, thread_name_prefix="ort-run")
        self._next_graph = 100

    def graph_id(self) -> int:
        """A CUDA graph id no other context of this session uses (each id replays its own addresses)."""
        with self.lock:
            gid = self._next_graph
            self._next_graph += 1
            return gid


def _static_shape(name: str, shape: list[Any]) -> tuple[int, ...]:
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif i == 0:
            dims.append(1)  # dynamic batch: we always run batch 1
        else:
            raise ModelError(f"tensor {name!r} has a dynamic dimension {d!r} at axis {i}; export with a fixed size")
    return tuple(dims)


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime session at batch 1.

    `optimized_model_out`: where ONNX Runtime writes its optimised graph (the CPU / CUDA "engine" the
    cache keeps); loading that file later skips the optimisation passes.
    """

    def __init__(self, model_path: Path, cfg: EngineConfig, optimized_model_out: Path | None = None,
                 on_event: EventSink | None = None, precision: str | None = None) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        self.cfg = cfg
        self.optimized_model_out = optimized_model_out
        self.on_event = on_event
        self.precision = precision or cfg.precision
        self._session: Any = None
        self._input: TensorSpec | None = None
        self._outputs: list[TensorSpec] = []
        self._output_names: list[str] = []
        self._info: EngineInfo | None = None
        self.metadata: dict[str, str] = {}
        self._binding: Any = None
        self._binding_options: Any = None
        self._binding_device = ""
        self._bound_in: Any = None
        self._bound_out: list[Any] = []
        self._stream: Any = None  # agent.engines.cuda.Stream shared with GPU preprocessing, when there is one
        self._device_bindings: list[tuple[Any, Any]] = []  # (IO binding, its RunOptions)
        self._plain_options: Any = None  # RunOptions for session.run; keeps plain runs out of CUDA graphs
        self._graphs = False
        self.placement: dict[str, Any] = {}
        self._shared: _SharedSession | None = None
        self._stream_in_session = True  # ONNX Runtime runs on self._stream (user_compute_stream)
        self._lanes: OrtLanes | None = None  # inference as CUDA-graph replays on lanes (agent.engines.ort_lanes)
        self._lane_stream: Any = None  # the first lane's stream, made with the first session
        self._lane_bindings: list[tuple[int, list[int]]] = []  # (input, outputs) device pointers per binding
        self._lane_providers: list[tuple[str, dict[str, str]]] = []
        self._thread_runs = threading.local()  # runs per calling thread (graphs are captured per thread)

    def _session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.cfg.graph_optimization])
        so.intra_op_num_threads = self.cfg.intra_op_threads or physical_cores()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if self.optimized_model_out is not None:
            so.optimized_model_filepath = str(self.optimized_model_out)
        if self.cfg.require_gpu:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _gpu_provider_options(self, name: str, options: dict[str, str]) -> dict[str, str]:
        """Options the agent adds to a GPU EP: a shared stream for device IO, CUDA graphs from config."""
        opts = dict(options)
        if self.cfg.cuda_graph:
            opts.setdefault("enable_cuda_graph" if name == "CUDAExecutionProvider" else "trt_cuda_graph_enable", "1")
        # has_user_compute_stream "0": ONNX Runtime takes a stream of its own per run (several cameras
        # on one session overlap on the GPU); the frontend's stream is then ordered by the host
        own_streams = opts.get("has_user_compute_stream") == "0"
        if self.cfg.preprocess != "cpu" and "user_compute_stream" not in opts:
            try:
                cuda.set_sync_mode(self.cfg.gpu_sync)  # before anything makes the CUDA context
                self._stream = cuda.Stream()
            except EngineError as exc:
                if self.cfg.preprocess == "gpu":
                    raise EngineError(f"engine.preprocess is 'gpu' but no CUDA stream can be made: {exc}") from exc
                log.warning("GPU preprocessing unavailable (%s); preprocessing on the CPU", exc)
            else:
                if self._wants_lanes(name):
                    # the first lane's session runs on a stream of its own; this camera's kernels on self._stream
                    self._lane_stream = cuda.Stream()
                    opts["user_compute_stream"] = str(self._lane_stream.handle)
                    opts["has_user_compute_stream"] = "1"
                    self._stream_in_session = False
                    return opts
                if own_streams:
                    self._stream_in_session = False
                    return opts
                # one stream for upload, preprocessing kernel, inference and candidate selection:
                # ordered on the device, no host synchronisation between them
                opts["user_compute_stream"] = str(self._stream.handle)
                opts["has_user_compute_stream"] = "1"
        return opts

    def _wants_lanes(self, provider: str) -> bool:
        return bool(self.cfg.graph_lanes > 0 and self.cfg.cuda_graph and provider == "CUDAExecutionProvider")

    def _load_impl(self) -> None:
        try:
            self._load_session()
        except BaseException:
            self._close_impl()  # the shared CUDA stream, when one was made
            if self._lane_stream is not None:
                self._lane_stream.free()
                self._lane_stream = None
            raise

    def _load_session(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(
                "onnxruntime is not installed: `pip install edge-agent[cpu]`, or on a Jetson NVIDIA's "
                "onnxruntime-gpu wheel from the Jetson AI Lab index (see README)"
            ) from exc
        if not self.model_path.is_file():
            raise ModelError(f"model file not found: {self.model_path}")
        wanted = [p.name for p in self.cfg.providers]
        if wanted[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            # pip-installed CUDA / cuDNN libraries (nvidia-* wheels) are found only when preloaded
            ort.preload_dlls()
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        providers: list[tuple[str, dict[str, str]]] = [(p.name, {k: str(v) for k, v in p.options.items()})
                                                       for p in self.cfg.providers if p.name in available]
        if providers and providers[0][0] in _GPU_EPS:
            providers[0] = (providers[0][0], self._gpu_provider_options(*providers[0]))
        self._lane_providers = list(providers)  # the lanes make their sessions from these
        if missing:
            log.warning("execution providers %s are not available in this onnxruntime (available: %s)",
                        missing, available)
        if self.cfg.require_gpu:
            # ONNX Runtime refuses the CPU EP in the list once CPU fallback is disabled
            if wanted[0] not in available or wanted[0] == "CPUExecutionProvider":
                raise EngineError(f"engine.require_gpu is set but {wanted[0]} is not available "
                                  f"(available: {available})")
            providers = [p for p in providers if p[0] != "CPUExecutionProvider"]
        if not providers:
            raise EngineError(f"none of the execution providers {wanted} is available; available: {available}")
        so = self._session_options()
        profile_dir = None
        if self.cfg.placement_report:
            import tempfile

            profile_dir = tempfile.mkdtemp(prefix="edge-agent-placement-")
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / "placement")
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail / InvalidGraph / RuntimeError types
            raise ModelError(f"cannot load {self.model_path.name}: {str(exc).strip()[:500]}") from exc
        got = list(self._session.get_providers())
        if got[0] != wanted[0]:
            msg = f"asked for {wanted[0]}, running on {got[0]} (providers in use: {got})"
            if self.cfg.require_gpu and wanted[0] != "CPUExecutionProvider":
                raise EngineError(f"GPU execution provider unavailable and engine.require_gpu is set: {msg}")
            log.warning("execution provider fell back: %s", msg)
            if self.on_event is not None:
                self.on_event("engine_fallback", {"wanted": wanted, "providers": got})
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"expected one input tensor, the model has {len(inputs)}")
        inp = inputs[0]
        self._input = TensorSpec(inp.name, _static_shape(inp.name, inp.shape), self._dtype(inp.type, inp.name))
        self._outputs = [TensorSpec(o.name, _static_shape(o.name, o.shape), self._dtype(o.type, o.name))
                         for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        self._graphs = bool(self.cfg.cuda_graph and got[0] in _GPU_EPS)
        if self._graphs:
            self._plain_options = self.run_options(-1)
        if profile_dir is not None:
            self.placement = self._report_placement(profile_dir, got)
        self._binding = None
        if self._lane_stream is not None:
            self._start_lanes(ort)
        elif self.cfg.io_binding:
            self._bind(ort, got[0])
        self._info = EngineInfo(backend="onnxruntime", providers=got, precision=self.precision,
                                device="cpu" if got[0] == "CPUExecutionProvider" else "cuda",
                                extra={"onnxruntime": ort.__version__,
                                       "intra_op_threads": self._session.get_session_options().intra_op_num_threads,
                                       "io_binding": self._binding_device or "off",
                                       "cuda_graph": bool(self.cfg.cuda_graph and got[0] in _GPU_EPS),
                                       "graph_lanes": self._lanes.count if self._lanes is not None else 0,
                                       "graph_replay": self._lanes.replay if self._lanes is not None else None,
                                       "placement": self.placement})

    def _start_lanes(self, ort: Any) -> None:
        """The model as CUDA-graph lanes: the first on the session just made, the others on sessions of
        their own, each on its own stream (ONNX Runtime replays a session's graphs on one stream)."""
        assert self._input is not None

        def make_session(stream: Any) -> Any:
            name, opts = self._lane_providers[0]
            opts = {**opts, "user_compute_stream": str(stream.handle), "has_user_compute_stream": "1"}
            so = self._session_options()
            so.optimized_model_filepath = ""  # the first session wrote the cache's copy
            return ort.InferenceSession(str(self.model_path), sess_options=so,
                                        providers=[(name, opts), *self._lane_providers[1:]])

        first, self._lane_stream = (self._session, self._lane_stream), None  # the lanes own the stream now
        try:
            self._lanes = OrtLanes(make_session, self.cfg.graph_lanes, self._input, self._outputs,
                                   capture_runs=max(3, self.cfg.warmup_runs), first=first, name=self.model_path.name)
        except BaseException:
            first[1].free()
            raise

    def _report_placement(self, profile_dir: str, providers: list[str]) -> dict[str, Any]:
        """Nodes per execution provider, from the profiler's trace of one run on a zero input.

        A GPU EP that leaves nodes to the CPU EP gets Memcpy nodes at every boundary: data crosses
        the bus inside each inference (the subgraph trap). Said in the log and in telemetry.
        """
        import shutil

        assert self._input is not None
        try:
            self._session.run(None, {self._input.name: np.zeros(self._input.shape, self._input.dtype)},
                              self._plain_options)
            trace = json.loads(Path(self._session.end_profiling()).read_text())
        except Exception as exc:  # a report, never a reason to refuse the model
            log.warning("placement report unavailable: %s", str(exc)[:200])
            return {}
        finally:
            shutil.rmtree(profile_dir, ignore_errors=True)
        nodes: dict[str, str] = {}
        for ev in trace:
            args = ev.get("args") or {}
            name = str(ev.get("name", ""))
            if ev.get("cat") == "Node" and name.endswith("_kernel_time") and args.get("provider"):
                nodes[name[: -len("_kernel_time")]] = str(args["provider"])
        per_ep: dict[str, int] = {}
        for ep in nodes.values():
            per_ep[ep] = per_ep.get(ep, 0) + 1
        memcpy = sum(1 for n in nodes if n.startswith("Memcpy"))
        report = {"nodes": per_ep, "memcpy_nodes": memcpy}
        main = providers[0]
        off = {ep: n for ep, n in per_ep.items() if ep != main}
        if main in _GPU_EPS and (off or memcpy):
            log.warning("graph placement: %s runs %d nodes, others %s, %d copies between devices per run "
                        "(each is a host round trip)", main, per_ep.get(main, 0), off, memcpy)
        else:
            log.info("graph placement: %s", per_ep)
        return report

    # ---- device IO (GPU preprocessing writes the input, candidates are read from the outputs) ----
    @property
    def device_stream(self) -> Any | None:
        return self._stream

    def bind_device(self, input_ptr: int, output_ptrs: list[int]) -> int:
        self._require_loaded()
        assert self._input is not None
        if self._stream is None:
            raise EngineError("device IO needs a GPU execution provider and the CUDA Python bindings")
        if len(output_ptrs) != len(self._outputs):
            raise EngineError(f"{len(output_ptrs)} output buffers for {len(self._outputs)} outputs")
        if self._lanes is not None:  # whichever lane is free copies from / to these buffers
            self._lane_bindings.append((int(input_ptr), [int(p) for p in output_ptrs]))
            return len(self._lane_bindings) - 1
        binding = self._session.io_binding()
        binding.bind_input(self._input.name, "cuda", 0, self._input.dtype.type, list(self._input.shape), input_ptr)
        for spec, ptr in zip(self._outputs, output_ptrs, strict=True):
            binding.bind_output(spec.name, "cuda", 0, spec.dtype.type, list(spec.shape), ptr)
        index = len(self._device_bindings)
        ro = self.run_options(self._graph_id(10 + index))  # a CUDA graph per binding: each replays its own addresses
        if self._stream_in_session:
            # the caller synchronises the shared stream once, after its own kernels and copies
            ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._device_bindings.append((binding, ro))
        return index

    def run_options(self, graph_id: int) -> Any:
        """RunOptions naming the CUDA graph a run belongs to (one per set of bound addresses).

        With `cuda_graph` on, ONNX Runtime replays the graph captured for that id; -1 runs without
        a graph (plain session.run, whose buffers move between calls). Without `cuda_graph`, plain.
        """
        import onnxruntime as ort

        ro = ort.RunOptions()
        if self._graphs:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    @property
    def submits_device_runs(self) -> bool:
        return self._lanes is not None

    def submit_device(self, binding: int, wait: Any, input_read: Callable[[Any], None] | None,
                      done: Callable[[Any, list[Any]], None], failed: Callable[[BaseException], None]) -> None:
        if self._lanes is None:
            raise EngineError("submit_device() needs CUDA-graph lanes (engine.graph_lanes)")
        if not 0 <= binding < len(self._lane_bindings):
            raise EngineError("bind_device() first")
        self._lanes.submit_device(self._lane_bindings[binding][0], wait, input_read, done, failed)

    def submit_fill(self, fill: Callable[[Any, int], None], done: Callable[[Any, list[Any]], None],
                    failed: Callable[[BaseException], None]) -> None:
        if self._lanes is None:
            raise EngineError("submit_fill() needs CUDA-graph lanes (engine.graph_lanes)")
        self._lanes.submit_fill(fill, done, failed)

    def run_device(self, binding: int = 0) -> None:
        if self._lanes is not None:
            if not 0 <= binding < len(self._lane_bindings):
                raise EngineError("bind_device() first")
            with cuda.CAPTURE.shared():
                self._stream.synchronize()  # the camera's input is written on its own stream
            self._lanes.run_device(*self._lane_bindings[binding])  # not under the lock: a lane takes it
            return
        if not 0 <= binding < len(self._device_bindings):
            raise EngineError("bind_device() first")
        io, ro = self._device_bindings[binding]
        try:
            if not self._stream_in_session:  # the input written on our stream, ONNX Runtime runs on its own
                with cuda.CAPTURE.shared():
                    self._stream.synchronize()
            if self._shared is None:
                with self._capture_guard():
                    self._session.run_with_iobinding(io, ro)
            else:
                self._shared.workers.submit(self._run_locked, io, ro).result()
        except Exception as exc:
            raise EngineError(f"inference failed: {str(exc).strip()[:300]}") from exc

    def _bind(self, ort: Any, provider: str) -> None:
        """Input and outputs in preallocated buffers on the provider's device, bound once.

        Per frame the input is copied into its buffer and the outputs copied out: no allocation,
        and on a GPU no round trip through ONNX Runtime's own host staging.
        """
        assert self._input is not None
        device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        try:
            binding = self._session.io_binding()
            x = ort.OrtValue.ortvalue_from_shape_and_type(list(self._input.shape), self._input.dtype.type, device, 0)
            binding.bind_ortvalue_input(self._input.name, x)
            outs = []
            for spec in self._outputs:
                y = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), spec.dtype.type, device, 0)
                binding.bind_ortvalue_output(spec.name, y)
                outs.append(y)
        except Exception as exc:  # an ONNX Runtime without these APIs: plain run() still works
            log.warning("IO binding unavailable (%s); using session.run", str(exc)[:200])
            return
        self._binding, self._bound_in, self._bound_out = binding, x, outs
        self._binding_device = device
        self._binding_options = self.run_options(self._graph_id(2)) if self._plain_options is not None else None

    @staticmethod
    def _dtype(ort_type: str, name: str) -> np.dtype:
        dtype = _ORT_DTYPES.get(ort_type)
        if dtype is None:
            raise ModelError(f"tensor {name!r} has unsupported type {ort_type}")
        return dtype

    def _input_spec_impl(self) -> TensorSpec:
        assert self._input is not None  # set by _load_impl; load() guards every caller
        return self._input

    def _output_specs_impl(self) -> list[TensorSpec]:
        return self._outputs

    def _info_impl(self) -> EngineInfo:
        assert self._info is not None
        return self._info

    def _infer_impl(self, tensor: np.ndarray) -> list[np.ndarray]:
        assert self._input is not None
        if self._lanes is not None:
            return self._lanes.run_host(tensor)
        if self._shared is None:
            return self._infer_locked(tensor)
        return self._shared.workers.submit(self._infer_locked, tensor).result()

    def _run_locked(self, io: Any, ro: Any) -> None:
        """On a worker of the shared session: one device-IO run (under the graph lock when graphs are on)."""
        with self._run_guard(), self._capture_guard():
            self._session.run_with_iobinding(io, ro)

    def _infer_locked(self, tensor: np.ndarray) -> list[np.ndarray]:
        with self._run_guard(), self._capture_guard():
            return self._infer_run(tensor)

    def _capture_guard(self) -> contextlib.AbstractContextManager[object]:
        """agent.engines.cuda.CAPTURE for a run on the GPU: alone for this thread's first runs with CUDA
        graphs (ONNX Runtime captures on one of them, per thread, in global mode), else shared."""
        if self._info is not None and self._info.device != "cuda":
            return contextlib.nullcontext()
        if self._graphs:
            runs = getattr(self._thread_runs, "n", 0)
            self._thread_runs.n = runs + 1
            if runs < _CAPTURE_RUNS:
                return cuda.CAPTURE.exclusive()
        return cuda.CAPTURE.shared()

    def _infer_run(self, tensor: np.ndarray) -> list[np.ndarray]:
        assert self._input is not None
        try:
            if self._binding is not None:
                self._bound_in.update_inplace(tensor)
                self._session.run_with_iobinding(self._binding, self._binding_options)
                # Copies the caller owns: the bound buffers are overwritten by the next frame
                # while the post thread may still decode this one.
                return [np.array(y.numpy(), copy=True) for y in self._bound_out]
            out = self._session.run(self._output_names, {self._input.name: tensor}, self._plain_options)
        except Exception as exc:
            raise EngineError(f"inference failed: {str(exc).strip()[:300]}") from exc
        return list(out)

    @property
    def session(self) -> Any:
        """The ONNX Runtime session (for IO binding and profiling)."""
        self._require_loaded()
        return self._session

    # ---- one loaded model, several cameras --------------------------------------------------
    def share(self) -> OnnxRuntimeEngine:
        """Another camera's context on this loaded model: the same session (weights) with its own
        IO binding, buffers, CUDA graph ids and, when ONNX Runtime runs on streams of its own
        (has_user_compute_stream "0"), its own CUDA stream for preprocessing and candidates; else
        the session's one stream. Close each context; the session goes with the last one."""
        self._require_loaded()
        assert self._info is not None
        if self._shared is None:
            self._shared = _SharedSession()
        ctx = OnnxRuntimeEngine(self.model_path, self.cfg, on_event=self.on_event, precision=self.precision)
        with self._shared.lock:
            self._shared.refs += 1
            self._shared.contexts += 1
        ctx._shared = self._shared
        ctx._session, ctx._stream, ctx._graphs = self._session, self._stream, self._graphs
        ctx._stream_in_session = self._stream_in_session
        ctx._lanes = self._lanes
        if self._stream is not None and not self._stream_in_session:
            ctx._stream = cuda.Stream()  # this camera's own stream (ONNX Runtime uses none of ours)
        ctx._input, ctx._outputs, ctx._output_names = self._input, self._outputs, self._output_names
        ctx.metadata, ctx.placement, ctx._plain_options = self.metadata, self.placement, self._plain_options
        ctx._info = self._info.copy()
        if self.cfg.io_binding and self._lanes is None:
            import onnxruntime as ort

            ctx._bind(ort, self._info.providers[0])
        ctx._loaded = True
        return ctx

    @property
    def contexts(self) -> int:
        """Cameras (contexts) created on this loaded session, this one included."""
        return self._shared.contexts if self._shared is not None else 1

    def _serialised(self) -> bool:
        # ONNX Runtime does not support Run from several threads on one session with CUDA graphs
        # (lanes replay each on its own session and thread)
        return self._graphs and self._lanes is None and self._shared is not None and self._shared.contexts > 1

    def _run_guard(self) -> contextlib.AbstractContextManager[object]:
        """The shared session's run lock when runs must be serialised, else nothing to hold."""
        if self._serialised():
            assert self._shared is not None
            return self._shared.run_lock
        return contextlib.nullcontext()

    def _graph_id(self, default: int) -> int:
        return self._shared.graph_id() if self._shared is not None else default

    def _close_impl(self) -> None:
        with cuda.CAPTURE.shared():  # dropping the last reference frees the session's device memory
            self._binding, self._bound_in, self._bound_out = None, None, []
            self._device_bindings, self._lane_bindings = [], []
            self._session = None
        lanes, self._lanes = self._lanes, None  # every context of the session holds the same lanes
        shared, self._shared = self._shared, None
        last = True
        if shared is not None:
            with shared.lock:
                shared.refs -= 1
                last = shared.refs == 0
            if last:
                shared.workers.shutdown(wait=True)
        if last and lanes is not None:
            lanes.close()
        if not last and self._stream_in_session:  # another camera still runs on the session and its stream
            self._stream = None
            return
        if self._stream is not None:
            try:
                with cuda.CAPTURE.shared():
                    self._stream.synchronize()
                    self._stream.free()
            except EngineError as exc:
                log.warning("closing the engine's CUDA stream: %s", exc)
            self._stream = None
