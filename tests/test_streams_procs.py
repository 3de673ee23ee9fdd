"""`edge-agent bench --streams N --processes K` (agent.streams_procs): the streams split over K agent
processes started together, on the CPU here (real child processes, real services, real OpenCV
decoding of a PyAV-encoded clip); MPS cannot exist here, so only its detection is checked."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent import streams_procs
from agent.streams_bench import _row
from agent.streams_procs import barrier, merge, split
from tests.support.cli import assert_clean, edge_agent


def test_split_is_even_and_loses_no_stream() -> None:
    assert split(48, 3) == [16, 16, 16]
    assert split(50, 4) == [13, 13, 12, 12]
    assert split(2, 2) == [1, 1]
    assert all(sum(split(n, k)) == n for n in range(1, 40) for k in range(1, n + 1))


def test_barrier_waits_for_every_process_and_gives_up_after_its_wait(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_BENCH_BARRIER", f"{tmp_path}:2")
    passed = threading.Event()
    t = threading.Thread(target=lambda: (barrier("window"), passed.set()), daemon=True)
    t.start()
    time.sleep(0.3)
    assert not passed.is_set()  # one of two arrived
    (tmp_path / "window.999999").touch()  # the other process
    assert passed.wait(5)
    monkeypatch.setattr(streams_procs, "_BARRIER_WAIT_S", 0.2)
    t0 = time.monotonic()
    barrier("limits")  # the other never arrives: go on, say so
    assert 0.2 <= time.monotonic() - t0 < 5
    monkeypatch.delenv("EDGE_AGENT_BENCH_BARRIER")
    barrier("window")  # outside a split run: no wait at all


def test_mps_is_seen_by_its_daemon_process(tmp_path: Path) -> None:
    """A process table stand-in (no MPS daemon can run here): the daemon's name, as the kernel cuts it."""
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "comm").write_text("python3\n")
    assert not streams_procs.mps_running(tmp_path)
    (tmp_path / "345").mkdir()
    (tmp_path / "345" / "comm").write_text("nvidia-cuda-mps\n")
    assert streams_procs.mps_running(tmp_path)
    assert not streams_procs.mps_running()  # this machine: no daemon


def _part(cams: int, fps: float, p99: float, held: bool, limit: float) -> dict[str, object]:
    run = {"streams": cams, "total_fps": fps * cams, "host_cpu_ms_per_frame": 2.0 if cams == 1 else 1.0,
           "host_cpu_ms_per_frame_by_thread": {"capture": 0.5}, "worst_p99_ms": p99, "min_fps": fps, "dropped": 0,
           "model_loads": 1, "goal_held": held,
           "per_stream": [{"camera": f"s{i}", "fps": fps} for i in range(cams)]}
    return {"streams": cams, "runs": {str(cams): run},
            "engine_limit": {"contexts": cams, "inferences_per_s": limit, "preprocess": "gpu", "graph_lanes": 4},
            "nvdec_limit": {"decoders": cams, "frames_per_s": 100.0}}


def test_merge_sums_the_processes_and_keeps_the_worst_stream() -> None:
    m = merge([_part(1, 30.0, 20.0, True, 700.0), _part(3, 29.0, 150.0, False, 800.0)])
    run = m["run"]
    assert run["streams"] == 4 and run["processes"] == 2 and run["model_loads"] == 2
    assert run["total_fps"] == pytest.approx(117.0) and run["min_fps"] == 29.0 and run["worst_p99_ms"] == 150.0
    assert run["goal_held"] is False  # one process missed: the run missed
    # frame-weighted: 30 frames/s at 2 ms and 87 at 1 ms
    assert run["host_cpu_ms_per_frame"] == pytest.approx((30 * 2 + 87 * 1) / 117, abs=1e-3)
    assert [s["camera"] for s in run["per_stream"]] == ["p0.s0", "p1.s0", "p1.s1", "p1.s2"]
    assert m["engine_limit"]["inferences_per_s"] == 1500.0 and m["engine_limit"]["contexts"] == 4
    assert m["nvdec_limit"] == {"decoders": 4, "frames_per_s": 200.0}
    assert "wakeups_per_frame_by_thread" not in run  # no process had the kernel's counters


