"""agent.checks: the files a valid config names, checked without building an engine (in process,
on small real ONNX models)."""

from __future__ import annotations

from pathlib import Path

import onnx

from agent.checks import model_errors
from agent.config import ModelConfig
from tests.support.models import fixed_yolov8_model


def _model(tmp_path: Path, classes: int = 2) -> Path:
    return fixed_yolov8_model(tmp_path / "m.onnx", [(32, 32, 16, 16, 0, 0.9)], num_classes=classes, anchors=40)


def test_a_fitting_model_has_no_errors(tmp_path: Path) -> None:
    path = _model(tmp_path)
    assert model_errors(ModelConfig(path=path)) == []
    assert model_errors(ModelConfig(path=path, decoder="yolov8", labels=["a", "b"])) == []


def test_declared_decoder_and_labels_must_fit(tmp_path: Path) -> None:
    path = _model(tmp_path)
    [err] = model_errors(ModelConfig(path=path, decoder="end2end"))
    assert err.startswith("model.decoder:") and "[1, 6, 40]" in err
    [err] = model_errors(ModelConfig(path=path, labels=["a", "b", "c"]))
    assert err.startswith("model.labels:") and "3 labels" in err


def test_symbolic_output_dims_are_left_to_the_runtime(tmp_path: Path) -> None:
    """A dynamic export ([batch, 6, anchors]) cannot be judged from the file: no error, no guess."""
    path = _model(tmp_path)
    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param = "batch", "anchors"
    onnx.save(m, str(path))
    assert model_errors(ModelConfig(path=path, decoder="end2end")) == []


def test_missing_and_non_onnx_files(tmp_path: Path) -> None:
    [err] = model_errors(ModelConfig(path=tmp_path / "none.onnx"))
    assert err.startswith("model.path: file not found")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx at all")
    [err] = model_errors(ModelConfig(path=tmp_path / "junk.onnx"))
    assert err.startswith("model.path: not a readable ONNX model")
    [err] = model_errors(ModelConfig(path=tmp_path))
    assert err.startswith("model.path: not a file")
