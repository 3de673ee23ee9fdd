"""The NVDEC source's demuxer (agent.capture.sources.demux) on real files and a real RTSP server.

NVDEC cannot exist here; what it needs from the demuxer can: Annex B elementary streams that a
decoder fed packet by packet, with no container, decodes to the same frames as the file itself
(FFmpeg's CPU decoder stands in for NVDEC's parser here; the H200 compares NVDEC's frames:
docs/measurements/h200-2026-12-02-lane-fill), and reads that let the GIL go and time out when a
camera stops sending."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from agent.capture.sources import demux
from agent.capture.sources.demux import END, AvDemuxer, bytes_at
from agent.errors import SourceError
from agent.streams_bench import make_clip
from tests.support.rtsp_server import RtspServer, free_port, unavailable_reason

_RTSP_SKIP = unavailable_reason()
DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo" / "sample.mp4"


def frames_of_file(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray") for f in c.decode(video=0)]


def decode_elementary(codec: str, packets: list[np.ndarray]) -> list[np.ndarray]:
    """The packets' bytes, one after the other, decoded as a bare elementary stream: split by FFmpeg's
    parser, no container, no extradata (NVDEC's parser reads the stream the same way)."""
    ctx = av.CodecContext.create(codec, "r")
    out = []
    for data in [*packets, None]:
        for packet in ctx.parse(None if data is None else data.tobytes()):
            out.extend(f.to_ndarray(format="gray") for f in ctx.decode(packet))
    out.extend(f.to_ndarray(format="gray") for f in ctx.decode(None))
    return out


def nal_types(data: np.ndarray, codec: str) -> list[int]:
    b = data.tobytes()
    starts = [i + 3 for i in range(len(b) - 3) if b[i:i + 3] == b"\x00\x00\x01"]
    return [b[i] & 0x1F if codec == "h264" else (b[i] >> 1) & 0x3F for i in starts if i < len(b)]


def as_array(packet: tuple[int, int, int, bool]) -> np.ndarray:
    """A copy of a yielded packet's bytes (`packets()` yields addresses, valid until the next)."""
    return np.frombuffer(bytes_at(packet[0], packet[1]), np.uint8)


def read_all(dmx: AvDemuxer) -> list[np.ndarray]:
    got, ends = [], []
    for i, packet in enumerate(dmx.packets()):
        got.append(as_array(packet))  # copied as it comes: its bytes go with the next packet
        if packet == END:
            ends.append(i)
    assert got and ends == [len(got) - 1]  # END comes last, once
    return got[:-1]


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_mp4_packets_come_out_in_annex_b_and_decode_to_the_files_frames(tmp_path: Path, codec: str) -> None:
    clip = make_clip(tmp_path / f"c.{codec}.mp4", codec, 160, 96, 30, 12)
    dmx = AvDemuxer(str(clip), "test clip", False, 5, 5)
    try:
        assert (dmx.codec, dmx.width, dmx.height, dmx.fps, dmx.pix_fmt) == (codec, 160, 96, 30.0, "yuv420p")
        assert (dmx.matrix, dmx.full_range) == ("bt601", False)  # nothing declared: BT.601, limited
        packets = read_all(dmx)
    finally:
        dmx.close()
    assert all(p[:4].tobytes() == b"\x00\x00\x00\x01" or p[:3].tobytes() == b"\x00\x00\x01" for p in packets)
    # parameter sets in band before the first picture: SPS (H.264 NAL type 7) before the IDR slice (5);
    # VPS / SPS (HEVC 32 / 33) before the IRAP slice (16-21)
    types = nal_types(packets[0], codec)
    sps, pic = (7, [5]) if codec == "h264" else (33, list(range(16, 22)))
    assert sps in types and types.index(sps) < min(types.index(t) for t in pic if t in types), types
    decoded = decode_elementary(codec, packets)
    expected = frames_of_file(clip)
    assert len(decoded) == len(expected) == 12
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected, strict=True))


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_keyframes_are_flagged_where_a_decoder_can_start(tmp_path: Path, codec: str) -> None:
    """A new NVDEC decoder starts over at a flagged packet (agent.capture.sources.nvdec): exactly the
    packets holding an IDR (H.264) / IRAP (HEVC) picture, the first one among them."""
    clip = make_clip(tmp_path / f"k.{codec}.mp4", codec, 160, 96, 10, 25)  # a keyframe every 10 frames
    dmx = AvDemuxer(str(clip), "test clip", False, 5, 5)
    flagged, random_access = [], []
    try:
        for packet in dmx.packets():
            if packet == END:
                break
            types = nal_types(as_array(packet), codec)
            flagged.append(packet[3])
            random_access.append(5 in types if codec == "h264" else any(16 <= t <= 21 for t in types))
    finally:
        dmx.close()
    assert len(flagged) == 25 and flagged[0] and sum(flagged) >= 3
    assert flagged == random_access


