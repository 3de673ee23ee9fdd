"""NVDEC sources where NVDEC cannot serve (CI: no GPU): a clear reason, CPU decoding, frames keep flowing.

PyNvVideoCodec is made missing the way Python sees a missing package (sys.modules entry None), so
these hold whether or not it is installed. The NVDEC path itself runs on the GPU machine
(scripts/streams_check.py: nvdec vs CPU-decode detections on the demo clip at 1080p).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.capture.reader import CaptureThread
from agent.capture.sources import FileSource, NvdecSource, choose_decode, open_source
from agent.config import CameraConfig
from agent.errors import SourceError
from tests.support.rtsp_server import unavailable_reason

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo" / "sample.mp4"
_RTSP_SKIP = unavailable_reason()


@pytest.fixture
def no_pynvvideocodec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)


def test_nvdec_without_pynvvideocodec_falls_back_to_cpu(no_pynvvideocodec: None) -> None:
    src = open_source(CameraConfig(source=str(DEMO), decode="nvdec", pace=False))
    assert isinstance(src, NvdecSource)
    src.open()
    try:
        img = src.read()
        assert isinstance(img, np.ndarray) and img.shape == (360, 640, 3)
        assert src.decode_path.startswith("cpu (nvdec unavailable: PyNvVideoCodec is not installed")
        assert "edge-agent[nvdec]" in src.decode_path or "nvdec" in src.decode_path
    finally:
        src.close()


def test_auto_chooses_cpu_and_says_why(no_pynvvideocodec: None) -> None:
    cfg = CameraConfig(source=str(DEMO), decode="auto", pace=False)
    chosen, why = choose_decode(cfg)
    assert chosen in ("cpu", "jetson") and why.startswith("auto:")
    src = open_source(cfg)
    assert isinstance(src, FileSource) and src.decode_path.startswith(chosen)


def test_nvdec_is_only_for_files_and_rtsp() -> None:
    with pytest.raises(SourceError, match="decode 'nvdec' is for rtsp:// and file sources"):
        open_source(CameraConfig(source="synthetic:64x48", decode="nvdec"))
    # auto on other sources simply decodes as they always do
    assert open_source(CameraConfig(source="synthetic:64x48", decode="auto")).decode_path == "cpu"


def test_missing_file_is_a_clear_error(no_pynvvideocodec: None, tmp_path: Path) -> None:
    src = open_source(CameraConfig(source=str(tmp_path / "none.mp4"), decode="nvdec"))
    with pytest.raises(SourceError, match="video file not found"):
        src.open()


def test_capture_reports_the_decode_path_and_serves(no_pynvvideocodec: None) -> None:
    cap = CaptureThread(CameraConfig(id="c1", source=str(DEMO), decode="nvdec", pace=False))
    cap.start()
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            f = cap.get(0.5)
            if f is not None:
                got.append(f)
        assert [f.seq for f in got] == list(range(10))
        stats = cap.stats()
        assert str(stats["decode"]).startswith("cpu (nvdec unavailable") and stats["state"] == "streaming"
    finally:
        cap.stop()


class _StandIn:
    """Stands in for a DeviceBuffer / Event (no GPU here): records its free()."""

    made: list[_StandIn] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.freed = False
        self.ptr = 0x1000 * (len(_StandIn.made) + 1)
        _StandIn.made.append(self)

    def free(self) -> None:
        assert not self.freed, "freed twice"
        self.freed = True


def test_frame_pool_hands_each_buffer_out_with_its_own_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoded frame's buffer comes with the event its copy is recorded on; both come back
    together when the frame is gone, are reused, and are freed once when the pool closes."""
    from agent.capture.sources import nvdec
    from agent.engines import cuda

    _StandIn.made = []
    monkeypatch.setattr(cuda, "DeviceBuffer", _StandIn)
    monkeypatch.setattr(cuda, "Event", _StandIn)
    pool = nvdec._Pool(1024)
    a = pool.take()
    b = pool.take()
    assert a.buf is not b.buf and a.ready is not b.ready and pool.allocated == 2
    first = (a.buf, a.ready)
    del a  # the frame using it is gone: buffer and event return as a pair
    c = pool.take()
    assert (c.buf, c.ready) == first and pool.allocated == 2
    del c
    pool.close()
    assert first[0].freed and first[1].freed
    kept = (b.buf, b.ready)
    assert not kept[0].freed
    del b  # a frame outliving its pool frees its own buffer and event
    assert kept[0].freed and kept[1].freed


