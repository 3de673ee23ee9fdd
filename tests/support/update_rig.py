"""A real agent on the bundled demo model and video, with updates on, for the reliability scenarios.

What the update, disk and clock scenarios share: one signing key, an agent process that can be
started (optionally under an LD_PRELOAD such as libfaketime), SIGKILLed and restarted on the same
store and cache, a collector on its topics, and the operators' push path (`agent.fleet.push`:
build_manifest -> sign_manifest -> push_model, what `edge-agent fleet push-model` runs) in a thread.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fleet.push import PushResult, build_manifest, connect, model_info, push_model
from agent.updates.manifest import generate_keypair, load_private_key, sign_manifest
from agent.updates.state import attempt_records
from tests.support.agent_proc import ROOT, AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.mqtt import Collector, Msg

DEMO = ROOT / "agent" / "data" / "demo"
DEMO_MODEL = DEMO / "model.onnx"
DEMO_V2 = DEMO / "model_v2.onnx"
DEMO_VIDEO = DEMO / "sample.mp4"
FINAL = ("active", "failed", "rolled_back")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Signer:
    key: Any  # Ed25519PrivateKey trusted by the agent under `key_id`
    key_id: str
    public_b64: str


def make_signer(directory: Path, key_id: str = "ops") -> Signer:
    kp = generate_keypair(directory, key_id)
    return Signer(load_private_key(kp.private_path), key_id, kp.public_b64)


def payloads(msgs: Iterable[Msg], suffix: str) -> list[dict[str, Any]]:
    out = []
    for m in msgs:
        if m.topic.endswith(suffix) and m.payload:
            try:
                out.append(json.loads(m.payload))
            except ValueError:
                pass
    return out


def update_records(states: Iterable[dict[str, Any]], version: str | None = None,
                   before: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The attempt and refusal records carried by model/state payloads, in order, each once (every
    payload repeats the records that did not change); records already carried by `before` (payloads
    published earlier) are not new, and left out."""
    out: list[dict[str, Any]] = []
    seen = {json.dumps(rec, sort_keys=True, default=str) for p in before for rec in attempt_records(p)}
    for p in states:
        for rec in attempt_records(p):
            key = json.dumps(rec, sort_keys=True, default=str)
            if key not in seen and (version is None or rec.get("version") == version):
                seen.add(key)
                out.append(rec)
    return out


def timed(msgs: Iterable[Msg], suffix: str) -> list[tuple[float, dict[str, Any]]]:
    return [(m.at, json.loads(m.payload)) for m in msgs if m.topic.endswith(suffix) and m.payload]


def signed_manifest(signer: Signer, model: Path, version: str, *, name: str = "demo",
                    devices: Iterable[str] = ("dev1",), chunk_size: int = 256 * 1024, now: float | None = None,
                    expires_in: int = 3600) -> dict[str, Any]:
    """What `edge-agent fleet push-model MODEL --version V --device D` signs."""
    unsigned = build_manifest(model_info(model), name=name, version=version, devices=devices,
                              chunk_size=chunk_size, now=now, expires_in=expires_in)
    return sign_manifest(unsigned, signer.key, signer.key_id)


@dataclass
class Push:
    """One push running in a thread (the operator does not wait for a device that was just killed)."""

    manifest: dict[str, Any]
    started: float = 0.0  # time.monotonic() at start
    result: PushResult | None = None
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def version(self) -> str:
        return str(self.manifest["model"]["version"])

    def join(self, timeout: float = 60.0) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


def start_push(broker: Broker, manifest: dict[str, Any], model: Path, ready_timeout: float = 10.0) -> Push:
    p = Push(manifest)

    def run() -> None:
        try:
            client = connect(broker.host, broker.port)
        except Exception as exc:  # reported in the cycle's figures, never swallowed silently
            p.error = f"{type(exc).__name__}: {exc}"
            return
        try:
            p.result = push_model(client, manifest, model, ready_timeout=ready_timeout)
        except Exception as exc:
            p.error = f"{type(exc).__name__}: {exc}"
        finally:
            client.disconnect()
            client.loop_stop()

    p.started = time.monotonic()
    p.thread = threading.Thread(target=run, name=f"push-{p.version}", daemon=True)
    p.thread.start()
    return p


