"""The shipped broker setup: TLS with client certificates, user = certificate CN, the device ACL.

config/mosquitto-tls.conf and config/mosquitto.acl run as shipped on a real mosquitto
(tests/support/tls.py), with a PKI from scripts/make_certs.py, and with one made by the openssl
commands of config/CERTIFICATES.md. The live checks are shared with the `tls_acl` reliability scenario.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.fleet.status import collect_status
from agent.mqtt.topics import Topics
from scripts.make_certs import Issued
from tests.support.tls import (
    SHIPPED_ACL,
    SHIPPED_CONF,
    FleetPki,
    TlsClient,
    TlsReport,
    device_patterns,
    run_tls_acl,
    start_tls_broker,
    tls_context,
)

ROOT = Path(__file__).resolve().parents[2]
HOWTO = ROOT / "config" / "CERTIFICATES.md"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> TlsReport:
    return run_tls_acl(tmp_path_factory.mktemp("tls"), rounds=1)


# ---- live: the broker with the shipped files, and the real agent ----------------------------------

def test_device_cannot_publish_as_another_device(report: TlsReport) -> None:
    assert report.forged_sent >= 30  # 3 identities x (6 out topics of dev2 + 6 update / chunk topics)
    assert report.control_seen, "the attacker's own publish did not arrive: the probe proves nothing"
    assert report.forged_seen == []


def test_device_reads_only_its_own_and_its_groups_updates(report: TlsReport) -> None:
    assert report.reads_expected == 4 and report.reads_got == 4
    assert report.reads_leaked == []


def test_clients_without_a_valid_certificate_are_refused(report: TlsReport) -> None:
    assert len(report.refusals) == 3 and all(report.refusals.values()), report.refusals
    assert report.refusal_log_lines >= 2  # refused in the TLS handshake, not later


def test_agent_over_mutual_tls_publishes_and_takes_its_groups_update(report: TlsReport) -> None:
    assert report.agent_det_payloads > 0, report.log_tail
    assert report.non_member_group_reached is False  # the config claims line4, the ACL does not give it
    assert report.push_cli_rc == 0, report.log_tail
    assert report.update_state == "active", report.log_tail
    assert report.served_after_update == {"2"}


# ---- static: the shipped files against the topic contract ------------------------------------------

def _rights(user: str) -> list[tuple[str, str]]:
    out = []
    for line in device_patterns():
        _, access, filt = line.split(maxsplit=2)
        out.append((access, filt.replace("%u", user)))
    return out


def _may(user: str, access: str, topic: str) -> bool:
    return any(a in (access, "readwrite") and mqtt.topic_matches_sub(f, topic) for a, f in _rights(user))


def test_acl_patterns_cover_exactly_the_device_topics() -> None:
    me, other = Topics("edge", "dev1"), Topics("edge", "dev2")
    for cam in ("cam0", "line-cam_2"):
        outgoing = [me.status, me.telemetry, me.events, me.model_state, me.detections(cam), me.count(cam, "scratch")]
        for t in outgoing:
            assert _may("dev1", "write", t), t
            assert not _may("dev1", "read", t), t  # nobody needs to read their own output back
        for t in [other.status, other.detections(cam), other.model_state, other.count(cam, "x")]:
            assert not _may("dev1", "write", t), t
    incoming = [me.model_update, me.chunks("t1", 0)]
    for t in incoming:
        assert _may("dev1", "read", t), t
        assert not _may("dev1", "write", t), t  # a device cannot feed itself manifests or chunks
    for t in [other.model_update, other.chunks("t1", 0), me.group_model_update("line3"),
              me.group_chunks("line3", "t1", 0)]:
        assert not _may("dev1", "read", t), t  # groups: only through explicit `user` blocks
        assert not _may("dev1", "write", t), t


def test_acl_group_blocks_and_accounts() -> None:
    text = SHIPPED_ACL.read_text()
    blocks = re.findall(r"^user (\S+)\n((?:topic .*\n)+)", text, re.M)
    users = dict(blocks)
    assert "topic read edge/group/line-3/model/update" in users["orin-01"]
    assert "topic read edge/group/line-3/model/chunks/#" in users["orin-01"]
    assert "write" not in users["orin-01"] and "write" not in users["scada"]
    assert "topic readwrite edge/#" in users["fleet-ops"]


def test_broker_conf_demands_certificates() -> None:
    lines = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in SHIPPED_CONF.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert lines["require_certificate"] == "true"
    assert lines["use_identity_as_username"] == "true"
    assert lines["allow_anonymous"] == "false"
    assert lines["per_listener_settings"] == "false"
    assert lines["listener"] == "8883"
    assert {"cafile", "certfile", "keyfile", "acl_file"} <= set(lines)


# ---- the operators' tools for certificates ---------------------------------------------------------

def test_make_certs_cli(tmp_path: Path) -> None:
    d = tmp_path / "pki"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_certs.py"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)

    old = os.umask(0o022)
    try:
        assert run("ca", "--dir", str(d)).returncode == 0
        assert run("server", "--dir", str(d), "--host", "localhost", "--ip", "127.0.0.1").returncode == 0
        assert run("client", "--dir", str(d), "orin-01", "fleet-ops").returncode == 0
    finally:
        os.umask(old)
    for key in [d / "ca.key", d / "server.key", d / "clients" / "orin-01.key", d / "clients" / "fleet-ops.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for folder in (d, d / "clients"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    again = run("client", "--dir", str(d), "orin-01")
    assert again.returncode == 1 and "exists" in again.stderr  # never overwrites a key
    bad = run("client", "--dir", str(d), "orin/01")
    assert bad.returncode == 1 and "common name" in bad.stderr
    if shutil.which("openssl"):  # what the script issues is a proper chain to other tools too
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), str(d / "server.crt"),
                                 str(d / "clients" / "orin-01.crt")], capture_output=True, text=True, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr


def _howto_openssl_block() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", HOWTO.read_text(), re.S)
    found = [b for b in blocks if b.startswith("# how-to: openssl")]
    assert len(found) == 1, "CERTIFICATES.md must hold one ```sh block starting with '# how-to: openssl'"
    return found[0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_howto_makes_certificates_the_broker_and_the_fleet_tools_accept(tmp_path: Path) -> None:
    d = tmp_path / "ossl"
    d.mkdir()
    env = {**os.environ, "BROKER_HOST": "localhost", "BROKER_IP": "127.0.0.1", "DEVICES": "dev1 dev2 monitor"}
    r = subprocess.run(["bash", "-e", "-c", _howto_openssl_block()], cwd=d, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600

    def issued(cn: str) -> Issued:
        return Issued(d / f"{cn}.crt", d / f"{cn}.key")

    pki = FleetPki(d, Issued(d / "ca.crt", d / "ca.key"), issued("server"),
                   {cn: issued(cn) for cn in ("dev1", "dev2", "monitor")})
    broker = start_tls_broker(tmp_path / "broker", pki, {"dev1": []}, {"monitor": ["read edge/#"]})
    clients: list[TlsClient] = []
    try:
        mon = TlsClient(broker.host, broker.port, pki.ca.cert, pki.client("monitor"))
        dev1 = TlsClient(broker.host, broker.port, pki.ca.cert, pki.client("dev1"))
        clients += [mon, dev1]
        assert mon.connected and dev1.connected, (mon.connect_rc, dev1.connect_rc, broker.log_text()[-1500:])
        mon.subscribe(["edge/#"])
        dev1.publish("edge/dev2/status", "forged", retain=True)
        dev1.publish("edge/dev1/status", json.dumps({"state": "online", "ts": time.time()}), retain=True)
        got = mon.wait_for("edge/dev1/status", timeout=5)
        assert [m.payload for m in got][-1].startswith(b'{"state"')
        assert mon.on("edge/dev2/#") == []
        # `edge-agent fleet status --cafile --certfile --keyfile` reads it over TLS
        rows = collect_status(broker.host, broker.port, timeout=3,
                              tls=tls_context(pki.ca.cert, pki.client("monitor")))
        assert list(rows) == ["dev1"] and rows["dev1"].online == "online"
    finally:
        for c in clients:
            c.close()
        broker.stop()
