"""TensorRT backend without TensorRT: clear errors, and the pure helpers on plain data."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.config import EngineConfig
from agent.engines import tensorrt as trtmod
from agent.engines.base import TensorSpec
from agent.engines.factory import create_engine
from agent.engines.tensorrt import (
    BuildOptions,
    TensorRTEngine,
    check_io_contract,
    network_flags,
    numpy_dtype,
    onnx_io_specs,
    parse_version,
    tensorrt_available,
)
from agent.errors import EngineError

F32 = np.dtype(np.float32)


def tiny_model(path: Path, batch: int | str = 1) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["images"], ["output0"])], "t",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 3, 32, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_not_installed_is_none_and_a_clear_error(tmp_path: Path) -> None:
    if tensorrt_available() is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineError, match="TensorRT not installed"):
        TensorRTEngine(tmp_path / "engine.bin")
    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(EngineError, match="TensorRT not installed"):
        create_engine(model, EngineConfig(backend="tensorrt"), None)
    with pytest.raises(EngineError, match="TensorRT not installed"):
        trtmod.build_engine_bytes(model, BuildOptions())


def test_version_parsing_and_branching() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("8.6.2.3") == (8, 6, 2)
    assert parse_version("10.7") == (10, 7, 0)
    assert network_flags("8.6.2.3", 0) == 1  # EXPLICIT_BATCH asked for on 8.x
    assert network_flags("10.3.0.30", 0) == 0  # implied (and deprecated) on 10.x
    with pytest.raises(EngineError, match="too old"):
        network_flags("8.5.3", 0)
    with pytest.raises(EngineError):
        parse_version("none")


def test_dtype_mapping() -> None:
    assert numpy_dtype("FLOAT") == F32
    assert numpy_dtype("DataType.HALF") == np.dtype(np.float16)
    enum_like = types.SimpleNamespace(name="INT64")
    assert numpy_dtype(enum_like) == np.dtype(np.int64)
    for name, want in (("INT8", np.int8), ("INT32", np.int32), ("BOOL", np.bool_), ("UINT8", np.uint8)):
        assert numpy_dtype(name) == np.dtype(want)
    with pytest.raises(EngineError, match="BF16"):
        numpy_dtype("BF16")


def test_onnx_io_specs_fix_a_dynamic_batch(tmp_path: Path) -> None:
    inputs, outputs = onnx_io_specs(tiny_model(tmp_path / "m.onnx", batch="N"))
    assert inputs == [TensorSpec("images", (1, 3, 32, 32), F32)]
    assert outputs == [TensorSpec("output0", (1, 3, 32, 32), F32)]


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


def test_build_options_cover_the_key() -> None:
    fields = BuildOptions.from_config(EngineConfig(backend="tensorrt", precision="int8", dla_core=0)).key_fields()
    assert fields["precision"] == "int8" and fields["dla_core"] == "0"
    assert fields["int8_calibration"] == "explicit-qdq-in-model"
    assert {"workspace_mb", "optimization_level", "hardware_compat", "version_compat"} <= set(fields)


def test_progress_monitor_reports_the_top_phase() -> None:
    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    fake = types.SimpleNamespace(IProgressMonitor=IProgressMonitor)
    seen: list[tuple[float, str]] = []
    mon = trtmod._progress_monitor(fake, lambda f, note: seen.append((f, note)))
    assert mon is not None
    mon.phase_start("Building engine", None, 4)
    mon.phase_start("tactics", "Building engine", 100)
    assert mon.step_complete("tactics", 5) is True
    assert mon.step_complete("Building engine", 1) is True
    mon.phase_finish("Building engine")
    assert seen == [(0.0, "Building engine"), (0.5, "Building engine"), (1.0, "Building engine")]
    assert trtmod._progress_monitor(types.SimpleNamespace(), lambda f, n: None) is None  # 8.6: none
