"""`edge-agent` command line (contract in DESIGN.md).

argv -> argparse (bad flag values are usage errors, exit 2) -> one `cmd_*` per subcommand. Exit codes:
0 ok; 1 a runtime failure; 2 a usage or configuration error (systemd's RestartPreventExitStatus=2:
a config mistake is not restarted in a loop); 130 on Ctrl-C. No bad input ends in a traceback: every
AgentError is printed as one message, and a closed stdout (`edge-agent demo | head`) stops quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import DEMO_VIDEO, AgentConfig, json_schema, load_config, parse_config
from agent.errors import AgentError, ConfigError

log = logging.getLogger("agent")

EXIT_CONFIG = 2


def _setup_logging(level: str, device_id: str | None = None) -> None:
    from agent.logs import setup_logging

    setup_logging(level, fields={"DEVICE_ID": device_id} if device_id else None)


def _user_dir(env: str, fallback: str) -> Path:
    return Path(os.environ.get(env) or Path.home() / fallback) / "edge-agent"


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return x


def _frame_size(text: str) -> str:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and 16 <= int(w) <= 8192 and 16 <= int(h) <= 8192):
        raise argparse.ArgumentTypeError(f"expected WxH with sides 16..8192, e.g. 1920x1080, got {text!r}")
    return f"{int(w)}x{int(h)}"


def _print_config_errors(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)


def _load_checked(path: str, model: bool = True) -> AgentConfig:
    """The config, validated, and its files checked (model, labels, decoder, file cameras)."""
    from agent.checks import check_config_files

    cfg = load_config(path)
    errors = check_config_files(cfg, model=model)
    if errors:
        raise ConfigError(errors)
    return cfg


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json_schema())
        return 0
    if not args.config:
        print("check-config: -c FILE is required (or --schema)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = _load_checked(args.config)
    except ConfigError as exc:
        _print_config_errors(args.config, exc)
        return EXIT_CONFIG
    print(f"{args.config}: ok (device {cfg.device_id}, {len(cfg.cameras)} camera(s), model {cfg.model.path})")
    return 0


def _run_service(cfg: AgentConfig, config_path: Path | None, echo: bool, max_frames: int | None,
                 duration: float | None) -> int:
    from agent.service import Service

    closed = threading.Event()

    def print_line(line: str) -> None:
        # stdout closed by the reader (`edge-agent demo | head -2`): stop at once, quietly
        if closed.is_set():
            return
        try:
            print(line, flush=True)
        except (BrokenPipeError, ValueError):
            closed.set()
            _silence_stdout()
            svc.request_stop()

    svc = Service(cfg, config_path, echo=print_line if echo else None, max_frames=max_frames, duration=duration)
    svc.install_signal_handlers()
    try:
        code = svc.run()
    except AgentError as exc:
        log.error("%s", exc)
        svc.notifier.status(f"failed: {str(exc)[:200]}")
        # a configuration error found only at run time (an unreadable trusted key) exits 2 like one
        # found at load: the unit does not restart it (RestartPreventExitStatus), no restart loop
        return EXIT_CONFIG if isinstance(exc, ConfigError) else 1
    if echo and not closed.is_set():
        _print_summary(svc)
    return code


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that no later write or the exit-time flush raises BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def cmd_run(args: argparse.Namespace) -> int:
    try:
        # the model is checked by the service, and only when it serves the configured one (an
        # installed update may be serving instead)
        cfg = _load_checked(args.config, model=False)
    except ConfigError as exc:
        _print_config_errors(args.config, exc)
        return EXIT_CONFIG
    _setup_logging(args.log_level or cfg.log_level, cfg.device_id)
    code = _run_service(cfg, Path(args.config), False, args.max_frames, args.duration)
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
    if stuck:
        # A thread still inside native code (an engine build or smoke test during an update) would
        # abort the interpreter's teardown ("terminate called without an active exception", status
        # -6). MQTT is drained and the store is written atomically by now: leave without teardown.
        logging.getLogger(__name__).warning("exiting with threads still running: %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def parse_broker(text: str) -> tuple[str, int]:
    """HOST[:PORT] (default port 1883; [v6]:PORT for IPv6); ValueError naming what is wrong."""
    host, port = text, "1883"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected HOST:PORT or [IPv6]:PORT, got {text!r}")
        port = rest[1:] or "1883"
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 1..65535, got {text!r}")
    return host, int(port)


def demo_config(mqtt: str | None, fast: bool, video: Path = DEMO_VIDEO) -> AgentConfig:
    host, port = "127.0.0.1", 1883
    if mqtt:
        try:
            host, port = parse_broker(mqtt)
        except ValueError as exc:
            raise ConfigError([f"--mqtt: {exc}"]) from None
    return parse_config({
        "device_id": "demo",
        "cameras": [{"id": "cam0", "source": str(video), "pace": not fast}],
        "mqtt": {"enabled": mqtt is not None, "host": host, "port": port},
        "cache": {"dir": str(_user_dir("XDG_CACHE_HOME", ".cache") / "engines")},
        "updates": {"enabled": False, "models_dir": str(_user_dir("XDG_DATA_HOME", ".local/share") / "models")},
        "telemetry": {"period_s": 5},
        "service": {"watchdog": False},
    })


BROKER_WAIT_S = 5.0


def broker_problem(cfg: AgentConfig, wait_s: float = BROKER_WAIT_S) -> str | None:
    """Why the configured broker cannot be used (None when an MQTT session comes up within `wait_s`)."""
    from agent.mqtt.client import MqttClient

    host, port = cfg.mqtt.host, cfg.mqtt.port
    try:  # the operating system's reason first: refused, no such host, unreachable, timed out
        socket.create_connection((host, port), timeout=min(wait_s, 3.0)).close()
    except OSError as exc:
        return f"cannot reach the broker at {host}:{port}: {exc.strerror or exc}"
    # its will (sent only if this process died mid-probe) goes to a topic of its own, never the status
    probe = MqttClient(cfg.mqtt, f"{cfg.client_id}-probe", will_topic=f"{cfg.mqtt.topic_prefix}/{cfg.device_id}/probe",
                       will_payload=b"")
    probe.start()
    deadline = time.monotonic() + wait_s
    try:
        while not probe.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        if probe.connected:
            return None
        why = probe.stats().get("last_error") or "no CONNACK (is it an MQTT broker?)"
        return f"no MQTT session with {host}:{port} within {wait_s:g} s: {why}"
    finally:
        probe.stop(0.0)


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level or "warning")
    try:
        cfg = demo_config(args.mqtt, args.fast)
    except ConfigError as exc:
        print("demo: " + "; ".join(exc.errors), file=sys.stderr)
        return EXIT_CONFIG
    if cfg.mqtt.enabled:
        # the demo shows the pipeline working end to end: a broker it cannot reach is a failure,
        # said before the first frame (the service itself keeps retrying in the background)
        problem = broker_problem(cfg)
        if problem is not None:
            print(f"demo: --mqtt {args.mqtt}: {problem}", file=sys.stderr)
            return 1
    return _run_service(cfg, None, True, args.max_frames, args.duration)


def _print_summary(svc: object) -> None:
    from agent.service import Service

    assert isinstance(svc, Service)
    for p in svc.pipelines:
        s = p.stats()
        lat = s["latency_ms"]
        e2e = lat.get("e2e", {}) if isinstance(lat, dict) else {}
        infer = lat.get("infer", {}) if isinstance(lat, dict) else {}
        print(f"summary: camera {s['camera']}: {s['frames_processed']} frames processed of {s['frames_in']} captured, "
              f"{s['frames_dropped']} dropped, {s['errors']} errors; inference p50 {infer.get('p50', '-')} ms, "
              f"end-to-end p50 {e2e.get('p50', '-')} / p99 {e2e.get('p99', '-')} ms; "
              f"engine {svc.engine_info.get('backend')} {svc.engine_info.get('providers')}", file=sys.stderr)


def _decodes(video: Path) -> bool:
    """True when OpenCV reads a first frame of `video`."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    try:
        return bool(cap.isOpened() and cap.read()[0])
    finally:
        cap.release()


