from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.capture.sources import (
    SOURCES,
    CsiSource,
    FileSource,
    FrameSource,
    GstSource,
    HttpSource,
    RtspSource,
    SyntheticSource,
    V4L2Source,
    gstreamer_available,
    jetson_decode_pipeline,
    network,
    open_source,
    pipeline_for,
    redact,
    scheme_of,
)
from agent.capture.sources.network import _FfmpegOptions
from agent.config import CameraConfig
from agent.errors import SourceError
from tests.capture.conftest import index_of
from tests.support.mjpeg import MjpegServer
from tests.support.rtsp_server import RtspServer, unavailable_reason

_RTSP_SKIP = unavailable_reason()


def cam(source: str, **kw: object) -> CameraConfig:
    return CameraConfig(source=source, **kw)


def must(img: np.ndarray | None) -> np.ndarray:
    assert img is not None
    return img


def assert_reads_frames(src: FrameSource, shape: tuple[int, int, int], n: int = 3) -> None:
    """Open `src`, read `n` frames of `shape`, close it."""
    src.open()
    try:
        imgs = [src.read() for _ in range(n)]
    finally:
        src.close()
    assert all(i is not None and i.shape == shape for i in imgs)


def read_all(src: FileSource, limit: int = 1000) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    while len(out) < limit:
        img = src.read()
        if img is None:
            break
        out.append(img)
    return out


# ---- files ---------------------------------------------------------------------------------
def test_file_decodes_every_frame_in_order(video: Callable[..., Path]) -> None:
    path = video(30, 30.0)
    src = open_source(cam(str(path), pace=False))
    assert isinstance(src, FileSource)
    src.open()
    try:
        frames = read_all(src)
        assert src.live is False
        assert src.fps == pytest.approx(30.0)
    finally:
        src.close()
    assert len(frames) == 30
    assert all(f.dtype == np.uint8 and f.shape == (64, 96, 3) for f in frames)
    assert [index_of(f, 30) for f in frames] == list(range(30))


def test_file_url_and_paced_file_waits_but_keeps_every_frame(video: Callable[..., Path]) -> None:
    path = video(8, 40.0)
    src = open_source(cam(path.resolve().as_uri(), pace=True))
    src.open()
    t0 = time.monotonic()
    frames = read_all(src)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    src.close()
    assert len(frames) == 8
    assert elapsed >= 7 / 40 * 0.9  # delivered on the file's 40 fps schedule, as a camera would


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    src = open_source(cam(str(tmp_path / "nope.mp4")))
    with pytest.raises(SourceError, match="not found"):
        src.open()


def test_undecodable_file_is_a_source_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot decode"):
        open_source(cam(str(bad))).open()


# ---- synthetic -----------------------------------------------------------------------------
def test_synthetic_is_deterministic_live_and_sized() -> None:
    a = open_source(cam("synthetic:160x120@50", pace=False))
    b = open_source(cam("synthetic:160x120@50", pace=False))
    assert isinstance(a, SyntheticSource)
    a.open()
    b.open()
    fa = [must(a.read()) for _ in range(5)]
    fb = [must(b.read()) for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert fa[0].shape == (120, 160, 3) and fa[0].dtype == np.uint8
    assert not np.array_equal(fa[0], fa[1])  # it moves
    assert a.live is True and a.fps == 50.0
    assert a.describe() == "synthetic 160x120@50"
    a.close()
    b.close()


def test_synthetic_defaults_from_config_and_paces() -> None:
    src = open_source(cam("synthetic:", width=64, height=48, fps=50))
    src.open()
    t0 = time.monotonic()
    imgs = [src.read() for _ in range(6)]
    assert time.monotonic() - t0 >= 5 / 50 * 0.9
    assert imgs[0] is not None and imgs[0].shape == (48, 64, 3)


@pytest.mark.parametrize("uri", ["synthetic:abc", "synthetic:10x10", "synthetic:640x480@0"])
def test_bad_synthetic_spec(uri: str) -> None:
    with pytest.raises(SourceError, match="synthetic"):
        open_source(cam(uri))


# ---- registry ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "scheme", "cls"),
    [
        ("video.mp4", "file", FileSource),
        ("/data/line 3/video.mkv", "file", FileSource),
        ("file:///data/v.mp4", "file", FileSource),
        ("synthetic:", "synthetic", SyntheticSource),
        ("/dev/video0", "v4l2", V4L2Source),
        ("v4l2:///dev/video2", "v4l2", V4L2Source),
        ("rtsp://cam/stream", "rtsp", RtspSource),
        ("http://cam/mjpg", "http", HttpSource),
        ("HTTPS://cam/mjpg", "https", HttpSource),
        ("csi://0", "csi", CsiSource),
        ("gst:videotestsrc ! appsink", "gst", GstSource),
    ],
)
def test_registry_picks_the_class(uri: str, scheme: str, cls: type) -> None:
    assert scheme_of(uri) == scheme
    assert type(open_source(cam(uri))) is cls


