"""`edge-agent fleet` on bad input, through the real console script: a flag out of range, a file
that cannot be read, a manifest the device would refuse, a broker that is not there. Each gives one
message and its exit code (2: the operator's input, 1: the broker), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import free_port
from tests.support.cli import ROOT, assert_clean, edge_agent

MODEL = str(ROOT / "agent" / "data" / "demo" / "model.onnx")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("keys")
    assert_clean(edge_agent("fleet", "keygen", "--out", str(out), "--key-id", "ops"), 0)
    return str(out / "ops.key")


def _push(key: str, *extra: str) -> list[str]:
    return ["fleet", "push-model", MODEL, "--version", "2", "--device", "d1", "--key", key, *extra]


BAD = [
    (["--key", "/nonexistent.key"], 2, "cannot load private key"),
    (["--key", "/etc/passwd"], 2, "cannot load private key"),
    (["--labels", "/nonexistent-labels.txt"], 2, "cannot read /nonexistent-labels.txt"),
    (["--version", "abc"], 2, "model.version"),
    (["--device", "a/b"], 2, "targets.devices"),
    (["--input-size", "0x0"], 2, "model.input"),
    (["--input-size", "big"], 2, "--input-size"),
    (["--chunk-size", "0"], 2, "--chunk-size"),
    (["--expires-in", "-5"], 2, "--expires-in"),
    (["--wait", "-1"], 2, "--wait"),
    (["--ready-timeout", "0"], 2, "--ready-timeout"),
    (["--port", "99999"], 2, "--port"),
    (["--port", "http"], 2, "--port"),
    (["--via", "url", "--url", "ftp://host/m.onnx"], 2, "source.url"),
    (["--cafile", "/nonexistent-ca.pem"], 2, "cannot load /nonexistent-ca.pem"),
    (["--certfile", "/nonexistent.crt", "--keyfile", "/nonexistent.pem"], 2, "cannot load"),
    (["--certfile", "/nonexistent.crt"], 2, "go together"),
    (["--host", "no-such-host.invalid"], 1, "no-such-host.invalid"),
    (["--port", "PORT"], 1, "Connection refused"),
]


@pytest.mark.parametrize(("extra", "code", "needle"), BAD, ids=[" ".join(e) for e, _, _ in BAD])
def test_push_model_bad_input(key: str, extra: list[str], code: int, needle: str) -> None:
    args = _push(key, *[str(free_port()) if a == "PORT" else a for a in extra])
    # a later --version / --device / --key replaces the default one (argparse keeps the last)
    assert_clean(edge_agent(*args, timeout=60), code, needle)


def test_push_model_not_onnx(key: str) -> None:
    assert_clean(edge_agent("fleet", "push-model", "/etc/passwd", "--version", "2", "--device", "d1", "--key", key),
                 2, "input size unknown")


@pytest.mark.parametrize(("extra", "code", "needle"), [
    (["--timeout", "-1"], 2, "--timeout"),
    (["--cafile", "/nonexistent-ca.pem"], 2, "cannot load"),
    (["--port", "PORT", "--timeout", "1"], 1, "Connection refused"),
    (["--host", "no-such-host.invalid", "--timeout", "1"], 1, "no-such-host.invalid"),
])
def test_status_bad_input(extra: list[str], code: int, needle: str) -> None:
    args = ["fleet", "status", *[str(free_port()) if a == "PORT" else a for a in extra]]
    assert_clean(edge_agent(*args, timeout=60), code, needle)


def test_keygen_into_a_file_path(tmp_path: Path) -> None:
    assert_clean(edge_agent("fleet", "keygen", "--out", "/etc/passwd"), 2, "cannot write the key pair")