def test_mpeg4_in_mp4_gets_its_header_from_the_extradata_first(tmp_path: Path) -> None:
    dmx = AvDemuxer(str(DEMO), "demo", False, 5, 5)
    try:
        assert dmx.codec == "mpeg4"
        packets = read_all(dmx)
    finally:
        dmx.close()
    assert packets[0][:4].tobytes() == b"\x00\x00\x01\xb0"  # the VOS / VOL header, sent before any frame
    decoded = decode_elementary("mpeg4", packets)
    expected = frames_of_file(DEMO)
    assert len(decoded) == len(expected) > 0
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected, strict=True))


def test_a_missing_or_unreadable_file_is_a_clear_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open nothing here"):
        AvDemuxer(str(tmp_path / "missing.mp4"), "nothing here", False, 5, 5)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match="junk"):
        AvDemuxer(str(junk), "junk", False, 5, 5)


def test_without_pyav_the_demuxer_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(demux.DemuxUnavailable, match=r"PyAV is not installed \(`pip install edge-agent\[nvdec\]`\)"):
        AvDemuxer(str(DEMO), "demo", False, 5, 5)


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=f"RTSP tests need system packages: {_RTSP_SKIP}")
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_packets_decode_and_a_camera_that_stops_sending_times_out_without_holding_the_gil(
        transport: str) -> None:
    """A live camera through the real GStreamer RTSP server, offering only the transport asked for:
    Annex B packets that decode alone (the SDP's parameter sets first); then the server is frozen
    (SIGSTOP: the session stays open, no data): the read fails after read_timeout_s, and other
    threads run meanwhile."""
    srv = RtspServer(fps=15, protocols=transport).start()
    try:
        dmx = AvDemuxer(srv.url, "rtsp test camera", True, 5.0, 1.0, transport)
        try:
            assert (dmx.codec, dmx.width, dmx.height) == ("h264", 160, 120)
            packets = dmx.packets()
            got, keys = [], []
            for _ in range(20):
                packet = next(packets)
                got.append(as_array(packet))  # its bytes go with the next packet
                keys.append(packet[3])
            assert dmx.prefix is not None and got[0].tobytes() == dmx.prefix.tobytes()  # the SDP's parameter sets
            assert any(keys[1:])  # the camera's keyframes (one a second) are flagged
            decoded = decode_elementary("h264", got)
            assert len(decoded) >= 10 and decoded[0].shape == (120, 160)
            assert srv._proc is not None
            os.kill(srv._proc.pid, signal.SIGSTOP)
            failed: list[BaseException] = []
            t0 = time.monotonic()

            def read_on() -> None:
                try:
                    for _ in packets:  # buffered packets first, then the wait for data that never comes
                        pass
                except SourceError as exc:
                    failed.append(exc)

            reader = threading.Thread(target=read_on, daemon=True)
            reader.start()
            ticks = 0
            while reader.is_alive() and time.monotonic() - t0 < 15:
                time.sleep(0.01)  # needs the GIL back every 10 ms
                ticks += 1
            waited = time.monotonic() - t0
            reader.join(1)
            assert failed and "rtsp test camera" in str(failed[0]), failed
            assert 0.8 <= waited < 10, waited
            assert ticks >= waited / 0.05  # this thread ran all along (a held GIL would give ~0 ticks)
        finally:
            if srv._proc is not None:
                os.kill(srv._proc.pid, signal.SIGCONT)
            dmx.close()
    finally:
        srv.stop()


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=f"RTSP tests need system packages: {_RTSP_SKIP}")
def test_an_rtsp_transport_the_camera_does_not_offer_is_a_source_error() -> None:
    with RtspServer(fps=15, protocols="tcp") as srv:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"cannot open cam: .*the camera does not offer RTP over udp"):
            AvDemuxer(srv.url, "cam", True, 5.0, 1.0, "udp")
        assert time.monotonic() - t0 < 5


def test_an_rtsp_camera_nobody_answers_for_is_a_source_error_within_the_open_timeout() -> None:
    port = free_port()  # nothing listens there: refused at once
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="cannot open cam"):
        AvDemuxer(f"rtsp://127.0.0.1:{port}/none", "cam", True, 2.0, 1.0)
    assert time.monotonic() - t0 < 5


def test_end_marker_is_empty() -> None:
    assert END == (0, 0, 0, False) and bytes_at(*END[:2]) == b""
