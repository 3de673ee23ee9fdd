"""scripts/jetson_acceptance.py, run whole on the fake TensorRT bindings (tests/support/fake_tensorrt.py)
and a fake CUDA runtime: its variants, comparisons, damaged-engine check, report and table.

This proves the script's own logic, not TensorRT: on CI the "engine" is the fake's, which runs the
ONNX model on ONNX Runtime's CPU EP. The real run is on an Orin (README, "Installing on a Jetson").
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.cache.store import EngineCache
from agent.config import EngineConfig
from agent.engines import fingerprint
from agent.engines.factory import create_engine
from agent.errors import EngineError
from scripts import jetson_acceptance as ja
from tests.engines.conftest import FakeFactory

ORIN = {"board": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "l4t": "36.4.0",
        "cuda_system": "12.6.68", "gpu_name": "Orin", "gpu_cc": "8.7", "gpu_sm_count": "8", "cpu_arch": "aarch64"}


@pytest.fixture
def orin(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine read as an Orin NX (the fake TensorRT supplies the TensorRT version)."""
    real = fingerprint.read_fingerprint

    def read(*args: object, **kwargs: object) -> dict[str, str]:
        return {**real(*args, **kwargs), **ORIN}  # type: ignore[arg-type]

    monkeypatch.setattr(fingerprint, "read_fingerprint", read)


def calib_dir(tmp_path: Path) -> Path:
    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return d


def test_whole_run_on_the_fake_passes_and_prints_a_table(make_fake: FakeFactory, orin: None, model: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_fake("10.3.0.26", dla_cores=1)
    rc = ja.main([str(model), "--calib", str(calib_dir(tmp_path)), "--runs", "3", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "jetson_acceptance.json").read_text())
    names = [c["name"] for c in report["checks"]]
    assert names == ["fingerprint read (key portable to identical devices)", "tensorrt fp32", "tensorrt fp16",
                     "tensorrt int8", "tensorrt dla0-fp16",
                     "damaged engine refused by TensorRT, quarantined, rebuilt"], printed
    assert rc == 0 and all(c["ok"] for c in report["checks"]), printed
    damaged = report["checks"][-1]
    assert "cannot deserialize" in damaged["quarantine_reason"]  # TensorRT refused it, not the checksum
    assert next(c for c in report["checks"] if c["name"] == "tensorrt dla0-fp16")["dla_core"] == 0
    table = (tmp_path / "out" / "jetson_acceptance.md").read_text()
    assert table in printed
    assert "| tensorrt int8 |" in table and "TensorRT 10.3.0.26" in table and "8 SMs" in table
    assert table.count("| PASS |") == 6


def test_without_tensorrt_it_fails_and_says_what_to_install(orin: None, model: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # stubs only
    assert ja.main([str(model), "--out", str(tmp_path / "out")]) == 1
    assert "python3-libnvinfer" in capsys.readouterr().out


def test_a_tolerance_breach_fails_the_variant(make_fake: FakeFactory, orin: None, model: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake("8.6.2.3")
    monkeypatch.setattr(ja, "rel_diff", lambda got, ref: 0.5)
    rc = ja.main([str(model), "--no-int8", "--runs", "1", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "jetson_acceptance.json").read_text())
    by_name = {c["name"]: c for c in report["checks"]}
    assert rc == 1 and not by_name["tensorrt fp32"]["ok"] and not by_name["tensorrt fp16"]["ok"]
    assert "tensorrt int8" not in by_name


def test_damage_passes_the_cache_checks_and_only_deserialize_refuses(fake_trt: types.ModuleType, model: Path,
                                                                     tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache", 1 << 24)
    cfg = EngineConfig(backend="tensorrt")
    engine = create_engine(model, cfg, cache)
    key = engine.info.engine_key
    engine.close()
    size = (cache.root / key / "engine.bin").stat().st_size
    path = ja.damage_past_size_check(cache, key)
    assert path.stat().st_size == size
    from agent.engines.factory import key_fields

    assert cache.lookup(key_fields(model, cfg)) is not None  # size, meta and sha256 all pass
    from agent.engines.tensorrt import TensorRTEngine

    with pytest.raises(EngineError, match="cannot deserialize"):
        TensorRTEngine(path, model).load()


def test_variants_and_tolerances() -> None:
    vs = ja.variants(Path("m.onnx"), Path("q.onnx"), dla_cores=2)
    assert [(v.name, v.precision, v.dla_core) for v in vs] == [
        ("fp32", "fp32", None), ("fp16", "fp16", None), ("int8", "int8", None),
        ("dla0-fp16", "fp16", 0), ("dla1-fp16", "fp16", 1)]
    assert [v.tolerance for v in vs] == [1e-3, 2e-2, 5e-2, 3e-2, 3e-2]
    assert [v.model.name for v in vs] == ["m.onnx", "m.onnx", "q.onnx", "m.onnx", "m.onnx"]
    assert ja.rel_diff(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert ja.rel_diff(np.array([1.0, 2.1]), np.array([1.0, 2.0])) == pytest.approx(0.05)
