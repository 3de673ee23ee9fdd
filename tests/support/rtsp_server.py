"""A real RTSP camera on loopback, for tests: GStreamer's RTSP server with a live x264 encoder.

`RtspServer` serves rtsp://127.0.0.1:PORT/test: `videotestsrc is-live` encoded by `x264enc`, one
pipeline shared by every client, as a camera has. It is agent.streams_rtsp's server (libgstrtspserver
through ctypes, run as a subprocess of this Python), so it needs Debian's GStreamer libraries and
plugins (base, good, ugly for x264enc) but no PyGObject. `stop()` kills it (a camera losing power);
`start()` again reuses the same port.
"""

from __future__ import annotations

import subprocess

from agent.streams_rtsp import free_port, gstreamer_env, missing_elements, server_command, start_server, stop_server

__all__ = ["APT_LINE", "RtspServer", "free_port", "unavailable_reason"]

APT_LINE = (
    "apt-get install -y libgstrtspserver-1.0-0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-ugly"
)
ELEMENTS = ["videotestsrc", "x264enc", "rtph264pay"]


def unavailable_reason() -> str | None:
    """None when the server can run here, else why not (with the apt line to fix it)."""
    try:
        missing = missing_elements(ELEMENTS)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"GStreamer RTSP server cannot load ({e}); install: {APT_LINE}"
    if missing:
        return f"GStreamer elements missing: {', '.join(missing)}; install: {APT_LINE}"
    return None


class RtspServer:
    def __init__(self, port: int | None = None, width: int = 160, height: int = 120, fps: int = 15,
                 protocols: str | None = None) -> None:
        self.port = port or free_port()
        self.width, self.height, self.fps = width, height, fps
        self.protocols = protocols  # "tcp" / "udp": the only RTP transport offered; None: both
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/test"

    def start(self, timeout: float = 15.0) -> RtspServer:
        launch = (f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={self.width},height={self.height},"
                  f"framerate={self.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={self.fps} "
                  "! rtph264pay name=pay0 pt=96 )")
        command = server_command(self.port, {"/test": launch}, True, ELEMENTS, self.protocols)
        self._proc = start_server(command, self.port, timeout, APT_LINE, stderr=subprocess.DEVNULL, env=gstreamer_env())
        return self

    def stop(self) -> None:
        p, self._proc = self._proc, None
        stop_server(p)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