def test_without_pyav_nvdec_is_unavailable_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV demuxes for NVDEC (agent.capture.sources.demux): missing, the source falls back like
    without PyNvVideoCodec (NvdecUnavailable), naming the extra."""
    from agent.capture.sources.nvdec import NvdecUnavailable

    monkeypatch.setitem(sys.modules, "av", None)
    src = open_source(CameraConfig(source="rtsp://127.0.0.1:8554/cam", decode="nvdec"))
    assert isinstance(src, NvdecSource)
    with pytest.raises(NvdecUnavailable, match=r"PyAV is not installed \(`pip install edge-agent\[nvdec\]`\)"):
        src._demuxer(object())


class StandInPacketData:
    """PyNvVideoCodec's PacketData (its fields as printed on the H200: bsl_data, bsl, pts, ...)."""

    bsl_data = 0
    bsl = 0
    pts = 0


def test_stream_packets_reach_the_decoder_as_pointers_to_annex_b_bytes(tmp_path: Path) -> None:
    """rtsp:// streams are demuxed by PyAV (it lets the GIL go and times out: test_demux.py); here on a
    file, forced down that path: each PacketData the decoder gets points at the packet's bytes while
    the decoder reads them, the last one empty (the decoder's flush). PyNvVideoCodec cannot exist
    here: its module is a stand-in with the names it has."""
    import ctypes
    from types import SimpleNamespace

    from agent.capture.sources.demux import AvDemuxer, bytes_at
    from agent.capture.sources.nvdec import _NetDemuxer
    from agent.streams_bench import make_clip

    clip = make_clip(tmp_path / "c.mp4", "h264", 160, 96, 30, 8)
    nvc = SimpleNamespace(PacketData=StandInPacketData, cudaVideoCodec=SimpleNamespace(H264="h264-id"),
                          cudaVideoChromaFormat=SimpleNamespace(**{"420": "420-id"}))
    dmx = _NetDemuxer(nvc, str(clip), "clip", False, 5.0, 5.0)
    try:
        assert (dmx.codec, dmx.caps(), dmx.fps, dmx.size, dmx.color) == ("h264-id", ("420-id", 8), 30.0,
                                                                         (160, 96), ("bt601", False))
        seen = [ctypes.string_at(p.bsl_data, p.bsl) if p.bsl else b"" for p in dmx.packets()]
    finally:
        dmx.close()
    ref = AvDemuxer(str(clip), "clip", False, 5.0, 5.0)
    try:
        expected = [bytes_at(address, size) for address, size, _, _ in ref.packets()]
    finally:
        ref.close()
    assert seen == expected and seen[-1] == b"" and all(b.startswith(b"\x00\x00\x00\x01") for b in seen[:-1])


@pytest.mark.parametrize(("pix_fmt", "expected"), [
    ("yuv420p", ("420", 8)), ("yuvj420p", ("420", 8)), ("nv12", ("420", 8)), ("yuv420p10le", ("420", 10)),
    ("yuv422p", ("422", 8)), ("yuv444p12le", ("444", 12)), ("gray", ("Monochrome", 8))])
def test_pixel_formats_map_to_nvdecs_chroma_and_depth(pix_fmt: str, expected: tuple[str, int]) -> None:
    from agent.capture.sources.nvdec import _chroma

    assert _chroma(pix_fmt) == expected


def test_a_codec_nvdec_does_not_decode_is_nvdec_unavailable() -> None:
    """The camera falls back to the CPU (NvdecUnavailable) instead of failing: e.g. a ProRes file."""
    from types import SimpleNamespace

    from agent.capture.sources.nvdec import NvdecUnavailable, _nv_codec

    nvc = SimpleNamespace(cudaVideoCodec=SimpleNamespace(H264="h264-id"))  # stands in for PyNvVideoCodec's enum
    assert _nv_codec(nvc, SimpleNamespace(codec="h264")) == "h264-id"  # type: ignore[arg-type]
    with pytest.raises(NvdecUnavailable, match="NVDEC does not decode prores"):
        _nv_codec(nvc, SimpleNamespace(codec="prores"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "expected"), [("", None), ("native", "NATIVE-id"), ("low", "LOW-id"),
                                                   ("Zero", "ZERO-id"), ("fast", None)])
