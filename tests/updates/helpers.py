"""Shared helpers of the update tests: keys, manifests, a Range-capable HTTP server, tmpfs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.updates.manifest import sign_manifest

NOW = 1_800_000_000  # a fixed "now" (2027-01-15) for time checks


def make_manifest(data: bytes = b"x" * 1000, *, name: str = "widgets", version: str = "2",
                  devices: list[str] | None = None, groups: list[str] | None = None, now: int = NOW,
                  ttl: int = 3600, rollback: bool = False, mqtt_chunk: int | None = None,
                  url: str = "https://models.example/widgets.onnx", manifest_id: str = "m-0001-abcdef",
                  labels: list[str] | None = None, decoder: str = "yolov8", size: int = 64) -> dict[str, Any]:
    source: dict[str, Any] = {"url": url}
    if mqtt_chunk:
        source = {"mqtt": {"transfer_id": hashlib.sha256(data).hexdigest()[:32], "chunk_size": mqtt_chunk,
                           "chunks": math.ceil(len(data) / mqtt_chunk)}}
    return {
        "schema": 1,
        "id": manifest_id,
        "model": {"name": name, "version": version, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                  "input": {"width": size, "height": size}, "labels": labels or ["c0", "c1"], "decoder": decoder},
        "source": source,
        "targets": {"devices": devices if devices is not None else ["dev1"], "groups": groups or []},
        "issued_at": now,
        "expires_at": now + ttl,
        "rollback": rollback,
    }


def signed_bytes(m: dict[str, Any], key: Ed25519PrivateKey, key_id: str = "k1") -> bytes:
    return json.dumps(sign_manifest(m, key, key_id)).encode()


class RangeServer:
    """http.server on loopback serving `data` at /model.onnx, with Range support and fault modes.

    modes: ignore_range (always 200), drop_after (close the connection after N body bytes),
    stall_s (sleep before sending the body), extra (append N bytes beyond `data`),
    lie_length (announce this Content-Length), status (answer with this code).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ignore_range = False
        self.drop_after: int | None = None
        self.stall_s = 0.0
        self.extra = 0
        self.status: int | None = None
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(dict(self.headers))
                if server.status:
                    self.send_error(server.status)
                    return
                body = server.data + b"\0" * server.extra
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.stall_s:
                    time.sleep(server.stall_s)
                if server.drop_after is not None:
                    part = part[: server.drop_after]
                    with contextlib.suppress(OSError):
                        self.wfile.write(part)
                        self.wfile.flush()
                    self.close_connection = True
                    return
                with contextlib.suppress(OSError):
                    self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.onnx"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path | None]:
    """A tiny tmpfs at `path`, or None when mounting is not permitted here."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
