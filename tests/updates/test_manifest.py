from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import UpdateError
from agent.updates.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    canonical_json,
    compare_versions,
    generate_keypair,
    load_private_key,
    load_trusted_keys,
    sign_manifest,
    verify_manifest,
)
from tests.updates.helpers import NOW, make_manifest, signed_bytes

KEY = Ed25519PrivateKey.generate()
KEY2 = Ed25519PrivateKey.generate()
TRUSTED = {"k1": KEY.public_key()}


def verify(raw: bytes, **kw: Any) -> Manifest:
    args: dict[str, Any] = {"trusted": TRUSTED, "device_id": "dev1", "groups": ["line-3"],
                            "current_version": "1", "seen_ids": set(), "now": NOW + 10}
    args.update(kw)
    return verify_manifest(raw, **args)


def reason(raw: bytes, **kw: Any) -> str:
    with pytest.raises(UpdateError) as ei:
        verify(raw, **kw)
    return ei.value.reason


def test_valid_manifest_verifies() -> None:
    m = verify(signed_bytes(make_manifest(), KEY))
    assert (m.model.name, m.model.version, m.key_id) == ("widgets", "2", "k1")
    assert m.source.url and m.source.mqtt is None


def test_signature_covers_meaning_not_whitespace() -> None:
    doc = json.loads(signed_bytes(make_manifest(), KEY))
    pretty = json.dumps(doc, indent=4, ensure_ascii=True).encode()
    assert verify(pretty).id == doc["id"]
    assert canonical_json(doc) == canonical_json(json.loads(pretty))
    assert b" " not in canonical_json({"a": [1, 2], "b": {"c": "d"}})


def test_bad_signature_on_any_change() -> None:
    doc = json.loads(signed_bytes(make_manifest(), KEY))
    for mutate in (lambda d: d["model"].__setitem__("version", "3"),
                   lambda d: d["targets"]["devices"].append("dev2"),
                   lambda d: d.__setitem__("expires_at", d["expires_at"] + 1),
                   lambda d: d["model"].__setitem__("sha256", "f" * 64)):
        d = json.loads(json.dumps(doc))
        mutate(d)
        assert reason(json.dumps(d).encode()) == "bad_signature"
    d = dict(doc, signature=base64.b64encode(b"\0" * 64).decode())
    assert reason(json.dumps(d).encode()) == "bad_signature"
    d = dict(doc, signature="not base64!!")
    assert reason(json.dumps(d).encode()) == "bad_signature"


def test_signed_with_an_untrusted_key_is_bad_signature_or_unknown() -> None:
    assert reason(signed_bytes(make_manifest(), KEY2, "k1")) == "bad_signature"  # claims k1, signed by another
    assert reason(signed_bytes(make_manifest(), KEY2, "k2")) == "unknown_key"


def test_missing_signature() -> None:
    m = make_manifest()
    m["key_id"] = "k1"
    assert reason(json.dumps(m).encode()) == "missing_signature"
    assert reason(json.dumps(dict(m, signature="")).encode()) == "missing_signature"


def test_key_rotation_and_removed_key() -> None:
    both = {"k1": KEY.public_key(), "k2": KEY2.public_key()}
    old = signed_bytes(make_manifest(manifest_id="old-key-0001"), KEY, "k1")
    new = signed_bytes(make_manifest(manifest_id="new-key-0001"), KEY2, "k2")
    assert verify(old, trusted=both).key_id == "k1"
    assert verify(new, trusted=both).key_id == "k2"
    rotated = {"k2": KEY2.public_key()}  # k1 removed from the config
    assert reason(old, trusted=rotated) == "unknown_key"
    assert verify(new, trusted=rotated).key_id == "k2"


def test_time_window_and_clock_skew() -> None:
    raw = signed_bytes(make_manifest(now=NOW, ttl=600), KEY)
    assert reason(raw, now=NOW + 600 + 301) == "expired"
    assert verify(raw, now=NOW + 600 + 299)  # within the skew
    assert reason(raw, now=NOW - 301) == "not_yet_valid"
    assert verify(raw, now=NOW - 299)
    assert reason(raw, now=NOW + 700, clock_skew_s=0) == "expired"
    with pytest.raises(UpdateError, match="clock looks unset") as ei:
        verify(raw, now=1000.0)
    assert ei.value.reason == "not_yet_valid"


