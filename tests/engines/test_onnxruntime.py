from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import EngineConfig, ProviderConfig
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.errors import EngineError, ModelError
from tests.support.models import fixed_yolov8_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # outputs depend on the input (gain 1), so a stale buffer would show
    return fixed_yolov8_model(tmp_path / "m.onnx", [(32, 32, 16, 16, 1, 0.5)], input_gain=1.0)


def test_io_binding_equals_plain_run_and_outputs_are_the_callers(model: Path) -> None:
    bound = OnnxRuntimeEngine(model, EngineConfig(io_binding=True))
    plain = OnnxRuntimeEngine(model, EngineConfig(io_binding=False))
    bound.load()
    plain.load()
    assert bound.info.extra["io_binding"] == "cpu" and plain.info.extra["io_binding"] == "off"
    a = np.full((1, 3, 64, 64), 0.2, np.float32)
    b = np.full((1, 3, 64, 64), 0.7, np.float32)
    out_a = bound.infer(a)[0]
    kept = out_a.copy()
    out_b = bound.infer(b)[0]
    np.testing.assert_array_equal(out_a, kept)  # the next frame did not overwrite it
    np.testing.assert_allclose(out_b, plain.infer(b)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out_a, plain.infer(a)[0], rtol=0, atol=1e-6)
    assert out_b[0, 5, 0] == pytest.approx(0.5 + 0.7, abs=1e-5)
    bound.close()
    plain.close()


def test_input_checks(model: Path) -> None:
    eng = OnnxRuntimeEngine(model, EngineConfig())
    with pytest.raises(EngineError, match="not loaded"):
        eng.infer(np.zeros((1, 3, 64, 64), np.float32))
    eng.load()
    with pytest.raises(EngineError, match="shape"):
        eng.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(EngineError, match="dtype"):
        eng.infer(np.zeros((1, 3, 64, 64), np.float64))


def test_fallback_is_reported_and_require_gpu_refuses(model: Path) -> None:
    events: list[tuple[str, dict]] = []
    cfg = EngineConfig(providers=[ProviderConfig(name="CUDAExecutionProvider"),
                                  ProviderConfig(name="CPUExecutionProvider")])
    eng = OnnxRuntimeEngine(model, cfg, on_event=lambda n, d: events.append((n, d)))
    eng.load()  # no CUDA here: falls back to the CPU, and says so
    assert eng.info.providers == ["CPUExecutionProvider"]
    assert events and events[0][0] == "engine_fallback"
    strict = OnnxRuntimeEngine(model, cfg.model_copy(update={"require_gpu": True}))
    with pytest.raises(EngineError, match="require_gpu"):
        strict.load()
    only_gpu = EngineConfig(providers=[ProviderConfig(name="CUDAExecutionProvider")])
    with pytest.raises(EngineError, match="available"):
        OnnxRuntimeEngine(model, only_gpu).load()


def test_unreadable_and_missing_models(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelError, match=r"bad\.onnx"):
        OnnxRuntimeEngine(bad, EngineConfig()).load()
    with pytest.raises(ModelError, match="not found"):
        OnnxRuntimeEngine(tmp_path / "none.onnx", EngineConfig()).load()
