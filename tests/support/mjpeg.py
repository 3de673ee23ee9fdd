"""A real MJPEG-over-HTTP camera on loopback for tests.

`MjpegServer(fps=..)` serves `multipart/x-mixed-replace` JPEG frames (made with cv2.imencode, a
frame counter drawn on each) on every GET. `start()` binds (the first time to a free port, then to
the same port again), `stop()` closes the listening socket AND every open stream, as a camera that
loses power would, so a test can stop it and start it again on the same URL.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = "edgeagentframe"


def make_jpeg(i: int, width: int, height: int) -> bytes:
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :] = (i * 7 % 256, 80, 160)
    cv2.putText(img, str(i), (4, height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: MjpegServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.startswith("/notfound"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        owner._streams.add(self.connection)
        period = 1.0 / owner.fps
        t0 = time.monotonic()
        n = 0
        try:
            while not owner._stopping.is_set():
                jpg = make_jpeg(owner._counter, owner.width, owner.height)
                owner._counter += 1
                part = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n").encode()
                self.wfile.write(part + jpg + b"\r\n")
                self.wfile.flush()
                n += 1
                delay = t0 + n * period - time.monotonic()
                if delay > 0:
                    owner._stopping.wait(delay)
        except OSError:
            pass
        finally:
            owner._streams.discard(self.connection)


class MjpegServer:
    def __init__(self, fps: float = 20.0, width: int = 160, height: int = 120, port: int = 0) -> None:
        self.fps = fps
        self.width = width
        self.height = height
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._streams: set[socket.socket] = set()
        self._counter = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> MjpegServer:
        self._stopping.clear()
        srv = _Server(("127.0.0.1", self.port), _Handler)
        srv.owner = self
        self.port = srv.server_address[1]
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for conn in list(self._streams):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
