"""ONNX -> engine bytes on the recording fake of the TensorRT bindings (8.6 and 10.3): the calls
made, in order, per precision; DLA; batch-1 profile; failure paths; progress."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from agent.cache.store import EngineCache
from agent.engines import trt_build
from agent.engines.quantize import make_calibration_reader, quantize_int8
from agent.engines.trt_build import build_engine_bytes, progress_monitor
from agent.engines.trt_common import BuildOptions
from agent.errors import EngineError, ModelError
from tests.engines.conftest import FakeFactory, conv_model
from tests.support.fake_tensorrt import plan_header


def flag_calls(trt: types.ModuleType) -> list[tuple[str, str]]:
    return [(n.rsplit(".", 1)[1], a[0]) for n, a in trt._state.calls if n.endswith(("set_flag", "clear_flag"))]


def test_fp32_clears_tf32_and_sets_pool_level_and_network_flags(fake_trt: types.ModuleType, model: Path) -> None:
    plan = build_engine_bytes(model, BuildOptions(precision="fp32", workspace_mb=256, optimization_level=5))
    st = fake_trt._state
    assert flag_calls(fake_trt) == [("clear_flag", "TF32")]  # point 4: fp32 really is fp32
    assert ("IBuilderConfig.set_memory_pool_limit", ("WORKSPACE", 256 << 20)) in st.calls
    assert ("IBuilderConfig.builder_optimization_level=", (5,)) in st.calls
    header = plan_header(plan)
    assert "TF32" not in header["flags"] and header["workspace"] == 256 << 20 and header["opt_level"] == 5
    # point 8: TensorRT's plugins are registered before the builder exists
    assert st.index("init_libnvinfer_plugins") < st.index("Builder")
    # point 9: EXPLICIT_BATCH is asked for on 8.6 and not even read on 10.x (deprecated there)
    explicit = fake_trt.__version__.startswith("8.")
    assert ("Builder.create_network", (1 if explicit else 0,)) in st.calls
    assert st.deprecated == []


def test_fp16_and_int8_flags(fake_trt: types.ModuleType, model: Path, tmp_path: Path) -> None:
    build_engine_bytes(model, BuildOptions(precision="fp16"))
    assert flag_calls(fake_trt) == [("set_flag", "FP16")]
    fake_trt._state.calls.clear()
    frames = [__import__("numpy").random.default_rng(i).integers(0, 255, (40, 40, 3), dtype="uint8")
              for i in range(4)]
    qdq = quantize_int8(model, tmp_path / "q.onnx", frames, variant="tensorrt")
    plan = build_engine_bytes(qdq, BuildOptions(precision="int8"))
    assert flag_calls(fake_trt) == [("set_flag", "INT8"), ("set_flag", "FP16")]
    assert {"INT8", "FP16", "TF32"} <= set(plan_header(plan)["flags"])


def test_int32_bias_dequantize_is_what_the_parser_rejects(fake_trt: types.ModuleType, model: Path,
                                                          tmp_path: Path) -> None:
    """Point 1 from the other side: ONNX Runtime's default (QuantizeBias on) makes INT32
    DequantizeLinear inputs, which TensorRT's parser refuses on 8.6 and 10.x alike."""
    import numpy as np

    frames = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(4)]
    out = tmp_path / "int32-bias.onnx"
    quantize_static(str(model), str(out), make_calibration_reader(model, frames), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    with pytest.raises(ModelError, match="DequantizeLinear input of type INT32"):
        build_engine_bytes(out, BuildOptions(precision="int8"))


def test_dla_with_gpu_fallback(make_fake: FakeFactory, model: Path) -> None:
    trt = make_fake("10.3.0.26", dla_cores=2)
    plan = build_engine_bytes(model, BuildOptions(precision="fp16", dla_core=1))
    st = trt._state
    assert ("IBuilderConfig.default_device_type=", (trt.DeviceType.DLA,)) in st.calls
    assert ("IBuilderConfig.DLA_core=", (1,)) in st.calls
    assert ("set_flag", "GPU_FALLBACK") in flag_calls(trt)
    assert plan_header(plan)["dla_core"] == 1
    with pytest.raises(EngineError, match="DLA core 2 requested, this device has 2"):
        build_engine_bytes(model, BuildOptions(precision="fp16", dla_core=2))
    with pytest.raises(EngineError, match="DLA has no fp32"):
        build_engine_bytes(model, BuildOptions(precision="fp32", dla_core=0))


def test_dynamic_batch_gets_a_batch_1_profile(fake_trt: types.ModuleType, tmp_path: Path) -> None:
    path = conv_model(tmp_path / "dyn.onnx", batch="N")
    plan = build_engine_bytes(path, BuildOptions())
    assert ("IOptimizationProfile.set_shape", ("images", [1, 3, 32, 32], [1, 3, 32, 32], [1, 3, 32, 32])) \
        in fake_trt._state.calls
    assert plan_header(plan)["io"][0]["shape"] == [-1, 3, 32, 32]


def test_parser_errors_are_named(make_fake: FakeFactory, model: Path, tmp_path: Path) -> None:
    make_fake("8.6.2.3", unsupported_ops=("Conv",))
    with pytest.raises(ModelError, match=r"TensorRT cannot parse m\.onnx: .*No importer registered for op: Conv"):
        build_engine_bytes(model, BuildOptions())
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="failed to load the model"):
        build_engine_bytes(tmp_path / "junk.onnx", BuildOptions())


def test_build_returning_none_is_an_engine_error(make_fake: FakeFactory, model: Path) -> None:
    make_fake("10.3.0.26", build_returns_none=True)
    with pytest.raises(EngineError, match=r"could not build an engine from m\.onnx"):
        build_engine_bytes(model, BuildOptions())


def test_8_6_without_explicit_batch_fails_like_the_real_parser(make_fake: FakeFactory, model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake holds 8.6 to its rule, so a regression to 10.x-style flags on 8.6 fails CI."""
    make_fake("8.6.2.3")
    monkeypatch.setattr(trt_build, "network_flags", lambda version, bit: 0)
    with pytest.raises(ModelError, match="explicit batch"):
        build_engine_bytes(model, BuildOptions())


def test_progress_is_reported_on_10x_only(fake_trt: types.ModuleType, model: Path) -> None:
    seen: list[tuple[float, str]] = []
    build_engine_bytes(model, BuildOptions(), progress=lambda f, note: seen.append((f, note)))
    if fake_trt.__version__.startswith("10."):
        assert seen == [(0.0, "Building engine"), (0.5, "Building engine"), (1.0, "Building engine"),
                        (1.0, "Building engine")]
    else:  # 8.6 has no IProgressMonitor
        assert seen == []
    assert progress_monitor(types.SimpleNamespace(), lambda f, n: None) is None


def test_timing_cache_is_reused_on_the_same_tensorrt_and_gpu(fake_trt: types.ModuleType, model: Path,
                                                             tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache", 1 << 24)
    first = build_engine_bytes(model, BuildOptions(), cache, timing_tag="tag-a")
    stored = tmp_path / "cache" / "timing" / "tag-a.cache"
    assert stored.is_file() and plan_header(first)["timing_hits"] == 0
    second = build_engine_bytes(model, BuildOptions(), cache, timing_tag="tag-a")
    assert plan_header(second)["timing_hits"] == 2  # the entries measured by the first build
    assert ("IBuilderConfig.set_timing_cache", (f"{fake_trt.__version__}|Orin", False)) in fake_trt._state.calls
