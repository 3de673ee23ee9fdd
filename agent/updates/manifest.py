"""Signed model-update manifests (contract in DESIGN.md, "Model updates").

Wire format (JSON object, every key required unless marked optional)::

    {
      "schema": 1,
      "id": "3f9c0e5b6a0d4b7e9d1c2a8f7e6d5c4b",        # nonce / manifest id, [A-Za-z0-9_-]{8,64}
      "model": {
        "name": "widgets", "version": "4",              # safe name; dotted numeric version
        "sha256": "<64 lowercase hex>", "size": 123456,
        "input": {"width": 640, "height": 640},
        "labels": ["scratch", "dent"],
        "decoder": "yolov8"                             # yolov8 | yolov5 | end2end
      },
      "source": {"url": "https://host/widgets-4.onnx"}  # http://, https:// or file://
             |  {"mqtt": {"transfer_id": "...", "chunk_size": 262144, "chunks": 1}},
      "targets": {"devices": ["orin-01"], "groups": ["line-3"]},   # at least one entry in all
      "issued_at": 1763812345, "expires_at": 1763815945,           # Unix seconds, integers
      "rollback": false,
      "key_id": "ops-2026",
      "signature": "<base64 of the 64-byte Ed25519 signature>"
    }

Decisions (documented in the README changelog by the lead):

* Timestamps are integer Unix seconds (UTC). Integers only, so the canonical form is the same in
  every language; ISO strings would need a canonical string form of their own.
* Numbers: the manifest holds integers only. Floats, NaN and Infinity are rejected while parsing
  (there is no float field, and float canonicalisation differs between JSON libraries). Integers
  longer than 18 digits are rejected before Python converts them.
* Canonical form = ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
  encoded as UTF-8, over the object without its ``signature`` key. The device re-canonicalises the
  parsed object, so a signature covers the manifest's meaning, not its whitespace. Duplicate keys
  are rejected (they would make the meaning ambiguous), as are lone surrogates in strings.
* Size cap 64 KiB before parsing; nesting deeper than the schema's (4 levels) is rejected by a
  cheap bracket scan before ``json.loads`` sees the text.
* Version order: versions are dotted numeric (``4``, ``1.2.0``; no leading zeros), compared as
  integer tuples with trailing zeros ignored (``1.0`` == ``1``). A current version that is not
  dotted numeric (a bundled "demo-a" say) cannot be ordered: an update over it is refused as
  ``not_newer`` unless the manifest is a signed ``rollback``. The comparison ignores the model
  name on purpose: a new model family continues the version sequence, so an old manifest of
  another name cannot downgrade a device.
* Clock skew: ``issued_at - skew <= now <= expires_at + skew`` (default skew 300 s). A device
  clock before 2024-01-01 is taken as unset (no RTC, no NTP yet) and every manifest is refused as
  ``not_yet_valid`` with that said in the detail, rather than trusting a bogus clock.
* Replay: a manifest id already processed is ``replayed``; one aimed at another device or group is
  ``not_for_this_device``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from agent.errors import UpdateError

__all__ = [
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "KeyPair",
    "Manifest",
    "canonical_json",
    "compare_versions",
    "generate_keypair",
    "load_private_key",
    "load_trusted_keys",
    "parse_strict_json",
    "parse_version",
    "sign_manifest",
    "verify_manifest",
]

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_DEPTH = 6  # the schema needs 4 (object > source > mqtt > value); a little slack
DEFAULT_CLOCK_SKEW_S = 300
CLOCK_UNSET_BEFORE = 1704067200  # 2024-01-01T00:00:00Z
MAX_CHUNKS = 1_000_000

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', no NUL, no leading dot; '..' checked below
VERSION_RE = r"^(?:0|[1-9][0-9]{0,8})(?:\.(?:0|[1-9][0-9]{0,8})){0,3}$"
ID_RE = r"^[A-Za-z0-9_-]{8,64}$"
DEVICE_RE = r"^[A-Za-z0-9_-]{1,64}$"
KEY_ID_RE = r"^[A-Za-z0-9_.-]{1,64}$"
TRANSFER_RE = r"^[A-Za-z0-9_-]{1,64}$"
SHA256_RE = r"^[0-9a-f]{64}$"
URL_RE = r"^(?:https?://[^\s/?#]+|file://)[^\s\x00-\x1f\x7f]*$"
LABEL_RE = r"^[^\x00-\x1f\x7f]{1,128}$"



def _no_dotdot(v: str) -> str:
    if ".." in v:
        raise ValueError("'..' is not allowed in a name")
    return v


def _not_bool(v: object) -> object:
    # Literal[1] alone accepts `true` (True == 1 in Python), even in strict mode
    if isinstance(v, bool):
        raise ValueError("must be the integer 1, not a boolean")
    return v


Name = Annotated[str, Field(pattern=NAME_RE), AfterValidator(_no_dotdot)]
DeviceId = Annotated[str, Field(pattern=DEVICE_RE)]
Label = Annotated[str, Field(pattern=LABEL_RE)]
Dim = Annotated[StrictInt, Field(ge=16, le=8192)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputSize(_Strict):
    width: Dim
    height: Dim


class ModelSpec(_Strict):
    name: Name
    version: Annotated[str, Field(pattern=VERSION_RE)]
    sha256: Annotated[str, Field(pattern=SHA256_RE)]
    size: Annotated[StrictInt, Field(gt=0, le=1 << 40)]
    input: InputSize
    labels: Annotated[list[Label], Field(min_length=1, max_length=4096)]
    decoder: Literal["yolov8", "yolov5", "end2end"]


class MqttSource(_Strict):
    transfer_id: Annotated[str, Field(pattern=TRANSFER_RE)]
    chunk_size: Annotated[StrictInt, Field(ge=256, le=8 * 1024 * 1024)]
    chunks: Annotated[StrictInt, Field(ge=1, le=MAX_CHUNKS)]


class Source(_Strict):
    url: Annotated[str, Field(max_length=2048, pattern=URL_RE)] | None = None
    mqtt: MqttSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.url is None) == (self.mqtt is None):
            raise ValueError("source needs exactly one of 'url' and 'mqtt'")
        return self


class Targets(_Strict):
    devices: Annotated[list[DeviceId], Field(max_length=10000)] = []
    groups: Annotated[list[DeviceId], Field(max_length=1000)] = []

    @model_validator(mode="after")
    def _not_empty(self) -> Targets:
        if not self.devices and not self.groups:
            raise ValueError("targets must name at least one device or group")
        return self


class Manifest(_Strict):
    """A parsed manifest. Built only by `verify_manifest` (or `Manifest.parse_unverified` in tools)."""

    schema_: Annotated[Literal[1], BeforeValidator(_not_bool)] = Field(alias="schema")
    id: Annotated[str, Field(pattern=ID_RE)]
    model: ModelSpec
    source: Source
    targets: Targets
    issued_at: Annotated[StrictInt, Field(ge=0, le=1 << 40)]
    expires_at: Annotated[StrictInt, Field(ge=0, le=1 << 40)]
    rollback: StrictBool = False
    key_id: Annotated[str, Field(pattern=KEY_ID_RE)]
    signature: Annotated[str, Field(min_length=1, max_length=200)]

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        mq = self.source.mqtt
        if mq is not None and mq.chunks != math.ceil(self.model.size / mq.chunk_size):
            raise ValueError(f"source.mqtt.chunks must be ceil(size / chunk_size) = "
                             f"{math.ceil(self.model.size / mq.chunk_size)}, got {mq.chunks}")
        return self

    @property
    def label(self) -> str:
        return f"{self.model.name}-{self.model.version}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest as signed (with its signature), ready for `json.dumps`."""
        return self.model_dump(by_alias=True, exclude_none=True)

    @classmethod
    def parse_unverified(cls, raw: bytes | bytearray | str) -> Manifest:
        """Strict parse and schema check, without any signature check (operator tools, tests)."""
        data = parse_strict_json(raw)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UpdateError("malformed", _short_errors(exc)) from None


