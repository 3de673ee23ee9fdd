"""Ed25519 keys of the update channel: the operator's key pair on disk, the devices' trusted keys.

    fleet keygen -> generate_keypair -> <id>.key (PKCS#8 PEM, 0600) + <id>.pub -> public_b64 into
    each device's `updates.trusted_keys` -> load_trusted_keys -> {key_id: public key} for verify_manifest

A trusted key is given as base64 of the raw 32 bytes or as a PEM file path.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import UpdateError

__all__ = ["KEY_ID_RE", "KeyPair", "generate_keypair", "load_private_key", "load_trusted_keys", "public_key_b64"]

KEY_ID_RE = r"^[A-Za-z0-9_.-]{1,64}$"


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
