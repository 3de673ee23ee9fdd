"""What the agent leaves on disk and in its output: file modes, and secrets that must never show.

`run_file_audit` runs the real agent (and `edge-agent fleet keygen`) under umask 022, the usual default
outside systemd (whose unit sets UMask=0077: the agent must not rely on it), on a mosquitto that wants
TLS with a client certificate AND a user name / password:

  run 1  password from `mqtt.password_file`, log_level debug; a signed update arrives over MQTT chunks
         and becomes active (model store written, two engines built into the cache)
  run 2  password from `$CREDENTIALS_DIRECTORY/mqtt_password` (systemd's LoadCredential=), debug; serves
         the updated model from the store and its engine from the cache
  run 3  a wrong password: the broker refuses, the agent says so (without the password)

Then every file and directory under the model store, the engine cache and the key directory must be
owner-only (no group / other bits; directories 0700), and neither password, nor the body of the TLS
client key or of the signing key, may appear in the agent's output, in anything it published, or in
any file it wrote.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fleet.push import build_manifest, model_info, push_model
from agent.updates.manifest import load_private_key, sign_manifest
from tests.support.agent_proc import ROOT, AgentProcess, write_config
from tests.support.broker import Broker
from tests.support.models import fixed_yolov8_model
from tests.support.tls import FleetPki, TlsClient, make_fleet_pki

UMASK = 0o022


@dataclass
class Audit:
    checked: list[str] = field(default_factory=list)  # every path whose mode was checked
    bad_modes: list[str] = field(default_factory=list)  # "path 0o644"
    secrets_checked: int = 0  # distinct secret strings looked for
    haystacks: int = 0  # texts searched (log files, payloads, files)
    leaks: list[str] = field(default_factory=list)  # "where: which secret"
    runs: dict[str, bool] = field(default_factory=dict)  # run name -> it did what it should
    notes: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return not self.bad_modes and not self.leaks and bool(self.runs) and all(self.runs.values())


def mode_problems(paths: Iterable[Path]) -> tuple[list[str], list[str]]:
    """(checked, problems): a file or directory with any group / other bit is a problem; a directory
    must be exactly 0700, a file at most 0600 (an executable bit on data would be odd too)."""
    checked, bad = [], []
    for p in paths:
        st = p.lstat()
        mode = stat.S_IMODE(st.st_mode)
        checked.append(str(p))
        if stat.S_ISLNK(st.st_mode):
            bad.append(f"{p} is a symlink")
        elif stat.S_ISDIR(st.st_mode):
            if mode != 0o700:
                bad.append(f"{p} {oct(mode)} (dir, want 0o700)")
        elif mode & 0o177:
            bad.append(f"{p} {oct(mode)} (file, want 0o600)")
    return checked, bad


def walk(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))] if root.exists() else []


def pem_secrets(pem_file: Path) -> list[str]:
    """The base64 lines of a PEM private key (any one of them in a log is a leak)."""
    lines = pem_file.read_text().splitlines()
    return [ln for ln in lines if ln and not ln.startswith("-----") and len(ln) >= 16]


def find_leaks(secret_values: dict[str, str], haystacks: dict[str, str]) -> list[str]:
    out = []
    for where, text in haystacks.items():
        for name, value in secret_values.items():
            if value and value in text:
                out.append(f"{where}: {name}")
        if re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?!\s*\*\*\*)", text):
            out.append(f"{where}: a PEM private key block")
    return out


def _passwd(path: Path, users: dict[str, str]) -> None:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run([exe, "-b", *(["-c"] if i == 0 else []), str(path), user, pw], check=True,
                       capture_output=True, timeout=30)


def _spawn_with_umask(fn: Callable[[], Any]) -> Any:
    """Run `fn` (which starts a child process) with the process umask at UMASK; children inherit it."""
    old = os.umask(UMASK)
    try:
        return fn()
    finally:
        os.umask(old)


def run_file_audit(work: Path, log: Callable[[str], None] = lambda s: None) -> Audit:
    a = Audit()
    work.mkdir(parents=True, exist_ok=True)
    pki: FleetPki = make_fleet_pki(work / "pki", ["dev1", "fleet-ops"])
    pw, ops_pw, wrong = (f"pw-{secrets.token_hex(12)}", f"ops-{secrets.token_hex(12)}",
                         f"wrong-{secrets.token_hex(12)}")
    sec = work / "secrets"
    sec.mkdir(mode=0o700)
    (sec / "mqtt_password").write_text(pw + "\n")
    (sec / "wrong_password").write_text(wrong + "\n")
    creds = work / "credentials"  # what systemd's LoadCredential= makes: a private dir with one file per credential
    creds.mkdir(mode=0o700)
    (creds / "mqtt_password").write_text(pw)
    for p in [*sec.iterdir(), *creds.iterdir()]:
        p.chmod(0o600)
    pwfile = work / "broker" / "passwords"
    pwfile.parent.mkdir()
    _passwd(pwfile, {"dev1": pw, "fleet-ops": ops_pw})
    broker = Broker(work / "broker", extra_conf=(
        f"allow_anonymous false\npassword_file {pwfile}\ncafile {pki.ca.cert}\ncertfile {pki.server.cert}\n"
        f"keyfile {pki.server.key}\nrequire_certificate true\n")).start()

    # the operator's keys, by the CLI, as an operator would make them
    keys = work / "keys"
    kg = _spawn_with_umask(lambda: subprocess.run(
        [sys.executable, "-m", "agent.cli", "fleet", "keygen", "--out", str(keys), "--key-id", "ops"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60))
    if kg.returncode != 0:
        raise RuntimeError(f"fleet keygen failed: {kg.stderr}")
    b64 = re.search(r"^\s+ops: (\S+)$", kg.stdout, re.M)
    if b64 is None:
        raise RuntimeError(f"fleet keygen printed no public key: {kg.stdout}")

    v1 = fixed_yolov8_model(work / "v1.onnx", [(32, 32, 16, 16, 1, 0.8)], labels=["part", "dent"], version="1")
    v2 = fixed_yolov8_model(work / "v2.onnx", [(32, 32, 16, 16, 1, 0.7)], labels=["part", "dent"], version="2")
    dev = work / "dev1"
    dev.mkdir()
    d1 = pki.client("dev1")
    tls = {"ca_file": str(pki.ca.cert), "cert_file": str(d1.cert), "key_file": str(d1.key)}
    updates = {"enabled": True, "trusted_keys": {"ops": b64.group(1)}, "models_dir": str(dev / "models"),
               "health_window_s": 1}

    def config(name: str, **mqtt: Any) -> Path:
        return write_config(dev / f"{name}.yaml", broker.port, v1, "synthetic:160x120@10", device_id="dev1",
                            log_level="debug", updates=updates, cache={"dir": str(dev / "cache")},
                            mqtt={"username": "dev1", "tls": tls, **mqtt})

    mon = TlsClient(broker.host, broker.port, pki.ca.cert, pki.client("fleet-ops"), username="fleet-ops",
                    password=ops_pw)
    if not mon.connected:
        raise RuntimeError(f"the operator client could not connect: {mon.connect_rc} {mon.error}")
    mon.subscribe(["edge/#"])
    logs: list[AgentProcess] = []

    def start(cfg: Path, env: dict[str, str] | None = None) -> AgentProcess:
        proc: AgentProcess = _spawn_with_umask(lambda: AgentProcess(cfg, env=env))
        logs.append(proc)
        return proc

    def wait(pred: Callable[[], bool], timeout: float, proc: AgentProcess) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.proc.poll() is None:
            if pred():
                return True
            time.sleep(0.05)
        return pred()

    def since(mark: int, suffix: str) -> list[bytes]:
        return [m.payload for m in mon.messages[mark:] if m.topic.endswith(suffix)]

    env_no_creds = {"CREDENTIALS_DIRECTORY": ""}  # the test runner's own environment must not leak in
    try:
        # run 1: password_file; a real update over MQTT chunks
        mark = len(mon.messages)
        p1 = start(config("run1", password_file=str(sec / "mqtt_password")), env_no_creds)
        ready = wait(lambda: any(b'"manifests"' in t for t in since(mark, "/telemetry")), 60, p1)
        key = load_private_key(keys / "ops.key")
        signed = sign_manifest(build_manifest(model_info(v2), name="fixed", version="2", devices=["dev1"],
                                              chunk_size=256), key, "ops")
        res = push_model(mon.client, signed, v2, ready_timeout=10, wait_s=20) if ready else None
        kept = wait(lambda: any(b'"model_kept"' in e for e in since(mark, "/events")), 15, p1)
        a.runs["password_file: connected, update active and kept"] = bool(ready and res and res.ok and kept)
        p1.stop()
        log(f"run 1 (password_file): ready {ready}, update {res.ok if res else None}, kept {kept}")

        # run 2: $CREDENTIALS_DIRECTORY/mqtt_password, serving v2 from the store and the cache
        mark = len(mon.messages)
        p2 = start(config("run2"), {"CREDENTIALS_DIRECTORY": str(creds)})
        served = wait(lambda: any(b'"version":"2"' in d for d in since(mark, "/cam0/detections")), 60, p2)
        a.runs["CREDENTIALS_DIRECTORY: connected, serving the update"] = served
        p2.stop()
        log(f"run 2 (CREDENTIALS_DIRECTORY): serving v2 {served}")

        # run 3: a wrong password is refused, and said so
        p3 = start(config("run3", password_file=str(sec / "wrong_password")), env_no_creds)
        refused = wait(lambda: "refused" in p3.output(), 30, p3)
        a.runs["wrong password: refused and reported"] = refused
        p3.stop()
        log(f"run 3 (wrong password): refused {refused}")
    finally:
        a.log_tail = logs[-1].output()[-3000:] if logs else ""
        for proc in logs:
            proc.stop()
        mon.close()
        broker.stop()

    # modes: the model store, the engine cache, the operator's keys
    roots = [dev / "models", dev / "cache", keys]
    for r in roots:
        if not r.exists():
            a.notes.append(f"{r} was not created")
            a.runs[f"{r.name} exists"] = False
        checked, bad = mode_problems(walk(r))
        a.checked += checked
        a.bad_modes += bad
    n_engines = len(list((dev / "cache").glob("*/engine.bin")))
    a.runs["two engines cached"] = n_engines >= 2
    a.runs["the update is installed"] = (dev / "models" / "versions" / "fixed-2" / "model.onnx").is_file()

    # secrets: in the agent's output, in what it published, in what it wrote, in keygen's output
    values = {"mqtt password": pw, "wrong mqtt password": wrong}
    values.update({f"TLS client key line {i}": s for i, s in enumerate(pem_secrets(d1.key))})
    values.update({f"signing key line {i}": s for i, s in enumerate(pem_secrets(keys / "ops.key"))})
    hay: dict[str, str] = {f"agent output {p.log.name}": p.output() for p in logs}
    hay["published payloads"] = "\n".join(m.payload.decode("utf-8", "replace") for m in mon.messages)
    hay["fleet keygen output"] = kg.stdout + kg.stderr
    for r in roots[:2]:
        for f in walk(r):
            if f.is_file():
                hay[str(f.relative_to(work))] = f.read_bytes().decode("utf-8", "replace")
    a.secrets_checked, a.haystacks = len(values), len(hay)
    a.leaks = find_leaks(values, hay)
    return a
