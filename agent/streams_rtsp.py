"""Live RTSP test streams on loopback: video files served by Debian's GStreamer RTSP server.

Data flow: an H.264 / HEVC MP4 made by `agent.streams_bench.make_clip` -> `filesrc ! qtdemux !
h264parse|h265parse ! rtph264pay|rtph265pay` in a GStreamer RTSP server (one mount per stream,
/s0, /s1, ...; every client gets its own pipeline, paced by the server's clock) -> OpenCV's
FFmpeg backend (or NVDEC) reading rtsp://127.0.0.1:PORT/sN over TCP like any camera.

The server runs under the system python3 (python3-gi, gir1.2-gst-rtsp-server-1.0 and the
GStreamer plugins are Debian packages, not wheels): `RtspStreams` starts this file with it as a
subprocess and kills it on `stop()`. Nothing here is imported by the service.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
APT_LINE = ("apt-get install -y python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
            "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, needs: str) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; RuntimeError when `proc` exits first
    (with the last line of its stderr, where piped, and `needs`: what to install) or `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            last = (err.splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise RuntimeError(f"RTSP server exited ({last}); it needs: {needs}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"RTSP server did not listen on {port} within {timeout} s")


def start_server(args: list[str], port: int, timeout: float, needs: str,
                 stderr: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start a server process and return it once it listens on `port`; RuntimeError (saying what to
    install: `needs`) when it cannot start, exits or never listens (then it is stopped)."""
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr)
    except OSError as exc:
        raise RuntimeError(f"cannot start the RTSP server with {args[0]} ({exc}); install: {needs}") from None
    try:
        wait_listening(proc, port, timeout, needs)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill a server started by start_server and close its pipes (None: nothing to do)."""
    if proc is None:
        return
    proc.kill()
    proc.wait(10)
    for fh in (proc.stdout, proc.stderr):
        if fh is not None:
            fh.close()


class RtspStreams:
    """N RTSP mounts on one loopback server, each serving `clip` from its start for every client."""

    def __init__(self, clip: Path, codec: str, count: int, port: int | None = None) -> None:
        if codec not in ("h264", "hevc"):
            raise ValueError(f"codec must be h264 or hevc, got {codec!r}")
        self.clip, self.codec, self.count = Path(clip), codec, count
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [f"rtsp://127.0.0.1:{self.port}/s{i}" for i in range(self.count)]

    def start(self, timeout: float = 15.0) -> RtspStreams:
        args = [SYSTEM_PYTHON, str(Path(__file__).resolve()), str(self.port), self.codec, str(self.clip.resolve()),
                str(self.count)]
        self._proc = start_server(args, self.port, timeout, APT_LINE)
        return self

    def stop(self) -> None:
        p, self._proc = self._proc, None
        stop_server(p)

    def __enter__(self) -> RtspStreams:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(port: int, codec: str, clip: str, count: int) -> None:  # runs under the system python3
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    parse, pay = ("h264parse", "rtph264pay") if codec == "h264" else ("h265parse", "rtph265pay")
    missing = [e for e in ("filesrc", "qtdemux", parse, pay) if Gst.ElementFactory.find(e) is None]
    if missing:
        raise SystemExit(f"GStreamer elements missing: {', '.join(missing)}")
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    mounts = server.get_mount_points()
    for i in range(count):
        factory = GstRtspServer.RTSPMediaFactory()
        # config-interval=-1: parameter sets with every key frame, so a client joining late decodes
        factory.set_launch(f'( filesrc location="{clip}" ! qtdemux ! {parse} ! {pay} config-interval=-1 '
                           f'name=pay0 pt=96 )')
        factory.set_shared(False)
        mounts.add_factory(f"/s{i}", factory)
    server.attach(None)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
