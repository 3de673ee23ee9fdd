"""Commissioning view: a camera's picture with detections, track ids, zones, lines and counts drawn.

Two ways in, one drawing (`draw_overlay`):
- `edge-agent snapshot -c FILE [--camera ID] -o out.jpg`: opens the configured camera itself, reads
  a few frames (so the tracker can give ids), runs the model the service serves on them (the one an
  update installed, else the configured one: `snapshot_model`; ONNX Runtime on the CPU, no engine
  cache), draws the last frame with the counters saved by the running service, writes the picture
  and says which model it used. While the service holds a V4L2 / CSI camera that cannot be opened
  twice, use the HTTP endpoint instead.
- `commissioning.http_port`: the running service serves, on loopback only, `/snapshot.jpg?camera=ID`
  (the newest frame given to the detector, with the latest detections and counters) and
  `/counters` (JSON, every counting camera). Stdlib http.server in one daemon thread; off by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from agent.config import AgentConfig, CameraConfig, CountingConfig, ModelConfig
from agent.errors import AgentError, ConfigError, SourceError
from agent.plc.counting import UINT32, CounterStore, Tracked, ZoneCounter, anchor_of
from agent.vision.types import Detection, Result

if TYPE_CHECKING:
    from agent.models.layout import ModelVersion

log = logging.getLogger(__name__)

_ZONE = (0, 200, 255)  # BGR: amber
_LINE = (255, 0, 255)  # magenta
_BOX = (0, 220, 0)
_TEXT = (255, 255, 255)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # the agent itself needs OpenCV; say which one to install
        raise AgentError(f"the snapshot needs OpenCV (JetPack's python3-opencv, or opencv-python-headless): {exc}") \
            from None
    return cv2


def _label(cv2: Any, img: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int]) -> None:
    scale = max(0.4, img.shape[0] / 900)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = min(max(0, org[0]), max(0, img.shape[1] - w - 2))
    y = min(max(h + 2, org[1]), img.shape[0] - base - 1)
    cv2.rectangle(img, (x, y - h - 2), (x + w + 2, y + base), color, -1)
    cv2.putText(img, text, (x + 1, y - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def draw_overlay(image: np.ndarray, counting: CountingConfig | None, detections: Sequence[Detection],
                 track_ids: Sequence[int | None] | None = None, counters: dict[str, int] | None = None) -> np.ndarray:
    """A copy of `image` (BGR) with zones, lines (arrow towards `in`), boxes, track ids and counts."""
    cv2 = _cv2()
    img = np.ascontiguousarray(image.copy())
    counters = counters or {}
    anchor = counting.anchor if counting is not None else "bottom_center"
    if counting is not None:
        for z in counting.zones:
            pts = np.asarray([[round(x), round(y)] for x, y in z.polygon], np.int32)
            overlay = img.copy()
            cv2.fillPoly(overlay, [pts], _ZONE)
            cv2.addWeighted(overlay, 0.2, img, 0.8, 0, dst=img)
            cv2.polylines(img, [pts], True, _ZONE, 2, cv2.LINE_AA)
            n = counters.get(f"zone/{z.name}/count")
            _label(cv2, img, f"{z.name}" + (f": {n}" if n is not None else ""), (int(pts[0][0]), int(pts[0][1])),
                   _ZONE)
        for li in counting.lines:
            (x1, y1), (x2, y2) = li.points
            cv2.line(img, (round(x1), round(y1)), (round(x2), round(y2)), _LINE, 2, cv2.LINE_AA)
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            dx, dy = {"left_to_right": (1, 0), "right_to_left": (-1, 0), "top_to_bottom": (0, 1),
                      "bottom_to_top": (0, -1)}[li.direction]
            size = max(20, img.shape[0] // 15)
            cv2.arrowedLine(img, (round(mx - dx * size), round(my - dy * size)),
                            (round(mx + dx * size), round(my + dy * size)), _LINE, 2, cv2.LINE_AA, tipLength=0.4)
            n_in, n_out = counters.get(f"line/{li.name}/in"), counters.get(f"line/{li.name}/out")
            text = li.name + (f" in {n_in} out {n_out}" if n_in is not None else "")
            _label(cv2, img, text, (round(x1) + 4, round(y1) + 4), _LINE)
    ids = list(track_ids) if track_ids is not None else [d.track_id for d in detections]
    for det, tid in zip(detections, ids, strict=False):
        x1, y1, x2, y2 = (round(v) for v in det.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), _BOX, 2)
        ax, ay = anchor_of(det.box, anchor)
        cv2.circle(img, (round(ax), round(ay)), 3, _LINE, -1)
        tag = f"#{tid} " if tid is not None else ""
        _label(cv2, img, f"{tag}{det.label} {det.score:.2f}", (x1, y1 - 2), _BOX)
    return img


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    cv2 = _cv2()
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise AgentError("OpenCV could not encode the picture as JPEG")
    return bytes(buf)


# ---- the CLI snapshot ---------------------------------------------------------------------------


def pick_camera(cfg: AgentConfig, camera_id: str | None) -> CameraConfig:
    if camera_id is None:
        return cfg.cameras[0]
    for cam in cfg.cameras:
        if cam.id == camera_id:
            return cam
    raise ConfigError([f"--camera: no camera {camera_id!r} in the config (cameras: "
                       f"{', '.join(c.id for c in cfg.cameras)})"])


def saved_counters(cfg: AgentConfig, cam: CameraConfig) -> dict[str, int]:
    """The line counters the service saved for this camera (zones have no saved state: live only)."""
    if cam.counting is None:
        return {}
    from agent.plc.counting_service import default_state_file

    state, _ = CounterStore(cam.counting.state_file or default_state_file(cfg, cam.id)).load()
    out: dict[str, int] = {}
    for li in cam.counting.lines:
        data = (state or {}).get("lines", {}).get(li.name, {})
        out[f"line/{li.name}/in"] = sum(data.get("in", {}).values()) % UINT32
        out[f"line/{li.name}/out"] = sum(data.get("out", {}).values()) % UINT32
    return out


@dataclass(frozen=True)
class SnapshotModel:
    """The model a snapshot runs, and where it came from."""

    path: Path
    name: str
    version: str
    model_cfg: ModelConfig
    source: str  # "installed" (by a fleet update, from the model store) or "configured" (model.path)
    note: str = ""  # why this one, where it is not plain

    def describe(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"model {self.name} {self.version} ({self.source}{note}): {self.path}"


def snapshot_model(cfg: AgentConfig) -> SnapshotModel:
    """The model the service serves, resolved as it does at start (agent.service.resolve_model): the
    store's active version when updates are on and one is installed, else the configured model."""
    from agent.service import resolve_model

    active, note = (None, "updates off") if not cfg.updates.enabled else _installed_version(cfg)
    path, name, version, mcfg = resolve_model(cfg, active)
    return SnapshotModel(path, name, version, mcfg, "configured" if active is None else "installed", note)