def test_targets_and_replay_to_another_device_or_group() -> None:
    for_dev1 = signed_bytes(make_manifest(devices=["dev1"]), KEY)
    assert reason(for_dev1, device_id="dev2") == "not_for_this_device"
    for_group = signed_bytes(make_manifest(devices=[], groups=["line-3"]), KEY)
    assert verify(for_group, device_id="devX", groups=["line-3"]).targets.groups == ["line-3"]
    assert reason(for_group, device_id="devX", groups=["line-4"]) == "not_for_this_device"
    assert reason(for_group, device_id="devX", groups=[]) == "not_for_this_device"


def test_replayed_id() -> None:
    raw = signed_bytes(make_manifest(manifest_id="seen-before-1"), KEY)
    assert reason(raw, seen_ids={"seen-before-1"}) == "replayed"


def test_not_newer_and_rollback() -> None:
    for cur in ("2", "3", "2.0", "10"):
        assert reason(signed_bytes(make_manifest(version="2"), KEY), current_version=cur) == "not_newer"
    assert verify(signed_bytes(make_manifest(version="10"), KEY), current_version="9").model.version == "10"
    assert verify(signed_bytes(make_manifest(version="1.10"), KEY), current_version="1.9")
    assert reason(signed_bytes(make_manifest(version="2"), KEY), current_version="demo-a") == "not_newer"
    # rollback: allowed only when the signed manifest says so
    rb = signed_bytes(make_manifest(version="1", rollback=True), KEY)
    assert verify(rb, current_version="5").rollback is True
    forged = json.loads(signed_bytes(make_manifest(version="1"), KEY))
    forged["rollback"] = True
    assert reason(json.dumps(forged).encode(), current_version="5") == "bad_signature"
    assert verify(signed_bytes(make_manifest(version="1"), KEY), current_version=None)


def test_too_large() -> None:
    m = make_manifest(labels=[f"label-number-{i:05d}" for i in range(4096)])
    raw = signed_bytes(m, KEY)
    assert len(raw) > MAX_MANIFEST_BYTES
    assert reason(raw) == "too_large"
    big = signed_bytes(make_manifest(b"x" * 5000), KEY)
    assert reason(big, max_model_bytes=4999) == "too_large"
    assert verify(big, max_model_bytes=5000)


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1.5}', b'{"a": 1e3}',
    b'{"a": 1' + b"0" * 30 + b"}", b"[" * 5000 + b"]" * 5000, b'{"a":' * 100 + b"1" + b"}" * 100,
    b'{"a": "\\ud800"}',
])
def test_malformed_json(raw: bytes) -> None:
    r = reason(raw)
    assert r in ("malformed", "missing_signature"), r


def test_duplicate_keys_rejected_even_if_signed() -> None:
    doc = json.loads(signed_bytes(make_manifest(), KEY))
    text = json.dumps(doc)
    dup = text.replace('"rollback": false', '"rollback": false, "rollback": true')
    assert dup != text
    assert reason(dup.encode()) == "malformed"


def test_schema_errors_are_malformed() -> None:
    for mutate in (lambda m: m.__setitem__("extra", 1),
                   lambda m: m.__setitem__("schema", 2),
                   lambda m: m["model"].__setitem__("sha256", "A" * 64),
                   lambda m: m["model"].__setitem__("sha256", "g" * 64),
                   lambda m: m["model"].__setitem__("size", True),
                   lambda m: m["model"].__setitem__("decoder", "auto"),
                   lambda m: m.__setitem__("source", {"url": "ftp://x/y"}),
                   lambda m: m.__setitem__("source", {"url": "https://a/b", "mqtt": {
                       "transfer_id": "t", "chunk_size": 1024, "chunks": 1}}),
                   lambda m: m.__setitem__("targets", {"devices": [], "groups": []}),
                   lambda m: m.__setitem__("expires_at", m["issued_at"]),
                   lambda m: m["model"].__setitem__("labels", [])):
        m = make_manifest()
        mutate(m)
        assert reason(signed_bytes(m, KEY)) == "malformed", m


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "a..b", ".hidden", "a\x00b", "a\\b", "", "x" * 65, "é"])
def test_traversal_names_rejected(name: str) -> None:
    assert reason(signed_bytes(make_manifest(name=name), KEY)) == "malformed"


