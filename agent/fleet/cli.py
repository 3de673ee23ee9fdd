"""`edge-agent fleet keygen | push-model | status` (operator side, plain paho-mqtt).

Flags -> the operator's files (model, key, labels, TLS certificates) read and the manifest built,
signed and checked against the device's own schema -> the broker. Exit codes: 0 done; 1 the broker
or the devices failed (unreachable, not every target active); 2 bad input (a flag, a file, a
manifest the device would refuse), said in one line, before anything is sent.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import UpdateError

__all__ = ["add_parser", "cmd_keygen", "cmd_push_model", "cmd_status", "main"]


EXIT_USAGE = 2


def _print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _count(low: int, high: int | None = None) -> Any:
    """argparse type: a whole number within [low, high]."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {n}" if high is not None
                                             else f"must be at least {low}, got {n}")
        return n
    return parse


def _seconds(allow_zero: bool) -> Any:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not (x >= 0 if allow_zero else x > 0) or x == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text!r}")
        return x
    return parse


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.fleet.keys import keygen

    try:
        kp = keygen(Path(args.out) if args.out else None, args.key_id)
    except OSError as exc:
        _print_err(f"keygen: cannot write the key pair to {args.out or 'the default folder'}: {exc.strerror or exc}")
        return EXIT_USAGE
    print(f"private key: {kp.private_path} (mode 0600; keep it off the devices)")
    print(f"public key:  {kp.public_path}")
    print("device config (updates.trusted_keys):")
    print(f"  {kp.key_id}: {kp.public_b64}")
    return 0