def test_the_decoders_hold_back_is_the_one_the_environment_names(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setting: str, expected: str | None) -> None:
    """EDGE_AGENT_NVDEC_LATENCY reaches CreateDecoder as PyNvVideoCodec's DisplayDecodeLatencyType member;
    unset: the decoder's default (no argument); an unknown value: the default, said once in the log.
    PyNvVideoCodec and a CUDA device cannot exist here: a recording stand-in takes their calls."""
    import logging
    from types import ModuleType, SimpleNamespace

    from agent.capture.sources import nvdec
    from agent.engines import cuda

    made: list[dict[str, object]] = []
    nvc = ModuleType("PyNvVideoCodec")
    nvc.DisplayDecodeLatencyType = SimpleNamespace(NATIVE="NATIVE-id", LOW="LOW-id", ZERO="ZERO-id")  # type: ignore[attr-defined]
    nvc.GetDecoderCaps = lambda **kw: {"supported": 1}  # type: ignore[attr-defined]
    nvc.CreateDecoder = lambda **kw: made.append(kw) or SimpleNamespace()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", nvc)
    monkeypatch.setattr(cuda, "use_device", lambda device: None)
    monkeypatch.setattr(cuda, "Stream", lambda: SimpleNamespace(handle=7, synchronize=lambda: None, free=lambda: None))
    monkeypatch.setattr(cuda, "current_context", lambda: None)
    monkeypatch.setattr(nvdec, "_LATENCY", setting)
    monkeypatch.setattr(nvdec, "_warned", set())
    demuxer = SimpleNamespace(codec="h264-id", what="h264 (yuv420p)", fps=30.0, color=("bt709", False),
                              size=(1920, 1080), caps=lambda: ("420-id", 8), packets=lambda: iter(()),
                              close=lambda: None)
    src = NvdecSource(CameraConfig(source="rtsp://127.0.0.1:8554/cam", decode="nvdec"), open_source)
    monkeypatch.setattr(src, "_demuxer", lambda nvc: demuxer)
    with caplog.at_level(logging.WARNING, logger="agent.capture.sources.nvdec"):
        src._open_nvdec()
        src._open_nvdec()  # a reconnect: an unknown value is not said again
    assert len(made) == 2 and all(kw["codec"] == "h264-id" and kw["usedevicememory"] is True for kw in made)
    assert [kw.get("latency") for kw in made] == [expected, expected]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == (["EDGE_AGENT_NVDEC_LATENCY='fast' is not one of native, low, zero (or this PyNvVideoCodec "
                         "lacks it): the decoder's default is used"] if setting == "fast" else [])


# ---- a picture NVDEC refuses: a new decoder from the next keyframe, without leaving the stream -------

def _has_idr(data: bytes) -> bool:
    return any(data[i + 3] & 0x1F == 5 for i in range(len(data) - 3) if data[i:i + 3] == b"\x00\x00\x01")


class StandInDecoder:
    """Stands in for PyNvVideoCodec's decoder (no GPU here): records what it is fed and gives one
    "frame" (the packet's pts) per picture; refuses the packets whose pts is in `refuse` (`once`: the
    first time only, as a resolution change is refused by the old decoder alone), raising as
    PyNvVideoCodec does when cuvidDecodePicture fails."""

    def __init__(self, number: int, refuse: set[int], fed: list[tuple[int, int, bytes]], once: bool) -> None:
        self.number, self.refuse, self.fed, self.once = number, refuse, fed, once

    def Decode(self, packet: StandInPacketData) -> list[int]:  # PyNvVideoCodec's name
        import ctypes

        data = ctypes.string_at(packet.bsl_data, packet.bsl) if packet.bsl else b""
        self.fed.append((self.number, packet.pts, data))
        if data and packet.pts in self.refuse:
            if self.once:
                self.refuse.discard(packet.pts)
            raise RuntimeError("cuvidDecodePicture returned error 1")
        return [packet.pts] if data else []


