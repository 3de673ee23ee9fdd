"""A device clock far off: a real agent under libfaketime gets a valid, freshly signed manifest.

`clock_skew` (7 cases, the same in both sizes): each case starts an agent on the demo model and video
whose whole process sees a shifted wall clock (libfaketime, Debian package `faketime`, by LD_PRELOAD;
monotonic time is left alone), and pushes model_v2 signed now by the operator's (correct) clock.
The rule under test (agent/updates/manifest.py): accepted when issued_at - 300 s <= now <=
expires_at + 300 s; a clock before 2024-01-01 counts as unset and refuses every manifest.

| case | device clock | manifest | expected |
| behind_2y | -730 days | 1 h | failed not_yet_valid |
| unset_2020 | 2020-01-01 | 1 h | failed not_yet_valid ("clock looks unset") |
| ahead_2y | +730 days | 1 h | failed expired |
| behind_200s | -200 s | 1 h | kept (within the skew) |
| behind_400s | -400 s | 1 h | failed not_yet_valid |
| ahead_260s_of_60s_ttl | +260 s | 60 s | kept (expired 200 s ago: within the skew) |
| ahead_400s_of_60s_ttl | +400 s | 60 s | failed expired |

Checks per case: the agent really ran on the shifted clock (its detections' `ts` minus the real
time), the end reported on model/state (state, reason, a detail that says why), and for a refusal:
the old model kept serving (no gap in detections), nothing installed, nothing downloaded.

libfaketime 0.9.10 (Debian 12) breaks Python 3.11 in two ways: with its default fake monotonic clock
`threading.Event.wait(timeout)` never returns, and with FAKETIME_DONT_FAKE_MONOTONIC=1 every
`time.sleep` fails with EINVAL (its clock_nanosleep wrapper). So the scenario preloads, before
libfaketime, a 6-line shim (compiled here with `cc`) that passes clock_nanosleep straight to the
kernel: monotonic sleeps are then exact, and the wall clock stays shifted. No test knob in the agent.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reliability.common import Context, ScenarioResult
from tests.support.broker import Broker
from tests.support.update_rig import DEMO_V2, DemoAgent, leftovers, make_signer, signed_manifest, start_push

GOAL = "valid manifest refused with the right reason when the clock is off by more than the skew, kept within it"
DAY = 86400
SKEW_S = 300

SHIM_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
/* libfaketime 0.9.10 returns EINVAL here under FAKETIME_DONT_FAKE_MONOTONIC: ask the kernel. */
int clock_nanosleep(clockid_t id, int flags, const struct timespec *req, struct timespec *rem) {
    return syscall(SYS_clock_nanosleep, id, flags, req, rem) == -1 ? errno : 0;
}
"""

# (case, FAKETIME value, offset in seconds from the real clock or None for an absolute date,
#  manifest lifetime, expected end: "kept" or "failed:<reason>", words the detail must hold)
CASES: list[tuple[str, str, float | None, int, str, str]] = [
    ("behind_2y", "-730d", -730 * DAY, 3600, "failed:not_yet_valid", "issued at"),
    ("unset_2020", "@2020-01-01 00:00:00", None, 3600, "failed:not_yet_valid", "clock looks unset"),
    ("ahead_2y", "+730d", 730 * DAY, 3600, "failed:expired", "expired at"),
    ("behind_200s", "-200", -200, 3600, "kept", ""),
    ("behind_400s", "-400", -400, 3600, "failed:not_yet_valid", "issued at"),
    ("ahead_260s_of_60s_ttl", "+260", 260, 60, "kept", ""),
    ("ahead_400s_of_60s_ttl", "+400", 400, 60, "failed:expired", "expired at"),
]


