"""ONNX Runtime's TensorRT EP files kept in the agent's cache: same key as the rest, a checksummed
manifest, verified before and after each load, quarantined and rebuilt when damaged.

TEST DOUBLE: ONNX Runtime's TensorRT EP needs NVIDIA's onnxruntime-gpu and TensorRT, neither of
which can exist here, so `make_engine` below stands in for the session: it writes an "engine file"
where the EP would (`trt_engine_cache_path`) unless one is there, like the EP does. The cache,
its locks, checksums and quarantine are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.cache.store import ENGINE_FILE, EngineCache
from agent.config import EngineConfig, ProviderConfig
from agent.engines import trt_ort
from agent.engines.base import Engine
from agent.engines.onnxruntime import OnnxRuntimeEngine
from agent.engines.trt_timing import timing_tag
from agent.errors import EngineError

FIELDS = {"model_sha256": "m" * 64, "backend": "onnxruntime", "providers": "TensorrtExecutionProvider",
          "tensorrt": "10.3.0.30", "gpu_name": "Orin", "gpu_cc": "8.7", "gpu_sm_count": "8",
          "board": "NVIDIA Jetson Orin NX", "cuda_system": "12.6.68"}
CFG = EngineConfig(precision="fp16", dla_core=0, providers=[
    ProviderConfig(name="TensorrtExecutionProvider", options={"trt_max_workspace_size": "123"}),
    ProviderConfig(name="CPUExecutionProvider")])


class EpStandIn:
    """Creates real CPU sessions and plays the EP's part on its engine folder: writes `payload` as
    its engine file when there is none (or always, with `rebuild_on_load`)."""

    def __init__(self) -> None:
        self.payload = b"plan-v1" * 100
        self.sessions = 0
        self.rebuild_on_load = False
        self.seen_options: list[dict[str, object]] = []

    def __call__(self, model: Path, cfg: EngineConfig) -> Engine:
        opts = cfg.providers[0].options
        self.seen_options.append(dict(opts))
        engine_dir = Path(str(opts["trt_engine_cache_path"]))
        plan = engine_dir / "TensorrtExecutionProvider_TRTKernel_graph_0_0.engine"
        if not plan.exists() or self.rebuild_on_load:
            plan.write_bytes(self.payload)
        self.sessions += 1
        cpu = OnnxRuntimeEngine(model, EngineConfig())
        cpu.load()
        return cpu


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "cache", 1 << 24)


def test_options_point_the_ep_at_the_entry_and_timing_folders(tmp_path: Path) -> None:
    out = trt_ort.ep_options(CFG, tmp_path / "e", tmp_path / "t")
    opts = out.providers[0].options
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path / "e")
    assert opts["trt_timing_cache_enable"] == "True" and opts["trt_timing_cache_path"] == str(tmp_path / "t")
    assert opts["trt_fp16_enable"] == "True" and opts["trt_int8_enable"] == "False"
    assert opts["trt_dla_enable"] == "True" and opts["trt_dla_core"] == "0"
    assert opts["trt_max_workspace_size"] == "123"  # the user's explicit option wins
    assert out.providers[1].name == "CPUExecutionProvider"


def test_built_once_verified_and_reused(cache: EngineCache, model: Path) -> None:
    ep = EpStandIn()
    engine, cached = trt_ort.create(model, CFG, cache, FIELDS, ep)
    assert cached is False
    engine.close()
    key = cache.cache_key(FIELDS)
    entry = cache.root / key
    assert (entry / trt_ort.EP_DIR).is_dir() and (entry / ENGINE_FILE).is_file()  # same key as native engines
    assert ep.seen_options[0]["trt_timing_cache_path"] == str(cache.root / "timing" / "ort-trt" / timing_tag(FIELDS))
    engine, cached = trt_ort.create(model, CFG, cache, FIELDS, ep)
    assert cached is True and ep.sessions == 3  # build, load of the fresh entry, load of the hit
    assert np.isfinite(engine.infer(np.zeros(engine.input_spec.shape, np.float32))[0]).all()
    engine.close()
    assert cache.lookup(FIELDS) is not None  # the manifest verifies like an engine (checksum, size, meta)


def test_damaged_ep_engine_is_quarantined_and_rebuilt(tmp_path: Path, model: Path) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    cache = EngineCache(tmp_path / "cache", 1 << 24, on_event=lambda n, d: events.append((n, d)))
    ep = EpStandIn()
    trt_ort.create(model, CFG, cache, FIELDS, ep)[0].close()
    plan = next((cache.root / cache.cache_key(FIELDS) / trt_ort.EP_DIR).iterdir())
    raw = bytearray(plan.read_bytes())
    raw[7] ^= 0xFF
    plan.write_bytes(bytes(raw))
    engine, cached = trt_ort.create(model, CFG, cache, FIELDS, ep)
    engine.close()
    assert cached is False
    reasons = [str(d["reason"]) for n, d in events if n == "engine_quarantined"]
    assert len(reasons) == 1 and "differs from the manifest" in reasons[0]
    quarantined = list((cache.root / "quarantine").iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / trt_ort.EP_DIR).is_dir()  # kept for a post-mortem


def test_an_ep_that_rebuilt_on_load_is_caught(tmp_path: Path, model: Path) -> None:
    """The EP silently building anew means its cached engine was not used: quarantine, rebuild."""
    events: list[tuple[str, dict[str, object]]] = []
    cache = EngineCache(tmp_path / "cache", 1 << 24, on_event=lambda n, d: events.append((n, d)))
    ep = EpStandIn()
    trt_ort.create(model, CFG, cache, FIELDS, ep)[0].close()
    ep.rebuild_on_load, ep.payload = True, b"plan-v2" * 100
    engine, cached = trt_ort.create(model, CFG, cache, FIELDS, ep)
    engine.close()
    reasons = [str(d["reason"]) for n, d in events if n == "engine_quarantined"]
    assert cached is False and len(reasons) == 1 and "differs from the manifest" in reasons[0]


def test_manifest_and_verify_name_the_file(tmp_path: Path) -> None:
    d = tmp_path / "ep"
    d.mkdir()
    with pytest.raises(EngineError, match="wrote no engine"):
        trt_ort.manifest(d)
    (d / "a.engine").write_bytes(b"x" * 10)
    (tmp_path / "manifest").write_bytes(trt_ort.manifest(d))
    trt_ort.verify(tmp_path / "manifest", d)
    (d / "b.profile").write_bytes(b"y")
    with pytest.raises(EngineError, match=r"wrote b.profile, not in the manifest"):
        trt_ort.verify(tmp_path / "manifest", d)
    (d / "b.profile").unlink()
    (d / "a.engine").unlink()
    with pytest.raises(EngineError, match=r"a\.engine is missing"):
        trt_ort.verify(tmp_path / "manifest", d)
    (tmp_path / "manifest").write_text("{")
    with pytest.raises(EngineError, match="unreadable"):
        trt_ort.verify(tmp_path / "manifest", d)