@pytest.fixture
def stand_in_nvdec(monkeypatch: pytest.MonkeyPatch) -> Any:
    """NvdecSource on a file demuxed by PyAV (as rtsp:// streams are) with PyNvVideoCodec, the CUDA
    stream and the device copy standing in (none can exist here): `make(clip, refuse)` opens it."""
    from types import ModuleType, SimpleNamespace

    from agent.capture.sources import nvdec
    from agent.engines import cuda

    state: dict[str, Any] = {"decoders": 0, "fed": [], "syncs": 0, "refuse": set(), "once": False}

    def create(**kw: object) -> StandInDecoder:
        state["decoders"] += 1
        return StandInDecoder(state["decoders"], state["refuse"], state["fed"], state["once"])

    def sync() -> None:
        state["syncs"] += 1

    nvc = ModuleType("PyNvVideoCodec")
    nvc.PacketData = StandInPacketData  # type: ignore[attr-defined]
    nvc.cudaVideoCodec = SimpleNamespace(H264="h264-id")  # type: ignore[attr-defined]
    nvc.cudaVideoChromaFormat = SimpleNamespace(**{"420": "420-id"})  # type: ignore[attr-defined]
    nvc.GetDecoderCaps = lambda **kw: {"supported": 1}  # type: ignore[attr-defined]
    nvc.CreateDecoder = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", nvc)
    monkeypatch.setattr(cuda, "use_device", lambda device: None)
    monkeypatch.setattr(cuda, "Stream", lambda: SimpleNamespace(handle=7, synchronize=sync, free=lambda: None))
    monkeypatch.setattr(cuda, "current_context", lambda: None)
    monkeypatch.setattr(nvdec, "_FILE_DEMUX", "pyav")

    def make(clip: Path, refuse: set[int], once: bool = False) -> NvdecSource:
        state["refuse"].update(refuse)
        state["once"] = once
        src = NvdecSource(CameraConfig(id="cam", source=str(clip), decode="nvdec", pace=False, loop=False),
                          open_source)
        src.open()
        monkeypatch.setattr(src, "_copy", lambda f: f)  # the device-to-device copy: a frame is its pts here
        return src

    make.state = state  # type: ignore[attr-defined]
    return make


def _packets_of(clip: Path) -> list[tuple[int, bool]]:
    from agent.capture.sources.demux import END, AvDemuxer

    dmx = AvDemuxer(str(clip), "clip", False, 5.0, 5.0)
    try:
        return [(pts, key) for _, _, pts, key in dmx.packets() if (_, _, pts, key) != END]
    finally:
        dmx.close()


def _read_all(src: NvdecSource) -> list[int]:
    got = []
    while (f := src.read()) is not None:
        got.append(f)
    return got