def _faketime_env(work: Path) -> tuple[dict[str, str] | None, str]:
    """The environment that shifts a child's wall clock, or None and why it cannot be had here."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")) or sorted(
        glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))
    if not libs:
        return None, "libfaketime is not installed (apt-get install faketime)"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler for the clock_nanosleep shim libfaketime 0.9.10 needs under Python"
    src, shim = work / "shim.c", work / "nanosleep_shim.so"
    src.write_text(SHIM_C)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(shim), str(src)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        return None, f"the clock_nanosleep shim did not compile: {r.stderr[-300:]}"
    env = {"LD_PRELOAD": f"{shim} {libs[0]}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    probe = subprocess.run(  # does a Python under it keep time and sleep properly?
        [sys.executable, "-c", "import threading, time; time.sleep(0.05); threading.Event().wait(0.05); "
                               "print(time.time())"],
        env={**os.environ, **env, "FAKETIME": "-730d"}, capture_output=True, text=True, timeout=20, check=False)
    try:
        shifted = float(probe.stdout.strip()) - time.time()
    except ValueError:
        return None, f"Python under libfaketime does not run: {probe.stderr[-300:]}"
    if abs(shifted + 730 * DAY) > 60:
        return None, f"libfaketime did not shift the clock (offset seen {shifted:.0f} s)"
    return env, libs[0]


def _outcome(agent: DemoAgent, since: int) -> dict[str, Any] | None:
    if agent.events("model_kept", since):
        return {"state": "kept", "error": None, "detail": None}
    for s in reversed(agent.states(since)):
        if s.get("state") in ("failed", "rolled_back"):
            return {"state": s["state"], "error": s.get("error"), "detail": s.get("detail")}
    return None


def _case(ctx: Context, broker: Broker, signer: Any, env: dict[str, str], cache_dir: Path, case: str, fake: str,
          offset: float | None, ttl: int, expected: str, says: str) -> dict[str, Any]:
    agent = DemoAgent(ctx.work / case, broker, signer, device_id=case.replace("_", "-"), cache_dir=cache_dir,
                      env={**env, "FAKETIME": fake})
    row: dict[str, Any] = {"case": case, "faketime": fake, "ttl_s": ttl, "expected": expected}
    try:
        agent.start()
        if not agent.wait_ready(90) or not agent.wait_dets(5, since=agent.mark, timeout=30):
            row["problems"] = [f"the agent did not start under FAKETIME={fake}: {agent.log(1500)}"]
            return row
        det = agent.dets()[-1]
        seen = float(det["ts"]) - time.time()  # capture time on the device's clock vs ours (< 1 s apart)
        row["device_clock_offset_s"] = round(seen, 1)
        mark = len(agent.col.messages)
        push = start_push(broker, signed_manifest(signer, DEMO_V2, "2", devices=[agent.dev], expires_in=ttl),
                          DEMO_V2)
        agent.wait(lambda: _outcome(agent, mark) is not None, 60)
        out = _outcome(agent, mark)
        row["report_s"] = round(time.monotonic() - push.started, 3) if out else None
        agent.wait_dets(15, timeout=20)
        push.join(30)
        at = [m.at for m in agent.col.messages[mark:] if m.topic.endswith("/cam0/detections")]
        gap = max((b - a for a, b in itertools.pairwise(at)), default=float("inf"))
        versions = [str(d["model"]["version"]) for d in agent.dets(mark)]
        got = "kept" if out and out["state"] == "kept" else f"{out['state']}:{out['error']}" if out else None
        row.update(outcome=got, detail=out and out.get("detail"), max_gap_s=round(gap, 3),
                   served_after=versions[-1] if versions else None,
                   installed=sorted(p.name for p in (agent.models_dir / "versions").glob("*")),
                   downloads=leftovers(agent.models_dir / "downloads") + sorted(
                       p.name for p in (agent.models_dir / "downloads").glob("*.onnx")))
        problems = []
        want = offset if offset is not None else 1_577_836_800 - time.time()
        if abs(seen - want) > 30:
            problems.append(f"device clock offset {seen:.0f} s, wanted {want:.0f} s: faketime not in effect")
        if got != expected:
            problems.append(f"ended {got} ({row['detail']}), expected {expected}")
        if says and says not in (row["detail"] or ""):
            problems.append(f"detail {row['detail']!r} does not say {says!r}")
        if gap > 1.0:
            problems.append(f"detections stopped for {gap:.2f} s")
        if expected != "kept":
            if row["served_after"] != "1" or row["installed"] or row["downloads"]:
                problems.append(f"refused, yet serves v{row['served_after']}, installed {row['installed']}, "
                                f"downloads {row['downloads']}")
        elif row["served_after"] != "2":
            problems.append(f"accepted, yet serves v{row['served_after']}")
        row["problems"] = problems
        if problems:
            row["log_tail"] = agent.log(2500)
        return row
    finally:
        agent.close()


def clock_skew(ctx: Context) -> ScenarioResult:
    env, why = _faketime_env(ctx.work)
    if env is None:
        return ScenarioResult(name="clock_skew", cycles=0, goal=GOAL, met=None, lost="-",
                              note=f"not run: {why}; nothing was judged")
    (ctx.work / "broker").mkdir()
    broker = Broker(ctx.work / "broker").start()
    signer = make_signer(ctx.work / "keys")
    cache_dir = ctx.work / "cache"  # shared: the cases need the same two engines
    rows: list[dict[str, Any]] = []
    try:
        for case, fake, offset, ttl, expected, says in CASES:
            row = _case(ctx, broker, signer, env, cache_dir, case, fake, offset, ttl, expected, says)
            rows.append(row)
            detail = f" ({row['detail']})" if row.get("detail") else ""
            ctx.log(f"{case}: FAKETIME={fake} (device clock {row.get('device_clock_offset_s')} s off), manifest "
                    f"ttl {ttl} s -> {row.get('outcome')}{detail}; serving v{row.get('served_after')}"
                    + ("; PROBLEMS " + "; ".join(row["problems"]) if row.get("problems") else ""))
    finally:
        broker.stop()
    bad = [r for r in rows if r.get("problems")]
    return ScenarioResult(
        name="clock_skew", cycles=len(rows), goal=GOAL, met=not bad,
        lost=f"{len(bad)} of {len(rows)} cases decided wrongly or disturbed serving",
        hard=True,
        note=(f"real agent under libfaketime ({why}); skew {SKEW_S} s; "
              + "; ".join(f"{r['case']} -> {r.get('outcome')}" for r in rows)
              + (f"; problems: {[(r['case'], r['problems']) for r in bad]}" if bad else "")),
        details={"cases": rows})


SCENARIOS = {"clock_skew": clock_skew}
