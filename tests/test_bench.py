"""`edge-agent bench` (agent/bench.py) on the CPU: every row runs the real pipeline on the demo model.

Figures are not judged here (the bench measures; tests check that its rows are there and agree
with each other). The live row reads an H.264 clip PyAV encodes from the bench's frames, at its
frame rate, through OpenCV's decoder: a live camera in all but the socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.streams_bench import make_clip

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--frames", "45", "--fps", "30",
                        "--json", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_bench_rows_and_the_live_camera_row(tmp_path: Path) -> None:
    res, table = _bench(tmp_path)
    for key in ("bare", "bare_iobinding", "pipeline_memory", "pipeline_paced", "pipeline_live", "pipeline_file"):
        assert key in table, key
    live = res["pipeline_live"]
    assert live["decode"] == "cpu" and live["source_fps"] == 30.0 and live["clip"].endswith("live-h264.mp4")
    assert live["frames"] == 45 and live["frames_dropped"] == 0
    # the first second (30 frames) is the source's start, left out of the latencies
    assert live["published"] == 45 and len(live["latencies_ms"]) == 15
    lat = live["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    ratio = res["ratios"]["pipeline_live_p99_vs_bare_iobinding_p50"]
    assert abs(ratio - lat["p99"] / res["bare_iobinding"]["latency_ms"]["p50"]) < 0.01
    assert "pipeline_live: live-h264.mp4 at 30 fps, decode cpu, 0 dropped" in table


def test_bench_live_row_reads_the_given_clip(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "given.mp4", "hevc", 320, 180, 15.0, 15)
    res, _ = _bench(tmp_path, "--clip", str(clip))
    live = res["pipeline_live"]
    assert live["clip"] == str(clip) and live["decode"] == "cpu" and live["frames"] == 45


def test_a_failed_paced_engine_run_leaves_the_tight_loop_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two bare IO-binding rows fail on their own: the tight loop's figures stay when only the
    run paced at the live rate fails (and both go when IO binding itself fails)."""
    from agent import bench

    def flaky(engine: object, tensor: object, n: int, pace_fps: float | None = None) -> dict:
        if pace_fps is not None:
            raise RuntimeError("CUDA failure 2: out of memory")
        return {"fps": 100.0, "latency_ms": {"p50": 1.0}}
    monkeypatch.setattr(bench, "bench_iobinding", flaky)
    rows = bench.iobinding_rows(object(), None, 50, 30.0)  # type: ignore[arg-type]
    assert rows["bare_iobinding"]["fps"] == 100.0
    assert rows["bare_iobinding_live"] == {"error": "CUDA failure 2: out of memory"}

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("IO binding not supported by this EP")
    monkeypatch.setattr(bench, "bench_iobinding", broken)
    assert bench.iobinding_rows(object(), None, 50, 30.0) == {  # type: ignore[arg-type]
        "bare_iobinding": {"error": "IO binding not supported by this EP"}}
