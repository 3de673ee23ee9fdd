"""scripts/pyspy_summary.py: py-spy's raw profile (one `stack count` line per distinct stack) by thread kind.

The lines below are in the form py-spy 0.4 writes with `--threads --format raw` (checked against a
real recording on this machine when the script was written): the thread's id and name first, then
the frames from the thread's start to the sampled one.
"""

from __future__ import annotations

from scripts.pyspy_summary import charge, kind_of, summarise

BOOT = "Thread._bootstrap (threading.py:1002)"
READ = "CaptureThread._run (agent/capture/reader.py:280)"
RAW = "\n".join([
    f"thread (0x7F01): capture-s3;{BOOT};{READ};NvdecSource.read (agent/capture/sources/nvdec.py:293);"
    "Decode (PyNvVideoCodec/__init__.py:10) 30",
    f"thread (0x7F01): capture-s3;{BOOT};{READ};_Pacer.wait (agent/capture/sources/base.py:144);"
    "Event.wait (threading.py:622) 10",
    f"thread (0x7F02): post-s3;{BOOT};Pipeline._post_one (agent/pipeline.py:378) 20",
    f"thread (0x7F03): ort-lane-0;{BOOT};OrtLanes._loop (agent/engines/ort_lanes.py:187);"
    "memcpy_async (agent/engines/cuda.py:351) 40",
    "not a profile line",
])


def test_thread_kinds_are_the_bench_groups() -> None:
    assert kind_of("capture-cam-1") == "capture" and kind_of("ort-lane-0") == "ort-lane"
    assert kind_of("MainThread") == "main" and kind_of("Thread-7 (worker)") == "Thread-7 (worker)"
    assert kind_of("") == "unnamed"


def test_a_sample_is_charged_to_the_innermost_agent_line_and_its_callee() -> None:
    frames = ["Thread._bootstrap (threading.py:1002)", "NvdecSource.read (agent/capture/sources/nvdec.py:293)",
              "Decode (PyNvVideoCodec/__init__.py:10)", "inner (PyNvVideoCodec/x.py:3)"]
    assert charge(frames) == "NvdecSource.read (agent/capture/sources/nvdec.py:293) -> Decode"
    assert charge(frames[:2]) == "NvdecSource.read (agent/capture/sources/nvdec.py:293) -> (own code)"
    assert charge(["Thread._bootstrap (threading.py:1002)"]) == "Thread._bootstrap (threading.py:1002)"


def test_summary_shares_by_kind_and_place() -> None:
    out = summarise(RAW, top=5).splitlines()
    assert out[0] == "100 samples in all"
    assert "ort-lane: 40 samples, 40.0 %" in out and "capture: 40 samples, 40.0 %" in out
    assert "post: 20 samples, 20.0 %" in out
    i = out.index("capture: 40 samples, 40.0 %")
    assert out[i + 1] == "   75.0 %  NvdecSource.read (agent/capture/sources/nvdec.py:293) -> Decode"
    assert out[i + 2] == "   25.0 %  _Pacer.wait (agent/capture/sources/base.py:144) -> Event.wait"