def _input_size(text: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)(?:x(\d+))?$", text)
    if not m:
        raise argparse.ArgumentTypeError("expected WxH or N")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def cmd_push_model(args: argparse.Namespace) -> int:
    from agent.fleet.push import build_manifest, connect, model_info, push_model
    from agent.updates.manifest import Manifest, load_private_key, sign_manifest

    model = Path(args.model)
    if not model.is_file():
        _print_err(f"push-model: {model} is not a file")
        return 2
    if not args.device and not args.group:
        _print_err("push-model: give --device D or --group G (repeatable)")
        return 2
    if args.via == "url" and not args.url:
        _print_err("push-model: --via url needs --url URL (http(s):// or file://)")
        return 2
    try:
        info = model_info(model)
        if args.input_size:
            info.width, info.height = args.input_size
        if args.labels:
            text = Path(args.labels).read_text(encoding="utf-8")
            info.labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if args.decoder:
            info.decoder = args.decoder
        key_path = Path(args.key)
        key = load_private_key(key_path)
        key_id = args.key_id or key_path.stem
        unsigned = build_manifest(info, name=args.name or model.stem, version=args.version,
                                  devices=args.device or [], groups=args.group or [],
                                  url=args.url if args.via == "url" else None, chunk_size=args.chunk_size,
                                  expires_in=args.expires_in, rollback=args.rollback)
        signed = sign_manifest(unsigned, key, key_id)
        Manifest.model_validate(signed)  # the device would refuse a malformed one: say so here
        tls = _tls(args)
    except (OSError, UnicodeDecodeError) as exc:
        _print_err(f"push-model: cannot read {getattr(exc, 'filename', None) or args.labels}: "
                   f"{getattr(exc, 'strerror', None) or exc}")
        return EXIT_USAGE
    except UpdateError as exc:
        _print_err(f"push-model: {exc}")
        return EXIT_USAGE
    except ValidationError as exc:
        from agent.config import format_errors

        _print_err("push-model: the device would refuse this manifest:\n  " + "\n  ".join(format_errors(exc)))
        return EXIT_USAGE
    if args.print_manifest:
        print(json.dumps(signed, indent=2, sort_keys=True))
    print(f"manifest {signed['id']}: {signed['model']['name']} {args.version} ({info.size} bytes, "
          f"sha256 {info.sha256[:12]}...) -> devices {args.device or []} groups {args.group or []}", flush=True)

    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 0.5:
            last[0] = now
            print(f"  chunks: {done}/{total} bytes ({100 * done / max(total, 1):.0f}%)", flush=True)

    def on_state(device: str, st: dict[str, Any]) -> None:
        prog = st.get("progress")
        dl = isinstance(prog, int | float) and st.get("state") == "downloading"
        extra = f" {float(prog) * 100:.0f}%" if dl and isinstance(prog, int | float) else ""
        err = f" error={st.get('error')} {st.get('detail') or ''}" if st.get("error") else ""
        print(f"  {device}: {st.get('state')}{extra}{err}", flush=True)

    client = connect(args.host, args.port, tls=tls)
    try:
        res = push_model(client, signed, model if args.via == "mqtt" else None, prefix=args.prefix,
                         retain=args.retain, ready_timeout=args.ready_timeout, wait_s=args.wait,
                         progress=progress, on_state=on_state if args.wait or args.via == "mqtt" else None)
    finally:
        client.disconnect()
        client.loop_stop()
    if args.wait:
        for dev, st in sorted(res.states.items()):
            print(f"{dev}: {st.get('state')} {st.get('error') or ''}".rstrip())
        if not res.ok:
            _print_err("push-model: not every target reached 'active'")
            return 1
    if res.silent and not res.ok:
        _print_err(f"push-model: no state from {', '.join(res.silent)}: is the agent running and subscribed?")
    return 0 if res.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from agent.fleet.status import collect_status, format_table

    try:
        tls = _tls(args)
    except UpdateError as exc:
        _print_err(f"status: {exc}")
        return EXIT_USAGE
    rows = collect_status(args.host, args.port, args.prefix, timeout=args.timeout, tls=tls)
    if args.json:
        print(json.dumps({d: {"status": r.status, "model_state": r.model_state} for d, r in rows.items()}, indent=2))
    else:
        print(format_table(rows))
    return 0


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=_count(1, 65535), default=1883, help="broker port (a TLS listener is usually 8883)")
    p.add_argument("--prefix", default="edge", help="topic prefix")
    p.add_argument("--cafile", default=None, help="TLS: CA bundle that signed the broker's certificate")
    p.add_argument("--certfile", default=None, help="TLS: this operator's client certificate (mutual TLS)")
    p.add_argument("--keyfile", default=None, help="TLS: the private key of --certfile")


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """TLS to the broker when any of --cafile / --certfile / --keyfile is given (config/CERTIFICATES.md)."""
    if not (args.cafile or args.certfile or args.keyfile):
        return None
    if bool(args.certfile) != bool(args.keyfile):
        raise UpdateError("bad_key", "--certfile and --keyfile go together")
    try:
        ctx = ssl.create_default_context(cafile=args.cafile)
        if args.certfile:
            ctx.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; FileNotFoundError names no file
        names = " / ".join(f for f in (args.cafile, args.certfile, args.keyfile) if f)
        raise UpdateError("bad_tls", f"cannot load {names}: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `fleet` and its subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("fleet", help="operator tools: keys, model pushes, fleet status")
    sub = p.add_subparsers(dest="fleet_command", required=True)

    k = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    k.add_argument("--out", default=None, help="directory (default ~/.config/edge-agent/keys)")
    k.add_argument("--key-id", default=None, help="key id (default <user>-<host>)")
    k.set_defaults(func=cmd_keygen)

    pm = sub.add_parser("push-model", help="sign and publish a model update to a device or a group")
    pm.add_argument("model", help="ONNX model file")
    pm.add_argument("--version", required=True, help="model version (dotted numeric, newer than the device's)")
    pm.add_argument("--name", default=None, help="model name (default: the file name without .onnx)")
    pm.add_argument("--device", action="append", help="target device id (repeatable)")
    pm.add_argument("--group", action="append", help="target group (repeatable)")
    pm.add_argument("--via", choices=["mqtt", "url"], default="mqtt", help="how the device gets the bytes")
    pm.add_argument("--url", default=None, help="http(s):// or file:// URL of the model (with --via url)")
    pm.add_argument("--key", required=True, help="private key file (PEM) from `fleet keygen`")
    pm.add_argument("--key-id", default=None, help="key id (default: the key file name without extension)")
    _broker_args(pm)
    pm.add_argument("--chunk-size", type=_count(256, 8 * 1024 * 1024), default=256 * 1024,
                    help="bytes per chunk (MQTT transfer)")
    pm.add_argument("--expires-in", type=_count(1), default=3600, help="manifest lifetime in seconds")
    pm.add_argument("--rollback", action="store_true", help="allow a version not newer than the device's")
    pm.add_argument("--retain", action="store_true", help="retain a group manifest (devices joining later get it)")
    pm.add_argument("--wait", type=_seconds(True), default=0.0, metavar="S",
                    help="watch the targets' model/state this long")
    pm.add_argument("--ready-timeout", type=_seconds(False), default=10.0,
                    help="wait for devices to accept before chunks")
    pm.add_argument("--labels", default=None, help="labels file, one per line (default: the model's metadata)")
    pm.add_argument("--decoder", choices=["yolov8", "yolov5", "end2end"], default=None, help="output layout")
    pm.add_argument("--input-size", type=_input_size, default=None, help="WxH (default: the model's input)")
    pm.add_argument("--print-manifest", action="store_true", help="print the signed manifest")
    pm.set_defaults(func=cmd_push_model)

    st = sub.add_parser("status", help="table of devices: model, update state, last seen")
    _broker_args(st)
    st.add_argument("--timeout", type=_seconds(False), default=3.0, help="seconds to collect retained messages")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-agent")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except UpdateError as exc:
        _print_err(f"edge-agent fleet: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
