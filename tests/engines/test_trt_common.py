"""TensorRT helpers on plain data: versions, flags, dtypes, IO specs and contract, build options,
and the once-per-process logger / plugin registration (on the fake bindings)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines import trt_common
from agent.engines.base import TensorSpec
from agent.engines.trt_common import (
    BuildOptions,
    check_io_contract,
    network_flags,
    numpy_dtype,
    onnx_io_specs,
    parse_version,
    require_tensorrt,
)
from agent.errors import EngineError
from tests.engines.conftest import FakeFactory, conv_model

F32 = np.dtype(np.float32)


def test_version_parsing_and_branching() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("8.6.2.3") == (8, 6, 2)
    assert parse_version("10.7") == (10, 7, 0)
    assert network_flags("8.6.2.3", 0) == 1  # EXPLICIT_BATCH asked for on 8.x
    assert network_flags("10.3.0.30", None) == 0  # implied (and deprecated) on 10.x: not even read
    with pytest.raises(EngineError, match="EXPLICIT_BATCH"):
        network_flags("8.6.2.3", None)
    with pytest.raises(EngineError, match="too old"):
        network_flags("8.5.3", 0)
    with pytest.raises(EngineError):
        parse_version("none")


def test_dtype_mapping() -> None:
    assert numpy_dtype("FLOAT") == F32
    assert numpy_dtype("DataType.HALF") == np.dtype(np.float16)
    assert numpy_dtype(types.SimpleNamespace(name="INT64")) == np.dtype(np.int64)
    for name, want in (("INT8", np.int8), ("INT32", np.int32), ("BOOL", np.bool_), ("UINT8", np.uint8)):
        assert numpy_dtype(name) == np.dtype(want)
    with pytest.raises(EngineError, match="BF16"):
        numpy_dtype("BF16")


def test_onnx_io_specs_fix_a_dynamic_batch(tmp_path: Path) -> None:
    inputs, outputs = onnx_io_specs(conv_model(tmp_path / "m.onnx", batch="N"))
    assert inputs == [TensorSpec("images", (1, 3, 32, 32), F32)]
    assert outputs == [TensorSpec("output0", (1, 4, 32, 32), F32)]


def test_io_contract_check() -> None:
    model_in = [TensorSpec("images", (1, 3, 640, 640), F32)]
    model_out = [TensorSpec("output0", (1, 84, -1), F32)]
    assert check_io_contract(model_in, model_out, model_in, [TensorSpec("output0", (1, 84, 8400), F32)]) == []
    problems = check_io_contract(
        model_in, model_out,
        [TensorSpec("input", (1, 3, 640, 640), F32)],
        [TensorSpec("output0", (1, 84, 8400), np.dtype(np.float16)), TensorSpec("extra", (1,), F32)])
    text = "; ".join(problems)
    assert "input 'images' of the model is missing" in text
    assert "extra output 'extra'" in text
    assert "dtype float16 in the engine" in text
    shape = check_io_contract(model_in, model_out, [TensorSpec("images", (1, 3, 320, 320), F32)],
                              [TensorSpec("output0", (1, 84, 2100), F32)])
    assert shape == ["input 'images': shape (1, 3, 320, 320) in the engine, (1, 3, 640, 640) in the model"]


def test_build_options_cover_the_key_and_name_tf32() -> None:
    fields = BuildOptions.from_config(EngineConfig(backend="tensorrt", precision="int8", dla_core=0)).key_fields()
    assert fields["precision"] == "int8" and fields["dla_core"] == "0"
    assert fields["int8_calibration"] == "explicit-qdq-in-model"
    assert {"workspace_mb", "optimization_level", "hardware_compat", "version_compat"} <= set(fields)
    # issue 14 point 4: an fp32 engine is built without TF32, and the key says so
    assert BuildOptions(precision="fp32").key_fields()["tf32"] == "off"
    assert BuildOptions(precision="fp16").key_fields()["tf32"] == "on"


def test_require_tensorrt_refuses_stubs_and_old_versions(make_fake: FakeFactory,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(EngineError, match="TensorRT not installed"):
        require_tensorrt()
    make_fake("8.5.3.1")
    with pytest.raises(EngineError, match="too old"):
        require_tensorrt()
    assert require_tensorrt() if make_fake("10.3.0.26") else False


def test_plugins_registered_once_per_module(make_fake: FakeFactory) -> None:
    trt = make_fake("10.3.0.26")
    trt_common.init_plugins()
    trt_common.init_plugins()
    assert trt._state.names().count("init_libnvinfer_plugins") == 1
    assert trt._state.plugins_registered
    assert trt_common.logger() is trt_common.logger()  # one logger: it must outlive builders / runtimes
    failing = make_fake("10.3.0.26", plugins_ok=False)  # a fresh process / module registers again
    trt_common.init_plugins()  # a failure is logged, not raised: models without plugins still work
    assert failing._state.names().count("init_libnvinfer_plugins") == 1
