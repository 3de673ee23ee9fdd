"""The reliability suite's runner: every fault, attack, fleet and soak scenario against real processes,
one report.

    python3 -m reliability --quick            # CI size, a few minutes
    python3 -m reliability                    # release size (hours with the soak)
    python3 -m reliability --only broker_kill,camera_outage --out report/

    MODULES (reliability.<area>, each with SCENARIOS) -> discover -> each scenario(Context) in its own
    temp folder -> ScenarioResult -> reliability.json + reliability.md in --out (rewritten after each)

Exit status 1 when a scenario crashed or a safety invariant (`hard`) broke, and with --strict (CI)
also when a scenario could not run for want of a tool or a permission; a missed timing goal is
reported in the table, not hidden and not fatal.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from reliability.common import Context, Scenario, ScenarioResult

ROOT = Path(__file__).resolve().parents[1]

# Scenario modules in report order; each exposes SCENARIOS: dict[str, Scenario].
MODULES = ["reliability.broker", "reliability.network", "reliability.camera", "reliability.updates",
           "reliability.cache", "reliability.disk", "reliability.clock", "reliability.tls",
           "reliability.attacks", "reliability.fuzz", "reliability.files", "reliability.fleet",
           "reliability.soak"]


def discover() -> tuple[dict[str, Scenario], list[str]]:
    """The scenarios, and the scenario modules that do not exist (said in the report, not hidden)."""
    found: dict[str, Scenario] = {}
    absent: list[str] = []
    for mod in MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                absent.append(mod)
                continue
            raise
        found.update(m.SCENARIOS)
    return found, absent


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    lines = [f"Reliability suite, {meta['size']} size, {meta['date']}, commit {meta['commit']}, "
             f"{meta['machine']}.", "",
             "| scenario | cycles | lost | recovery p50 / p99 / max s | goal | met |",
             "| --- | ---: | --- | --- | --- | --- |"]
    for r in results:
        rec = r.recovery()
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        recovery = " / ".join(_fmt(rec[k]) for k in ("p50", "p99", "max")) if r.recovery_s else "-"
        lines.append(f"| {r.name} | {r.cycles} | {r.lost} | {recovery} | {r.goal} | {met} |")
    notes = [f"- **{r.name}**: {r.note}" for r in results if r.note]
    if meta.get("absent_modules"):
        notes.append(f"- not present in this checkout: {', '.join(meta['absent_modules'])}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: few cycles")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated scenario names to leave out")
    ap.add_argument("--out", type=Path, default=Path("reliability-report"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep each scenario's work folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario parameter, e.g. --set soak_s=28800 (8 h soak) or --set cycles=10")
    ap.add_argument("--strict", action="store_true",
                    help="a scenario that could not run (a tool or permission missing) fails the run too")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)

    scenarios, absent = discover()
    if args.list:
        print("\n".join(scenarios))
        return 0
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = [s for s in [*only, *skip] if s not in scenarios]
    if unknown:
        print(f"reliability: unknown scenarios {unknown}; known: {', '.join(scenarios)}", file=sys.stderr)
        return 2
    names = [n for n in (only or list(scenarios)) if n not in skip]
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        print(f"reliability: --set takes KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    params = dict(kv.split("=", 1) for kv in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"size": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "seed": args.seed, "params": params, "absent_modules": absent}
    results: list[ScenarioResult] = []
    failed = False
    for i, name in enumerate(names, 1):
        work = Path(tempfile.mkdtemp(prefix=f"edge-agent-{name}-"))

        def log(msg: str, name: str = name) -> None:
            print(f"[{name}] {msg}", file=sys.stderr, flush=True)

        print(f"== {i}/{len(names)} {name}", file=sys.stderr, flush=True)
        ctx = Context(work=work, quick=args.quick, seed=args.seed, log=log, params=params)
        t0 = time.monotonic()
        try:
            res = scenarios[name](ctx)
        except Exception as exc:  # a crashed scenario is a result too, and fails the run
            traceback.print_exc()
            res = ScenarioResult(name=name, cycles=0, goal="runs to the end", met=False, lost="-", hard=True,
                                 note=f"scenario crashed: {type(exc).__name__}: {str(exc)[:300]}")
        res.wall_s = round(time.monotonic() - t0, 1)
        results.append(res)
        if (res.hard and res.met is False) or (args.strict and res.met is None):
            failed = True
        log(f"done in {res.wall_s} s: lost {res.lost}; met {res.met}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        # written after every scenario, so an interrupted release run still leaves its figures
        (args.out / "reliability.json").write_text(json.dumps({"meta": meta, "results": [r.to_json() for r in results]},
                                                               indent=2))
        (args.out / "reliability.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    if absent:
        print(f"reliability: scenario modules not present: {absent}", file=sys.stderr)
    return 1 if failed else 0