# ---- strict JSON ------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise UpdateError("malformed", f"duplicate key {k!r:.40}")
        out[k] = v
    return out


def _reject_float(s: str) -> Any:
    raise UpdateError("malformed", f"non-integer number {s[:20]!r} (the manifest holds integers only)")


def _reject_constant(s: str) -> Any:
    raise UpdateError("malformed", f"{s} is not JSON")


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > 18:
        raise UpdateError("malformed", f"integer too long ({len(s)} digits)")
    return int(s)


def _check_depth(text: str, limit: int) -> None:
    depth = 0
    in_str = False
    esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise UpdateError("malformed", f"nesting deeper than {limit}")
        elif ch in "]}":
            depth -= 1


def parse_strict_json(raw: bytes | bytearray | str, max_bytes: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """Parse a JSON object strictly: size cap, UTF-8, depth cap, no duplicate keys, integers only."""
    if len(raw) > max_bytes:
        raise UpdateError("too_large", f"manifest of {len(raw)} bytes exceeds {max_bytes}")
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UpdateError("malformed", f"not UTF-8: {exc.reason}") from None
    else:
        text = raw
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise UpdateError("too_large", f"manifest exceeds {max_bytes} bytes")
    _check_depth(text, MAX_DEPTH)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_reject_float,
                          parse_constant=_reject_constant, parse_int=_parse_int)
    except UpdateError:
        raise
    except (ValueError, RecursionError) as exc:
        raise UpdateError("malformed", f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise UpdateError("malformed", f"expected a JSON object, got {type(data).__name__}")
    return data


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not \\u escapes); `signature` left out."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise UpdateError("malformed", f"cannot canonicalise: {str(exc)[:120]}") from None