def _installed_version(cfg: AgentConfig) -> tuple[ModelVersion | None, str]:
    """The version the service's start would pick (ModelStore.recover), chosen READ ONLY: recover()
    empties `staging/` (a running service's download in progress) and rolls back a model on trial,
    neither of which a snapshot may do to the service beside it."""
    from agent.models.layout import STATE_FILE
    from agent.models.store import ModelStore

    root = cfg.updates.models_dir
    try:
        with open(root / STATE_FILE, "rb"):
            pass
        store = ModelStore(root, cfg.updates.keep_versions)  # the service made its folders: nothing created
    except FileNotFoundError:
        return None, f"no model installed in {root}"
    except PermissionError as exc:  # most likely not the service's user: guessing would risk the wrong model
        raise AgentError(f"cannot read the model store {root} ({exc.strerror}): the service may serve a model "
                         "installed there; run the snapshot as the service's user (sudo -u edge-agent ...)") from None
    except OSError as exc:  # the service cannot use it either, and serves the configured model
        return None, f"model store {root} unusable ({exc.strerror or exc})"
    active = store.active()
    if active is not None and store.is_complete(active):
        return active, "on trial" if store.on_trial() == active.key else ""
    previous = store.previous()
    if previous is not None and store.is_complete(previous):
        return previous, "the active version is missing or damaged: its previous one, as the service's start picks"
    return None, f"no complete model installed in {root}"


