"""agent.streams_rtsp: the bench's RTSP server, Debian's GStreamer RTSP server called through ctypes.

Real parts: the server process, its GStreamer libraries and plugins, PyAV (FFmpeg) as the client.
The folder test is what the lent GPU machine gets (it has no GStreamer): a folder of the
libraries and plugins named by EDGE_AGENT_GSTREAMER_DIR; here the folder holds copies of this
machine's plugins, so the test proves the plugin set is enough and that the server loads them
from the folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av  # the test extra: PyAV makes and reads the test streams
import pytest

from agent.streams_bench import make_clip
from agent.streams_rtsp import RtspStreams, gstreamer_env, missing_elements

# what the server needs besides the libraries: filesrc / queue, appsrc / appsink, qtdemux, h264parse,
# RTP payloaders, rtpbin, UDP and TCP elements (the server builds them per client)
PLUGINS = ["coreelements", "app", "isomp4", "videoparsersbad", "rtp", "rtpmanager", "udp", "tcp"]
SYSTEM_PLUGINS = Path("/usr/lib/x86_64-linux-gnu/gstreamer-1.0")


def _frames(url: str, n: int) -> list[tuple[int, int]]:
    sizes = []
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(10.0, 10.0)) as c:
        for frame in c.decode(video=0):
            sizes.append((frame.width, frame.height))
            if len(sizes) == n:
                break
    return sizes


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_every_mount_serves_the_clip_from_its_start(tmp_path: Path, codec: str) -> None:
    clip = make_clip(tmp_path / f"c.{codec}.mp4", codec, 320, 180, 30.0, 45)
    with RtspStreams(clip, codec, 2) as server:
        assert server.urls == [f"rtsp://127.0.0.1:{server.port}/s0", f"rtsp://127.0.0.1:{server.port}/s1"]
        for url in server.urls:
            assert _frames(url, 30) == [(320, 180)] * 30


def _sliced_clip(path: Path, frames: int) -> Path:
    """H.264 with 4 slices per picture and a key frame every 10 (what multi-threaded encoders make)."""
    import numpy as np

    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (180, 320, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "10", "x264-params": "slices=4"}
        for i in range(frames):
            img = np.roll(base, 4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_served_pictures_decode_equal_to_the_file_with_several_slices(tmp_path: Path) -> None:
    """Parameter sets go in before each key frame's access unit, not between its slices (the
    payloader's config-interval put them before every IDR slice: FFmpeg then split the key frame
    into two broken pictures and every frame to the next key frame decoded wrong)."""
    import numpy as np

    clip = _sliced_clip(tmp_path / "sliced.mp4", 25)
    with av.open(str(clip)) as c:
        ref = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
    with RtspStreams(clip, "h264", 1) as server, \
            av.open(server.urls[0], options={"rtsp_transport": "tcp"}, timeout=(10.0, 10.0)) as c:
        got = []
        for frame in c.decode(video=0):
            got.append(frame.to_ndarray(format="yuv420p"))
            if len(got) == 22:  # past two key frames
                break
    assert len(got) == 22
    differ = [i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if not np.array_equal(a, b)]
    assert differ == []


def test_gstreamer_env_names_the_folder_for_the_server_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGE_AGENT_GSTREAMER_DIR", raising=False)
    assert gstreamer_env() is None
    monkeypatch.setenv("EDGE_AGENT_GSTREAMER_DIR", str(tmp_path))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    env = gstreamer_env()
    assert env is not None
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}/lib{os.pathsep}/opt/x"
    assert env["GST_PLUGIN_SYSTEM_PATH"] == f"{tmp_path}/plugins" and env["GST_PLUGIN_PATH"] == ""
    assert env["GST_REGISTRY"] == f"{tmp_path}/registry.bin"
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/x"  # this process is not touched


def test_server_runs_from_a_folder_of_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = [p for p in PLUGINS if not (SYSTEM_PLUGINS / f"libgst{p}.so").exists()]
    if missing:
        pytest.fail(f"GStreamer plugins missing from {SYSTEM_PLUGINS}: {missing} (.ci/run installs them)")
    root = tmp_path / "gst"
    (root / "lib").mkdir(parents=True)
    (root / "plugins").mkdir()
    for p in PLUGINS:
        shutil.copy(SYSTEM_PLUGINS / f"libgst{p}.so", root / "plugins")  # copies: /proc maps names them
    monkeypatch.setenv("EDGE_AGENT_GSTREAMER_DIR", str(root))
    clip = make_clip(tmp_path / "c.mp4", "h264", 320, 180, 30.0, 45)
    with RtspStreams(clip, "h264", 1) as server:
        assert _frames(server.urls[0], 10) == [(320, 180)] * 10
        assert server._proc is not None
        maps = Path(f"/proc/{server._proc.pid}/maps").read_text()
    loaded = {line.split()[-1] for line in maps.splitlines() if "libgst" in line and line.endswith(".so")}
    assert loaded and all(p.startswith(str(root / "plugins")) for p in loaded), loaded
    assert (root / "registry.bin").exists()


def test_bench_says_what_the_rtsp_server_lacks_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "EDGE_AGENT_GSTREAMER_DIR": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--streams", "1", "--source", "rtsp", "--size",
                        "160x90", "--fps", "5", "--seconds", "1"], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 1
    assert "bench: RTSP server exited (GStreamer elements missing: filesrc" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_plugin_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "gst"
    (root / "plugins").mkdir(parents=True)  # no plugins at all: filesrc and the rest are missing
    monkeypatch.setenv("EDGE_AGENT_GSTREAMER_DIR", str(root))
    clip = make_clip(tmp_path / "c.mp4", "h264", 320, 180, 30.0, 5)
    with pytest.raises(RuntimeError, match="GStreamer elements missing: filesrc, qtdemux, h264parse, rtph264pay"):
        RtspStreams(clip, "h264", 1).start()


def test_missing_elements_are_asked_in_the_servers_environment(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """The test camera's probe (tests.support.rtsp_server) asks the same process the server runs in."""
    from tests.support.rtsp_server import unavailable_reason

    wanted = ["filesrc", "videotestsrc", "no-such-element"]
    assert missing_elements(wanted) == ["no-such-element"]
    assert unavailable_reason() is None  # CI installs the live encoder's plugins (.ci/run)
    root = tmp_path / "gst"
    (root / "plugins").mkdir(parents=True)
    monkeypatch.setenv("EDGE_AGENT_GSTREAMER_DIR", str(root))
    assert missing_elements(wanted) == wanted
    reason = unavailable_reason()
    assert reason is not None and reason.startswith("GStreamer elements missing: videotestsrc, x264enc, rtph264pay;")
    assert "apt-get install -y libgstrtspserver-1.0-0" in reason
