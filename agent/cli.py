"""`edge-agent` command line (contract in DESIGN.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
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


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json_schema())
        return 0
    if not args.config:
        print("check-config: -c FILE is required (or --schema)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok (device {cfg.device_id}, {len(cfg.cameras)} camera(s), model {cfg.model.path})")
    return 0


def _run_service(cfg: AgentConfig, config_path: Path | None, echo: bool, max_frames: int | None,
                 duration: float | None) -> int:
    from agent.service import Service

    svc = Service(cfg, config_path, echo=(lambda line: print(line, flush=True)) if echo else None,
                  max_frames=max_frames, duration=duration)
    svc.install_signal_handlers()
    try:
        code = svc.run()
    except AgentError as exc:
        log.error("%s", exc)
        svc.notifier.status(f"failed: {str(exc)[:200]}")
        # a configuration error found only at run time (an unreadable trusted key) exits 2 like one
        # found at load: the unit does not restart it (RestartPreventExitStatus), no restart loop
        return EXIT_CONFIG if isinstance(exc, ConfigError) else 1
    if echo:
        _print_summary(svc)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
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


def demo_config(mqtt: str | None, fast: bool, video: Path = DEMO_VIDEO) -> AgentConfig:
    host, port = "127.0.0.1", 1883
    if mqtt:
        host, _, p = mqtt.rpartition(":") if ":" in mqtt else (mqtt, "", "1883")
        port = int(p)
    return parse_config({
        "device_id": "demo",
        "cameras": [{"id": "cam0", "source": str(video), "pace": not fast}],
        "mqtt": {"enabled": mqtt is not None, "host": host, "port": port},
        "cache": {"dir": str(_user_dir("XDG_CACHE_HOME", ".cache") / "engines")},
        "updates": {"enabled": False, "models_dir": str(_user_dir("XDG_DATA_HOME", ".local/share") / "models")},
        "telemetry": {"period_s": 5},
        "service": {"watchdog": False},
    })


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level or "warning")
    try:
        cfg = demo_config(args.mqtt, args.fast)
    except (ConfigError, ValueError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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


def cmd_bench(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level or "warning")
    from agent.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-agent", description="Edge inference agent: camera -> detector -> MQTT")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the service in the foreground")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames per camera")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 on errors)")
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("--schema", action="store_true", help="print the config's JSON schema, for editors")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled model and video")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    p.add_argument("--mqtt", metavar="HOST:PORT", default=None, help="also publish to this broker")
    p.add_argument("--fast", action="store_true", help="read the video as fast as possible, not at its rate")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="pipeline vs bare engine throughput and latency")
    p.add_argument("-c", "--config", default=None, help="take model and engine settings from this config")
    p.add_argument("--model", default=None, help="ONNX model (default: the bundled demo model)")
    p.add_argument("--video", default=None, help="video file for the file-source run (default: bundled)")
    p.add_argument("--frames", type=int, default=300, help="frames per measurement")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="print the ten slowest nodes (ONNX Runtime profiler)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="resize the video's frames to this size first (e.g. 1920x1080: 1080p frames)")
    p.set_defaults(func=cmd_bench)

    from agent.cache.cli import add_parsers as add_cache_parsers
    from agent.fleet.cli import add_parser as add_fleet_parser

    add_cache_parsers(sub)
    add_fleet_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run",):
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
