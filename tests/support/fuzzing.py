"""Fuzzing of every handler of external input: generators, mutators and in-process harnesses.

Shared by the reliability scenario `fuzz` (reliability/fuzz.py), the coverage-guided long runs
(scripts/fuzz_atheris.py) and the hypothesis tests (tests/updates/test_fuzz_handlers.py,
tests/test_fuzz_config.py). Handlers, and what a clean rejection is for each:

    manifest        MQTT `edge/D/model/update`, `edge/group/G/model/update` -> UpdateManager._on_manifest.
                    Clean: the manager counts it rejected (UpdateError from verify_manifest); nothing
                    reaches its "internal" path, nothing is logged with a traceback.
    chunk           MQTT `edge/D/model/chunks/<transfer>/<index>` (group likewise) -> UpdateManager._on_chunk.
                    The chunk's "header" is its topic (transfer id, index); clean: ignored, dropped
                    (unknown transfer), refused (UpdateError bad_chunk) or a duplicate, without a traceback.
    config_file     a config file -> agent.config.load_config. Clean: ConfigError (pydantic's
                    ValidationError wrapped as the agent does, YAML errors, unreadable files).
    config_data     a parsed YAML document -> agent.config.parse_config. Clean: ConfigError.
    transfer_state  a damaged `<transfer>.state` bitmap file -> ChunkAssembler resuming a transfer.
                    Clean: resumed only when it describes this very transfer, else a fresh start.

A crash is any other exception, or a traceback logged by the agent (the MQTT client and the update
manager catch callback exceptions so paho's thread survives: those are crashes all the same). A
state change is any difference, across a rejected or ignored input, in the model store's files
(state.json, installed versions, downloads and transfer state) or in the update manager's memory
(queued / current job, assemblers and their bitmaps, processed ids, the reported update state).

The MQTT handlers are driven through the agent's real MqttClient: its paho `on_message` callback is
called with a real paho MQTTMessage (raw topic bytes, so non-UTF-8 topics reach the client's own
check), which runs the client's size cap, topic matching and callback dispatch and then the
UpdateManager's callbacks, exactly as paho's network thread does. The client is never connected:
per-message before / after snapshots need the delivery to be synchronous, and tens of thousands of
cases must run in minutes. The reliability scenario also sends a sample through a real mosquitto.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import shutil
import string
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MqttConfig, UpdatesConfig, load_config, parse_config
from agent.errors import ConfigError, UpdateError
from agent.models.store import ModelStore, ModelVersion
from agent.mqtt.client import MqttClient
from agent.mqtt.topics import Topics
from agent.updates.manager import UpdateManager
from agent.updates.manifest import Manifest, generate_keypair, load_private_key, public_key_b64, sign_manifest
from agent.updates.transfer import ChunkAssembler

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000  # a fixed clock (2027-01-15): every run is reproducible from its seed
DEVICE = "dev1"
GROUP = "line-3"
KEY_ID = "ops"
PREFIX = "edge"
BUSY_CHUNK = 256  # the in-flight transfer: 1024 chunks of 256 bytes, every other one held
BUSY_CHUNKS = 1024
HANDLERS = ("manifest", "chunk", "config_file", "config_data", "transfer_state")
SENTINEL = "fuzz/sentinel"  # broker mode: a marker that the fuzzed message before it has been handled

# ---- values that find bugs ---------------------------------------------------------------------

INTS = [0, 1, -1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1023, 1024, 8191, 8192, 8193, 65535, 65536,
        1 << 20, (1 << 20) + 1, 2**31 - 1, 2**31, 2**32, 1 << 40, (1 << 40) + 1, 2**53 + 1, 2**63 - 1, 2**63,
        -(2**63), 10**18 - 1, 10**18, 10**19, 10**30, NOW, NOW + 3600, NOW - 400, NOW + 400, 1704067199]
STRINGS = ["", " ", ".", "..", "../../etc/passwd", "/abs", "a/b", "+", "#", "a+b", "\x00", "a\x00b", "\t", "\n",
           "\r\n", "\x7f", "\x9f", "\u2028", "\u202e", "\ufeff", "\u200b", "é", "e\u0301", "😀", "\U0010ffff",
           "\uff21\uff22\uff23", "İ", "ß", "Ω", "\u0661\u0662", "A" * 63, "A" * 64, "A" * 65, "A" * 129, "x" * 5000,
           "1", "01", "0", "-1", "1.2", "1.2.3.4", "1.2.3.4.5", "999999999", "1000000000", "1e5", "NaN", "Infinity",
           "null", "true", "%s%n%x", "\\", '"', "'", "{}", "[]", "${HOME}", "$(id)", "dev1", "line-3", "ops", "yolov8",
           "https://x", "file:///etc/passwd", "file://host/x", "ftp://x", "http://", "https://a b",
           "ZmFrZQ==", "=" * 44, "A" * 43 + "="]
FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), 1e16, 2.0**63]
YAML_TOKENS = ["!!python/object:os.system", "!!python/name:os.system", "!!binary AAAA", "!!binary ====",
               "!!timestamp 2024-13-45", "2024-13-45", "2024-02-30 25:61:61", "0000-00-00",
               "2001-12-14t21:59:43.10-05:00",
               "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]", "!!int 0x" + "f" * 40, "0b" + "1" * 300,
               "0o777777777777777777777777", "1" * 5000, "0x" + "f" * 4000, "1_000_000", "-.inf", ".nan", "1e400",
               "!!float x", "!!int x", "!!bool maybe", "!!timestamp x", "!!timestamp 2024-01-01T25:00:00",
               "!!timestamp 2024-01-01 10:00:00 +99:99", "2024-01-01 10:00:00.99999999999999999999",
               "!!str", "!!null x", "&a", "*a", "*zz", "<<: *a", "<<: 5",
               "<<: [1]", "? [a]\n: b", "- - - -", "{", "}", "[", "]", "'", '"', "|", ">", "%YAML 1.1", "%TAG ! !x",
               "---", "...", "\t", "\ufeff", "\x00", "\x85", "\u2028", "~", "=", ":", ": :", "@", "`", "!x", "!<tag:x>",
               "yes", "no", "on", "off", "Y", "NO", "0x", "0o", "+", "-", "0" * 30 + "1"]


class Mutator:
    """Seeded structure-aware and byte-level mutations (one `random.Random`: a seed replays a run)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # -- values ---------------------------------------------------------------------------------
    def text(self, max_len: int = 40) -> str:
        r = self.rng
        pick = r.random()
        if pick < 0.4:
            return r.choice(STRINGS)
        if pick < 0.6:
            return "".join(r.choice(string.printable) for _ in range(r.randrange(max_len + 1)))
        if pick < 0.8:  # any code point, surrogates included (they must be refused, never crash)
            return "".join(chr(r.choice([r.randrange(0x80), r.randrange(0x800), r.randrange(0x110000)]))
                           for _ in range(r.randrange(max_len + 1)))
        base = r.choice(STRINGS)
        return base * r.randrange(1, 50)

    def number(self) -> int | float:
        r = self.rng
        pick = r.random()
        if pick < 0.55:
            return r.choice(INTS)
        if pick < 0.8:
            return r.randrange(-(1 << 70), 1 << 70) >> r.randrange(71)
        return r.choice(FLOATS)

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.random()
        if pick < 0.1:
            return None
        if pick < 0.18:
            return r.random() < 0.5
        if pick < 0.45:
            return self.number()
        if pick < 0.75 or depth >= 3:
            return self.text()
        if pick < 0.88:
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        return {self.text(12): self.value(depth + 1) for _ in range(r.randrange(4))}

    # -- structure --------------------------------------------------------------------------------
    def _paths(self, doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        yield path
        if isinstance(doc, dict):
            for k, v in doc.items():
                yield from self._paths(v, (*path, k))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                yield from self._paths(v, (*path, i))

    def mutate_doc(self, doc: Any, rounds: int | None = None) -> Any:
        """A deep copy of `doc` with 1-3 structural mutations: deletions, type swaps, huge values, ..."""
        doc = copy.deepcopy(doc)
        r = self.rng
        for _ in range(rounds or r.choice([1, 1, 1, 2, 3])):
            paths = list(self._paths(doc))
            path = r.choice(paths)
            if not path:
                if isinstance(doc, dict) and r.random() < 0.5:
                    extra = self.text(12) if r.random() < 0.5 else r.choice(["Schema", "signature ", "extra"])
                    doc[extra] = self.value()
                    continue
                if r.random() < 0.1:
                    return self.value()
                continue
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            key, cur = path[-1], parent[path[-1]]
            op = r.random()
            if op < 0.15 and isinstance(parent, dict):
                del parent[key]
            elif op < 0.2 and isinstance(parent, list):
                parent.pop(key)
            elif op < 0.45:
                parent[key] = self.value()
            elif op < 0.6:
                parent[key] = self.swap_type(cur)
            elif op < 0.75:
                parent[key] = self.near_miss(cur)
            elif op < 0.82 and isinstance(parent, dict):
                parent[self.text(16)] = self.value()
            elif op < 0.88 and isinstance(cur, list):
                parent[key] = cur * r.choice([0, 2, 100, 5000]) if cur else [self.value()] * r.choice([1, 5000])
            elif op < 0.93:
                nested: Any = cur
                for _ in range(r.choice([1, 3, 8, 40])):
                    nested = [nested] if r.random() < 0.5 else {"x": nested}
                parent[key] = nested
            elif isinstance(parent, dict) and isinstance(key, str):  # rename: case, spaces, unicode look-alikes
                new = r.choice([key.upper(), key + " ", " " + key, key.replace("a", "\u0430"), key + "\x00", ""])
                parent[new] = parent.pop(key)
            else:
                parent[key] = self.value()
        return doc

    def swap_type(self, v: Any) -> Any:
        r = self.rng
        if isinstance(v, bool):
            return r.choice([int(v), str(v).lower(), None, [v]])
        if isinstance(v, int):
            return r.choice([str(v), float(v) if abs(v) < 1e300 else 1.5, bool(v), [v], {"v": v}, None])
        if isinstance(v, str):
            return r.choice([len(v), v.encode().hex(), [v], {v: v} if v else {}, None, True, 1.0])
        if isinstance(v, list):
            return r.choice([{str(i): x for i, x in enumerate(v)}, ",".join(map(str, v)), len(v), None])
        if isinstance(v, dict):
            return r.choice([list(v.values()), list(v.items()), json.dumps(v, default=str), None, 0])
        return self.value()

    def near_miss(self, v: Any) -> Any:
        r = self.rng
        if isinstance(v, bool):
            return not v
        if isinstance(v, int):
            return r.choice([v + 1, v - 1, -v, v * 2, v * (1 << 20), 0, 10**18, 10**19, 2**63])
        if isinstance(v, str):
            return r.choice([v + r.choice(STRINGS), v[:-1], v[1:], v.upper(), v * 2, v + "\x00", " " + v,
                             v.replace(".", ".."), v[: r.randrange(len(v) + 1)], v + "é" * 70])
        return self.value()

    # -- bytes ------------------------------------------------------------------------------------
    def mutate_bytes(self, data: bytes, tokens: list[str] | None = None) -> bytes:
        """1-4 byte-level edits: bit flips, byte sets, deletions, insertions, splices, truncation."""
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.choice([1, 1, 2, 4])):
            n = len(buf)
            op = r.random()
            pos = r.randrange(n + 1)
            if op < 0.25 and n:
                i = r.randrange(n)
                buf[i] ^= 1 << r.randrange(8)
            elif op < 0.35 and n:
                buf[r.randrange(n)] = r.choice([0, 0x7F, 0x80, 0xC0, 0xFF, ord('"'), ord("\\"), ord("{"), ord("}"),
                                                ord(":"), ord(","), ord("["), ord("\n")])
            elif op < 0.5 and n:
                end = min(n, pos + r.choice([1, 2, 8, 64, n]))
                del buf[pos:end]
            elif op < 0.65:
                buf[pos:pos] = r.randbytes(r.choice([1, 2, 4, 16, 200]))
            elif op < 0.8:
                tok = r.choice(tokens or ['"', "{", "}", "[", "]", ",", ":", "\\u0000", "\\ud800", "1e999", "NaN",
                                          "-0", "99999999999999999999", "null", "true", '"signature":""', "\\"])
                buf[pos:pos] = tok.encode("utf-8", "surrogatepass")
            elif op < 0.9 and n:
                start = r.randrange(n)
                chunk = buf[start:start + r.choice([1, 4, 32, 256])]
                buf[pos:pos] = chunk * r.choice([1, 2, 10])
            else:
                del buf[pos:]
        return bytes(buf)

    def random_bytes(self) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.4:
            return r.randbytes(r.choice([0, 1, 2, 7, 64, 255, 256, 257, 1000, 5000]))
        if pick < 0.7:
            try:
                return json.dumps(self.value(), ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
            except (ValueError, TypeError):
                return b"null"
        if pick < 0.85:
            depth = r.choice([5, 6, 7, 50, 5000, 200_000])
            return (b"[" * depth + b"]" * depth) if r.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
        return r.choice([b"\xff\xfe", b"\xef\xbb\xbf{}", b"{}" * 40000, b" " * 70000, b'{"a":1,"a":2}',
                         b'{"signature": "x"}', b"\x00" * 300, b'{"id": "\\ud800"}'])

    def serialize(self, doc: Any) -> bytes:
        """JSON in some layout; sometimes with a duplicated key (which must be refused)."""
        r = self.rng
        try:
            text = json.dumps(doc, sort_keys=r.random() < 0.5, ensure_ascii=r.random() < 0.5,
                              indent=r.choice([None, None, 0, 2, "\t"]),
                              separators=r.choice([None, (",", ":"), (" , ", " : ")]))
        except (ValueError, TypeError, RecursionError):
            return b"{}"
        if r.random() < 0.05 and text.startswith("{") and isinstance(doc, dict) and doc:
            k = r.choice(list(doc))
            text = "{" + json.dumps(k) + ":" + json.dumps(self.value(), default=str) + "," + text[1:]
        return text.encode("utf-8", "surrogatepass")


# ---- a manifest world ---------------------------------------------------------------------------

def base_manifest(data: bytes, *, version: str = "4", manifest_id: str = "m-fuzz-0001", mqtt_chunk: int | None = None,
                  devices: list[str] | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    """A valid unsigned manifest for `data` (sizes and hashes consistent)."""
    source: dict[str, Any] = {"url": "https://models.example/widgets.onnx"}
    if mqtt_chunk:
        source = {"mqtt": {"transfer_id": "t" + hashlib.sha256(data).hexdigest()[:31], "chunk_size": mqtt_chunk,
                           "chunks": math.ceil(len(data) / mqtt_chunk)}}
    return {
        "schema": 1, "id": manifest_id,
        "model": {"name": "widgets", "version": version, "sha256": hashlib.sha256(data).hexdigest(),
                  "size": len(data), "input": {"width": 64, "height": 64}, "labels": ["scratch", "dent"],
                  "decoder": "yolov8"},
        "source": source,
        "targets": {"devices": [DEVICE] if devices is None else devices, "groups": [] if groups is None else groups},
        "issued_at": NOW - 60, "expires_at": NOW + 3600, "rollback": False,
    }


def sign(doc: dict[str, Any], key: Ed25519PrivateKey, key_id: str = KEY_ID) -> bytes:
    """Sign `doc` as the fleet tool does; a document that cannot be canonicalised goes out unsigned."""
    if not isinstance(doc, dict):
        return json.dumps(doc, default=str).encode("utf-8", "surrogatepass")
    try:
        return json.dumps(sign_manifest(doc, key, key_id), ensure_ascii=False).encode("utf-8")
    except (UpdateError, ValueError, TypeError, UnicodeEncodeError, RecursionError):
        return json.dumps(doc, default=str).encode("utf-8", "surrogatepass")


@dataclass
class Outcome:
    """What one input did: its verdict, any crash (traceback text), any state change of a rejected input."""

    handler: str
    verdict: str  # accepted | rejected | ignored (| undelivered: broker mode only)
    crash: str | None = None
    changed: list[str] = field(default_factory=list)
    detail: str = ""


class _Traces(logging.Handler):
    """Every record the agent logs with a traceback: the callbacks' own catch-alls turn crashes into those."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.rejections = 0
        self.last_reason = ""  # of the manager's latest "update manifest rejected" warning

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "update manifest rejected: %s" and record.args:
            exc = record.args[0] if isinstance(record.args, tuple) else None
            self.rejections += 1
            self.last_reason = str(getattr(exc, "reason", exc))
        if record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}\n"
                                + "".join(traceback.format_exception(*record.exc_info)))


@contextlib.contextmanager
def captured_agent_logs() -> Iterator[_Traces]:
    """Collect tracebacks logged under `agent.*`; the thousands of rejection warnings stay quiet."""
    logger = logging.getLogger("agent")
    h = _Traces()
    old_prop, old_level = logger.propagate, logger.level
    logger.addHandler(h)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield h
    finally:
        logger.removeHandler(h)
        logger.propagate, logger.level = old_prop, old_level


class _Host:
    """The service side (UpdateHost) as far as the intake path needs it: the serving model's version.

    The handlers under test never reach the rest (the worker is held in the in-flight transfer); a
    job that did get further blocks in prepare_engine, so nothing here can swap a model.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()

    def recent_frames(self) -> list[np.ndarray]:
        return []

    def current_model(self) -> tuple[str, str]:
        return ("widgets", "2")

    def prepare_engine(self, model_path: Path | None, manifest: Manifest | None) -> object:
        self.gate.wait(30)
        raise UpdateError("engine_failed", "the fuzz host builds no engine")

    def smoke(self, bundle: object, frames: list[np.ndarray]) -> dict[str, Any]:
        raise UpdateError("smoke_failed", "the fuzz host runs nothing")

    def activate(self, bundle: object, version: ModelVersion | None) -> None:
        raise UpdateError("activation_failed", "the fuzz host swaps nothing")

    def release(self, bundle: object) -> None:
        pass

    def health_since(self, t0: float) -> dict[str, Any]:
        return {"frames": 0, "errors": 0, "fps": 0.0}


def _digest(p: Path) -> str:
    st = p.stat()
    if st.st_size <= 512 * 1024:
        return hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return f"size={st.st_size} mtime={st.st_mtime_ns}"  # large sparse .part files of accepted fuzz manifests


class UpdateHarness:
    """An UpdateManager wired as the service wires it (real ModelStore, real MqttClient, real topics),
    busy with an MQTT transfer half received, so a fuzzed input meets a running update to disturb.

    `deliver(topic, payload)` runs one message through the client's paho callback and reports an Outcome.
    """

    def __init__(self, root: Path, broker: tuple[str, int] | None = None) -> None:
        self.root = Path(root)
        self.broker = broker  # (host, port): the client really connects, messages come through mosquitto
        self.root.mkdir(parents=True, exist_ok=True)
        keys = self.root / "keys"
        if not (keys / f"{KEY_ID}.key").exists():
            generate_keypair(keys, KEY_ID)
            generate_keypair(keys, "rogue")
        self.key = load_private_key(keys / f"{KEY_ID}.key")
        self.rogue = load_private_key(keys / "rogue.key")
        self.pub_b64 = public_key_b64(self.key.public_key())
        self.topics = Topics(PREFIX, DEVICE)
        self.busy_data = random.Random(1).randbytes(BUSY_CHUNK * BUSY_CHUNKS)
        self.busy_manifest = base_manifest(self.busy_data, version="3", manifest_id="m-busy-0001",
                                           mqtt_chunk=BUSY_CHUNK)
        self.busy_tid: str = self.busy_manifest["source"]["mqtt"]["transfer_id"]
        self.generation = 0
        self.resets = 0
        self.mgr: UpdateManager
        self._build()

    # -- wiring ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self.generation += 1
        self.dir = self.root / f"gen{self.generation}"
        cfg = UpdatesConfig(models_dir=self.dir / "models", trusted_keys={KEY_ID: self.pub_b64}, groups=[GROUP],
                            max_model_mb=1, download_timeout_s=3600.0, health_window_s=0.0)
        self.cfg = cfg
        self.store = ModelStore(cfg.models_dir, cfg.keep_versions)
        self.store.recover()
        self._install_current()
        host, port = self.broker or ("127.0.0.1", 1883)
        self.client = MqttClient(MqttConfig(host=host, port=port, queue_size=1000),
                                 f"edge-agent-{DEVICE}-{self.generation}", self.topics.status, b'{"state":"offline"}')
        self.sentinel = threading.Event()
        if self.broker is not None:
            self.client.subscribe(SENTINEL, lambda _t, _p: self.sentinel.set(), 1)
            self.client.start()
            deadline = time.monotonic() + 10
            while not self.client.connected:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no connection to mosquitto: {self.client.stats()['last_error']}")
                time.sleep(0.01)
        self.host = _Host()
        self.mgr = UpdateManager(cfg, DEVICE, self.topics, self.client, self.store, self.host, clock=lambda: NOW)
        self.mgr.start()
        # the running update: a chunked transfer, every other chunk held; the worker waits for the rest
        self._dispatch(self.topics.model_update.encode(), sign(self.busy_manifest, self.key))
        for i in range(0, BUSY_CHUNKS, 2):
            self._dispatch(self.topics.chunks(self.busy_tid, i).encode(),
                           self.busy_data[i * BUSY_CHUNK:(i + 1) * BUSY_CHUNK])
        deadline = time.monotonic() + 10
        while self.mgr.reporter.state != "downloading" or self.mgr._current is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the in-flight update did not start: {self.mgr.reporter.last}")
            time.sleep(0.005)

    def _install_current(self) -> None:
        """widgets 2 installed and active: the store has real content for a rejected input to damage."""
        if self.store.active() is not None:
            return
        from tests.support.models import fixed_yolov8_model

        model = fixed_yolov8_model(self.dir / "widgets-2.onnx", [(10, 10, 5, 5, 0, 0.9)], size=64)
        doc = base_manifest(model.read_bytes(), version="2", manifest_id="m-installed-2")
        mv = self.store.install(self.store.stage(model, sign(doc, self.key)))
        self.store.activate(mv)

    def reset(self) -> None:
        """A fresh manager and store (after a fuzzed chunk completed the in-flight transfer)."""
        self.close()
        self.resets += 1
        self._build()

    def close(self) -> None:
        self.host.gate.set()
        self.mgr.stop(timeout=5)
        if self.broker is not None:
            self.client.stop(0.5)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- one message ----------------------------------------------------------------------------
    def _dispatch(self, topic: bytes, payload: bytes) -> None:
        msg = paho.MQTTMessage(mid=0, topic=topic)
        msg.payload = payload
        msg.qos = 1
        self.client._on_message(self.client._client, None, msg)  # what paho's network thread calls

    def snapshot(self) -> dict[str, Any]:
        m = self.mgr
        files = {str(p.relative_to(self.dir)): _digest(p) for p in sorted(self.cfg.models_dir.rglob("*"))
                 if p.is_file()}
        with m._cv:
            asms = {tid: (a.received, hashlib.blake2b(bytes(a._bits), digest_size=8).hexdigest(), a._fd is None)
                    for tid, a in m._chunks.assemblers.items()}
            mem: dict[str, object] = {"queued": None if m._queued is None else m._queued.manifest.id,
                                      "current": None if m._current is None else m._current.manifest.id,
                                      "assemblers": asms, "seen": tuple(m._seen), "chunk_error": repr(m._chunks.error)}
        r = m.reporter
        mem["reporter"] = (r.state, r.version, r.name, r.manifest_id, r.error, r.progress)
        return {"files": files, "memory": mem}

    @staticmethod
    def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        out: list[str] = []
        fb, fa = before["files"], after["files"]
        for k in sorted(set(fb) | set(fa)):
            if fb.get(k) != fa.get(k):
                out.append(f"file {k}: {'absent' if k not in fb else 'was'} -> {'gone' if k not in fa else 'changed'}")
        mb, ma = before["memory"], after["memory"]
        for k in mb:
            if mb[k] != ma[k]:
                out.append(f"manager {k}: {str(mb[k])[:120]} -> {str(ma[k])[:120]}")
        return out

    def deliver(self, handler: str, topic: str | bytes, payload: bytes, traces: _Traces,
                publisher: paho.Client | None = None) -> Outcome:
        """Run one message; `traces` is the capture of captured_agent_logs() around the whole run.

        With `publisher` (broker mode) the message goes through mosquitto, followed by a sentinel
        on the same connection: mosquitto keeps their order, so once the sentinel's callback ran the
        fuzzed message has been handled (or was not routed to the agent at all).
        """
        c0 = dict(self.mgr.counters)
        errs0 = self.client.stats()["callback_errors"]
        n0 = len(traces.records)
        r0 = traces.rejections
        before = self.snapshot()
        raw_topic = topic if isinstance(topic, bytes) else topic.encode("utf-8", "surrogatepass")
        crash: str | None = None
        try:
            if publisher is None:
                self._dispatch(raw_topic, payload)
            else:
                self.sentinel.clear()
                publisher.publish(raw_topic.decode("utf-8"), payload, qos=1)
                publisher.publish(SENTINEL, b"", qos=1)
                if not self.sentinel.wait(10):
                    return Outcome(handler, "undelivered", detail="the sentinel did not come back through mosquitto")
        except Exception:  # the client's own catch-all should make this impossible
            crash = traceback.format_exc()
        c1 = self.mgr.counters
        if crash is None and len(traces.records) > n0:
            crash = "\n".join(traces.records[n0:])
        if crash is None and self.client.stats()["callback_errors"] > errs0:
            crash = "MqttClient counted a callback error"
        if (c1["manifests"] > c0["manifests"] and c1["rejected"] == c0["rejected"]) or c1["chunks"] > c0["chunks"]:
            verdict = "accepted"
        elif c1["rejected"] > c0["rejected"] or c1["chunks_bad"] > c0["chunks_bad"] \
                or c1["chunks_dropped"] > c0["chunks_dropped"]:
            verdict = "rejected"
        else:
            verdict = "ignored"  # no subscription matched, an empty (retained-clear) payload, a duplicate chunk
        reason = traces.last_reason if traces.rejections > r0 else ""
        reason = next((k for k in ("chunks_bad", "chunks_dropped") if c1[k] > c0[k]), reason)
        out = Outcome(handler, verdict, crash, detail=reason)
        if verdict != "accepted":
            out.changed = self.diff(before, self.snapshot())
        with self.mgr._cv:
            busy = self.mgr._chunks.assemblers.get(self.busy_tid)
        if busy is None or busy.complete or self.mgr._current is None:
            self.reset()  # a fuzzed chunk finished the in-flight transfer: start again from a known state
        return out

    # -- inputs -----------------------------------------------------------------------------------
    def manifest_case(self, mut: Mutator) -> tuple[str, bytes, str]:
        """(topic, payload, kind) of one fuzzed manifest message."""
        r = mut.rng
        topic = r.choices([self.topics.model_update, self.topics.group_model_update(GROUP),
                           self.topics.group_model_update("other"), f"{PREFIX}/{DEVICE}/model/update/x"],
                          weights=[80, 14, 3, 3])[0]
        data = r.randbytes(r.choice([300, 1000, 4096]))
        doc = base_manifest(data, version=r.choice(["4", "4", "10.1", "3", "2", "1", "2.0"]),
                            manifest_id=f"m-{r.getrandbits(48):012x}", mqtt_chunk=r.choice([None, 256, 1024]),
                            devices=r.choice([[DEVICE], [], ["other"], [DEVICE, "other"]]),
                            groups=r.choice([[], [GROUP], ["other"]]))
        if not doc["targets"]["devices"] and not doc["targets"]["groups"]:
            doc["targets"]["devices"] = [DEVICE]
        kind = r.choices(["resigned", "stale_signature", "bytes", "rogue", "random", "valid", "replay"],
                         weights=[35, 10, 22, 5, 13, 10, 5])[0]
        if kind == "resigned":  # signed after the mutation: the schema and every later check see it
            payload = sign(mut.mutate_doc(doc), self.key)
        elif kind == "stale_signature":
            signed = json.loads(sign(doc, self.key))
            payload = mut.serialize(mut.mutate_doc(signed))
        elif kind == "bytes":
            payload = mut.mutate_bytes(sign(doc, self.key))
        elif kind == "rogue":
            payload = sign(doc, self.rogue, r.choice([KEY_ID, "rogue", "", "ops ", "OPS"]))
        elif kind == "random":
            payload = mut.random_bytes()
        elif kind == "valid":  # well-formed: expiry edges, rollbacks, other targets, old versions
            doc["rollback"] = r.random() < 0.2
            doc["issued_at"], doc["expires_at"] = r.choice([(NOW - 60, NOW + 3600), (NOW + 301, NOW + 3600),
                                                            (NOW - 7200, NOW - 301), (NOW - 7200, NOW - 299),
                                                            (NOW + 299, NOW + 400)])
            payload = sign(doc, self.key)
        else:  # the in-flight update's own manifest again, re-serialised (same id: replayed)
            payload = mut.serialize(json.loads(sign(self.busy_manifest, self.key)))
        return topic, payload, kind

    def chunk_case(self, mut: Mutator) -> tuple[str | bytes, bytes, str]:
        """(topic, payload, kind) of one fuzzed chunk message."""
        r = mut.rng
        with self.mgr._cv:
            tids = list(self.mgr._chunks.assemblers)
        tid = r.choices([self.busy_tid, r.choice(tids) if tids else self.busy_tid, mut.text(20), "t" * 64, "t" * 65],
                        weights=[60, 10, 15, 3, 2])[0]
        held = r.randrange(0, BUSY_CHUNKS, 2)
        index: Any = r.choices([held, held + 1, BUSY_CHUNKS - 1, BUSY_CHUNKS, 10**9 - 1, 10**9, -1,
                                r.randrange(1 << 31)], weights=[45, 15, 5, 10, 5, 5, 5, 10])[0]
        topic: str | bytes = f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{index}"
        kind = "chunk"
        pick = r.random()
        if pick < 0.07:
            topic = f"{PREFIX}/group/{GROUP}/model/chunks/{tid}/{index}"
        elif pick < 0.22:
            kind = "topic"
            topic = r.choice([f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{index:0>4}" if isinstance(index, int) else "",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{index}/x",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}",
                              f"{PREFIX}/{DEVICE}/model/chunks//{index}",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/ {index}",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{mut.text(8)}",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/\u0661",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/+",
                              f"{PREFIX}/group//model/chunks/{tid}/{index}",
                              f"{PREFIX}/group/other/model/chunks/{tid}/{index}",
                              f"{PREFIX}//{DEVICE}/model/chunks/{tid}/{index}",
                              f"{PREFIX}/{DEVICE}/model/update/{tid}/{index}",
                              f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{index}".replace("/", r.choice(["//", "/./"]), 1)])
        elif pick < 0.27:
            kind = "topic_bytes"
            topic = mut.mutate_bytes(f"{PREFIX}/{DEVICE}/model/chunks/{tid}/{index}".encode(),
                                     tokens=["\udcff", "\x00", "/", "+", "#", "\xc0\x80"])
        want = BUSY_CHUNK  # every chunk of the in-flight transfer is full (262144 = 1024 x 256)
        length = r.choices([want, want - 1, want + 1, 0, 1, r.randrange(4 * want), 70_000],
                           weights=[60, 8, 8, 8, 4, 8, 4])[0]
        payload = r.randbytes(length)
        return topic, payload, kind


# ---- config -------------------------------------------------------------------------------------

def config_seeds() -> list[tuple[str, dict[str, Any]]]:
    """(YAML text, its document) of valid configs: the shipped example, a minimal and a rich one."""
    example = (ROOT / "config" / "agent.yaml").read_text(encoding="utf-8")
    minimal = {"cameras": [{"source": "synthetic:64x64@5"}]}
    rich = {
        "device_id": "orin-07", "log_level": "debug",
        "cameras": [{"id": "cam0", "source": "rtsp://10.0.0.5/stream", "reconnect": {"initial_s": 0.1, "max_s": 2}},
                    {"id": "cam1", "source": "/dev/video0", "width": 640, "height": 480, "fps": 30, "fourcc": "MJPG"}],
        "model": {"name": "widgets", "version": "3", "labels": ["scratch", "dent"], "decoder": "yolov8",
                  "class_thresholds": {"scratch": 0.5}},
        "engine": {"providers": [{"name": "CUDAExecutionProvider", "options": {"device_id": 0}},
                                 {"name": "CPUExecutionProvider"}], "precision": "fp16"},
        "mqtt": {"host": "broker.local", "port": 8883, "tls": {"ca_file": "ca.pem", "cert_file": "c.pem",
                                                               "key_file": "k.pem"}, "username": "u"},
        "telemetry": {"prometheus_port": 9108},
        "updates": {"trusted_keys": {"ops": "A" * 43 + "="}, "groups": ["line-3"]},
    }
    return [(example, yaml.safe_load(example)), (yaml.safe_dump(minimal), minimal),
            (yaml.safe_dump(rich, sort_keys=False), rich)]


def config_text_case(mut: Mutator, seeds: list[tuple[str, dict[str, Any]]]) -> tuple[bytes, str]:
    """(file bytes, kind) of one fuzzed config file."""
    r = mut.rng
    text, doc = r.choice(seeds)
    kind = r.choices(["structure", "text", "yaml_tokens", "random", "encoding"], weights=[35, 25, 25, 10, 5])[0]
    if kind == "structure":
        new = mut.mutate_doc(doc)
        try:
            out = yaml.safe_dump(new, allow_unicode=r.random() < 0.5, sort_keys=False) if r.random() < 0.8 \
                else json.dumps(new)
        except (yaml.YAMLError, ValueError, TypeError, RecursionError):
            out = text
        return out.encode("utf-8", "surrogatepass"), kind
    if kind == "text":
        return mut.mutate_bytes(text.encode("utf-8")), kind
    if kind == "yaml_tokens":
        lines = text.splitlines()
        for _ in range(r.choice([1, 1, 2, 3])):
            i = r.randrange(len(lines))
            tok = r.choice(YAML_TOKENS)
            head, sep, _tail = lines[i].partition(":")
            lines[i] = f"{head}: {tok}" if sep and r.random() < 0.7 else (tok + lines[i] if r.random() < 0.5 else tok)
        if r.random() < 0.1:  # aliases that fan out (a small billion-laughs) and deep nesting
            lines.append("zz: &b [" + ", ".join(["x"] * 9) + "]")
            lines.append("zy: [" + ", ".join(["*b"] * 9) + "]")
        if r.random() < 0.05:
            d = r.choice([50, 500, 5000])
            lines.append("deep: " + "[" * d + "]" * d)
        return "\n".join(lines).encode("utf-8", "surrogatepass"), kind
    if kind == "random":
        return mut.random_bytes(), kind
    return r.choice([text.encode("utf-16"), text.encode("latin-1", "replace") + b"\xe9\xff",
                     b"\xef\xbb\xbf" + text.encode(), text.encode("utf-32"), text.replace("\n", "\r").encode(),
                     text.encode()[:-1] + b"\x80"]), kind


def yaml_like(mut: Mutator, depth: int = 0) -> Any:
    """A value as YAML's safe loader can produce it (dates, bytes, sets included)."""
    import datetime

    r = mut.rng
    pick = r.random()
    if pick < 0.08:
        return r.choice([datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 1, 12, 0), b"\x00\xff", {1, 2},
                         1 << 20000, -(10**5000)])  # YAML's 0x / 0o / 0b integers have no digit limit
    if pick < 0.15 and depth < 3:
        return {r.choice([1, None, True, 1.5, "k", datetime.date(2024, 2, 29)]): yaml_like(mut, depth + 1)}
    return mut.value(depth)


def config_data_case(mut: Mutator, seeds: list[tuple[str, dict[str, Any]]]) -> tuple[Any, str]:
    r = mut.rng
    _, doc = r.choice(seeds)
    kind = r.choices(["structure", "yaml_values", "random"], weights=[70, 20, 10])[0]
    if kind == "structure":
        return mut.mutate_doc(doc), kind
    if kind == "yaml_values":
        new = copy.deepcopy(doc)
        section = r.choice(list(new))
        if isinstance(new[section], dict) and new[section] and r.random() < 0.7:
            new[section][r.choice(list(new[section]))] = yaml_like(mut)
        else:
            new[section] = yaml_like(mut)
        return new, kind
    return yaml_like(mut), kind


def _dir_state(d: Path) -> dict[str, str]:
    return {p.name: hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest() for p in sorted(d.iterdir())
            if p.is_file()}


def run_config_file(path: Path, data: bytes) -> Outcome:
    """load_config on `data` written at `path`: ConfigError or a config; the folder unchanged either way."""
    path.write_bytes(data)
    before = _dir_state(path.parent)
    try:
        load_config(path)
        out = Outcome("config_file", "accepted")
    except ConfigError as exc:
        out = Outcome("config_file", "rejected", detail=exc.errors[0][:120] if exc.errors else "")
    except Exception:
        out = Outcome("config_file", "crash", crash=traceback.format_exc())
    after = _dir_state(path.parent)
    if before != after:
        out.changed = [f"files next to the config: {sorted(before)} -> {sorted(after)}"]
    return out


def run_config_data(data: Any) -> Outcome:
    try:
        parse_config(data)
        return Outcome("config_data", "accepted")
    except ConfigError as exc:
        return Outcome("config_data", "rejected", detail=exc.errors[0][:120] if exc.errors else "")
    except Exception:
        return Outcome("config_data", "crash", crash=traceback.format_exc())


# ---- persisted transfer state ---------------------------------------------------------------------

STATE_TID = "tstate0001"
STATE_CHUNK, STATE_CHUNKS, STATE_SIZE = 256, 40, 256 * 39 + 100


def valid_transfer_state(held: int = 7) -> dict[str, Any]:
    bits = bytearray((STATE_CHUNKS + 7) // 8)
    for i in range(held):
        bits[i >> 3] |= 1 << (i & 7)
    return {"v": ChunkAssembler.STATE_VERSION, "transfer_id": STATE_TID, "chunk_size": STATE_CHUNK,
            "chunks": STATE_CHUNKS, "size": STATE_SIZE, "bitmap": base64.b64encode(bytes(bits)).decode()}


def transfer_state_case(mut: Mutator) -> tuple[bytes, str]:
    r = mut.rng
    doc = valid_transfer_state(r.randrange(STATE_CHUNKS + 1))
    kind = r.choices(["structure", "bytes", "random"], weights=[50, 35, 15])[0]
    if kind == "structure":
        return mut.serialize(mut.mutate_doc(doc)), kind
    if kind == "bytes":
        return mut.mutate_bytes(json.dumps(doc).encode()), kind
    return mut.random_bytes(), kind


def run_transfer_state(d: Path, state: bytes) -> Outcome:
    """A ChunkAssembler resuming over `state`: it must resume only a state that describes this transfer."""
    d.mkdir(parents=True, exist_ok=True)
    part, st = d / f"{STATE_TID}.part", d / f"{STATE_TID}.state"
    part.write_bytes(b"\0" * STATE_SIZE)
    st.write_bytes(state)
    try:
        asm = ChunkAssembler(d, STATE_TID, STATE_CHUNK, STATE_CHUNKS, STATE_SIZE, 1 << 20)
    except UpdateError as exc:
        return Outcome("transfer_state", "rejected", detail=str(exc))
    except Exception:
        return Outcome("transfer_state", "crash", crash=traceback.format_exc())
    try:
        resumed = st.exists()  # a state not taken is deleted at once
        out = Outcome("transfer_state", "accepted" if resumed else "rejected")
        if resumed:
            # independent check: only the exact parameters, a bitmap of the right length, may resume
            try:
                doc = json.loads(state)
                want = valid_transfer_state()
                ok = isinstance(doc, dict) and all(doc.get(k) == want[k] for k in want if k != "bitmap") \
                    and len(base64.b64decode(doc.get("bitmap", ""), validate=True)) == len(bytes(asm._bits))
            except (ValueError, TypeError, AttributeError, RecursionError):
                ok = False
            if not ok or asm.received > STATE_CHUNKS:
                out.changed = [f"resumed {asm.received} chunks from a state that does not describe the transfer"]
        return out
    finally:
        asm.discard()


# ---- one driver for the scenario and the atheris script -----------------------------------------

def is_failure(out: Outcome) -> bool:
    return out.crash is not None or bool(out.changed)


def first_line_of(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""



def broker_safe(topic: str | bytes) -> bool:
    """A topic mosquitto accepts from a publisher (valid UTF-8, no wildcard, NUL or control characters)."""
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            return False
    if not topic or len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return False
    return not any(ch in "+#" or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or 0xD800 <= ord(ch) <= 0xDFFF
                   or (ord(ch) & 0xFFFE) == 0xFFFE or 0xFDD0 <= ord(ch) <= 0xFDEF for ch in topic)
