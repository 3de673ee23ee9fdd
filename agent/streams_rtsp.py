"""Live RTSP test streams on loopback: video files served by Debian's GStreamer RTSP server.

Data flow: an H.264 / HEVC MP4 made by `agent.streams_bench.make_clip` -> `filesrc ! qtdemux !
h264parse|h265parse ! rtph264pay|rtph265pay` in a GStreamer RTSP server (one mount per stream,
/s0, /s1, ...; every client gets its own pipeline, paced by the server's clock) -> OpenCV's
FFmpeg backend (or NVDEC) reading rtsp://127.0.0.1:PORT/sN over TCP like any camera.

The server calls libgstrtspserver through ctypes (about a dozen C functions), so it runs under
any Python, the agent's venv included, with only GStreamer's shared libraries and plugins present
(Debian packages; on a machine without them, such as the lent GPU machine, a folder of them:
EDGE_AGENT_GSTREAMER_DIR with lib/ and plugins/, used by the server process only), no PyGObject.
`RtspStreams` starts this file as a subprocess (the mounts and their launch lines as JSON:
`server_command`) and kills it on `stop()`; the tests' live camera (tests/support/rtsp_server.py)
runs the same server with an x264 encoder. Nothing here is imported by the service.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

APT_LINE = ("apt-get install -y libgstrtspserver-1.0-0 gstreamer1.0-plugins-base "
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
                 stderr: int = subprocess.PIPE, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server process and return it once it listens on `port`; RuntimeError (saying what to
    install: `needs`) when it cannot start, exits or never listens (then it is stopped)."""
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, env=env)
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


def gstreamer_env() -> dict[str, str] | None:
    """The server's environment: with EDGE_AGENT_GSTREAMER_DIR set, its lib/ and plugins/ only
    (the registry cached beside them, plugins scanned in-process); None: this process's own."""
    root = os.environ.get("EDGE_AGENT_GSTREAMER_DIR")
    if not root:
        return None
    env = dict(os.environ)
    lib = str(Path(root, "lib"))
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env.update(GST_PLUGIN_SYSTEM_PATH=str(Path(root, "plugins")), GST_PLUGIN_PATH="", GST_REGISTRY_FORK="no",
               GST_REGISTRY=str(Path(root, "registry.bin")))
    return env


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
        parse, pay = ("h264parse", "rtph264pay") if self.codec == "h264" else ("h265parse", "rtph265pay")
        # config-interval=-1: parameter sets before every key frame, so a client joining late decodes.
        # On the parser, which inserts them per access unit: the payloader put them before each IDR
        # slice, which split a key frame of several slices into two broken pictures for FFmpeg.
        launch = (f'( filesrc location="{self.clip.resolve()}" ! qtdemux ! {parse} config-interval=-1 ! {pay} '
                  'name=pay0 pt=96 )')
        mounts = {f"/s{i}": launch for i in range(self.count)}  # every client its own pipeline: from the start
        self._proc = start_server(server_command(self.port, mounts, False, ["filesrc", "qtdemux", parse, pay]),
                                  self.port, timeout, APT_LINE, env=gstreamer_env())
        return self

    def stop(self) -> None:
        p, self._proc = self._proc, None
        stop_server(p)

    def __enter__(self) -> RtspStreams:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _gst_libs() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    """GStreamer core, its RTSP server, GObject and GLib, with the signatures `_serve` calls."""
    try:
        gst = ctypes.CDLL("libgstreamer-1.0.so.0")
        rtsp = ctypes.CDLL("libgstrtspserver-1.0.so.0")
        gobject = ctypes.CDLL("libgobject-2.0.so.0")
        glib = ctypes.CDLL("libglib-2.0.so.0")
    except OSError as exc:
        raise SystemExit(f"GStreamer RTSP server library missing ({exc})") from None
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    sigs: list[tuple[ctypes.CDLL, str, Any, list[Any]]] = [
        (gst, "gst_init", None, [vp, vp]),
        (gst, "gst_element_factory_find", vp, [cp]),
        (gst, "gst_object_unref", None, [vp]),
        (rtsp, "gst_rtsp_server_new", vp, []),
        (rtsp, "gst_rtsp_server_set_address", None, [vp, cp]),
        (rtsp, "gst_rtsp_server_set_service", None, [vp, cp]),
        (rtsp, "gst_rtsp_server_get_mount_points", vp, [vp]),
        (rtsp, "gst_rtsp_media_factory_new", vp, []),
        (rtsp, "gst_rtsp_media_factory_set_launch", None, [vp, cp]),
        (rtsp, "gst_rtsp_media_factory_set_shared", None, [vp, ctypes.c_int]),
        (rtsp, "gst_rtsp_media_factory_set_protocols", None, [vp, ctypes.c_int]),
        (rtsp, "gst_rtsp_mount_points_add_factory", None, [vp, cp, vp]),
        (rtsp, "gst_rtsp_server_attach", ctypes.c_uint, [vp, vp]),
        (gobject, "g_object_unref", None, [vp]),
        (glib, "g_main_loop_new", vp, [vp, ctypes.c_int]),
        (glib, "g_main_loop_run", None, [vp]),
    ]
    for lib, name, res, args in sigs:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return gst, rtsp, gobject, glib


