"""Logging setup: the journal with structured fields under systemd, one-line records elsewhere.

- Under systemd with systemd-python installed and stderr connected to journald (``$JOURNAL_STREAM``
  names stderr's device:inode), records go to the journal through `JournalHandler`; uppercase
  `extra=` keys become journal fields: ``log.info("camera lost", extra={"CAMERA": "cam0"})`` is
  found with ``journalctl -u edge-agent CAMERA=cam0``.
- Under journald without systemd-python: one line per record on stderr with a ``<N>`` syslog
  priority prefix (journald turns it into PRIORITY=) and no timestamp (journald adds its own).
- Elsewhere (a terminal, a container log): ``time LEVEL logger: message KEY=value``.

Every handler carries `SecretFilter`: values of password-like keys, URL passwords, bearer tokens
and PEM private-key blocks are masked before a record is written anywhere.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from typing import Any, TextIO

__all__ = ["SecretFilter", "journal_stream_matches", "mask_secrets", "setup_logging"]

MASK = "***"

_KEYS = (r"pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key"
         r"|client[_-]?secret|credentials?|auth")
_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys (RSA / EC / OPENSSH / ENCRYPTED / plain PKCS#8), whole block.
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END \1-----|$)", re.S),
     r"-----BEGIN \1----- " + MASK + r" -----END \1-----"),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@", re.I), r"\1" + MASK + "@"),
    # Authorization: Bearer <token>
    (re.compile(r"(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), r"\1" + MASK),
]


# key=value, key: value, "key": "value", 'key': 'value' (config dumps, query strings, command lines)
_KEY_VALUE = re.compile(r"""(["']?)([A-Za-z_][\w.-]*)\1(\s*[=:]\s*)"""
                        r"""("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^\s,;&'"}\]]+)""")
_SECRET_KEY = re.compile(r"(?:" + _KEYS + r")(?![a-z])", re.I)
_NOT_SECRET_SUFFIX = ("_file", "_path", "_dir", "_env", "_id")


def _mask_value(m: re.Match[str]) -> str:
    quote, key, sep, value = m.groups()
    k = key.lower()
    if not _SECRET_KEY.search(k) or k.endswith(_NOT_SECRET_SUFFIX) or value == MASK:
        return m.group(0)
    if value[:1] in "\"'" and len(value) >= 2:
        return f"{quote}{key}{quote}{sep}{value[0]}{MASK}{value[0]}"
    return f"{quote}{key}{quote}{sep}{MASK}"


def mask_secrets(text: str) -> str:
    """`text` with the values of known secret patterns replaced by ``***``."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return _KEY_VALUE.sub(_mask_value, text)


class SecretFilter(logging.Filter):
    """Masks secrets in the rendered message, the exception text and string `extra=` fields."""

    _fmt = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format: let the handler report it as logging does
            return True
        masked = mask_secrets(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._fmt.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        for key, value in list(vars(record).items()):
            if _is_field(key) and isinstance(value, str):
                setattr(record, key, mask_secrets(value))
        return True


_FIELD = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _is_field(name: str) -> bool:
    """A journal field name given through `extra=` (uppercase, not one of journald's own)."""
    return bool(_FIELD.match(name)) and not name.startswith("_")


# logging level -> syslog priority (journald reads a "<N>" prefix on stderr lines)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class PlainFormatter(logging.Formatter):
    """``[time ]LEVEL logger: message KEY=value``; under journald: ``<prio>LEVEL logger: message``, one line."""

    def __init__(self, journald: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if journald
                         else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if _is_field(k))
        if fields:
            first, nl, rest = text.partition("\n")
            text = f"{first} {fields}{nl}{rest}"
        if self.journald:
            # journald makes one entry per line: keep a record (and its traceback) in one entry.
            text = f"<{_priority(record.levelno)}>" + text.replace("\n", " | ")
        return text


def journal_stream_matches(stream: TextIO | None = None, environ: Any = None) -> bool:
    """True when `stream` (default stderr) is the journald stream named by ``$JOURNAL_STREAM``."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev or not ino:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def _journal_handler(identifier: str, fields: dict[str, str]) -> logging.Handler | None:
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    cls = getattr(journal, "JournalHandler", None)
    if cls is None:
        return None
    handler: logging.Handler = cls(SYSLOG_IDENTIFIER=identifier, **fields)
    return handler


def setup_logging(level: str = "info", *, stream: TextIO | None = None, identifier: str = "edge-agent",
                  fields: dict[str, str] | None = None, journal: bool | None = None) -> str:
    """Configure the root logger once (calling again replaces what it installed); returns the mode.

    Modes: "journal" (JournalHandler), "journald-stderr" (prefixed lines on a journald stderr) or
    "stderr". `fields` are journal fields added to every record (e.g. DEVICE_ID). `journal` forces
    (True) or forbids (False) the JournalHandler; None decides by the environment.
    """
    stream = sys.stderr if stream is None else stream
    fields = {k.upper(): str(v) for k, v in (fields or {}).items()}
    under_journald = journal_stream_matches(stream)
    handler: logging.Handler | None = None
    mode = "stderr"
    if journal is True or (journal is None and under_journald):
        handler = _journal_handler(identifier, fields)
        if handler is not None:
            mode = "journal"
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(PlainFormatter(journald=under_journald))
        mode = "journald-stderr" if under_journald else "stderr"
        if fields:
            handler.addFilter(_StaticFields(fields))
    handler.addFilter(SecretFilter())
    handler._edge_agent = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_edge_agent", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return mode


class _StaticFields(logging.Filter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True