def test_a_refused_picture_starts_a_new_decoder_at_the_next_keyframe(tmp_path: Path, stand_in_nvdec: Any,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A damaged picture (a lost UDP packet) costs the pictures up to the next keyframe, counted, not
    the stream: the read goes on, a new decoder gets the keyframe first, and after it every picture."""
    from agent.streams_bench import make_clip

    clip = make_clip(tmp_path / "c.mp4", "h264", 160, 96, 10, 35)  # keyframes at 0, 10, 20, 30
    packets = _packets_of(clip)
    keys = [i for i, (_, key) in enumerate(packets) if key]
    assert keys[:4] == [0, 10, 20, 30], keys
    src = stand_in_nvdec(clip, {packets[13][0]})
    try:
        got = _read_all(src)
        assert src.decode_errors == 1 and src._dmx.skipped == 6  # 14-19 waited for the keyframe
    finally:
        src.close()
    pts = [p for p, _ in packets]
    assert got == pts[:13] + pts[20:]
    state = stand_in_nvdec.state
    assert state["decoders"] == 2 and state["syncs"] >= 1  # the old decoder's copies finished first
    second = [data for number, _, data in state["fed"] if number == 2]
    assert second and _has_idr(second[0])  # the new decoder starts at a keyframe (parameter sets in band)
    assert "a new decoder starts at the next keyframe" in caplog.text and "error 1" in caplog.text


def test_a_refused_keyframe_goes_to_the_new_decoder_itself(tmp_path: Path, stand_in_nvdec: Any) -> None:
    """A resolution change: the old decoder refuses the new size's keyframe; the new decoder takes that
    same keyframe, so nothing is lost."""
    from agent.streams_bench import make_clip

    clip = make_clip(tmp_path / "c.mp4", "h264", 160, 96, 10, 30)
    packets = _packets_of(clip)
    assert packets[20][1]
    src = stand_in_nvdec(clip, {packets[20][0]}, once=True)
    try:
        got = _read_all(src)
        assert src.decode_errors == 1 and src._dmx.skipped == 0
    finally:
        src.close()
    assert got == [p for p, _ in packets]
    fed = stand_in_nvdec.state["fed"]
    assert [pts for number, pts, data in fed if number == 2][:1] == [packets[20][0]]


def test_a_decoder_that_keeps_failing_ends_the_read(tmp_path: Path, stand_in_nvdec: Any) -> None:
    """New decoders that fail again before their first picture (three in a row: at the next keyframe,
    that keyframe once more, the one after): a SourceError, and the capture thread reconnects with
    backoff."""
    from agent.errors import SourceError
    from agent.streams_bench import make_clip

    clip = make_clip(tmp_path / "c.mp4", "h264", 160, 96, 10, 60)
    packets = _packets_of(clip)
    src = stand_in_nvdec(clip, {pts for pts, _ in packets[13:]})
    try:
        got = []
        with pytest.raises(SourceError, match=r"NVDEC could not decode .*cuvidDecodePicture returned error 1"):
            while (f := src.read()) is not None:
                got.append(f)
        assert got == [p for p, _ in packets[:13]]
        assert src.decode_errors == 4 and stand_in_nvdec.state["decoders"] == 4
        first = {number: pts for number, pts, _ in reversed(stand_in_nvdec.state["fed"])}  # each decoder's first
        assert [first[2], first[3], first[4]] == [packets[20][0], packets[20][0], packets[30][0]]
    finally:
        src.close()


def test_a_refused_picture_from_pynvvideocodecs_own_demuxer_ends_the_read(stand_in_nvdec: Any) -> None:
    """Files on PyNvVideoCodec's demuxer carry no keyframe flags to start over at: the read ends."""
    from types import SimpleNamespace

    from agent.errors import SourceError

    src = NvdecSource(CameraConfig(id="cam", source=str(DEMO), decode="nvdec"), open_source)
    src._dmx = SimpleNamespace(close=lambda: None)  # a _FileDemuxer's place
    with pytest.raises(SourceError, match=r"NVDEC could not decode .*picture 7"):
        src._start_over(RuntimeError("picture 7"))
    assert src.decode_errors == 1


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=f"RTSP tests need system packages: {_RTSP_SKIP}")
def test_a_stream_starting_over_gets_the_sdps_parameter_sets_then_a_keyframe() -> None:
    """Over RTSP the parameter sets come in the SDP (sent once before the first packet): a new decoder
    gets them again, then the next keyframe; the real GStreamer server, PacketData standing in."""
    import ctypes
    from types import SimpleNamespace

    from agent.capture.sources.nvdec import _NetDemuxer
    from tests.support.rtsp_server import RtspServer

    nvc = SimpleNamespace(PacketData=StandInPacketData, cudaVideoCodec=SimpleNamespace(H264="h264-id"))
    with RtspServer(fps=15) as srv:
        dmx = _NetDemuxer(nvc, srv.url, "cam", True, 5.0, 2.0)
        try:
            assert dmx._av.prefix is not None
            prefix = dmx._av.prefix.tobytes()
            packets = dmx.packets()
            assert ctypes.string_at(next(packets).bsl_data, len(prefix)) == prefix
            for _ in range(3):
                next(packets)
            dmx.resync()
            after = []
            for _ in range(3):  # one PacketData for all: read as it comes
                packet = next(packets)
                after.append(ctypes.string_at(packet.bsl_data, packet.bsl))
        finally:
            dmx.close()
    assert after[0] == prefix and _has_idr(after[1]) and not _has_idr(after[2])
    assert dmx.skipped >= 1  # a keyframe a second at 15 fps: some pictures were left out
