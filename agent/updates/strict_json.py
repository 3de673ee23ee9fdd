"""Strict JSON for signed manifests: parse untrusted bytes safely, and the canonical form signed.

    raw bytes -> size cap -> UTF-8 -> bracket-depth scan -> json.loads (no duplicate keys, integers
    only, no NaN) -> dict;   dict without "signature" -> canonical_json -> the bytes a signature covers

Why each rule holds is in agent/updates/manifest.py's docstring (the manifest contract).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.errors import UpdateError

__all__ = ["MAX_DEPTH", "MAX_MANIFEST_BYTES", "canonical_json", "parse_strict_json"]

MAX_MANIFEST_BYTES = 64 * 1024
MAX_DEPTH = 6  # the schema needs 4 (object > source > mqtt > value); a little slack


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
