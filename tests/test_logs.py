"""Logging: plain / journald-stderr / journal modes, structured fields, and secrets never written."""

from __future__ import annotations

import importlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import journal_stream_matches, mask_secrets, setup_logging

PEM = """-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oVBwrSzKNOYloAoGCCqGSM49
AwEHoUQDQgAE7d1zYj8iHKXwz6m1Jp3dlz0bG6dnVnCK2g2xA0Cw3vEXAMPLE==
-----END EC PRIVATE KEY-----"""


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize(("text", "expected"), [
    ("connect password=hunter2 user=bob", "connect password=*** user=bob"),
    ('cfg {"password": "s3cr\\"et", "host": "h"}', 'cfg {"password": "***", "host": "h"}'),
    ("{'api_key': 'abc', 'x': 1}", "{'api_key': '***', 'x': 1}"),
    ("MQTT_PASSWORD='a b' next", "MQTT_PASSWORD='***' next"),
    ("GET /m?token=abc123&x=1", "GET /m?token=***&x=1"),
    ("broker mqtts://bob:pa55@host:8883", "broker mqtts://bob:***@host:8883"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9", "Authorization: Bearer ***"),
    (f"key {PEM} end", "key -----BEGIN EC PRIVATE KEY----- *** -----END EC PRIVATE KEY----- end"),
    # not secrets: left alone
    ("fps=30 author=x tokens=5 password_file=/etc/edge-agent/mqtt_password", None),
    ("at 12:30:45 cam0: streaming", None),
])
def test_mask_secrets(text: str, expected: str | None) -> None:
    assert mask_secrets(text) == (text if expected is None else expected)


def _capture(monkeypatch: pytest.MonkeyPatch, **kw: object) -> tuple[io.StringIO, str]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    buf = io.StringIO()
    mode = setup_logging("debug", stream=buf, **kw)  # type: ignore[arg-type]
    return buf, mode


def test_plain_stderr_line_with_fields_and_masking(monkeypatch: pytest.MonkeyPatch) -> None:
    buf, mode = _capture(monkeypatch)
    assert mode == "stderr"
    log = logging.getLogger("agent.test")
    log.info("mqtt connect as %s password=%s", "bob", "hunter2", extra={"CAMERA": "cam0", "MODEL_VERSION": "3"})
    line = buf.getvalue().strip()
    assert line.endswith("INFO agent.test: mqtt connect as bob password=*** CAMERA=cam0 MODEL_VERSION=3")
    assert line[:4].isdigit()  # a terminal gets a timestamp
    assert "hunter2" not in buf.getvalue()


def test_exception_text_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    buf, _ = _capture(monkeypatch)
    try:
        raise ValueError(f"bad key material {PEM}")
    except ValueError:
        logging.getLogger("agent.test").exception("load failed, token=%s", "t0psecret")
    out = buf.getvalue()
    assert "t0psecret" not in out and "MHcCAQEE" not in out
    assert "Traceback" in out and "ValueError" in out


def test_setup_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    buf, _ = _capture(monkeypatch)
    buf2, _ = _capture(monkeypatch)
    logging.getLogger("agent.test").warning("once")
    assert buf.getvalue() == ""
    assert buf2.getvalue().count("once") == 1


def test_journal_stream_detection(tmp_path: Path) -> None:
    f = (tmp_path / "stderr").open("w")
    st = os.fstat(f.fileno())
    assert journal_stream_matches(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journal_stream_matches(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not journal_stream_matches(f, {})
    assert not journal_stream_matches(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no file descriptor
    f.close()


def test_under_journald_lines_carry_priority_and_no_timestamp(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    f = (tmp_path / "stderr").open("w+")
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    mode = setup_logging("info", stream=f, journal=False)  # the stderr path, whether systemd-python exists or not
    assert mode == "journald-stderr"
    log = logging.getLogger("agent.test")
    log.error("engine failed\nsecond line", extra={"CAMERA": "cam0"})
    log.info("ready")
    f.flush()
    lines = Path(f.name).read_text().splitlines()
    assert lines == ["<3>ERROR agent.test: engine failed CAMERA=cam0 | second line", "<6>INFO agent.test: ready"]
    f.close()


def test_journal_handler_when_systemd_python_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        pytest.skip("systemd-python is not installed (extra `systemd`): the JournalHandler path is not exercised")
    assert hasattr(journal, "JournalHandler")
    sent: list[dict[str, object]] = []
    mode = setup_logging("info", journal=True, fields={"device_id": "dev1"})
    assert mode == "journal"
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_edge_agent", False))
    # JournalHandler binds journal.send at construction: catch what it would write to the journal
    handler.send = lambda *a, **kw: sent.append({"MESSAGE": a[0], **kw})  # type: ignore[attr-defined]
    logging.getLogger("agent.test").info("lost password=%s", "x1", extra={"CAMERA": "cam0"})
    assert sent
    rec = sent[-1]
    assert rec["MESSAGE"] == "lost password=***"
    assert rec["CAMERA"] == "cam0" and rec["DEVICE_ID"] == "dev1" and rec["SYSLOG_IDENTIFIER"] == "edge-agent"