def take_snapshot(cfg: AgentConfig, camera_id: str | None = None, frames: int = 5,
                  model: SnapshotModel | None = None) -> tuple[np.ndarray, Result]:
    """Read `frames` frames of the camera, detect (and track) on each; the last frame drawn, and its result.
    `model`: what to run (default: `snapshot_model(cfg)`, the model the service serves)."""
    from agent.capture.sources import open_source
    from agent.engines.factory import create_engine
    from agent.pipeline import build_runtime

    cam = pick_camera(cfg, camera_id)
    model = model or snapshot_model(cfg)
    engine = create_engine(model.path, cfg.engine.model_copy(update={"cuda_graph": False}), None)
    try:
        rt = build_runtime(engine, model.model_cfg, model.path, name=model.name, version=model.version,
                           preprocess="cpu")
    except AgentError:
        engine.close()
        raise
    src = open_source(cam)
    try:
        src.open()
        tracker = None
        counting = cam.counting if cam.counting is not None and cam.counting.enabled else None
        if counting is not None:
            from agent.plc.tracking import Tracker

            tracker = Tracker(counting.tracker)
        image: np.ndarray | None = None
        dets: list[Detection] = []
        ids: list[int | None] = []
        for _ in range(frames):
            img = src.read()
            if img is None:
                break
            image = img
            tensor, lb = rt.letterbox(img)
            dets = rt.post(rt.engine.infer(tensor), lb)
            ids = tracker.update(dets) if tracker is not None else [None] * len(dets)
        if image is None:
            raise SourceError(f"camera {cam.id}: the source gave no frame")
    finally:
        src.close()
        rt.close()
    for det, tid in zip(dets, ids, strict=True):
        det.track_id = tid
    result = Result(frame_seq=0, ts=0.0, mono=0.0, frame_w=image.shape[1], frame_h=image.shape[0], detections=dets,
                    model_name=rt.name, model_version=rt.version)
    counters = saved_counters(cfg, cam)
    if counting is not None:  # zones count what this frame shows
        tracked = [Tracked(t, d.label, anchor_of(d.box, counting.anchor)) for d, t in zip(dets, ids, strict=True)
                   if t is not None]
        for z in counting.zones:
            zone = ZoneCounter(z)
            zone.update(tracked)
            counters[f"zone/{z.name}/count"] = zone.total
    return draw_overlay(image, counting, dets, ids, counters), result


def _frames_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of frames, got {text!r}") from None
    if not 1 <= n <= 300:
        raise argparse.ArgumentTypeError(f"frames must be 1..300, got {n}")
    return n


def cmd_snapshot(args: argparse.Namespace) -> int:
    from agent.config import load_config

    out = Path(args.output)
    if out.suffix.lower() not in (".jpg", ".jpeg"):
        raise ConfigError([f"-o: {out} must end in .jpg or .jpeg"])
    if not out.parent.is_dir():
        raise ConfigError([f"-o: folder {out.parent} does not exist"])
    cfg = load_config(args.config)
    model = snapshot_model(cfg)
    print(model.describe())  # first: a commissioning record must say which model judged the picture
    image, result = take_snapshot(cfg, args.camera, args.frames, model)
    data = encode_jpeg(image)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise AgentError(f"cannot write {out}: {exc.strerror or exc}") from None
    tracked = sum(1 for d in result.detections if d.track_id is not None)
    labels = ", ".join(f"{label} {n}" for label, n in sorted(Counter(d.label for d in result.detections).items()))
    print(f"{out}: {result.frame_w}x{result.frame_h}, {len(result.detections)} detection(s)"
          f"{f' ({labels})' if labels else ''}, {tracked} tracked")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="write a camera's picture with detections, zones, lines and counts")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--camera", default=None, help="camera id (default: the first camera)")
    p.add_argument("-o", "--output", required=True, help="JPEG file to write")
    p.add_argument("--frames", type=_frames_arg, default=5,
                   help="frames read before the picture is taken (the tracker needs a few for ids)")
    p.set_defaults(func=cmd_snapshot)


