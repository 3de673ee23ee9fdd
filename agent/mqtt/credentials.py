"""Who the agent is to the broker: the password and the TLS context that a paho client is given.

Data flow: the config's `mqtt` section -> `read_password` (from `password_file`, else systemd's
`$CREDENTIALS_DIRECTORY/mqtt_password`) and `make_ssl_context` (the CA bundle or the system's, the
client pair for mutual TLS) -> `apply_credentials` sets both on a paho client before its first
connect. A file that cannot be read or a TLS setup that fails does not raise: it comes back as a
reason, which the client reports in `stats()["last_error"]` instead of connecting. The password is
never logged, and no error message quotes it (not even a byte of it).

Used by the agent's connection (agent/mqtt/connection.py) and by the Sparkplug B node's own session
(agent/plc/sparkplug.py), which share the one `mqtt` section.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttConfig

log = logging.getLogger("agent.mqtt.client")  # the records keep the logger name they had before the split

SYSTEMD_CREDENTIAL = "mqtt_password"  # the name under $CREDENTIALS_DIRECTORY (LoadCredential=)


def _systemd_credential() -> Path | None:
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / SYSTEMD_CREDENTIAL).is_file():
        return Path(cred_dir) / SYSTEMD_CREDENTIAL
    return None


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from `password_file` or `$CREDENTIALS_DIRECTORY/mqtt_password`, or None.

    Raises OSError when a configured file cannot be read (the message names the file, never its content).
    """
    path: Path | None = cfg.password_file
    if path is None:
        path = _systemd_credential()
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        # its message quotes a byte of the secret and its position: say only what is wrong
        raise OSError(errno.EINVAL, "not UTF-8 text", str(path)) from None
    return text or None  # an empty credential (the unit's fallback) means: no password


def make_ssl_context(tls: Any) -> ssl.SSLContext:
    """An SSL context from a TlsConfig: the CA bundle (or the system's), the client pair for mutual TLS."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.insecure:
        ctx.check_hostname = False  # the chain is still verified
    return ctx


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> str | None:
    """Set the username / password and the TLS context of `cfg` on `client`.

    Returns None, or why the client must not connect (an unreadable password file, a TLS setup
    that failed); the last such reason wins, as the client reports only one.
    """
    error: str | None = None
    if cfg.username is not None or cfg.password_file is not None:
        try:
            password = read_password(cfg)
        except OSError as exc:
            error = f"cannot read the MQTT password file: {exc.strerror or type(exc).__name__}"
            password = None
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        elif password is not None:
            log.warning("mqtt: a password is configured but no username; the password is not used")
    elif _systemd_credential() is not None:
        log.warning("mqtt: $CREDENTIALS_DIRECTORY/mqtt_password exists but mqtt.username is not set; not used")
    if cfg.tls is not None:
        try:
            client.tls_set_context(make_ssl_context(cfg.tls))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            error = f"TLS setup failed: {exc}"
    return error
