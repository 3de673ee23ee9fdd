"""The Engine base: shared checks live in the public methods, backends write the `_impl` ones.

Lifecycle: construct (cheap) -> load() (allocates everything once) -> infer() per frame -> close().
Nothing is allocated per inference by the base; backends are expected to do the same.

Several cameras on one model: `share()` on a loaded engine returns another context on the same
loaded model (weights loaded once) with its own input / output buffers, bindings and, where the
backend allows, its own stream; each context serves one camera's threads and is closed on its
own (the model goes with the last). A backend that cannot share raises EngineError, and the
caller loads one engine per camera instead.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agent.errors import EngineError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # fixed shape, batch 1
    dtype: np.dtype


@dataclass(slots=True)
class EngineInfo:
    backend: str  # "onnxruntime" | "tensorrt"
    providers: list[str]  # execution providers really in use (ONNX Runtime), or ["TensorRT"]
    precision: str  # "fp32" | "fp16" | "int8"
    device: str = "cpu"
    engine_key: str = ""  # cache key of the built engine, where one was used
    extra: dict[str, object] = field(default_factory=dict)

    def copy(self) -> EngineInfo:
        """An independent copy (its own providers list and extra dict), for another context."""
        return replace(self, providers=list(self.providers), extra=dict(self.extra))

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "providers": list(self.providers),
            "precision": self.precision,
            "device": self.device,
            "engine_key": self.engine_key,
            **self.extra,
        }


class Engine(abc.ABC):
    """A detector at batch 1: one input tensor in, one or more output tensors out."""

    def __init__(self) -> None:
        self._loaded = False

    # ---- public API (the checks every backend needs) -------------------------------------
    def load(self) -> None:
        if self._loaded:
            return
        self._load_impl()
        self._loaded = True

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def input_spec(self) -> TensorSpec:
        self._require_loaded()
        return self._input_spec_impl()

    @property
    def output_specs(self) -> list[TensorSpec]:
        self._require_loaded()
        return self._output_specs_impl()

    @property
    def info(self) -> EngineInfo:
        self._require_loaded()
        return self._info_impl()

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run one batch-1 inference. `tensor` must match `input_spec` exactly."""
        self._require_loaded()
        spec = self._input_spec_impl()
        if tensor.shape != spec.shape:
            raise EngineError(f"input shape {tensor.shape} does not match the model's {spec.shape}")
        if tensor.dtype != spec.dtype:
            raise EngineError(f"input dtype {tensor.dtype} does not match the model's {spec.dtype}")
        return self._infer_impl(tensor)

    # ---- device-resident IO (GPU backends) -----------------------------------------------
    @property
    def device_stream(self) -> Any | None:
        """The CUDA stream (agent.engines.cuda.Stream) the engine runs on, when device IO is possible.

        Work queued on it before run_device() is ordered before the inference, so a preprocessing
        kernel can write the bound input without a host synchronisation.
        """
        return None

    def bind_device(self, input_ptr: int, output_ptrs: list[int]) -> int:
        """Register caller-owned device buffers (outputs in output_specs order); returns the binding's id.

        Several bindings (e.g. two input buffers used in turn) may exist; each keeps its addresses.
        """
        raise EngineError(f"{type(self).__name__} has no device IO")

    def run_device(self, binding: int = 0) -> None:
        """One inference on a binding's buffers, on device_stream (the caller synchronises)."""
        raise EngineError(f"{type(self).__name__} has no device IO")

    @property
    def submits_device_runs(self) -> bool:
        """True when submit_device() queues a run without waiting for it (CUDA-graph lanes)."""
        return False

    def submit_device(self, binding: int, wait: Any, input_read: Callable[[Any], None] | None,
                      done: Callable[[Any, list[Any]], None], failed: Callable[[BaseException], None]) -> None:
        """Queue one inference on a binding's input without waiting (agent.engines.ort_lanes): the
        engine's stream waits on `wait` (a cuda.Event) first; the hooks run on the engine's thread."""
        raise EngineError(f"{type(self).__name__} cannot submit device runs")

    def submit_fill(self, fill: Callable[[Any, int], None], done: Callable[[Any, list[Any]], None],
                    failed: Callable[[BaseException], None]) -> None:
        """As submit_device, but `fill(stream, input_ptr)` queues what writes the run's own input
        buffer on its stream (a preprocessing kernel straight into it: no copy of a bound input)."""
        raise EngineError(f"{type(self).__name__} cannot submit device runs")

    def share(self) -> Engine:
        """Another context on this loaded model, for another camera (see the module docstring)."""
        raise EngineError(f"{type(self).__name__} cannot share one loaded model between cameras")

    @property
    def contexts(self) -> int:
        """How many contexts (cameras) run on this loaded model."""
        return 1

    def warmup(self, runs: int = 3) -> None:
        """Run a few inferences on a zero input so that the first real frame is not slow."""
        spec = self.input_spec
        dummy = np.zeros(spec.shape, dtype=spec.dtype)
        for _ in range(runs):
            self._infer_impl(dummy)

    def close(self) -> None:
        if self._loaded:
            self._close_impl()
            self._loaded = False

    def __enter__(self) -> Engine:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise EngineError(f"{type(self).__name__} is not loaded; call load() first")

    # ---- what a backend implements -------------------------------------------------------
    @abc.abstractmethod
    def _load_impl(self) -> None: ...

    @abc.abstractmethod
    def _input_spec_impl(self) -> TensorSpec: ...

    @abc.abstractmethod
    def _output_specs_impl(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def _info_impl(self) -> EngineInfo: ...

    @abc.abstractmethod
    def _infer_impl(self, tensor: np.ndarray) -> list[np.ndarray]: ...

    @abc.abstractmethod
    def _close_impl(self) -> None: ...
