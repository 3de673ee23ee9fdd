"""Timing caches per TensorRT version and GPU (issue 14 point 5): tags, mismatch and damage fall
back to an empty cache, the stored cache is merged into the new one under the lock."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest

from agent.cache.store import EngineCache
from agent.engines import trt_timing
from agent.engines.trt_build import build_engine_bytes
from agent.engines.trt_common import BuildOptions
from tests.engines.conftest import FakeFactory
from tests.support.fake_tensorrt import plan_header

ORIN_NX = {"tensorrt": "10.3.0.30", "gpu_name": "Orin", "gpu_cc": "8.7", "gpu_sm_count": "8",
           "board": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "cuda_system": "12.6.68"}


def test_tag_changes_with_tensorrt_and_gpu() -> None:
    tag = trt_timing.timing_tag(ORIN_NX)
    assert tag.startswith("trt10.3.0.30-Orin-cc8.7-") and "/" not in tag
    assert trt_timing.timing_tag(dict(ORIN_NX)) == tag  # stable
    for field, other in (("tensorrt", "8.6.2.3"), ("gpu_sm_count", "16"), ("board", "Jetson AGX Orin"),
                         ("cuda_system", "12.2.140")):
        assert trt_timing.timing_tag({**ORIN_NX, field: other}) != tag, field
    assert trt_timing.timing_tag({**ORIN_NX, "cpu_isa": "x"}) == tag  # only what the timings depend on


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "cache", 1 << 24)


def test_a_cache_from_another_tensorrt_is_not_used(make_fake: FakeFactory, model: Path, cache: EngineCache,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    make_fake("8.6.2.3")
    build_engine_bytes(model, BuildOptions(), cache, timing_tag="t")
    old = trt_timing.timing_path(cache, "t").read_bytes()
    trt = make_fake("10.3.0.26")  # JetPack 6.0 -> 6.1 with the file (wrongly) under the same tag
    with caplog.at_level(logging.WARNING):
        plan = build_engine_bytes(model, BuildOptions(), cache, timing_tag="t")
    assert "does not match this TensorRT" in caplog.text
    assert plan_header(plan)["timing_hits"] == 0
    calls = [a for n, a in trt._state.calls if n == "IBuilderConfig.set_timing_cache"]
    assert calls == [("8.6.2.3|Orin", False), ("10.3.0.26|Orin", False)]  # refused, then an empty one
    new = json.loads(trt_timing.timing_path(cache, "t").read_bytes())
    assert new["fake_timing_cache"] == "10.3.0.26|Orin" and old != trt_timing.timing_path(cache, "t").read_bytes()
    assert "could not be merged" in caplog.text  # the stale one is replaced, not combined


def test_damaged_cache_falls_back_to_empty(fake_trt: types.ModuleType, model: Path, cache: EngineCache,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = trt_timing.timing_path(cache, "t")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        build_engine_bytes(model, BuildOptions(), cache, timing_tag="t")
    assert "cannot be parsed" in caplog.text
    assert json.loads(path.read_bytes())["entries"]  # rewritten from this build


def test_stored_entries_are_merged_into_the_new_cache(fake_trt: types.ModuleType, model: Path,
                                                      cache: EngineCache) -> None:
    tag = f"{fake_trt.__version__}|Orin"
    path = trt_timing.timing_path(cache, "t")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fake_timing_cache": tag, "entries": ["tactic:from-another-model"]}))
    build_engine_bytes(model, BuildOptions(), cache, timing_tag="t")
    entries = json.loads(path.read_bytes())["entries"]
    assert "tactic:from-another-model" in entries and "tactic:images" in entries
    assert ("ITimingCache.combine", (tag, False)) in fake_trt._state.calls


def test_no_timing_cache_without_an_engine_cache(fake_trt: types.ModuleType, model: Path, tmp_path: Path) -> None:
    build_engine_bytes(model, BuildOptions())
    assert "IBuilderConfig.create_timing_cache" not in fake_trt._state.names()
