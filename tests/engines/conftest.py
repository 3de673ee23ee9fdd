"""Shared fixtures for the engine tests: tiny real ONNX models, and the TensorRT test double.

`fake_trt` puts tests/support/fake_tensorrt.py's module in place of `tensorrt` (TensorRT cannot be
installed here) and a FakeCudart in place of the CUDA runtime bindings, once for TensorRT 8.6
(JetPack 6.0) and once for 10.3 (JetPack 6.1 / 6.2).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.engines import cuda, fingerprint
from tests.support.fake_tensorrt import FakeCudart, make_tensorrt

VERSIONS = ("8.6.2.3", "10.3.0.26")


def conv_model(path: Path, seed: int = 0, batch: int | str = 1, channels: int = 4) -> Path:
    """images [batch,3,32,32] -> Conv(3x3, bias) -> Sigmoid -> output0 [batch,channels,32,32]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv0"),
         helper.make_node("Sigmoid", ["c"], ["output0"], name="sigmoid0")], "conv_sigmoid",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, channels, 32, 32])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return conv_model(tmp_path / "m.onnx")


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCudart]:
    fake = FakeCudart()
    monkeypatch.setattr(cuda, "_RT", fake)
    yield fake


FakeFactory = Callable[..., types.ModuleType]


@pytest.fixture
def make_fake(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart) -> Iterator[FakeFactory]:
    """make_fake(version, **knobs) -> the fake module, installed as `tensorrt`."""

    def make(version: str = VERSIONS[1], **knobs: object) -> types.ModuleType:
        mod = make_tensorrt(version, **knobs)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        fingerprint._device_fields.cache_clear()  # the fingerprint memoises the TensorRT version it read
        return mod

    yield make
    fingerprint._device_fields.cache_clear()


@pytest.fixture(params=VERSIONS)
def fake_trt(request: pytest.FixtureRequest, make_fake: FakeFactory) -> types.ModuleType:
    return make_fake(request.param)
