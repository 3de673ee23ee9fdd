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

Here: the schema, version order, signing and `verify_manifest`. Beside it: `strict_json` (parsing
untrusted bytes, the canonical form) and `signing` (key pairs, trusted keys).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
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

# Strict JSON and the keys live in their own modules; their public names are re-exported here,
# where the fleet tools, the tests and the agent import them from.
from agent.updates.signing import (
    KEY_ID_RE,
    KeyPair,
    generate_keypair,
    load_private_key,
    load_trusted_keys,
    public_key_b64,
)
from agent.updates.strict_json import MAX_MANIFEST_BYTES, canonical_json, parse_strict_json

__all__ = [
    "KEY_ID_RE",
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
    "public_key_b64",
    "sign_manifest",
    "verify_manifest",
]

SCHEMA_VERSION = 1
DEFAULT_CLOCK_SKEW_S = 300
CLOCK_UNSET_BEFORE = 1704067200  # 2024-01-01T00:00:00Z
MAX_CHUNKS = 1_000_000

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', no NUL, no leading dot; '..' checked below
VERSION_RE = r"^(?:0|[1-9][0-9]{0,8})(?:\.(?:0|[1-9][0-9]{0,8})){0,3}$"
ID_RE = r"^[A-Za-z0-9_-]{8,64}$"
DEVICE_RE = r"^[A-Za-z0-9_-]{1,64}$"
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