# ---- the HTTP endpoint in the service --------------------------------------------------------------


class CommissioningServer:
    """A PlcComponent: `/snapshot.jpg?camera=ID` and `/counters` on a loopback port, in one thread."""

    name = "commissioning"

    def __init__(self, host: Any, components: Sequence[Any]) -> None:
        self._host = host
        self._counting = {c.camera_id: c for c in components if getattr(c, "name", "").startswith("counting/")}
        self._latest: dict[str, Result] = {}
        self.requests = 0
        self.errors = 0
        for cam in host.cfg.cameras:
            if cam.id not in self._counting:
                host.add_result_listener(cam.id, self._keeper(cam.id))
        cfg = host.cfg.commissioning
        handler = _make_handler(self)
        try:
            self._server: ThreadingHTTPServer | None = _Server((cfg.host, cfg.http_port), handler)
        except OSError as exc:  # a port in use must not stop the detections: say so and go on without it
            log.error("commissioning endpoint: cannot listen on %s:%s: %s", cfg.host, cfg.http_port, exc)
            host.emit("commissioning_http_failed", {"port": cfg.http_port, "error": str(exc)[:200]})
            self._server = None
            return
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="commissioning-http", daemon=True)
        self._thread.start()
        log.info("commissioning endpoint on http://%s:%d/ (snapshot.jpg, counters)", cfg.host, self.port)

    def _keeper(self, camera_id: str) -> Callable[[Result], None]:
        def keep(result: Result) -> None:
            self._latest[camera_id] = result
        return keep

    def counters_json(self) -> dict[str, Any]:
        return {cam: {"counters": c.counters(), "per_label": c.per_label()} for cam, c in self._counting.items()}

    def picture(self, camera_id: str) -> bytes:
        """KeyError: no such camera; LookupError: no frame yet."""
        cam = pick_camera(self._host.cfg, camera_id)
        image = self._host.latest_image(cam.id)
        if image is None:
            raise LookupError(f"camera {cam.id} has given no frame yet")
        comp = self._counting.get(cam.id)
        if comp is not None:
            result, ids, counters = comp.last_result, comp.last_ids, comp.counters()
        else:
            result, ids, counters = self._latest.get(cam.id), None, {}
        dets = result.detections if result is not None else []
        return encode_jpeg(draw_overlay(image, cam.counting, dets, ids, counters))

    def stats(self) -> dict[str, Any]:
        return {"port": getattr(self, "port", None), "requests": self.requests, "errors": self.errors}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(2)
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int | None], handler: Any) -> None:
        import socket

        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__((addr[0], int(addr[1] or 0)), handler)


def _make_handler(server: CommissioningServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: debug log only
            log.debug("commissioning: " + format, *args)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, text: str) -> None:
            server.errors += 1
            self._send(code, json.dumps({"error": text}).encode(), "application/json")

        def do_GET(self) -> None:
            server.requests += 1
            url = urlparse(self.path)
            try:
                if url.path == "/counters":
                    self._send(200, json.dumps(server.counters_json()).encode(), "application/json")
                elif url.path == "/snapshot.jpg":
                    cams = parse_qs(url.query).get("camera")
                    self._send(200, server.picture(cams[0] if cams else server._host.cfg.cameras[0].id), "image/jpeg")
                else:
                    self._error(404, "not found: try /snapshot.jpg?camera=ID or /counters")
            except ConfigError as exc:
                self._error(404, "; ".join(exc.errors))
            except LookupError as exc:
                self._error(503, str(exc).strip("'\""))
            except Exception as exc:  # never a traceback to the client, never the service down
                log.exception("commissioning request %s failed", self.path)
                self._error(500, f"{type(exc).__name__}: {str(exc)[:200]}")

    return Handler


__all__ = ["CommissioningServer", "SnapshotModel", "add_parser", "draw_overlay", "encode_jpeg", "snapshot_model",
           "take_snapshot"]
