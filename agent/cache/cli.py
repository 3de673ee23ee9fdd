"""`edge-agent build-engine` and `edge-agent cache list | verify | prune` (wired by agent.cli).

    sub = parser.add_subparsers(dest="command")
    add_build_engine_parser(sub)      # sets func=cmd_build_engine
    add_cache_parser(sub)             # sets func=cmd_cache

Exit codes: 0 ok; 1 a failure (build failed, corrupt entries found by verify); 2 bad arguments /
config, or a cache folder that cannot be read (not a directory, no permission).

`cache list` is cheap: it reads each entry's metadata and compares the engine's size with it, so it
finds truncated, grown, half-written and mismatched entries, and shows the rest as `unverified`;
`cache verify` also reads every engine and checks its sha256 (a flipped byte), and says `ok`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, CacheError, ConfigError, ModelError

if TYPE_CHECKING:
    from agent.cache.entries import EntryInfo

__all__ = ["add_build_engine_parser", "add_cache_parser", "add_parsers", "cmd_build_engine", "cmd_cache",
           "format_table"]

EXIT_FAIL = 1
EXIT_USAGE = 2


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts > 0 else "-"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> tuple[Any, Path, int]:
    """(EngineConfig, cache dir, cache max bytes) from -c FILE if given, then the flags."""
    from agent.config import CacheConfig, EngineConfig, load_config

    if getattr(args, "config", None):
        cfg = load_config(args.config)
        engine, cache = cfg.engine, cfg.cache
    else:
        engine, cache = EngineConfig(), CacheConfig()
    updates: dict[str, Any] = {}
    if getattr(args, "backend", None):
        updates["backend"] = args.backend
    if getattr(args, "precision", None):
        updates["precision"] = args.precision
    if updates:
        engine = EngineConfig.model_validate({**engine.model_dump(), **updates})
    cache_dir = Path(args.cache_dir) if getattr(args, "cache_dir", None) else cache.dir
    return engine, cache_dir, cache.max_mb * 1024 * 1024


class _Progress:
    """One status line on stderr, rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.t0 = time.monotonic()

    def __call__(self, fraction: float, note: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {fraction:4.0%} {note}"
        if self.tty:
            print("\r" + line.ljust(78)[:78], end="", file=sys.stderr, flush=True)
        elif f"{fraction:.0%} {note}" != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = f"{fraction:.0%} {note}"

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_build_engine(args: argparse.Namespace) -> int:
    from agent.cache.store import EngineCache
    from agent.engines.factory import create_engine

    try:
        engine_cfg, cache_dir, max_bytes = _settings(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"build-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model = Path(args.model)
    if not model.is_file():
        print(f"build-engine: model not found: {model}", file=sys.stderr)
        return EXIT_USAGE
    events: list[tuple[str, dict[str, Any]]] = []

    def on_event(name: str, data: dict[str, Any]) -> None:
        events.append((name, data))
        if name in ("engine_quarantined", "engine_build_waiting", "engine_cache_unusable", "engine_evicted"):
            print(f"{name}: {data}", file=sys.stderr)

    progress = _Progress()
    t0 = time.monotonic()
    try:
        cache = EngineCache(cache_dir, max_bytes, on_event=on_event)
        engine = create_engine(model, engine_cfg, cache, on_event=on_event, progress=progress)
    except AgentError as exc:
        progress.done()
        print(f"build-engine failed: {exc}", file=sys.stderr)
        # the operator's input (not an ONNX model, a cache folder that cannot be written) is a usage
        # error; a build that fails on a good model is a failure
        return EXIT_USAGE if isinstance(exc, (ModelError, CacheError)) else EXIT_FAIL
    progress.done()
    info = engine.info
    built = any(name == "engine_built" for name, _ in events)
    engine.close()
    print(f"{'built' if built else 'cached'}: key {info.engine_key[:16]}  backend {info.backend} "
          f"({','.join(info.providers)})  precision {info.precision}  in {time.monotonic() - t0:.1f} s  "
          f"cache {cache_dir}")
    return 0


def _cache_dir_problem(cache_dir: Path) -> str | None:
    """Why `cache_dir` cannot be read as a cache (None when it can, or does not exist yet)."""
    try:
        if not cache_dir.exists():
            return None
        if not cache_dir.is_dir():
            return f"{cache_dir} is not a directory"
        next(iter(os.scandir(cache_dir)), None)
    except OSError as exc:
        return f"cannot read {cache_dir}: {exc.strerror or exc}"
    return None


def cmd_cache(args: argparse.Namespace) -> int:
    from agent.cache.store import EngineCache

    try:
        _, cache_dir, max_bytes = _settings(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    action = getattr(args, "cache_action", None) or "list"
    problem = _cache_dir_problem(cache_dir)
    if problem is not None:
        print(f"cache {action}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    cache = EngineCache(cache_dir, max_bytes, check=False)
    try:
        if action == "prune":
            removed = cache.prune(stale=True, corrupt=True)
            print(f"pruned {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
                  + "".join(f"\n  {k[:16]}" for k in removed))
            return 0
        infos = cache.verify() if action == "verify" else cache.list_entries()
    except AgentError as exc:
        print(f"cache {action} failed: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:  # an entry folder unreadable while the cache folder itself is readable
        print(f"cache {action}: cannot read {cache_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE

    def state(i: EntryInfo) -> str:
        # list reads metadata and sizes only: a flipped byte passes that, so nothing is called ok unread
        shown = "unverified" if action == "list" and i.state == "ok" else i.state
        return shown + (" (protected)" if i.protected else "")

    rows = [[i.key[:12], i.fields.get("model_sha256", "-")[:12], i.fields.get("backend", "-"),
             i.fields.get("precision", "-"), _human(i.size), _when(i.last_use), state(i), i.reason[:60]]
            for i in infos]
    if rows:
        print(format_table(rows, ["KEY", "MODEL", "BACKEND", "PRECISION", "SIZE", "LAST USE", "STATE", "REASON"]))
    print(f"{len(infos)} entr{'y' if len(infos) == 1 else 'ies'}, {_human(sum(i.size for i in infos))} "
          f"of {_human(max_bytes)} in {cache_dir}")
    if action == "list" and infos:
        print("list checked each entry's metadata and engine size; `edge-agent cache verify` reads every engine "
              "and checks its sha256")
    if action == "verify" and any(i.state == "corrupt" for i in infos):
        return EXIT_FAIL
    return 0


def add_build_engine_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("build-engine", help="build (or find) the engine for a model in the cache")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], help="default: the config's, or onnxruntime")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="default: the config's, or fp32")
    p.add_argument("--cache-dir", help="default: the config's cache.dir")
    p.add_argument("-c", "--config", help="agent config to take engine and cache settings from")
    p.set_defaults(func=cmd_build_engine)
    return p


def add_cache_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cache", help="list, verify or prune the engine cache")
    p.add_argument("cache_action", choices=["list", "verify", "prune"], nargs="?", default="list")
    p.add_argument("--cache-dir", help="default: the config's cache.dir")
    p.add_argument("-c", "--config", help="agent config to take the cache settings from")
    p.set_defaults(func=cmd_cache)
    return p


def add_parsers(subparsers: Any) -> None:
    add_build_engine_parser(subparsers)
    add_cache_parser(subparsers)