def test_unknown_scheme_lists_supported() -> None:
    with pytest.raises(SourceError) as ei:
        open_source(cam("ftp://user:secret@host/video"))
    msg = str(ei.value)
    assert "'ftp'" in msg and "secret" not in msg
    for scheme in SOURCES:
        assert scheme in msg


def test_missing_v4l2_device() -> None:
    with pytest.raises(SourceError, match="/dev/video97 does not exist"):
        open_source(cam("v4l2:///dev/video97")).open()


# ---- credentials -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("rtsp://admin:p@ss:w0rd@10.0.0.5:554/Streaming/101", "rtsp://10.0.0.5:554/Streaming/101"),
        ("http://user@cam.local/video.mjpg", "http://cam.local/video.mjpg"),
        ("rtsp://10.0.0.5/stream", "rtsp://10.0.0.5/stream"),
        (
            "gst:rtspsrc location=rtsp://u:pw@h/x ! decodebin ! appsink",
            "gst:rtspsrc location=rtsp://h/x ! decodebin ! appsink",
        ),
    ],
)
def test_redact_strips_credentials(uri: str, shown: str) -> None:
    assert redact(uri) == shown
    assert open_source(cam(uri)).describe().endswith(shown.removeprefix("gst:"))


# ---- network (real loopback servers) -----------------------------------------------------
def test_http_mjpeg_reads_frames() -> None:
    with MjpegServer(fps=30, width=160, height=120) as srv:
        src = open_source(cam(srv.url.replace("http://", "http://viewer:secret@"), read_timeout_s=3))
        assert_reads_frames(src, (120, 160, 3))
        assert "secret" not in src.describe()


def test_network_open_failure_is_quick_and_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    from tests.support.rtsp_server import free_port

    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot open RTSP stream rtsp://127\.0\.0\.1:"):
        open_source(cam(f"rtsp://u:p@127.0.0.1:{port}/x", open_timeout_s=3)).open()
    assert time.monotonic() - t0 < 5
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ  # set for the open only


