from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.capture.reader import FILE_QUEUE, CaptureThread
from agent.capture.sources import FrameSource, open_source
from agent.config import BackoffConfig, CameraConfig
from agent.vision.types import Frame
from tests.capture.conftest import index_of
from tests.support.mjpeg import MjpegServer
from tests.support.rtsp_server import RtspServer, free_port, unavailable_reason

FAST = BackoffConfig(initial_s=0.05, max_s=0.2, jitter=0.1)


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, object]]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, data: dict[str, object]) -> None:
        with self._cond:
            self.items.append((name, data))
            self._cond.notify_all()

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def wait_for(self, name: str, timeout: float, count: int = 1) -> dict[str, object]:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.names().count(name) >= count, timeout)
        assert ok, f"no {name} event within {timeout} s; got {self.names()}"
        return [d for n, d in self.items if n == name][count - 1]


@pytest.fixture
def running() -> Iterator[Callable[[CaptureThread], CaptureThread]]:
    started: list[CaptureThread] = []

    def run(c: CaptureThread) -> CaptureThread:
        started.append(c)
        c.start()
        return c

    yield run
    for c in started:
        c.stop(5)


def drain(c: CaptureThread, n: int, timeout: float = 10.0, each: float = 0.0) -> list[Frame]:
    out: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        f = c.get(timeout=0.2)
        if f is not None:
            out.append(f)
            if each:
                time.sleep(each)
    return out


# ---- files: lossless ---------------------------------------------------------------------
def test_fast_file_delivers_every_frame_once_in_order(video: Callable[..., Path], running: Callable) -> None:
    path = video(40)
    ev = Events()
    c = running(CaptureThread(CameraConfig(source=str(path), pace=False), on_event=ev))
    frames: list[Frame] = []
    max_queued = 0
    deadline = time.monotonic() + 15
    while not c.ended and time.monotonic() < deadline:
        max_queued = max(max_queued, int(c.stats()["queued"]))
        f = c.get(timeout=0.2)
        if f is not None:
            frames.append(f)
            if len(frames) < 10:
                time.sleep(0.01)  # a slow consumer at first: the reader must wait, not drop
    assert c.ended
    assert [f.seq for f in frames] == list(range(40))
    assert [index_of(f.image, 40) for f in frames] == list(range(40))
    assert all(a.mono <= b.mono and a.ts <= b.ts for a, b in itertools.pairwise(frames))
    s = c.stats()
    assert s["frames_in"] == 40 and s["frames_dropped"] == 0 and s["state"] == "ended"
    assert max_queued <= FILE_QUEUE
    assert ev.wait_for("camera_ended", 2)["frames"] == 40
    assert "camera_lost" not in ev.names()


def test_looped_file_starts_again(video: Callable[..., Path], running: Callable) -> None:
    path = video(10)
    c = running(CaptureThread(CameraConfig(source=str(path), pace=False, loop=True)))
    frames = drain(c, 25)
    assert [f.seq for f in frames] == list(range(25))
    assert [index_of(f.image, 10) for f in frames] == [i % 10 for i in range(25)]
    assert not c.ended and c.stats()["state"] == "streaming"


def test_stop_returns_while_file_waits_on_consumer(video: Callable[..., Path]) -> None:
    c = CaptureThread(CameraConfig(source=str(video(30)), pace=False))
    c.start()
    time.sleep(0.3)  # nobody consumes: the reader sits on the full queue
    assert c.stats()["queued"] == FILE_QUEUE and c.stats()["state"] == "streaming"
    assert time.monotonic() - c.last_progress < 0.5  # waiting on the consumer is not a stall
    t0 = time.monotonic()
    c.stop(5)
    assert time.monotonic() - t0 < 1.0
    assert c.stats()["state"] == "stopped"


