"""Operator keys: Ed25519 key pairs for signing manifests."""

from __future__ import annotations

import os
from pathlib import Path

from agent.updates.manifest import KeyPair, generate_keypair, load_private_key

__all__ = ["DEFAULT_KEY_DIR", "KeyPair", "default_key_id", "keygen", "load_private_key"]

DEFAULT_KEY_DIR = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "edge-agent" / "keys"


def default_key_id() -> str:
    """`<user>-<host>`, made safe for the key id pattern."""
    raw = f"{os.environ.get('USER', 'ops')}-{os.uname().nodename.split('.')[0]}"
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in raw)[:64] or "ops"


def keygen(out_dir: Path | None = None, key_id: str | None = None) -> KeyPair:
    """Create `<key_id>.key` (0600) and `<key_id>.pub` in `out_dir`; never overwrites."""
    return generate_keypair(out_dir or DEFAULT_KEY_DIR, key_id or default_key_id())