def test_rtsp_keeps_operator_ffmpeg_options(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;udp")
    monkeypatch.setattr(network, "_said", set())
    with caplog.at_level(logging.WARNING, logger="agent.capture.sources.network"):
        for _ in range(2):
            with RtspSource(cam("rtsp://127.0.0.1:1/x"))._options():
                assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;udp"
        with RtspSource(cam("rtsp://127.0.0.1:1/x", rtsp_transport="udp"))._options():
            assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;udp"
    assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;udp"  # still the operator's
    assert [r.getMessage() for r in caplog.records] == [  # said once
        "OPENCV_FFMPEG_CAPTURE_OPTIONS='rtsp_transport;udp' set before the agent started: it wins over the "
        "cameras' rtsp_transport"]


def test_ffmpeg_options_open_one_value_at_a_time_and_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opens that need the value set go together; one that needs another waits for them to finish,
    and a later open with the first value waits behind it (reconnecting cameras never keep it out);
    when the last open is done the variable is gone."""
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    gate = _FfmpegOptions()
    seen: list[tuple[str, str]] = []
    release = {name: threading.Event() for name in ("a", "same", "other", "later")}
    inside = {name: threading.Event() for name in release}

    def open_with(name: str, value: str) -> None:
        with gate.use(value):
            seen.append((name, os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]))
            inside[name].set()
            release[name].wait(5)

    tcp, udp = "rtsp_transport;tcp", "rtsp_transport;udp"
    threads = {name: threading.Thread(target=open_with, args=(name, value))
               for name, value in (("a", tcp), ("same", tcp), ("other", udp), ("later", tcp))}
    threads["a"].start()
    assert inside["a"].wait(5)
    threads["same"].start()
    assert inside["same"].wait(5)  # the same value goes in beside it
    threads["other"].start()
    time.sleep(0.1)
    threads["later"].start()
    time.sleep(0.2)
    assert seen == [("a", tcp), ("same", tcp)]  # the other value waits; the later one waits behind it
    release["a"].set()
    release["same"].set()
    assert inside["other"].wait(5)
    time.sleep(0.1)
    assert seen[2:] == [("other", udp)]
    release["other"].set()
    assert inside["later"].wait(5)
    release["later"].set()
    for t in threads.values():
        t.join(5)
    assert seen[3:] == [("later", tcp)]
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=f"RTSP tests need system packages: {_RTSP_SKIP}")
@pytest.mark.parametrize("offered", ["tcp", "udp"])
def test_rtsp_transport_is_the_one_the_camera_asks_for(monkeypatch: pytest.MonkeyPatch, offered: str) -> None:
    """A real server that offers one RTP transport only: the camera asking for it reads frames, the
    camera asking for the other cannot open (a clear error), so the setting reaches FFmpeg."""
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    other = "udp" if offered == "tcp" else "tcp"
    with RtspServer(fps=15, protocols=offered) as srv:
        assert_reads_frames(open_source(cam(srv.url, rtsp_transport=offered, read_timeout_s=5)), (120, 160, 3))
        with pytest.raises(SourceError, match=f"cannot open RTSP stream .*RTP over {other} .* not offered"):
            open_source(cam(srv.url, rtsp_transport=other, open_timeout_s=5)).open()
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ


# ---- GStreamer ---------------------------------------------------------------------------
def test_csi_pipeline_string() -> None:
    assert pipeline_for(cam("csi://1", width=1280, height=720, fps=60)) == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=60/1 ! "
        "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1"
    )
    default = pipeline_for(cam("csi://0"))
    assert "sensor-id=0 " in default and "width=1920,height=1080,framerate=30/1" in default
    assert "framerate=30000/1001" in pipeline_for(cam("csi://0", fps=29.97002997))
    with pytest.raises(SourceError, match="csi://N"):
        pipeline_for(cam("csi://left"))


def test_gst_pipeline_must_end_in_appsink() -> None:
    assert pipeline_for(cam("gst:videotestsrc ! videoconvert ! appsink name=s")) == (
        "videotestsrc ! videoconvert ! appsink name=s"
    )
    for bad in ("gst:videotestsrc ! autovideosink", "gst:", "gst:videotestsrc ! "):
        with pytest.raises(SourceError, match="appsink"):
            pipeline_for(cam(bad))


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer: the no-GStreamer error cannot occur")
@pytest.mark.parametrize("uri", ["csi://0", "gst:videotestsrc ! videoconvert ! appsink"])
def test_no_gstreamer_error_is_clear(uri: str) -> None:
    with pytest.raises(SourceError, match="no GStreamer support") as ei:
        open_source(cam(uri)).open()
    assert "pip" in str(ei.value) and "JetPack" in str(ei.value)


@pytest.mark.skipif(not gstreamer_available(), reason="this OpenCV was built without GStreamer (pip wheel)")
def test_gst_pipeline_reads_frames() -> None:
    src = open_source(cam("gst:videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48 ! videoconvert ! appsink"))
    src.open()
    try:
        img = src.read()
    finally:
        src.close()
    assert img is not None and img.shape == (48, 64, 3)


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_jetson_rtsp_pipeline_decodes_on_nvdec(codec: str) -> None:
    pipe = jetson_decode_pipeline(cam("rtsp://10.0.0.5:8554/line1", decode="jetson", codec=codec))
    assert pipe.startswith('rtspsrc location="rtsp://10.0.0.5:8554/line1" protocols=tcp ')
    udp = jetson_decode_pipeline(cam("rtsp://10.0.0.5:8554/line1", decode="jetson", codec=codec, rtsp_transport="udp"))
    assert udp == pipe.replace("protocols=tcp", "protocols=udp")
    assert f"rtp{codec}depay ! {codec}parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx" in pipe
    assert pipe.endswith("appsink drop=true max-buffers=1 sync=false")  # live: newest frame only


def test_jetson_file_pipeline_is_lossless_and_rejects_other_sources(tmp_path: Path) -> None:
    pipe = jetson_decode_pipeline(cam(str(tmp_path / "a.mp4"), decode="jetson"), str(tmp_path / "a.mp4"))
    assert "decodebin ! nvvidconv" in pipe and "drop=true" not in pipe  # files: every frame
    with pytest.raises(SourceError, match="rtsp:// and file"):
        jetson_decode_pipeline(cam("http://cam/stream", decode="jetson"))


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer: the no-GStreamer error cannot occur")
def test_jetson_decode_without_gstreamer_says_why(tmp_path: Path) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"not really a video")
    for uri in ("rtsp://127.0.0.1:1/x", str(video)):
        with pytest.raises(SourceError, match="no GStreamer support"):
            open_source(cam(uri, decode="jetson")).open()
