"""A corpus of hostile update manifests, and a runner that throws it at a live agent over MQTT.

Used by tests/updates/test_manifest_attacks.py (against `verify_manifest` directly and against a real
agent) and by the `manifest_attacks` reliability scenario. Every case names the rejection reasons that
count as right (UpdateError reasons, agent/updates/manifest.py) and where it is published: the device's
own update topic, or its group's. Cases already covered one by one by tests/updates/test_manifest.py
say so in `unit_dup` (the parser tests leave them out; the MQTT run keeps them: another layer).

Equivalent encodings that the contract accepts (whitespace, key order, \\u escapes: the signature
covers the canonical form of the parsed object, not its bytes) are `controls`: they must verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import UpdateError
from agent.fleet.push import build_manifest, connect, model_info, push_model
from agent.updates.manifest import generate_keypair, load_private_key, load_trusted_keys, sign_manifest, verify_manifest
from agent.updates.state import attempt_records, record_for
from tests.support.agent_proc import AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.mqtt import Collector, Msg

# the Ed25519 group order: S + L verifies in a lax implementation, never in a strict one (malleability)
ED25519_L = 2**252 + 27742317777372353535851937790883648493


@dataclass(frozen=True)
class Attack:
    name: str
    category: str
    raw: bytes
    expect: frozenset[str]  # rejection reasons that count as right
    topic: str = "device"  # "device": <prefix>/<dev>/model/update; "group": <prefix>/group/<g>/model/update
    unit_dup: str = ""  # the test of tests/updates/test_manifest.py that already covers this case
    mqtt: bool = True  # False: parser only (the agent never receives it; `note` says why)
    note: str = ""


@dataclass(frozen=True)
class CorpusSpec:
    """What the corpus is built around: the device under attack and a valid update for it."""

    key: Ed25519PrivateKey  # trusted by the device as `key_id`
    key_id: str
    removed_key: Ed25519PrivateKey  # was trusted, then removed from updates.trusted_keys
    removed_key_id: str
    device: str = "dev1"
    group: str = "line3"  # a group the device is in
    other_device: str = "dev2"
    other_group: str = "line4"
    name: str = "fixed"
    version: str = "2"  # newer than what the device runs
    current_version: str = "1"
    sha256: str = "ab" * 32
    size: int = 673
    width: int = 64
    height: int = 64
    labels: tuple[str, ...] = ("part", "dent")
    chunk_size: int = 256
    max_model_bytes: int = 512 * 1024 * 1024
    now: float = field(default_factory=time.time)


def base_manifest(spec: CorpusSpec, **over: Any) -> dict[str, Any]:
    """A valid, unsigned manifest for the spec's device (MQTT chunk source); `over` replaces top-level keys."""
    now = int(spec.now)
    doc: dict[str, Any] = {
        "schema": 1,
        "id": hashlib.sha256(f"{spec.name}-{now}-{over}".encode()).hexdigest()[:32],
        "model": {"name": spec.name, "version": spec.version, "sha256": spec.sha256, "size": spec.size,
                  "input": {"width": spec.width, "height": spec.height}, "labels": list(spec.labels),
                  "decoder": "yolov8"},
        "source": {"mqtt": {"transfer_id": spec.sha256[:32], "chunk_size": spec.chunk_size,
                            "chunks": math.ceil(spec.size / spec.chunk_size)}},
        "targets": {"devices": [spec.device], "groups": []},
        "issued_at": now - 60,
        "expires_at": now + 3600,
        "rollback": False,
    }
    doc.update(over)
    return doc


