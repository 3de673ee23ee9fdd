"""The bad-model corpus: each model is generated and is bad in the stated way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scripts.bad_models import BAD_KINDS, make_bad_models


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_models(tmp_path_factory.mktemp("bad"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_every_kind_is_written_and_small(bad: dict[str, Path]) -> None:
    assert set(bad) == set(BAD_KINDS)
    for kind, path in bad.items():
        assert path.is_file()
        if kind != "truncated":
            assert path.stat().st_size < 64 * 1024


def test_wrong_input_shape(bad: dict[str, Path]) -> None:
    onnx.checker.check_model(onnx.load(str(bad["wrong_input_shape"])))  # valid ONNX, wrong contract
    s = _session(bad["wrong_input_shape"])
    shape = s.get_inputs()[0].shape
    assert shape == [1, 320, 320, 3]
    assert shape[1] != 3  # not NCHW
    out = s.run(None, {"images": np.zeros(shape, np.float32)})[0]
    assert out.shape == (1, 8, 64)


def test_wrong_output_layout(bad: dict[str, Path]) -> None:
    s = _session(bad["wrong_output_layout"])
    assert s.get_inputs()[0].shape == [1, 3, 320, 320]
    out = s.run(None, {"images": np.zeros((1, 3, 320, 320), np.float32)})[0]
    assert out.ndim == 2  # not [1, 4 + nc, N]


def test_nan_outputs(bad: dict[str, Path]) -> None:
    s = _session(bad["nan_outputs"])
    assert s.get_inputs()[0].shape == [1, 3, 320, 320]
    assert s.get_outputs()[0].shape == [1, 8, 64]
    out = s.run(None, {"images": np.random.default_rng(0).random((1, 3, 320, 320), np.float32)})[0]
    assert out.shape == (1, 8, 64)
    assert np.isnan(out).all()


def test_truncated(bad: dict[str, Path]) -> None:
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError, whatever its module
        onnx.load(str(bad["truncated"]))
    with pytest.raises(Exception):  # noqa: B017
        _session(bad["truncated"])


def test_checker_fails(bad: dict[str, Path]) -> None:
    model = onnx.load(str(bad["checker_fails"]))  # parses fine
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    with pytest.raises(Exception):  # noqa: B017 - ORT refuses it too
        _session(bad["checker_fails"])
