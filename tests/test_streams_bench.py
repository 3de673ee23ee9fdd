"""`edge-agent bench --streams N` on the CPU: live RTSP streams from a real GStreamer server on loopback.

The streams are the demo clip encoded here with PyAV (libx264 / libx265) and served by Debian's
GStreamer RTSP server, called through ctypes (CI installs it: .ci/run); the service decodes
them with OpenCV's FFmpeg backend, as it does a camera. Figures are not judged here (speed is
measured by the bench itself, not by tests); the rows must be there and make sense.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from agent.config import parse_config
from agent.streams_bench import _config, loop_clip, make_clip

ROOT = Path(__file__).resolve().parents[1]


def _frames(path: Path) -> list[cv2.typing.MatLike]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_make_clip_encodes_the_demo_clip(tmp_path: Path, codec: str) -> None:
    frames = _frames(make_clip(tmp_path / f"c-{codec}.mp4", codec, 320, 180, 15.0, 20))
    assert len(frames) == 20 and all(img.shape == (180, 320, 3) for img in frames)


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_loop_clip_plays_the_clip_again_without_reencoding(tmp_path: Path, codec: str) -> None:
    import av

    clip = make_clip(tmp_path / f"c-{codec}.mp4", codec, 160, 90, 10.0, 12)  # 1.2 s
    looped, times = loop_clip(clip, tmp_path / "looped.mp4", 3.0)
    assert times == 3 and looped != clip
    once, thrice = _frames(clip), _frames(looped)
    assert len(thrice) == 3 * len(once) == 36
    for i, img in enumerate(thrice):  # the same pictures, bit for bit: packets copied, not encoded again
        assert (img == once[i % len(once)]).all()
    with av.open(str(looped)) as inp:
        stream = inp.streams.video[0]
        dts = [p.dts for p in inp.demux(stream) if p.dts is not None]
        assert dts == sorted(set(dts))  # time runs on across the seams
        assert abs(float(stream.duration * stream.time_base) - 3.6) < 0.2
    assert loop_clip(clip, tmp_path / "unused.mp4", 1.0) == (clip, 1)  # long enough already
    assert not (tmp_path / "unused.mp4").exists()


def test_bench_serves_a_short_clip_looped_over_rtsp(tmp_path: Path) -> None:
    """A --clip shorter than start-up and window would end mid-run: every stream lost, reconnecting."""
    clip = make_clip(tmp_path / "short.mp4", "h264", 320, 180, 10.0, 20)  # 2 s
    out = tmp_path / "streams.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "1", "--source", "rtsp",
                        "--clip", str(clip), "--size", "320x180", "--fps", "10", "--seconds", "2",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bench: --clip served 24 times in a row (47 s needed" in r.stderr
    run = json.loads(out.read_text())["runs"]["1"]
    assert run["reconnects"] == 0 and run["per_stream"][0]["state"] == "streaming"
    assert run["per_stream"][0]["frames"] > 0


def test_bench_two_rtsp_streams_on_one_engine(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "2", "--source", "rtsp",
                        "--size", "320x180", "--fps", "10", "--seconds", "3", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    run = res["runs"]["2"]
    assert run["model_loads"] == 1 and run["streams"] == 2
    assert [s["camera"] for s in run["per_stream"]] == ["s0", "s1"]
    for s in run["per_stream"]:
        assert s["state"] == "streaming" and s["frames"] > 0 and s["errors"] == 0
        assert 0 < s["p50_ms"] <= s["p99_ms"]
    assert run["host_cpu_ms_per_frame"] > 0
    assert run["settle_s"] is not None and run["reconnects"] == 0  # RTSP: the window waited for steady streams
    assert run["settled"] is True
    # the same window split by thread kind: the pipeline's threads are there, and the split adds
    # up to the process figure (rounding and the readings being a hair apart aside)
    by_thread = run["host_cpu_ms_per_frame_by_thread"]
    assert {"capture", "infer", "post", "native"} <= set(by_thread)
    assert all(v >= 0 for v in by_thread.values())
    assert sum(by_thread.values()) <= run["host_cpu_ms_per_frame"] * 1.02 + 0.05
    assert res["engine_limit"]["contexts"] == 2 and res["engine_limit"]["inferences_per_s"] > 0
    assert "N=2" in r.stdout and "cpu ms/f by thread: " in r.stdout and "limit: engine alone" in r.stdout
    # the kernel's counters over the same window: each camera's capture and post threads wake per frame
    wakes, shares = run["wakeups_per_frame_by_thread"], run["system_share_by_thread"]
    assert wakes["post"] > 0.5 and wakes["capture"] > 0, wakes
    assert all(0.0 <= v <= 1.0 for v in shares.values()) and "capture" in shares, shares
    assert "wake-ups/f by thread: " in r.stdout and "system share of cpu: " in r.stdout


def test_bench_streams_rejects_zero(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--streams must be >= 1" in r.stderr


def test_wait_steady_waits_out_a_source_catching_up() -> None:
    """Stand-in counters (the pipelines' processed counts), driven by the clock: one stream runs at
    3x its rate for 0.6 s (a server catching up), then at its rate; the other at its rate."""
    from agent.streams_bench import wait_steady

    t0 = time.monotonic()

    def counts() -> list[int]:
        t = time.monotonic() - t0
        fast = 30 * min(t, 0.6) + 10 * max(t - 0.6, 0.0)
        return [int(fast), int(10 * t)]

    waited, settled = wait_steady(counts, fps=10.0, timeout_s=5.0, step_s=0.2)
    assert settled and 0.6 <= waited < 1.6, waited


def test_wait_steady_gives_up_on_a_stream_that_never_settles() -> None:
    from agent.streams_bench import wait_steady

    t0 = time.monotonic()
    waited, settled = wait_steady(lambda: [int(30 * (time.monotonic() - t0))], fps=10.0, timeout_s=0.7, step_s=0.2)
    assert not settled and 0.7 <= waited < 1.2


@pytest.mark.parametrize("start", ["0", "3", "-2"])
def test_bench_refuses_a_search_start_outside_one_to_the_streams(start: str) -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "2", "--find-max", "--find-from",
                        start], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--find-from must be between 1 and --streams (2)" in r.stderr


def test_find_max_search_starts_where_it_is_told(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "3", "--find-max", "--find-from", "2",
                        "--size", "160x90", "--fps", "5", "--seconds", "1", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    runs = sorted(res["runs"])
    assert runs[0] in ("1", "2") and set(runs) <= {"1", "2", "3"}  # 1 only if 2 missed
    assert ("1" in runs) == (not res["runs"]["2"]["goal_held"])
    assert res["n_max"] in (0, 1, 2, 3)


@pytest.mark.parametrize(("n", "start", "least", "holds_up_to", "want"), [
    (56, 1, 1, 29, 29), (56, 4, 1, 48, 48), (40, 1, 1, 40, 40), (40, 1, 1, 0, 0), (64, 4, 1, 3, 3),
    (64, 4, 4, 3, 0), (64, 4, 1, 64, 64), (64, 48, 1, 62, 62), (72, 64, 6, 60, 60), (72, 64, 6, 5, 0),
    (72, 64, 6, 6, 6)])
def test_find_max_finds_the_largest_n_that_holds(n: int, start: int, least: int, holds_up_to: int,
                                                 want: int) -> None:
    from agent.streams_bench import find_max

    tried: list[int] = []

    def trial(k: int) -> bool:
        tried.append(k)
        return k <= holds_up_to

    assert find_max(n, trial, start, least) == want
    assert all(least <= k <= n for k in tried) and len(tried) == len(set(tried))  # no N run twice
    assert len(tried) <= 2 * n.bit_length() + 2
    if want >= start:
        assert min(tried) >= start  # below the start only when the start itself failed


def test_stream_cameras_take_the_rtsp_transport_asked_for(tmp_path: Path) -> None:
    base = parse_config({"cameras": [{"source": "synthetic:"}]})
    urls = ["rtsp://127.0.0.1:8554/s0", "rtsp://127.0.0.1:8554/s1"]
    cfg = _config(base, urls, "nvdec", tmp_path, False, "udp")
    assert [(c.source, c.rtsp_transport, c.decode) for c in cfg.cameras] == [(u, "udp", "nvdec") for u in urls]
    assert {c.rtsp_transport for c in _config(base, urls, "cpu", tmp_path, False).cameras} == {"tcp"}