def _enc(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _swap(raw: bytes, old: bytes, new: bytes) -> bytes:
    """Replace the one occurrence of `old` (a corpus case that silently did nothing would prove nothing)."""
    if raw.count(old) != 1:
        raise AssertionError(f"{old!r} occurs {raw.count(old)} times in the manifest")
    return raw.replace(old, new)


def build_corpus(spec: CorpusSpec) -> list[Attack]:
    k, kid = spec.key, spec.key_id

    def signed(mutate: Callable[[dict[str, Any]], object] | None = None, key: Ed25519PrivateKey | None = None,
               key_id: str | None = None, **over: Any) -> bytes:
        doc = base_manifest(spec, **over)
        if mutate is not None:
            mutate(doc)
        return _enc(sign_manifest(doc, key or k, key_id or kid))

    def model(**kv: Any) -> Callable[[dict[str, Any]], None]:
        return lambda d: d["model"].update(kv)

    def mqtt_src(**kv: Any) -> Callable[[dict[str, Any]], None]:
        return lambda d: d["source"]["mqtt"].update(kv)

    good = signed()
    doc = json.loads(good)
    sig = doc["signature"]
    out: list[Attack] = []

    def add(name: str, category: str, raw: bytes, *expect: str, **kw: Any) -> None:
        out.append(Attack(name, category, raw, frozenset(expect), **kw))

    # ---- JSON structure: one text, two meanings -------------------------------------------------------
    add("dup_key_model_version", "json", _swap(good, b'"version":"2"', b'"version":"2","version":"9"'), "malformed")
    add("dup_key_targets", "json", _swap(good, b'"devices":["dev1"]', b'"devices":["dev2"],"devices":["dev1"]'),
        "malformed")
    add("dup_key_signature", "json", _swap(good, f'"signature":"{sig}"'.encode(),
                                           f'"signature":"{sig}","signature":"AAAA"'.encode()), "malformed")
    add("dup_key_key_id", "json", _swap(good, f'"key_id":"{kid}"'.encode(),
                                        f'"key_id":"{spec.removed_key_id}","key_id":"{kid}"'.encode()), "malformed")
    add("dup_key_escaped_spelling", "json", _swap(good, b'"rollback":false', b'"rollback":false,"\\u0072ollback":true'),
        "malformed")
    add("trailing_garbage", "json", good + b"garbage", "malformed")
    add("two_documents", "json", good + good, "malformed")
    add("js_comment", "json", b"/*x*/" + good, "malformed")
    add("top_level_array", "json", b"[" + good + b"]", "malformed")

    # ---- byte encodings ---------------------------------------------------------------------------
    add("utf8_bom", "encoding", b"\xef\xbb\xbf" + good, "malformed")
    add("utf16", "encoding", good.decode().encode("utf-16"), "malformed")
    add("overlong_slash_in_name", "encoding", _swap(good, b'"name":"fixed"', b'"name":"..\xc0\xaf..\xc0\xafevil"'),
        "malformed")
    add("overlong_nul_in_version", "encoding", _swap(good, b'"version":"2"', b'"version":"2\xc0\x80"'), "malformed")
    add("invalid_continuation_byte", "encoding", _swap(good, b'"part"', b'"pa\x80rt"'), "malformed")
    add("cesu8_surrogate", "encoding", _swap(good, b'"part"', b'"pa\xed\xa0\x80rt"'), "malformed")
    add("escaped_lone_surrogate", "encoding", _swap(good, b'"part"', b'"pa\\ud800rt"'), "malformed")

    # ---- numbers: integers only, bounded ----------------------------------------------------------
    size = str(spec.size).encode()
    exp = str(doc["expires_at"]).encode()
    iss = str(doc["issued_at"]).encode()
    add("nan_size", "numbers", _swap(good, b'"size":' + size, b'"size":NaN'), "malformed")
    add("infinity_expiry", "numbers", _swap(good, b'"expires_at":' + exp, b'"expires_at":Infinity'), "malformed")
    add("minus_infinity_issued", "numbers", _swap(good, b'"issued_at":' + iss, b'"issued_at":-Infinity'), "malformed")
    add("float_exponent_expiry", "numbers", _swap(good, b'"expires_at":' + exp, b'"expires_at":1.9e9'), "malformed")
    add("float_size", "numbers", _swap(good, b'"size":' + size, b'"size":' + size + b".0"), "malformed")
    add("bigint_30_digits", "numbers", _swap(good, b'"expires_at":' + exp, b'"expires_at":' + b"9" * 30), "malformed")
    add("bigint_2_64", "numbers", _swap(good, b'"size":' + size, b'"size":18446744073709551616'), "malformed")
    add("signed_size_over_2_40", "numbers", signed(model(size=10**17)), "malformed")
    add("signed_negative_size", "numbers", signed(model(size=-1)), "malformed")
    add("signed_negative_issued_at", "numbers", signed(issued_at=-1), "malformed")
    add("signed_zero_chunks", "numbers", signed(mqtt_src(chunks=0)), "malformed")
    big = 600 * 1024 * 1024
    add("signed_model_over_size_cap", "numbers",
        signed(lambda d: (d["model"].update(size=big),
                          d["source"]["mqtt"].update(chunk_size=8 << 20, chunks=math.ceil(big / (8 << 20))))),
        "too_large")

    # ---- types (signed: the schema itself must refuse them) --------------------------------------
    add("schema_true", "types", signed(schema=True), "malformed")
    add("schema_string", "types", signed(schema="1"), "malformed")
    add("rollback_string", "types", signed(rollback="false"), "malformed")
    add("size_string", "types", signed(model(size=str(spec.size))), "malformed")
    add("devices_string", "types", signed(targets={"devices": spec.device, "groups": []}), "malformed")
    add("targets_null", "types", signed(targets=None), "malformed")
    add("labels_object", "types", signed(model(labels={"0": "part"})), "malformed")
    add("nested_unknown_field", "types", signed(model(quantized=True)), "malformed")
    add("key_id_number", "types", _swap(good, f'"key_id":"{kid}"'.encode(), b'"key_id":1'), "malformed")
    add("signature_number", "types", _swap(good, f'"signature":"{sig}"'.encode(), b'"signature":1'), "malformed")

    # ---- size and depth ------------------------------------------------------------------------------
    add("padded_over_64k", "size", good[:-1] + b" " * (70 * 1024) + b"}", "too_large")
    add("label_of_1mib", "size", signed(model(labels=["x" * (1 << 20)])), "too_large")
    add("over_16mib", "size", b'{"x":"' + b"A" * (17 << 20) + b'"}', "too_large", mqtt=False,
        note="over the agent's 16 MiB receive cap: MQTT 5 tells the broker, which never sends it")
    add("deep_array_10000", "nesting", _swap(good, b'"labels":["part","dent"]',
                                              b'"labels":[' + b"[" * 10000 + b"]" * 10000 + b"]"), "malformed")
    add("deep_object_7", "nesting", _swap(good, b'"rollback":false',
                                          b'"rollback":false,"x":' + b'{"x":' * 7 + b"1" + b"}" * 7), "malformed")

    # ---- path traversal in what becomes a file or directory name --------------------------------------
    dup_name = "test_traversal_names_rejected"
    for name, value, dup in [("../../evil", "dotdot_slash", dup_name), ("/tmp/edge-agent-evil", "absolute", ""),
                             ("a\x00b", "nul", dup_name), ("..\\..\\evil", "backslash", dup_name),
                             ("fixed\u2215..\u2215evil", "unicode_slash", ""), ("%2e%2e%2fevil", "percent", ""),
                             ("..", "dotdot", dup_name)]:
        add(f"name_{value}", "traversal", signed(model(name=name)), "malformed", unit_dup=dup)
    for version, value, dup in [("../1", "dotdot", "test_bad_versions_rejected"), ("/2", "absolute", ""),
                                ("2\x00", "nul", ""), ("2\\..\\x", "backslash", "")]:
        add(f"version_{value}", "traversal", signed(model(version=version)), "malformed", unit_dup=dup)
    for tid, value, dup in [("../../evil", "dotdot", "test_mqtt_source_chunk_count_must_match"),
                            ("/tmp/edge-agent-evil", "absolute", ""), ("..\\evil", "backslash", ""),
                            ("t\x00x", "nul", "")]:
        add(f"transfer_id_{value}", "traversal", signed(mqtt_src(transfer_id=tid)), "malformed", unit_dup=dup)
    add("manifest_id_traversal", "traversal", signed(id="../../../tmp/edge-agent-evil"), "malformed")
    add("key_id_traversal", "traversal", signed(key_id="../../keys/ops"), "unknown_key")
    add("label_with_newline", "traversal", signed(model(labels=["part\n../evil", "dent"])), "malformed")

    # ---- targets and replay ------------------------------------------------------------------------
    add("for_another_device", "replay", signed(targets={"devices": [spec.other_device], "groups": []}),
        "not_for_this_device", unit_dup="test_targets_and_replay_to_another_device_or_group")
    add("for_another_group", "replay", signed(targets={"devices": [], "groups": [spec.other_group]}),
        "not_for_this_device", topic="group", unit_dup="test_targets_and_replay_to_another_device_or_group")
    add("wildcard_target", "replay", signed(targets={"devices": ["+"], "groups": ["#"]}), "malformed")

    # ---- keys and signatures ------------------------------------------------------------------------
    add("removed_key", "keys", signed(key=spec.removed_key, key_id=spec.removed_key_id), "unknown_key",
        unit_dup="test_key_rotation_and_removed_key")
    add("removed_key_claims_trusted_id", "keys", signed(key=spec.removed_key, key_id=kid), "bad_signature",
        unit_dup="test_signed_with_an_untrusted_key_is_bad_signature_or_unknown")
    add("key_id_other_case", "keys", signed(key_id=kid.upper() if kid.upper() != kid else kid.lower()), "unknown_key")
    no_kid = {a: b for a, b in doc.items() if a != "key_id"}
    add("key_id_missing", "keys", _enc(no_kid), "unknown_key")
    s_bytes = base64.b64decode(sig)
    s_int = int.from_bytes(s_bytes[32:], "little") + ED25519_L
    malleated = base64.b64encode(s_bytes[:32] + s_int.to_bytes(32, "little")).decode()
    add("signature_malleated_s_plus_l", "keys", _swap(good, sig.encode(), malleated.encode()), "bad_signature")
    add("signature_with_newlines", "keys", _swap(good, sig.encode(), (sig[:40] + "\\n" + sig[40:]).encode()),
        "bad_signature")
    add("signature_63_bytes", "keys", _swap(good, sig.encode(), base64.b64encode(s_bytes[:63])), "bad_signature")
    add("signature_empty", "keys", _swap(good, sig.encode(), b""), "missing_signature",
        unit_dup="test_missing_signature")
    other = json.loads(signed(id="another-manifest-0001"))
    add("signature_transplant", "keys", _swap(good, sig.encode(), other["signature"].encode()), "bad_signature")
    ascii_doc = base_manifest(spec)
    ascii_doc["model"]["labels"] = ["Kratzer-ä", "dent"]
    ascii_doc["key_id"] = kid
    body = json.dumps(ascii_doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ascii_doc["signature"] = base64.b64encode(k.sign(body)).decode()
    add("signed_over_escaped_form", "keys", _enc(ascii_doc), "bad_signature")
    forged = json.loads(good)
    forged["rollback"] = True
    forged["model"]["version"] = "0.9"
    add("forged_rollback_flag", "keys", _enc(forged), "bad_signature",
        unit_dup="test_not_newer_and_rollback")

    # ---- time -------------------------------------------------------------------------------------
    now = int(spec.now)
    add("expired", "time", signed(issued_at=now - 7200, expires_at=now - 3600), "expired",
        unit_dup="test_time_window_and_clock_skew")
    add("not_yet_valid", "time", signed(issued_at=now + 3600, expires_at=now + 7200), "not_yet_valid",
        unit_dup="test_time_window_and_clock_skew")

    # ---- downgrade ------------------------------------------------------------------------------------
    add("downgrade", "downgrade", signed(model(version="0.9")), "not_newer", unit_dup="test_not_newer_and_rollback")
    add("same_version", "downgrade", signed(model(version=spec.current_version)), "not_newer",
        unit_dup="test_not_newer_and_rollback")
    add("same_version_trailing_zero", "downgrade", signed(model(version=spec.current_version + ".0")), "not_newer",
        unit_dup="test_not_newer_and_rollback")

    names = [a.name for a in out]
    assert len(names) == len(set(names)), "corpus case names must be unique"
    return out


def controls(spec: CorpusSpec) -> list[tuple[str, bytes]]:
    """Encodings of one valid manifest that differ in bytes, not meaning: each must verify."""
    doc = sign_manifest(base_manifest(spec, id="control-manifest-0001"), spec.key, spec.key_id)
    rev = dict(reversed(list(doc.items())))
    with_brackets = sign_manifest(base_manifest(spec, id="control-manifest-0002"), spec.key, spec.key_id)
    with_brackets["model"]["labels"] = ["[[[[[[[[[[{{{{{{{{", "dent"]
    with_brackets = sign_manifest(with_brackets, spec.key, spec.key_id)
    return [("compact", _enc(doc)), ("pretty", json.dumps(doc, indent=4).encode()),
            ("reversed_key_order", json.dumps(rev).encode()),
            ("ascii_escaped", json.dumps(doc, ensure_ascii=True).encode().replace(b'"fixed"', b'"\\u0066ixed"')),
            ("brackets_inside_strings", _enc(with_brackets))]


# ---- the agent side ----------------------------------------------------------------------------------

def tree_snapshot(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """Every path under `root` -> mode and sha256 (files) or "dir": what a rejected manifest must not change."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if skip(p):
            continue
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = f"link {p.readlink()}"
        elif p.is_dir():
            out[rel] = f"dir {oct(st.st_mode & 0o7777)}"
        else:
            out[rel] = f"{oct(st.st_mode & 0o7777)} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def tree_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}" for k in keys if before.get(k) != after.get(k)]


@dataclass
class Outcome:
    name: str
    expected: frozenset[str]
    reason: str | None  # the reason the agent reported (update_rejected / update_failed), None: nothing
    accepted: bool  # the agent took it as an update (a `downloading` state or an "accepted" log line)
    seconds: float

    @property
    def rejected(self) -> bool:
        return self.reason is not None and not self.accepted

    @property
    def right_reason(self) -> bool:
        return self.rejected and self.reason in self.expected


def rejection_events(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in payloads if p.get("event") in ("update_rejected", "update_failed")]


def throw_at_agent(publish: Callable[[str, bytes], None], collector: Collector, attacks: list[Attack], *,
                   prefix: str, device: str, group: str, agent_log: Callable[[], str],
                   timeout_s: float = 10.0) -> list[Outcome]:
    """Publish each case in turn (to the device's or its group's update topic) and wait for the agent's verdict.

    A verdict is the next `update_rejected` / `update_failed` event on `<prefix>/<device>/events`, or a
    `downloading` state on `model/state` (accepted). No verdict within `timeout_s` leaves `reason` None.
    """
    events_topic = f"{prefix}/{device}/events"
    state_topic = f"{prefix}/{device}/model/state"
    out: list[Outcome] = []
    for a in attacks:
        if not a.mqtt:
            continue
        topic = (f"{prefix}/group/{group}/model/update" if a.topic == "group" else f"{prefix}/{device}/model/update")
        mark = len(collector.messages)
        accepted_before = agent_log().count("accepted (manifest")
        t0 = time.monotonic()
        publish(topic, a.raw)

        def verdict(msgs: list[Msg], mark: int = mark) -> bool:
            return any((m.topic == events_topic and rejection_events([_json(m.payload)]))
                       or (m.topic == state_topic and _downloading(m.payload))
                       for m in msgs[mark:])

        try:
            collector.wait_for(verdict, timeout_s)
        except TimeoutError:
            pass
        new = collector.messages[mark:]
        evs = rejection_events([_json(m.payload) for m in new if m.topic == events_topic])
        downloading = any(_downloading(m.payload) for m in new if m.topic == state_topic)
        accepted = downloading or agent_log().count("accepted (manifest") > accepted_before
        out.append(Outcome(a.name, a.expect, str(evs[0].get("reason")) if evs else None, accepted,
                           round(time.monotonic() - t0, 3)))
    return out


def _downloading(payload: bytes) -> bool:
    """A model/state payload whose update attempt (beside what serves, 0.3.0 on) is downloading."""
    return any(r.get("state") == "downloading" for r in attempt_records(_json(payload)))


def _json(payload: bytes) -> dict[str, Any]:
    try:
        v = json.loads(payload)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


# ---- the whole campaign against one live agent (the test and the reliability scenario share it) -------

@dataclass
class Campaign:
    outcomes: list[Outcome] = field(default_factory=list)
    parser: dict[str, str] = field(default_factory=dict)  # case -> reason from verify_manifest ("ACCEPTED")
    controls_refused: list[str] = field(default_factory=list)
    tree_changes: list[str] = field(default_factory=list)  # anything written by the rejected manifests
    outside_store_changes: list[str] = field(default_factory=list)  # ... by the tampered transfer, outside models/
    served_after: set[str] = field(default_factory=set)  # model versions in detections after the attacks
    status_after: str | None = None  # model version in the retained status after the attacks
    telemetry_rejected: int | None = None
    tampered_reason: str | None = None  # a signed manifest whose chunks are not the signed model
    tampered_versions_changed: bool = False
    control_state: str | None = None  # a genuine update afterwards: must become active
    replay_reasons: list[str | None] = field(default_factory=list)  # that genuine manifest sent again
    agent_alive: bool = False
    stray_paths: list[str] = field(default_factory=list)  # absolute paths named by the corpus that exist
    log_tail: str = ""

    @property
    def published(self) -> int:
        return len(self.outcomes)

    @property
    def accepted(self) -> list[str]:
        return [o.name for o in self.outcomes if o.accepted]

    @property
    def unreported(self) -> list[str]:
        return [o.name for o in self.outcomes if o.reason is None and not o.accepted]

    @property
    def wrong_reason(self) -> list[str]:
        return [f"{o.name}: {o.reason} (want {'/'.join(sorted(o.expected))})" for o in self.outcomes
                if o.rejected and not o.right_reason]

    @property
    def parser_accepted(self) -> list[str]:
        return [k for k, v in self.parser.items() if v == "ACCEPTED"]


STRAY = [Path("/tmp/edge-agent-evil")]


def run_campaign(work: Path, rounds: int = 1, log: Callable[[str], None] = lambda s: None) -> Campaign:
    """One real agent (MQTT chunk updates on, group `line3`) on a real mosquitto; the corpus thrown at it
    `rounds` times (round 2 and later through the group topic), then a tampered transfer, a genuine update
    and replays of it. Also runs the corpus through `verify_manifest` directly."""
    res = Campaign()
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    ops, old = generate_keypair(keys, "ops"), generate_keypair(keys, "ops-2025")
    labels = ["part", "dent"]
    v1 = fixed_yolov8_model(work / "v1.onnx", [(32, 32, 16, 16, 1, 0.8)], labels=labels, version="1")
    v2 = fixed_yolov8_model(work / "v2.onnx", [(32, 32, 16, 16, 1, 0.7)], labels=labels, version="2")
    info = model_info(v2)
    spec = CorpusSpec(load_private_key(ops.private_path), "ops", load_private_key(old.private_path), "ops-2025",
                      sha256=info.sha256, size=info.size, labels=tuple(labels))
    corpus = build_corpus(spec)
    res.stray_paths = [str(p) for p in STRAY if p.exists()]

    # the parser on its own: the same corpus, what the device's config trusts (the removed key is gone)
    trusted = load_trusted_keys({"ops": ops.public_b64})
    for a in corpus:
        try:
            verify_manifest(a.raw, trusted, spec.device, [spec.group], current_version=spec.current_version,
                            seen_ids=set(), max_model_bytes=spec.max_model_bytes)
            res.parser[a.name] = "ACCEPTED"
        except UpdateError as exc:
            res.parser[a.name] = exc.reason
    for name, raw in controls(spec):
        try:
            verify_manifest(raw, trusted, spec.device, [spec.group], current_version=spec.current_version,
                            seen_ids=set(), max_model_bytes=spec.max_model_bytes)
        except UpdateError as exc:
            res.controls_refused.append(f"{name}: {exc}")

    (work / "broker").mkdir()
    broker = Broker(work / "broker").start()
    devdir = work / spec.device
    devdir.mkdir()
    cfg = write_config(devdir / "agent.yaml", broker.port, v1, "synthetic:160x120@10", device_id=spec.device,
                       updates={"enabled": True, "trusted_keys": {"ops": ops.public_b64},
                                "models_dir": str(devdir / "models"), "groups": [spec.group],
                                "health_window_s": 1, "download_timeout_s": 3})
    col = Collector(broker.host, broker.port, [f"edge/{spec.device}/#"])
    pub = connect(broker.host, broker.port)
    agent = AgentProcess(cfg)

    def publish(topic: str, raw: bytes) -> None:
        pub.publish(topic, raw, qos=1).wait_for_publish(10)

    def payloads(suffix: str, since: int = 0) -> list[dict[str, Any]]:
        return [_json(m.payload) for m in col.messages[since:] if m.topic.endswith(suffix) and m.payload]

    def wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or agent.proc.poll() is not None:
                raise RuntimeError(f"{what}: not seen in {timeout:g} s; agent log:\n{agent.output()[-3000:]}")
            time.sleep(0.05)

    def is_log(p: Path) -> bool:
        return p.suffix == ".log" or p.is_relative_to(work / "broker")

    try:
        wait(lambda: any("manifests" in t.get("updates", {}) for t in payloads("/telemetry")), 60, "agent ready")
        wait(lambda: len(payloads("/cam0/detections")) >= 3, 30, "detections")
        before = tree_snapshot(work, is_log)
        log(f"agent ready; {len(corpus)} cases ({sum(a.mqtt for a in corpus)} over MQTT) x {rounds} round(s)")
        for r in range(rounds):
            cases = corpus if r == 0 else [Attack(f"{a.name}@group", a.category, a.raw, a.expect, "group", a.unit_dup,
                                                  a.mqtt, a.note) for a in corpus]
            res.outcomes += throw_at_agent(publish, col, cases, prefix="edge", device=spec.device, group=spec.group,
                                           agent_log=agent.output)
        res.tree_changes = tree_diff(before, tree_snapshot(work, is_log))
        mark = len(col.messages)
        wait(lambda: len(payloads("/cam0/detections", mark)) >= 3, 15, "detections after the attacks")
        res.served_after = {str(d.get("model", {}).get("version")) for d in payloads("/cam0/detections", mark)}
        status = payloads("/status")
        res.status_after = str(status[-1].get("model", {}).get("version")) if status else None
        mark = len(col.messages)
        wait(lambda: bool(payloads("/telemetry", mark)), 10, "telemetry after the attacks")
        res.telemetry_rejected = int(payloads("/telemetry", mark)[-1]["updates"]["rejected"])
        log(f"{res.published} published: {len(res.accepted)} accepted, {len(res.unreported)} unreported")

        # a signed manifest for v2 whose chunks carry other bytes of the same length
        store = devdir / "models"

        def outside_store(p: Path) -> bool:
            return is_log(p) or p.is_relative_to(store) or p.is_relative_to(devdir / "cache")

        tampered = work / "tampered.onnx"
        data = bytearray(v2.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tampered.write_bytes(bytes(data))
        before_out = tree_snapshot(work, outside_store)
        versions_before = tree_snapshot(store / "versions")
        unsigned = build_manifest(info, name="fixed", version="2", devices=[spec.device], chunk_size=256)
        unsigned["source"]["mqtt"]["transfer_id"] = "tampered-" + info.sha256[:16]
        mark = len(col.messages)
        push_model(pub, sign_manifest(unsigned, spec.key, "ops"), tampered, ready_timeout=5)
        wait(lambda: bool(rejection_events(payloads("/events", mark))), 20, "the tampered transfer's verdict")
        res.tampered_reason = str(rejection_events(payloads("/events", mark))[0].get("reason"))
        res.outside_store_changes = tree_diff(before_out, tree_snapshot(work, outside_store))
        res.tampered_versions_changed = tree_snapshot(store / "versions") != versions_before

        # a genuine update: the channel still works after all that; then the same manifest replayed
        mark = len(col.messages)
        genuine = sign_manifest(build_manifest(info, name="fixed", version="2", devices=[spec.device], chunk_size=256),
                        spec.key, "ops")
        push_model(pub, genuine, v2, ready_timeout=5)
        def genuine_end() -> list[str]:
            recs = (record_for(s, genuine["id"]) for s in payloads("/model/state", mark))
            return [str(r["state"]) for r in recs if r is not None and r.get("state") in ("active", "failed")]

        wait(lambda: bool(genuine_end()), 30, "the genuine update")
        res.control_state = genuine_end()[0]
        raw = json.dumps(genuine).encode()
        replays = [Attack("replay_device_topic", "replay", raw, frozenset({"replayed"})),
                   Attack("replay_group_topic", "replay", raw, frozenset({"replayed"}), topic="group")]
        got = throw_at_agent(publish, col, replays, prefix="edge", device=spec.device, group=spec.group,
                             agent_log=agent.output)
        res.replay_reasons = [o.reason for o in got]
        res.outcomes += got
        res.agent_alive = agent.proc.poll() is None
    finally:
        res.log_tail = agent.output()[-4000:]
        agent.stop()
        pub.disconnect()
        pub.loop_stop()
        col.close()
        broker.stop()
    res.stray_paths += [str(p) for p in STRAY if p.exists() and str(p) not in res.stray_paths]
    return res
