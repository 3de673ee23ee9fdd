"""agent/mqtt/credentials.py on real files, a real PKI (scripts/make_certs.py) and real paho clients.

The end-to-end cases (a broker refusing a wrong password, mutual TLS against mosquitto) are in
tests/mqtt/test_client.py; these pin the rules of where the password comes from and what an error says.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.config import MqttConfig
from agent.mqtt.credentials import apply_credentials, make_ssl_context, read_password
from scripts.make_certs import make_ca, make_client

SECRET = "s3cr\u00e9t"


def cfg(**kw: Any) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=1883, **kw)


def paho_client() -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)


@pytest.fixture(autouse=True)
def no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)  # the runner's environment must not leak in


def test_password_file_wins_and_loses_its_line_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text(SECRET + "\r\n", encoding="utf-8")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_password(cfg(password_file=tmp_path / "pw")) == SECRET
    assert read_password(cfg()) == "from-systemd"  # no password_file: systemd's credential


def test_no_password_anywhere_and_an_empty_one_mean_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_password(cfg()) is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # a folder without the credential
    assert read_password(cfg()) is None
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    assert read_password(cfg(password_file=tmp_path / "empty")) is None


def test_unreadable_password_names_the_file_never_the_content(tmp_path: Path) -> None:
    bad = tmp_path / "pw"
    bad.write_bytes(b"\xffsecret-bytes\xfe")
    with pytest.raises(OSError) as err:
        read_password(cfg(password_file=bad))
    assert str(bad) in str(err.value) and "secret" not in str(err.value) and "0xff" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_password(cfg(password_file=tmp_path / "missing"))


def test_ssl_context_verifies_and_carries_the_client_pair(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    me = make_client(tmp_path / "pki", "dev1")
    ctx = make_ssl_context(cfg(tls={"ca_file": ca.cert, "cert_file": me.cert, "key_file": me.key}).tls)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "edge-agent fleet CA"),),)
    insecure = make_ssl_context(cfg(tls={"ca_file": ca.cert, "insecure": True}).tls)
    assert insecure.verify_mode == ssl.CERT_REQUIRED and not insecure.check_hostname  # the chain still counts


def test_apply_credentials_reports_instead_of_raising(tmp_path: Path) -> None:
    c = paho_client()
    assert apply_credentials(c, cfg(username="dev1", password_file=tmp_path / "missing")) == \
        "cannot read the MQTT password file: No such file or directory"
    c = paho_client()
    (tmp_path / "ca.crt").write_text("not a certificate", encoding="utf-8")
    error = apply_credentials(c, cfg(tls={"ca_file": tmp_path / "ca.crt"}))
    assert error is not None and error.startswith("TLS setup failed:")


def test_apply_credentials_sets_user_and_password(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET, encoding="utf-8")
    c = paho_client()
    assert apply_credentials(c, cfg(username="dev1", password_file=tmp_path / "pw")) is None
    assert c.username == "dev1" and c.password == SECRET


def test_a_password_without_a_username_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "pw").write_text(SECRET, encoding="utf-8")
    c = paho_client()
    with caplog.at_level(logging.WARNING):
        assert apply_credentials(c, cfg(password_file=tmp_path / "pw")) is None
    assert c.username is None and c.password is None
    assert "no username" in caplog.text and SECRET not in caplog.text
    caplog.clear()
    (tmp_path / "mqtt_password").write_text(SECRET, encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert apply_credentials(paho_client(), cfg()) is None
    assert "mqtt.username is not set" in caplog.text and SECRET not in caplog.text
