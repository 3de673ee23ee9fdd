"""TensorRTEngine on the recording fake of the TensorRT bindings (8.6 and 10.3) and a fake CUDA
runtime: deserialize with the DLA core set first, IO by name, the agent's buffers and stream,
numerics against ONNX Runtime's CPU EP, and every failure path; without TensorRT, clear errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.config import EngineConfig
from agent.engines.factory import create_engine
from agent.engines.tensorrt import TensorRTEngine, build_engine_bytes, tensorrt_available
from agent.engines.trt_common import BuildOptions
from agent.errors import EngineError, ModelError
from tests.engines.conftest import FakeFactory, conv_model
from tests.support.fake_tensorrt import FakeCudart, plan_header


def built(model: Path, tmp_path: Path, **options: object) -> Path:
    path = tmp_path / "engine.plan"
    path.write_bytes(build_engine_bytes(model, BuildOptions(**options)))  # type: ignore[arg-type]
    return path


def frame() -> np.ndarray:
    return np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)


def test_not_installed_is_none_and_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    assert tensorrt_available() is None
    with pytest.raises(EngineError, match="TensorRT not installed"):
        TensorRTEngine(tmp_path / "engine.bin")
    model = conv_model(tmp_path / "m.onnx")
    with pytest.raises(EngineError, match="TensorRT not installed"):
        create_engine(model, EngineConfig(backend="tensorrt"), None)
    with pytest.raises(EngineError, match="TensorRT not installed"):
        build_engine_bytes(model, BuildOptions())


def test_load_and_infer_on_the_agents_buffers_and_stream(fake_trt: types.ModuleType, cudart: FakeCudart,
                                                         model: Path, tmp_path: Path) -> None:
    engine = TensorRTEngine(built(model, tmp_path), model)
    engine.load()
    st = fake_trt._state
    assert st.index("init_libnvinfer_plugins") < st.index("Runtime.deserialize_cuda_engine")  # point 8
    assert engine.input_spec.name == "images" and [s.name for s in engine.output_specs] == ["output0"]
    addresses = {a[0]: a[1] for n, a in st.calls if n == "IExecutionContext.set_tensor_address"}
    assert set(addresses) == {"images", "output0"} and set(addresses.values()) <= cudart.device
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": frame()})[0]
    got = engine.infer(frame())[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stream = engine.device_stream
    assert stream is not None
    assert ("IExecutionContext.execute_async_v3", (stream.handle,)) in st.calls
    assert engine.info.backend == "tensorrt" and engine.info.extra["tensorrt"] == fake_trt.__version__
    engine.close()
    assert cudart.live == {} and cudart.streams == set()  # everything it allocated is freed


def test_device_bindings_set_addresses_once_per_switch(fake_trt: types.ModuleType, cudart: FakeCudart,
                                                       model: Path, tmp_path: Path) -> None:
    engine = TensorRTEngine(built(model, tmp_path), model)
    engine.load()
    ins = [cudart.cudaMalloc(3 * 32 * 32 * 4)[1] for _ in range(2)]
    out = cudart.cudaMalloc(4 * 32 * 32 * 4)[1]
    a, b = engine.bind_device(ins[0], [out]), engine.bind_device(ins[1], [out])
    fake_trt._state.calls.clear()
    engine.run_device(a)
    engine.run_device(a)
    engine.run_device(b)
    addr = [x for n, x in fake_trt._state.calls if n == "IExecutionContext.set_tensor_address"]
    assert addr == [("images", ins[0]), ("output0", out), ("images", ins[1]), ("output0", out)]
    assert fake_trt._state.names().count("IExecutionContext.execute_async_v3") == 3
    with pytest.raises(EngineError, match="run_device"):
        engine.infer(frame())
    engine.close()


def test_dla_core_is_set_before_deserialize(make_fake: FakeFactory, model: Path, tmp_path: Path) -> None:
    """Point 3: an engine built for DLA core 1 runs on core 1 only if the runtime is told first."""
    trt = make_fake("10.3.0.26", dla_cores=2)
    path = built(model, tmp_path, precision="fp16", dla_core=1)
    engine = TensorRTEngine(path, model, "fp16", dla_core=1)
    engine.load()
    st = trt._state
    assert st.index("Runtime.DLA_core=") < st.index("Runtime.deserialize_cuda_engine")
    assert ("Runtime.deserialize_cuda_engine", (path.stat().st_size, 1)) in st.calls
    assert engine.info.extra["dla_core"] == 1
    engine.close()
    with pytest.raises(EngineError, match="DLA core 3; this device has 2"):
        TensorRTEngine(path, model, "fp16", dla_core=3).load()


def test_damaged_or_foreign_plan_deserializes_to_none(make_fake: FakeFactory, cudart: FakeCudart, model: Path,
                                                      tmp_path: Path) -> None:
    make_fake("8.6.2.3")
    path = built(model, tmp_path)
    make_fake("10.3.0.26")  # JetPack upgraded under the file
    with pytest.raises(EngineError, match=r"cannot deserialize engine\.plan: built by another TensorRT"):
        TensorRTEngine(path, model).load()
    path = built(model, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same length: only TensorRT itself can tell
    path.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="cannot deserialize"):
        TensorRTEngine(path, model).load()
    assert cudart.live == {}


def test_engine_that_does_not_fit_the_model(fake_trt: types.ModuleType, cudart: FakeCudart, model: Path,
                                            tmp_path: Path) -> None:
    path = built(model, tmp_path)
    other = conv_model(tmp_path / "wider.onnx", channels=6)
    with pytest.raises(ModelError, match=r"output 'output0': shape \(1, 4, 32, 32\) in the engine"):
        TensorRTEngine(path, other).load()
    assert cudart.live == {}


def test_refused_input_shape_and_data_dependent_outputs(make_fake: FakeFactory, tmp_path: Path) -> None:
    dyn = conv_model(tmp_path / "dyn.onnx", batch="N")
    make_fake("10.3.0.26", set_input_shape_ok=False)
    with pytest.raises(EngineError, match=r"refused input shape \(1, 3, 32, 32\) for 'images'"):
        TensorRTEngine(built(dyn, tmp_path), dyn).load()
    trt = make_fake("10.3.0.26")
    engine = TensorRTEngine(built(dyn, tmp_path), dyn)
    engine.load()  # the dynamic batch is fixed at 1 and the output shape resolves
    assert engine.output_specs[0].shape == (1, 4, 32, 32)
    assert ("IExecutionContext.set_input_shape", ("images", [1, 3, 32, 32])) in trt._state.calls
    engine.close()
    make_fake("10.3.0.26", data_dependent_output=True)
    with pytest.raises(ModelError, match="data-dependent shape"):
        TensorRTEngine(built(dyn, tmp_path), dyn).load()


def test_plan_carries_what_was_built(fake_trt: types.ModuleType, model: Path, tmp_path: Path) -> None:
    header = plan_header(built(model, tmp_path, precision="fp16").read_bytes())
    assert header["trt"] == fake_trt.__version__ and "FP16" in header["flags"]
