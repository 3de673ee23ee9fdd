"""What the agent writes is owner-only, and its secrets never show (tests/support/filemodes.py).

The end-to-end audit runs the real agent three times (password from `password_file`, from
`$CREDENTIALS_DIRECTORY`, a wrong one) at log level debug under umask 022, with an update applied and
engines cached, plus `edge-agent fleet keygen`; the unit tests pin each writer's modes on its own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cache.store import EngineCache
from agent.config import MqttConfig
from agent.engines import trt_timing
from agent.mqtt.client import MqttClient
from agent.updates.manifest import generate_keypair
from tests.support.filemodes import Audit, find_leaks, mode_problems, run_file_audit, walk


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Audit:
    return run_file_audit(tmp_path_factory.mktemp("audit"))


def test_agent_runs_did_what_they_should(audit: Audit) -> None:
    assert audit.runs and all(audit.runs.values()), (audit.runs, audit.notes, audit.log_tail)


def test_store_cache_and_keys_are_owner_only(audit: Audit) -> None:
    assert len(audit.checked) >= 20  # store (versions, state.json, downloads), two cache entries, keys
    assert any(p.endswith("state.json") for p in audit.checked)
    assert any(p.endswith("engine.bin") for p in audit.checked)
    assert any(p.endswith("ops.key") for p in audit.checked)
    assert audit.bad_modes == []


def test_no_secret_in_output_payloads_or_files(audit: Audit) -> None:
    assert audit.secrets_checked >= 4 and audit.haystacks >= 5
    assert audit.leaks == []


# ---- each writer on its own --------------------------------------------------------------------------

def test_engine_cache_writes_owner_only_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    def build(path: Path) -> None:
        path.write_bytes(b"E" * 100)  # like a runtime: an ordinary open(), so the umask's 0644

    def load(path: Path) -> bytes:
        data = path.read_bytes()
        if data != b"E" * 100:
            raise ValueError("damaged")
        return data

    cache = EngineCache(tmp_path / "cache", 1 << 20, fingerprint=lambda b, p: {"gpu": "x"})
    fields = {"model_sha256": "a" * 64, "backend": "onnxruntime", "providers": "CPU", "gpu": "x"}
    _, entry = cache.get_or_build(fields, build, load)
    cache.set_protected([entry.key])
    trt_timing.read(cache, "tag")  # the TensorRT timing cache's lock file
    entry.engine_path.write_bytes(b"damaged")  # quarantined (with its reason.txt) and rebuilt
    cache.get_or_build(fields, build, load)
    paths = walk(cache.root)
    assert any(p.name == "reason.txt" for p in paths) and any(p.suffix == ".lock" for p in paths)
    _, bad = mode_problems(paths)
    assert bad == []


def test_keygen_writes_owner_only_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    kp = generate_keypair(tmp_path / "keys", "ops")
    for p in (kp.private_path, kp.public_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_audit_would_see_group_bits_and_leaks(tmp_path: Path) -> None:
    """The checks above are not vacuous: a 0644 file, a 0755 dir and a password in a log are caught."""
    (tmp_path / "d").mkdir(mode=0o755)
    (tmp_path / "d").chmod(0o755)
    f = tmp_path / "d" / "f"
    f.write_bytes(b"x")
    f.chmod(0o644)
    _, bad = mode_problems(walk(tmp_path / "d"))
    assert len(bad) == 2
    leaks = find_leaks({"pw": "hunter2-xyz"}, {"log": "connect user=a pw hunter2-xyz",
                                                "pem": "-----BEGIN PRIVATE KEY-----\nMC4CAQ\n"})
    assert leaks == ["log: pw", "pem: a PEM private key block"]


def test_password_file_that_is_not_utf8_is_reported_without_its_bytes(tmp_path: Path) -> None:
    """A decode error's message quotes a byte of the secret and its position; before the fix it also
    escaped MqttClient() and stopped the agent at start with a traceback."""
    p = tmp_path / "pw"
    p.write_bytes(b"s3cr\xffet\n")
    p.chmod(0o600)
    c = MqttClient(MqttConfig(username="u", password_file=p), "edge-agent-x", "edge/x/status", b"offline")
    c.start()
    try:
        err = str(c.stats()["last_error"])
        assert "not UTF-8" in err
        assert "0xff" not in err and "s3cr" not in err and "position" not in err
    finally:
        c.stop(0)