def test_merge_weighs_the_kernel_counters_by_frames() -> None:
    a, b = _part(1, 30.0, 20.0, True, 700.0), _part(3, 30.0, 20.0, True, 700.0)
    a["runs"]["1"].update(wakeups_per_frame_by_thread={"post": 2.0, "capture": 1.0},  # type: ignore[attr-defined]
                          system_share_by_thread={"capture": 0.5},
                          host_cpu_ms_per_frame_by_thread={"capture": 0.9})
    b["runs"]["3"].update(wakeups_per_frame_by_thread={"post": 1.0},  # type: ignore[attr-defined]
                          system_share_by_thread={"capture": 0.3, "post": 0.2},
                          host_cpu_ms_per_frame_by_thread={"capture": 0.1, "post": 0.2})
    run = merge([a, b])["run"]
    # 30 frames/s from the first process, 90 from the second: per frame over all 120
    assert run["wakeups_per_frame_by_thread"] == {"post": pytest.approx(1.25), "capture": pytest.approx(0.25)}
    # a share is weighed by each process's CPU in that kind: capture 0.9 x 30 and 0.1 x 90 ms/s
    assert run["system_share_by_thread"] == {"capture": pytest.approx((0.5 * 27 + 0.3 * 9) / 36, abs=1e-3),
                                             "post": pytest.approx(0.2)}


def test_merge_keeps_the_longest_settling_and_whether_every_process_settled() -> None:
    files = merge([_part(1, 30.0, 20.0, True, 700.0), _part(2, 30.0, 20.0, True, 700.0)])["run"]
    assert "settle_s" not in files and "settled" not in files  # file sources: nothing to wait for
    a, b = _part(1, 30.0, 20.0, True, 700.0), _part(2, 30.0, 20.0, True, 700.0)
    a["runs"]["1"].update(settle_s=4.0, settled=True)  # type: ignore[index]
    b["runs"]["2"].update(settle_s=15.1, settled=False)  # type: ignore[index]
    run = merge([a, b])["run"]
    assert run["settle_s"] == 15.1 and run["settled"] is False
    assert "server still catching up" in _row(run)
    b["runs"]["2"].update(settled=True)  # type: ignore[index]
    assert merge([a, b])["run"]["settled"] is True


def test_bench_splits_streams_over_processes_on_this_cpu(tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    r = edge_agent("bench", "--streams", "3", "--processes", "2", "--size", "320x180", "--fps", "10",
                   "--seconds", "2", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["processes"] == 2 and res["mps"] is False
    run = res["runs"]["3"]
    assert run["streams"] == 3 and run["model_loads"] == 2  # one model per process
    assert sorted(s["camera"] for s in run["per_stream"]) == ["p0.s0", "p0.s1", "p1.s0"]
    assert all(s["frames"] > 0 and s["errors"] == 0 for s in run["per_stream"])
    assert len(res["engine_limit"]["per_process"]) == 2 and res["engine_limit"]["contexts"] == 3
    assert "processes: 2" in r.stdout and "MPS not running" in r.stdout


@pytest.mark.parametrize("k", ["3", "0", "-1"])
def test_bench_refuses_a_process_count_outside_one_to_the_streams(k: str) -> None:
    assert_clean(edge_agent("bench", "--streams", "2", "--processes", k), 2,
                 "--processes must be between 1 and --streams (2)")


def test_a_failing_process_stops_the_others_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in children (python -c): the first fails at once, the second would wait a minute at
    its barrier; the run ends within seconds with the failure's exit code and output."""
    import argparse
    import sys

    children = [[sys.executable, "-c", "import sys; print('bad model'); sys.exit(3)"],
                [sys.executable, "-c", "import time; time.sleep(60)"]]
    monkeypatch.setattr(streams_procs, "_child_command", lambda args, clip, n, out: children.pop(0))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"process 0 exited 3: bad model.*process 1 exited -9"):
        streams_procs.measure(argparse.Namespace(), tmp_path / "clip.mp4", 2, 2, tmp_path)
    assert time.monotonic() - t0 < 20


def test_children_get_the_parents_stream_options(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(codec="h264", decode="nvdec", source="rtsp", fps=30.0, seconds=5.0, rtsp_transport="udp",
                              config=None, model=None, size="1920x1080")
    cmd = streams_procs._child_command(args, tmp_path / "c.mp4", 4, tmp_path / "p0.json")
    assert cmd[cmd.index("--rtsp-transport") + 1] == "udp" and cmd[cmd.index("--source") + 1] == "rtsp"
    assert cmd[cmd.index("--streams") + 1] == "4" and cmd[cmd.index("--size") + 1] == "1920x1080"
