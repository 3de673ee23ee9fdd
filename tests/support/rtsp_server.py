"""A real RTSP camera on loopback, for tests: a GStreamer RTSP server run by the system python3.

The server itself (`python3 rtsp_server.py PORT`) needs Debian's gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-{base,good,ugly} (x264enc) and python3-gi, which live in the system Python,
not in the project's virtual environment; `RtspServer` starts it with /usr/bin/python3 as a
subprocess serving rtsp://127.0.0.1:PORT/test, and `stop()` kills it (a camera losing power).
`start()` again reuses the same port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if __name__ != "__main__":  # the server process runs under the system python3, which has no `agent`
    from agent.streams_rtsp import free_port, start_server, stop_server

SYSTEM_PYTHON = "/usr/bin/python3"
APT_LINE = (
    "apt-get install -y gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly python3-gi"
)
_PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
    "missing = [e for e in ('videotestsrc', 'x264enc', 'rtph264pay') if Gst.ElementFactory.find(e) is None]; "
    "print(','.join(missing))"
)


def unavailable_reason() -> str | None:
    """None when the system python3 can run the server, else why not (with the apt line to fix it)."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON} to run the GStreamer RTSP server; install: {APT_LINE}"
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot probe GStreamer RTSP server packages ({e}); install: {APT_LINE}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"system GStreamer RTSP server missing ({last}); install: {APT_LINE}"
    if r.stdout.strip():
        return f"GStreamer elements missing: {r.stdout.strip()}; install: {APT_LINE}"
    return None


class RtspServer:
    def __init__(self, port: int | None = None, width: int = 160, height: int = 120, fps: int = 15) -> None:
        self.port = port or free_port()
        self.width, self.height, self.fps = width, height, fps
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/test"

    def start(self, timeout: float = 15.0) -> RtspServer:
        args = [SYSTEM_PYTHON, str(Path(__file__).resolve()), str(self.port), str(self.width), str(self.height),
                str(self.fps)]
        self._proc = start_server(args, self.port, timeout, APT_LINE, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        p, self._proc = self._proc, None
        stop_server(p)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(port: int, width: int, height: int, fps: int) -> None:  # runs under /usr/bin/python3
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/test", factory)
    server.attach(None)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    _serve(*(int(a) for a in sys.argv[1:5]))
