#!/usr/bin/env python3
"""A small private PKI for the fleet's MQTT broker: a CA, the broker's certificate, one client certificate
per device (its common name is the device id: the broker's ACL takes it as the user name).

    python scripts/make_certs.py ca     --dir pki/                                  # pki/ca.crt, pki/ca.key
    python scripts/make_certs.py server --dir pki/ --host broker.line3.local --ip 10.0.3.2
    python scripts/make_certs.py client --dir pki/ orin-01 orin-02 fleet-ops      # pki/clients/<cn>.crt/.key

Keys are EC P-256, written mode 0600 in directories of mode 0700; nothing is ever overwritten (remove
a file first to re-issue it). config/CERTIFICATES.md explains the whole setup, and the same steps
with the openssl command line. Needs only `cryptography` (a runtime dependency of the agent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "load_ca", "make_ca", "make_client", "make_server"]

# a device id is one topic level, and %u in the broker's ACL patterns: the agent's own id pattern
_CN_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _private_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask, and an existing directory keeps its own
    return d


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` (never overwrite: a re-issued key must be a deliberate act)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask too
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _window(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=days)  # an hour back: small clock skew


def make_ca(directory: Path, cn: str = "edge-agent fleet CA", days: int = 3650) -> Issued:
    """`ca.crt` and `ca.key` in `directory`."""
    d = _private_dir(Path(directory))
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out = Issued(d / "ca.crt", d / "ca.key")
    _write_new(out.key, _key_pem(key), 0o600)
    _write_new(out.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    d = Path(directory)
    cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{d / 'ca.key'} is not an EC key made by this script")
    return cert, key


def _leaf(ca_dir: Path, cn: str, days: int, server: bool, hosts: list[str], ips: list[str]) -> tuple[bytes, bytes]:
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days)
    b = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_server(ca_dir: Path, hosts: Sequence[str], ips: Sequence[str] = (), out_dir: Path | None = None,
                days: int = 825) -> Issued:
    """`server.crt` / `server.key` for the broker; clients verify `hosts` (DNS) and `ips` (SAN entries)."""
    if not hosts and not ips:
        raise ValueError("the broker certificate needs at least one host name or IP address")
    d = _private_dir(Path(out_dir or ca_dir))
    cert, key = _leaf(Path(ca_dir), (list(hosts) or list(ips))[0], days, True, list(hosts), list(ips))
    out = Issued(d / "server.crt", d / "server.key")
    _write_new(out.key, key, 0o600)
    _write_new(out.cert, cert, 0o644)
    return out


def make_client(ca_dir: Path, cn: str, out_dir: Path | None = None, days: int = 825) -> Issued:
    """`<cn>.crt` / `<cn>.key`: a device (CN = its device id) or an operator / service account."""
    if not cn or not set(cn) <= _CN_OK or len(cn) > 64:
        raise ValueError(f"common name {cn!r} must match [A-Za-z0-9_-]{{1,64}} (it becomes the MQTT user name)")
    d = _private_dir(Path(out_dir or Path(ca_dir) / "clients"))
    cert, key = _leaf(Path(ca_dir), cn, days, False, [], [])
    out = Issued(d / f"{cn}.crt", d / f"{cn}.key")
    _write_new(out.key, key, 0o600)
    _write_new(out.cert, cert, 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ca", help="a new CA (ca.crt, ca.key)")
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--cn", default="edge-agent fleet CA")
    c.add_argument("--days", type=int, default=3650)
    s = sub.add_parser("server", help="the broker's certificate, signed by the CA in --dir")
    s.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    s.add_argument("--out", type=Path, default=None, help="where to write server.crt/.key (default: --dir)")
    s.add_argument("--host", action="append", default=[], help="DNS name clients connect to (repeatable)")
    s.add_argument("--ip", action="append", default=[], help="IP address clients connect to (repeatable)")
    s.add_argument("--days", type=int, default=825)
    cl = sub.add_parser("client", help="client certificates, one per common name (device id or operator)")
    cl.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    cl.add_argument("--out", type=Path, default=None, help="where to write <cn>.crt/.key (default: --dir/clients)")
    cl.add_argument("--days", type=int, default=825)
    cl.add_argument("cn", nargs="+", help="common names: device ids, operator accounts")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "ca":
            got = [make_ca(args.dir, args.cn, args.days)]
        elif args.cmd == "server":
            got = [make_server(args.dir, args.host, args.ip, args.out, args.days)]
        else:
            got = [make_client(args.dir, cn, args.out, args.days) for cn in args.cn]
    except (OSError, ValueError) as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 1
    for i in got:
        print(f"{i.cert}\n{i.key} (0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