class DemoAgent:
    """One agent process (restartable, killable) on the demo model and video, plus a topic collector."""

    def __init__(self, work: Path, broker: Broker, signer: Signer, *, device_id: str = "dev1",
                 models_dir: Path | None = None, cache_dir: Path | None = None, health_window_s: float = 2.0,
                 download_timeout_s: float = 5.0, env: dict[str, str] | None = None,
                 updates: dict[str, Any] | None = None) -> None:
        self.work = work
        self.dev = device_id
        work.mkdir(parents=True, exist_ok=True)
        self.models_dir = models_dir or work / "models"
        self.cache_dir = cache_dir or work / "cache"
        self.env = env
        upd = {"enabled": True, "trusted_keys": {signer.key_id: signer.public_b64}, "models_dir": str(self.models_dir),
               "health_window_s": health_window_s, "download_timeout_s": download_timeout_s, **(updates or {})}
        self.cfg = write_config(work / "agent.yaml", broker.port, DEMO_MODEL, str(DEMO_VIDEO), device_id=device_id,
                                model={"path": str(DEMO_MODEL), "name": "demo", "version": "1"},
                                cache={"dir": str(self.cache_dir)}, updates=upd, mqtt={"detections_qos": 1},
                                log_level="info")
        self.col = Collector(broker.host, broker.port, [f"edge/{device_id}/#"])
        self.proc: AgentProcess | None = None
        self.mark = 0  # index into col.messages where the current process started
        self.started_at = 0.0
        self.started_wall = 0.0
        self.logs: list[Path] = []

    # ---- process -----------------------------------------------------------------------------
    def start(self, env: dict[str, str] | None = None) -> DemoAgent:
        self.mark = len(self.col.messages)
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.proc = AgentProcess(self.cfg, env={**(self.env or {}), **(env or {})})
        self.logs.append(self.proc.log)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop()

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.proc.poll() is None:
                self.proc.stop()
        finally:
            self.col.close()

    def log(self, tail: int = 4000) -> str:
        return self.proc.output()[-tail:] if self.proc is not None else ""

    # ---- topics ------------------------------------------------------------------------------
    def msgs(self, since: int | None = None) -> list[Msg]:
        return list(self.col.messages[self.mark if since is None else since:])

    def wait(self, pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            if self.proc is not None and self.proc.proc.poll() is not None:
                return pred()  # the agent exited: nothing more will come
            time.sleep(step)
        return pred()

    def dets(self, since: int | None = None) -> list[dict[str, Any]]:
        return payloads(self.msgs(since), "/cam0/detections")

    def states(self, since: int = 0, version: str | None = None) -> list[dict[str, Any]]:
        """The update records (attempts and refusals) first published on model/state since `since`."""
        msgs = list(self.col.messages)
        return update_records(payloads(msgs[since:], "/model/state"), version,
                              before=payloads(msgs[:since], "/model/state"))

    def served_state(self, since: int = 0) -> dict[str, Any] | None:
        """The last model/state payload: what serves, with the last attempt and refusal beside it."""
        out = payloads(self.col.messages[since:], "/model/state")
        return out[-1] if out else None

    def events(self, name: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in payloads(self.col.messages[since:], "/events") if name is None or e.get("event") == name]

    def status(self, since: int | None = None) -> dict[str, Any] | None:
        st = [s for s in payloads(self.msgs(since), "/status") if s.get("state") == "online"]
        return st[-1] if st else None

    def ready(self) -> bool:
        """Telemetry carrying update counters: the update manager runs and has subscribed."""
        return any(m.topic.endswith("/telemetry") and b'"manifests"' in m.payload for m in self.msgs())

    def wait_ready(self, timeout: float = 60) -> bool:
        return self.wait(self.ready, timeout)

    def first_detection_at(self, since: int | None = None) -> float | None:
        """When the first detections message of the current process arrived (monotonic).

        Messages of a killed process can still arrive after the restart (QoS 1, in flight at the
        broker): only frames captured after the start count (`ts` is the capture time, wall clock;
        not usable under a faked clock, where any message after `since` counts)."""
        faked = "FAKETIME" in (self.env or {})
        for m in self.msgs(since):
            if m.topic.endswith("/cam0/detections"):
                try:
                    ts = float(json.loads(m.payload)["ts"])
                except (ValueError, KeyError, TypeError):
                    continue
                if faked or ts >= self.started_wall:
                    return m.at
        return None

    def wait_dets(self, n: int, since: int | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        start = len(self.col.messages) if since is None else since
        self.wait(lambda: len(self.dets(start)) >= n, timeout)
        return self.dets(start)

    def serving(self, n: int = 3, timeout: float = 30) -> set[tuple[str, str]]:
        """(name, version) pairs of the next `n` detections messages."""
        return {(d["model"]["name"], str(d["model"]["version"])) for d in self.wait_dets(n, timeout=timeout)}

    # ---- disk --------------------------------------------------------------------------------
    def store_state(self) -> dict[str, Any]:
        p = self.models_dir / "state.json"
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def served_file(self) -> Path:
        """The model file the store says serves (the configured demo model when none is active)."""
        active = self.store_state().get("active")
        return self.models_dir / "versions" / active / "model.onnx" if active else DEMO_MODEL

    def store_problems(self) -> list[str]:
        """Every installed version complete (model matches its manifest), staging empty: or what is not."""
        problems: list[str] = []
        vdir = self.models_dir / "versions"
        for d in sorted(vdir.iterdir()) if vdir.is_dir() else []:
            try:
                man = json.loads((d / "manifest.json").read_text())["model"]
            except (OSError, ValueError, KeyError) as exc:
                problems.append(f"{d.name}: manifest unreadable ({exc})")
                continue
            mp = d / "model.onnx"
            if not mp.is_file() or sha256_of(mp) != man["sha256"]:
                problems.append(f"{d.name}: model.onnx does not match its manifest")
        staging = self.models_dir / "staging"
        if staging.is_dir() and any(staging.iterdir()):
            problems.append(f"staging not empty: {sorted(p.name for p in staging.iterdir())}")
        return problems


def leftovers(root: Path, patterns: tuple[str, ...] = (".tmp", ".part", ".state", "tmp-")) -> list[str]:
    """Files under `root` whose names say they are half-written (temp files, partial transfers)."""
    out: list[str] = []
    if not root.exists():
        return out
    for p in root.rglob("*"):
        if p.is_file() and any(x in p.name for x in patterns):
            out.append(str(p.relative_to(root)))
    return sorted(out)