def _bench_input_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with bench's files, found before minutes of measuring."""
    for flag, value in (("--model", args.model), ("--video", args.video), ("-c", args.config),
                        ("--clip", getattr(args, "clip", None))):
        if value is not None and not Path(value).is_file():
            return f"{flag}: no such file: {value}"
    clip = getattr(args, "clip", None)
    if clip is not None and not _decodes(Path(clip)):  # a camera on it would reconnect for ever
        return f"--clip: cannot decode a frame of {clip} (not an H.264 / HEVC video file?)"
    for flag in ("fps", "seconds"):  # bench --streams' numbers (agent.streams_bench adds the flags)
        value = getattr(args, flag, None)
        if value is not None and not 0 < value < float("inf"):
            return f"--{flag} must be a positive number, got {value}"
    if args.json_out is not None:
        out = Path(args.json_out)
        parent = out.parent if str(out.parent) else Path(".")
        if out.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            return f"--json: cannot write {out} (not a writable file path)"
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level or "warning")
    problem = _bench_input_problem(args)
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "streams", None) is not None:  # many live streams: agent.streams_bench
        from agent.streams_bench import run_streams

        return run_streams(args)
    from agent.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-agent", description="Edge inference agent: camera -> detector -> MQTT")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the service in the foreground")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="stop after N frames per camera")
    p.add_argument("--duration", type=_positive_float, default=None, help="stop after S seconds")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 on errors)")
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("--schema", action="store_true", help="print the config's JSON schema, for editors")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled model and video")
    p.add_argument("--duration", type=_positive_float, default=None, help="stop after S seconds")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="stop after N frames")
    p.add_argument("--mqtt", metavar="HOST:PORT", default=None, help="also publish to this broker")
    p.add_argument("--fast", action="store_true", help="read the video as fast as possible, not at its rate")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="pipeline vs bare engine throughput and latency")
    p.add_argument("-c", "--config", default=None, help="take model and engine settings from this config")
    p.add_argument("--model", default=None, help="ONNX model (default: the bundled demo model)")
    p.add_argument("--video", default=None, help="video file for the file-source run (default: bundled)")
    p.add_argument("--frames", type=_positive_int, default=300, help="frames per measurement")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="print the ten slowest nodes (ONNX Runtime profiler)")
    p.add_argument("--size", type=_frame_size, default=None, metavar="WxH",
                   help="resize the video's frames to this size first (e.g. 1920x1080: 1080p frames)")
    from agent.streams_bench import add_arguments as add_stream_arguments

    add_stream_arguments(p)
    p.set_defaults(func=cmd_bench)

    from agent.cache.cli import add_parsers as add_cache_parsers
    from agent.fleet.cli import add_parser as add_fleet_parser

    add_cache_parsers(sub)
    add_fleet_parser(sub)
    from agent.plc.snapshot import add_parser as add_snapshot_parser

    add_snapshot_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run",):
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `edge-agent check-config --schema | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