def _short_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


# ---- versions -----------------------------------------------------------------------------------

_DOTTED = re.compile(r"^[0-9]{1,18}(?:\.[0-9]{1,18}){0,7}$")


def parse_version(v: str) -> tuple[int, ...] | None:
    """Dotted numeric version -> int tuple without trailing zeros; None when not orderable."""
    if not isinstance(v, str) or not _DOTTED.match(v):
        return None
    parts = [int(p) for p in v.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as a <, ==, > b; None when either is not dotted numeric."""
    pa, pb = parse_version(a), parse_version(b)
    if pa is None or pb is None:
        return None
    return (pa > pb) - (pa < pb)


# ---- keys -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private_path: Path
    public_path: Path
    public_b64: str  # for `updates.trusted_keys` in the device config


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(directory: Path | str, key_id: str) -> KeyPair:
    """Write `<key_id>.key` (PKCS#8 PEM, mode 0600) and `<key_id>.pub` (PEM); never overwrites."""
    if not re.match(KEY_ID_RE, key_id) or key_id.startswith("."):
        raise UpdateError("bad_key", f"unsafe key id {key_id!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = d / f"{key_id}.key", d / f"{key_id}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise UpdateError("bad_key", f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    _write_private(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    pub = key.public_key()
    # owner-only like everything the tools write (its base64 form is printed for the devices' config)
    _write_private(pub_path, pub.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(key_id, priv_path, pub_path, public_key_b64(pub))


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UpdateError("bad_key", f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UpdateError("bad_key", f"{path} is not an Ed25519 private key")
    return key


def _load_public(value: str) -> Ed25519PublicKey:
    text = value.strip()
    # base64 of 32 bytes is exactly 44 characters ending in '='; anything else is taken as a path
    # ('/' is a base64 character, so it cannot tell the two apart on its own)
    if len(text) == 44 and text.endswith("=") and not Path(text).exists():
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32:
            return Ed25519PublicKey.from_public_bytes(raw)
        raise UpdateError("bad_key", "expected base64 of a raw 32-byte Ed25519 public key or a PEM file path")
    try:
        data = Path(text).read_bytes()
    except OSError as exc:
        raise UpdateError("bad_key", f"cannot read {text}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise UpdateError("bad_key", f"{text}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UpdateError("bad_key", f"{text}: not an Ed25519 public key")
    return key


def load_trusted_keys(keys: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """`updates.trusted_keys` -> {key_id: public key}; a bad entry raises UpdateError("bad_key")."""
    out: dict[str, Ed25519PublicKey] = {}
    for key_id, value in keys.items():
        try:
            out[key_id] = _load_public(value)
        except UpdateError as exc:
            raise UpdateError("bad_key", f"trusted key {key_id!r}: {exc.detail}") from None
    return out


# ---- sign / verify ----------------------------------------------------------------------------

def sign_manifest(manifest: Mapping[str, Any], private_key: Ed25519PrivateKey, key_id: str) -> dict[str, Any]:
    """A copy of `manifest` with `key_id` set and `signature` over its canonical form."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    body["key_id"] = key_id
    sig = private_key.sign(canonical_json(body))
    body["signature"] = base64.b64encode(sig).decode("ascii")
    return body


def verify_manifest(
    raw: bytes | bytearray | str,
    trusted: Mapping[str, Ed25519PublicKey],
    device_id: str,
    groups: Iterable[str] = (),
    current_version: str | None = None,
    seen_ids: Iterable[str] | None = None,
    now: float | None = None,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    max_model_bytes: int | None = None,
) -> Manifest:
    """Parse, authenticate and authorise one manifest, or raise UpdateError(reason).

    Order: too_large -> malformed (JSON) -> missing_signature -> unknown_key -> bad_signature ->
    malformed (schema) -> not_yet_valid / expired -> not_for_this_device -> replayed -> too_large
    (model size) -> not_newer (unless a signed rollback). Nothing unauthenticated reaches the schema.
    """
    data = parse_strict_json(raw)
    sig_b64 = data.get("signature")
    if sig_b64 is None or sig_b64 == "":
        raise UpdateError("missing_signature", "the manifest has no signature")
    if not isinstance(sig_b64, str):
        raise UpdateError("malformed", "signature must be a base64 string")
    key_id = data.get("key_id")
    if not isinstance(key_id, str):
        raise UpdateError("malformed" if key_id is not None else "unknown_key", "key_id missing or not a string")
    key = trusted.get(key_id)
    if key is None:
        raise UpdateError("unknown_key", f"key {key_id[:64]!r} is not trusted by this device")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        raise UpdateError("bad_signature", "signature is not base64") from None
    if len(sig) != 64:
        raise UpdateError("bad_signature", f"signature has {len(sig)} bytes, expected 64")
    try:
        key.verify(sig, canonical_json(data))
    except InvalidSignature:
        raise UpdateError("bad_signature", f"signature does not verify with key {key_id!r}") from None
    try:
        m = Manifest.model_validate(data)
    except ValidationError as exc:
        raise UpdateError("malformed", _short_errors(exc)) from None

    t = time.time() if now is None else now
    if t < CLOCK_UNSET_BEFORE:
        raise UpdateError("not_yet_valid", f"device clock looks unset ({int(t)}); updates wait for a set clock")
    if t + clock_skew_s < m.issued_at:
        raise UpdateError("not_yet_valid", f"issued at {m.issued_at}, now {int(t)} (skew {clock_skew_s:g} s)")
    if t - clock_skew_s > m.expires_at:
        raise UpdateError("expired", f"expired at {m.expires_at}, now {int(t)}")
    my_groups = set(groups)
    if device_id not in m.targets.devices and not my_groups.intersection(m.targets.groups):
        raise UpdateError("not_for_this_device", f"targets {m.targets.devices[:5]} / {m.targets.groups[:5]}")
    if seen_ids is not None and m.id in seen_ids:
        raise UpdateError("replayed", f"manifest {m.id} was already processed")
    if max_model_bytes is not None and m.model.size > max_model_bytes:
        raise UpdateError("too_large", f"model of {m.model.size} bytes exceeds the cap of {max_model_bytes}")
    if current_version is not None and not m.rollback:
        cmp = compare_versions(m.model.version, current_version)
        if cmp is None:
            raise UpdateError("not_newer", f"cannot order {m.model.version!r} after {current_version!r}; "
                                           "push it as a signed rollback")
        if cmp <= 0:
            raise UpdateError("not_newer", f"version {m.model.version} is not newer than {current_version}")
    return m