# GstRTSPLowerTrans flags: the RTP transports a mount offers its clients
_LOWER_TRANS = {"udp": 1, "tcp": 4}


def server_command(port: int, mounts: dict[str, str], shared: bool, elements: list[str],
                   protocols: str | None = None) -> list[str]:
    """The command that serves each mount's launch line on 127.0.0.1:`port` (`shared`: one pipeline
    for all clients, as a live camera; else one per client), once `elements` are all there.
    `protocols` ("tcp" or "udp"): the only RTP transport offered; None: the server's default (both)."""
    if protocols is not None and protocols not in _LOWER_TRANS:
        raise ValueError(f"protocols must be tcp or udp, got {protocols!r}")
    spec = {"mounts": mounts, "shared": shared, "elements": elements, "protocols": protocols}
    return [sys.executable, str(Path(__file__).resolve()), str(port), json.dumps(spec)]


def missing_elements(elements: list[str]) -> list[str]:
    """Which GStreamer elements are not installed, asked in a process of the server's environment;
    RuntimeError when GStreamer itself cannot load."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--missing", *elements], check=False,
                       capture_output=True, text=True, timeout=60, env=gstreamer_env())
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1])
    return r.stdout.split()


def _missing(gst: ctypes.CDLL, elements: list[str]) -> list[str]:
    missing = []
    for element in elements:
        factory = gst.gst_element_factory_find(element.encode())
        if factory:
            gst.gst_object_unref(factory)
        else:
            missing.append(element)
    return missing


def _serve(port: int, mounts: dict[str, str], shared: bool, elements: list[str], protocols: str | None) -> None:
    gst, rtsp, gobject, glib = _gst_libs()
    gst.gst_init(None, None)
    missing = _missing(gst, elements)
    if missing:
        raise SystemExit(f"GStreamer elements missing: {', '.join(missing)}")
    server = rtsp.gst_rtsp_server_new()
    rtsp.gst_rtsp_server_set_address(server, b"127.0.0.1")
    rtsp.gst_rtsp_server_set_service(server, str(port).encode())
    points = rtsp.gst_rtsp_server_get_mount_points(server)
    for path, launch in mounts.items():
        factory = rtsp.gst_rtsp_media_factory_new()
        rtsp.gst_rtsp_media_factory_set_launch(factory, launch.encode())
        rtsp.gst_rtsp_media_factory_set_shared(factory, int(shared))
        if protocols is not None:
            rtsp.gst_rtsp_media_factory_set_protocols(factory, _LOWER_TRANS[protocols])
        rtsp.gst_rtsp_mount_points_add_factory(points, path.encode(), factory)  # takes the factory
    gobject.g_object_unref(points)
    if rtsp.gst_rtsp_server_attach(server, None) == 0:
        raise SystemExit(f"GStreamer RTSP server cannot listen on 127.0.0.1:{port}")
    print("READY", flush=True)
    glib.g_main_loop_run(glib.g_main_loop_new(None, 0))


if __name__ == "__main__":
    if sys.argv[1] == "--missing":  # missing_elements(): print the ones not installed
        gst_lib = _gst_libs()[0]
        gst_lib.gst_init(None, None)
        print(" ".join(_missing(gst_lib, sys.argv[2:])))
    else:
        spec = json.loads(sys.argv[2])
        _serve(int(sys.argv[1]), dict(spec["mounts"]), bool(spec["shared"]), list(spec["elements"]),
               spec.get("protocols"))