# ---- live: newest frame only ----------------------------------------------------------------
def test_live_source_slow_consumer_drops_and_never_queues(running: Callable) -> None:
    c = running(CaptureThread(CameraConfig(source="synthetic:64x48@200")))
    seen: list[Frame] = []
    max_queued = 0
    t_end = time.monotonic() + 0.8
    while time.monotonic() < t_end:
        f = c.get(timeout=0.5)
        if f is not None:
            seen.append(f)
        max_queued = max(max_queued, int(c.stats()["queued"]))
        time.sleep(0.05)  # ~20 fps consumer of a 200 fps camera
    s = c.stats()
    assert max_queued <= 1
    assert s["frames_dropped"] > 50
    assert s["frames_in"] == s["frames_dropped"] + len(seen) + s["queued"]
    seqs = [f.seq for f in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[-1] - seqs[0] > len(seqs)  # what we got were the newest frames, with gaps between
    assert s["state"] == "streaming" and s["last_frame_age_s"] is not None


def test_set_source_switches_on_the_thread(video: Callable[..., Path], running: Callable) -> None:
    ev = Events()
    c = running(CaptureThread(CameraConfig(source="synthetic:64x48@100"), on_event=ev))
    assert drain(c, 3)
    c.set_source(CameraConfig(source=str(video(5)), pace=False))
    deadline = time.monotonic() + 10
    shapes = []
    while not c.ended and time.monotonic() < deadline:
        f = c.get(timeout=0.2)
        if f is not None:
            shapes.append(f.image.shape)
    assert c.ended
    assert shapes[-5:] == [(64, 96, 3)] * 5
    assert str(c.stats()["source"]).startswith("file ")
    ev.wait_for("camera_ended", 2)


# ---- reconnects -----------------------------------------------------------------------------
def test_camera_that_never_opens_keeps_retrying_with_backoff(running: Callable) -> None:
    port = free_port()  # nothing listens there
    opens: list[float] = []

    def factory(cfg: CameraConfig) -> FrameSource:
        opens.append(time.monotonic())
        return open_source(cfg)

    ev = Events()
    cfg = CameraConfig(source=f"http://127.0.0.1:{port}/video", open_timeout_s=1,
                       reconnect=BackoffConfig(initial_s=0.05, max_s=0.2, jitter=0.0))
    c = running(CaptureThread(cfg, on_event=ev, source_factory=factory))
    time.sleep(1.2)
    assert c.get(timeout=0.05) is None
    s = c.stats()
    assert s["state"] == "lost" and "cannot open HTTP stream" in str(s["last_error"])
    assert len(opens) >= 5 and s["reconnects"] >= 4
    gaps = np.diff(opens)
    assert 0.04 <= gaps[0] < 0.3 and gaps[1] >= 0.09  # 0.05, 0.1, then 0.2 capped
    assert all(g < 0.8 for g in gaps)  # capped at max_s (plus the failing open itself)
    assert ev.names() == ["camera_lost"]  # once per outage, not once per attempt


def test_exceptions_from_a_source_never_escape(running: Callable) -> None:
    calls = 0

    class Broken(FrameSource):
        def open(self) -> None:
            nonlocal calls
            calls += 1
            if calls % 2:
                raise RuntimeError("driver exploded")

        def read(self) -> np.ndarray | None:
            raise ValueError("bad buffer")

        def close(self) -> None:
            raise OSError("close failed too")

        live = True
        fps = None

        def describe(self) -> str:
            return "broken"

    ev = Events()
    cfg = CameraConfig(source="synthetic:", reconnect=BackoffConfig(initial_s=0.02, max_s=0.05, jitter=0.5))
    c = running(CaptureThread(cfg, on_event=ev, source_factory=lambda _c: Broken()))
    time.sleep(0.5)
    assert calls >= 4 and c.stats()["state"] == "lost"
    assert ev.names() == ["camera_lost"]
    assert ev.items[0][1]["reason"] == "driver exploded"


def test_decode_errors_add_up_across_reconnects(running: Callable) -> None:
    """A source counts the pictures its decoder refused (NVDEC starts over at a keyframe); the capture's
    figure keeps those of the sources it read before a reconnect."""
    class Damaged(FrameSource):
        def __init__(self) -> None:
            self.reads = 0

        def open(self) -> None:
            pass

        def read(self) -> np.ndarray | None:
            self.reads += 1
            if self.reads % 2 == 0:
                self.decode_errors += 1  # a damaged picture, skipped
            if self.reads > 4:
                raise ValueError("stream dropped")
            return np.zeros((8, 8, 3), np.uint8)

        def close(self) -> None:
            pass

        live = True
        fps = None

        def describe(self) -> str:
            return "damaged"

    cfg = CameraConfig(source="synthetic:", reconnect=BackoffConfig(initial_s=0.02, max_s=0.05, jitter=0.5))
    c = running(CaptureThread(cfg, source_factory=lambda _c: Damaged()))
    deadline = time.monotonic() + 10
    while c.stats()["reconnects"] < 3 and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    stats = c.stats()
    assert int(stats["reconnects"]) >= 3  # type: ignore[call-overload]
    assert int(stats["decode_errors"]) >= 2 * 3  # type: ignore[call-overload]  # two per source, three sources done


def test_mjpeg_camera_lost_and_restored(running: Callable) -> None:
    srv = MjpegServer(fps=25).start()
    try:
        ev = Events()
        cfg = CameraConfig(source=srv.url, read_timeout_s=2, open_timeout_s=2, reconnect=FAST)
        c = running(CaptureThread(cfg, on_event=ev))
        before = drain(c, 3)
        assert len(before) == 3 and c.stats()["state"] == "streaming"
        srv.stop()
        lost = ev.wait_for("camera_lost", 5)
        assert lost["camera"] == "cam0" and lost["reason"]
        time.sleep(0.4)  # a few failed reconnects against a closed port
        assert c.stats()["state"] == "lost" and c.stats()["reconnects"] >= 1
        while c.get(timeout=0.01) is not None:  # whatever was left in the mailbox
            pass
        srv.start()  # same port
        restored = ev.wait_for("camera_restored", 5)
        assert float(restored["downtime_s"]) >= 0.4  # type: ignore[arg-type]
        after = drain(c, 3)
        assert len(after) == 3 and after[0].seq > before[-1].seq
        assert c.stats()["state"] == "streaming"
        assert ev.names().count("camera_lost") == 1
    finally:
        srv.stop()


_RTSP_SKIP = unavailable_reason()


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=f"RTSP reconnect test needs system packages: {_RTSP_SKIP}")
def test_rtsp_camera_lost_and_restored(running: Callable) -> None:
    srv = RtspServer(fps=15).start()
    try:
        ev = Events()
        cfg = CameraConfig(source=srv.url, read_timeout_s=1.5, open_timeout_s=5, reconnect=FAST)
        c = running(CaptureThread(cfg, on_event=ev))
        before = drain(c, 3, timeout=15)
        assert len(before) == 3 and before[0].image.shape == (120, 160, 3)
        srv.stop()  # killed: the TCP session drops
        ev.wait_for("camera_lost", 10)
        srv.start()
        restored = ev.wait_for("camera_restored", 20)
        assert float(restored["downtime_s"]) > 0  # type: ignore[arg-type]
        after = drain(c, 2, timeout=10)
        assert len(after) == 2 and after[0].seq > before[-1].seq
    finally:
        srv.stop()


def test_stop_does_not_wait_out_a_slow_frame_rate() -> None:
    # one frame every 5 s: the capture thread sleeps in the pacer between frames; a stop wakes it
    c = CaptureThread(CameraConfig(source="synthetic:64x48@0.2"))
    c.start()
    assert c.get(timeout=5) is not None  # the first frame comes at once, the next one is 5 s away
    time.sleep(0.2)
    t0 = time.monotonic()
    c.stop(10)
    assert time.monotonic() - t0 < 1.0
    assert c.stats()["state"] == "stopped"