@pytest.mark.parametrize("version", ["../1", "1/2", "01", "1.", ".1", "1..2", "v2", "2-beta", "1.2.3.4.5"])
def test_bad_versions_rejected(version: str) -> None:
    assert reason(signed_bytes(make_manifest(version=version), KEY)) == "malformed"


def test_mqtt_source_chunk_count_must_match() -> None:
    m = make_manifest(b"y" * 3000, mqtt_chunk=1024)
    assert verify(signed_bytes(m, KEY)).source.mqtt is not None
    m["source"]["mqtt"]["chunks"] = 4
    assert reason(signed_bytes(m, KEY)) == "malformed"
    m = make_manifest(b"y" * 3000, mqtt_chunk=1024)
    m["source"]["mqtt"]["transfer_id"] = "../../etc"
    assert reason(signed_bytes(m, KEY)) == "malformed"


def test_version_order() -> None:
    assert compare_versions("2", "10") == -1
    assert compare_versions("1.10", "1.9") == 1
    assert compare_versions("1.0", "1") == 0
    assert compare_versions("1.0.1", "1") == 1
    assert compare_versions("a", "1") is None


def test_keys_roundtrip(tmp_path: Path) -> None:
    kp = generate_keypair(tmp_path / "keys", "ops-1")
    assert stat.S_IMODE(os.stat(kp.private_path).st_mode) == 0o600
    with pytest.raises(UpdateError):
        generate_keypair(tmp_path / "keys", "ops-1")  # never overwrites
    with pytest.raises(UpdateError):
        generate_keypair(tmp_path / "keys", "../evil")
    priv = load_private_key(kp.private_path)
    trusted = load_trusted_keys({"b64": kp.public_b64, "pem": str(kp.public_path)})
    raw = signed_bytes(make_manifest(), priv, "b64")
    assert verify(raw, trusted=trusted).key_id == "b64"
    raw = signed_bytes(make_manifest(), priv, "pem")
    assert verify(raw, trusted=trusted).key_id == "pem"
    pub_raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(kp.public_b64) == pub_raw
    for bad in ("AAAA", str(tmp_path / "missing.pem"), str(kp.private_path)):
        with pytest.raises(UpdateError) as ei:
            load_trusted_keys({"x": bad})
        assert ei.value.reason == "bad_key"


def test_sign_manifest_replaces_old_signature() -> None:
    s1 = sign_manifest(make_manifest(), KEY, "k1")
    s2 = sign_manifest(s1, KEY, "k1")
    assert s1 == s2  # Ed25519 is deterministic and the old signature is not signed over


# ---- fuzzing: the parser raises UpdateError or returns a Manifest, nothing else -------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
VALID = signed_bytes(make_manifest(), KEY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    try:
        verify(raw)
    except UpdateError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_valid_manifest(pos: int, patch: bytes) -> None:
    raw = VALID[:pos] + patch + VALID[pos + len(patch):]
    try:
        m = verify(raw)
    except UpdateError:
        return
    assert m.id == "m-0001-abcdef"  # only meaning-preserving edits (whitespace) can still verify


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema", "id", "model", "source", "targets", "issued_at", "expires_at",
                                        "rollback", "key_id", "signature", "x"]), json_values, max_size=10))
def test_fuzz_structures_signed(doc: dict[str, Any]) -> None:
    """Signed (so past the signature check) but arbitrary structure: the schema must reject it cleanly."""
    try:
        raw = json.dumps(sign_manifest(doc, KEY, "k1")).encode()
    except (UpdateError, ValueError):
        return
    try:
        verify(raw)
    except UpdateError:
        pass
