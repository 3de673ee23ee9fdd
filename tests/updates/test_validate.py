from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.errors import UpdateError
from agent.updates.manifest import Manifest
from agent.updates.validate import IOContract, smoke_test, validate_model
from tests.support.models import fixed_yolov8_model
from tests.updates.helpers import make_manifest


def manifest_for(path: Path, **kw: object) -> Manifest:
    m = make_manifest(path.read_bytes(), **kw)  # type: ignore[arg-type]
    m["key_id"], m["signature"] = "k1", "sig"
    return Manifest.model_validate(m)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return fixed_yolov8_model(tmp_path / "m.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64, num_classes=2)


def reason(path: Path, m: Manifest, exp: IOContract | None = None) -> str:
    with pytest.raises(UpdateError) as ei:
        validate_model(path, m, exp)
    return ei.value.reason


def test_valid_model(model: Path) -> None:
    io = validate_model(model, manifest_for(model))
    assert io.input_shape == (1, 3, 64, 64) and io.input_dtype == "float32"
    assert io.decoder == "yolov8" and io.num_classes == 2


def test_checksum_and_size(model: Path, tmp_path: Path) -> None:
    m = manifest_for(model)
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes(data))
    assert reason(bad, m) == "checksum_mismatch"
    bad.write_bytes(bytes(data) + b"x")
    assert reason(bad, m) == "size_mismatch"


def test_not_onnx(tmp_path: Path) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\x08\x07this is not a model" * 10)
    assert reason(p, manifest_for(p)) == "onnx_invalid"


def test_checker_rejects_invalid_graph(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["missing_input"], ["out"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6, 16])])
    p = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    assert reason(p, manifest_for(p)) == "onnx_invalid"


def test_io_contract(model: Path) -> None:
    assert reason(model, manifest_for(model, labels=["a", "b", "c"])) == "io_mismatch"  # 3 labels, 2 classes
    assert reason(model, manifest_for(model, size=128)) == "io_mismatch"
    assert reason(model, manifest_for(model, decoder="yolov5")) == "io_mismatch"
    assert reason(model, manifest_for(model, decoder="end2end")) == "io_mismatch"
    assert reason(model, manifest_for(model), IOContract(64, 64, "yolov8", 2, ("float16",))) == "io_mismatch"


def test_external_data_rejected(tmp_path: Path, model: Path) -> None:
    m = onnx.load(str(model))
    p = tmp_path / "ext.onnx"
    onnx.save(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
              size_threshold=0)
    assert reason(p, manifest_for(p)) == "external_data"


def test_smoke_test() -> None:
    frames = [np.zeros((1, 3, 8, 8), np.float32)] * 3
    res = smoke_test(lambda t: [np.ones((1, 6, 4), np.float32)], frames, budget_ms=1000)
    assert res["runs"] == 3 and res["output_shapes"] == [[1, 6, 4]]
    with pytest.raises(UpdateError, match="non_finite_output"):
        smoke_test(lambda t: [np.full((1, 6, 4), np.nan, np.float32)], frames, 1000)

    def slow(t: np.ndarray) -> list[np.ndarray]:
        time.sleep(0.02)
        return [np.ones(3, np.float32)]

    with pytest.raises(UpdateError, match="too_slow"):
        smoke_test(slow, frames, budget_ms=5)

    def broken(t: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("CUDA error")

    with pytest.raises(UpdateError, match="smoke_failed"):
        smoke_test(broken, frames, 1000)
    with pytest.raises(UpdateError, match="smoke_failed"):
        smoke_test(lambda t: [], frames, 1000)
    with pytest.raises(UpdateError, match="smoke_failed"):
        smoke_test(lambda t: [np.ones(1)], [], 1000)
    assert json.dumps(res)
