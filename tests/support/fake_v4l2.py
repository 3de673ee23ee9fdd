"""TEST DOUBLE for a V4L2 camera that can be unplugged and plugged back: a FIFO at a device path.

No machine of this workplace has a /dev/videoN, nor can it load v4l2loopback (no kernel modules in
a container). What a USB camera does when it is pulled is: reads fail, then its device node
disappears (udev), then it reappears on replug. `FifoCamera` plays that at any path: `plug()`
makes a FIFO there and writes raw BGR frames into it at `fps`; `unplug()` closes the writer (the
reader sees end of stream) and removes the node.

On the agent side, `FifoV4L2Source` replaces `V4L2Source` in the source registry (only in a
process started through this module: `python -m tests.support.fake_v4l2 run -c CFG`). It keeps the
real source's device check and message ("does not exist (camera unplugged?)") and reads frames of
the configured width x height from the FIFO, bounded by `read_timeout_s`; everything else (the
capture thread, its backoff, camera_lost / camera_restored, the pipeline, MQTT) is the real agent.
What it does NOT exercise: OpenCV's V4L2 backend and a real driver's ENODEV / select() timeout.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from agent.capture.sources import V4L2Source
from agent.config import CameraConfig
from agent.errors import SourceError
from tests.support.agent_proc import ROOT, AgentProcess


class FifoV4L2Source(V4L2Source):
    """The agent-side double: a V4L2 "device" that is a FIFO of raw BGR frames (cfg.width x cfg.height)."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self._fd: int | None = None
        self._size = (cfg.height or 240) * (cfg.width or 320) * 3

    def open(self) -> None:
        if not os.path.exists(self.device):  # the real V4L2Source's check, same words
            raise SourceError(f"V4L2 device {self.device} does not exist (camera unplugged? wrong index?)")
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"cannot open V4L2 device {self.device}: {exc.strerror}") from None
        # no writer yet: a FIFO that never had one is not readable, so this waits for the first frame
        if not select.select([fd], [], [], self.cfg.open_timeout_s)[0]:
            os.close(fd)
            raise SourceError(f"V4L2 device {self.device} sent nothing within {self.cfg.open_timeout_s:g} s")
        self._fd = fd
        self._fps = self.cfg.fps

    def read(self) -> np.ndarray | None:
        if self._fd is None:
            return None
        buf = bytearray()
        deadline = time.monotonic() + self.cfg.read_timeout_s
        while len(buf) < self._size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None  # stalled: a read timeout, as a wedged camera
            try:
                chunk = os.read(self._fd, self._size - len(buf))
            except BlockingIOError:
                continue
            if not chunk:
                return None  # writer gone: the camera was unplugged
            buf += chunk
        return np.frombuffer(bytes(buf), np.uint8).reshape((self.cfg.height or 240, self.cfg.width or 320, 3))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FifoCamera:
    """The device side: `plug()` / `unplug()` a FIFO at `path` and feed it frames while plugged."""

    def __init__(self, path: Path, width: int = 320, height: int = 240, fps: float = 15.0) -> None:
        self.path, self.width, self.height, self.fps = path, width, height, fps
        self.frames_written = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _frame(self, i: int) -> bytes:
        img = np.zeros((self.height, self.width, 3), np.uint8)
        img[:, :] = (i * 7 % 256, 80, 160)
        img[self.height // 3: 2 * self.height // 3, (i * 4) % self.width:][:, : self.width // 4] = 255
        return img.tobytes()

    def plug(self) -> None:
        os.mkfifo(self.path)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fifo-camera", daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        # node first, writer second: a reader that reopens after the end of stream finds no device,
        # never the old FIFO without a writer (which would hold it until open_timeout_s)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        fd: int | None = None
        period, n, t0 = 1.0 / self.fps, 0, time.monotonic()
        try:
            while not self._stop.is_set():
                if fd is None:
                    try:  # non-blocking open fails (ENXIO) until a reader has the FIFO open
                        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                        os.set_blocking(fd, True)
                        n, t0 = 0, time.monotonic()
                    except OSError as exc:
                        if exc.errno not in (errno.ENXIO, errno.ENOENT):
                            raise
                        self._stop.wait(0.005)
                        continue
                try:
                    os.write(fd, self._frame(self.frames_written))
                    self.frames_written += 1
                except BrokenPipeError:  # the reader closed it (the agent reopens): wait for the next reader
                    os.close(fd)
                    fd = None
                    continue
                n += 1
                delay = t0 + n * period - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
        finally:
            if fd is not None:
                os.close(fd)


class FakeV4L2Agent(AgentProcess):
    """The real agent, run through this module so that its `v4l2` sources are FifoV4L2Source."""

    def __init__(self, config: Path, *args: str) -> None:  # same fields as AgentProcess, another entry point
        self.log = config.parent / f"agent-{int(time.time() * 1000)}.log"
        self._fh = self.log.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_v4l2", "run", "-c", str(config),
                                      *args], cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, env=env)


def main() -> int:
    from agent.capture import sources
    from agent.cli import main as cli_main

    sources.SOURCES["v4l2"] = FifoV4L2Source
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
