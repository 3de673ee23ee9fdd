"""A full disk under a running agent: the model store and the engine cache on a size-capped tmpfs.

`disk_full` (3 cycles per case / 1 quick): each cycle mounts a fresh tmpfs (`mount -t tmpfs -o
size=N`; root is needed, and without it the scenario says so and judges nothing), starts a real
agent on the demo model and video, and pushes the bytes of model_v2 (3.9 MB) as a signed update:

- `models`: the tmpfs is the model store (`updates.models_dir`), too small for the download (free
  space 2 MB, 0.5 MB, then 0 after a ballast file fills it under the running agent). Wanted: the
  update fails and says why on model/state, the old model serves throughout (no gap in detections),
  no partial download / temp file / staged version is left, the free space is back.
- `cache`: the tmpfs is the engine cache (`cache.dir`): room for the running model's engine, not for
  the new one's (free 1 MB, 0.5 MB, then 0 after a ballast file). Wanted: the update is reported (it
  fails with a reason, or - since the engine can run uncached - it goes on and `engine_cache_full`
  says so), detections keep flowing, no temp file or half entry in the cache (`cache verify` clean),
  and a restart with the cache still full serves again (a full cache must not keep the agent down).

recovery_s: push -> the update's end reported (failed, or kept after its health window).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reliability.common import Context, ScenarioResult
from tests.support.broker import Broker
from tests.support.update_rig import (
    DEMO_V2,
    DemoAgent,
    Signer,
    leftovers,
    make_signer,
    signed_manifest,
    start_push,
)

GOAL = ("update refused or carried on, and reported; old model serves throughout; nothing half-written left; "
        "agent restarts on a full cache")
MODEL_BYTES = DEMO_V2.stat().st_size
ENGINE_BYTES = 3_903_844  # the demo model's optimised graph (ONNX Runtime 1.2x CPU EP), about the model's size
MAX_GAP_S = 1.0  # the video runs at 15 fps: a second without detections is a stall


class MountRefused(Exception):
    pass


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise MountRefused((r.stderr or r.stdout).strip() or f"mount exit {r.returncode}")
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:  # still busy (a process we did not end?): detach it rather than leave it
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _fill(path: Path) -> int:
    """A ballast file taking every free byte of the file system at `path`; returns its size."""
    written = 0
    fd = os.open(path / "ballast", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # unbuffered: no late ENOSPC
    try:
        for block in (64 * 1024, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    return written


def _outcome(agent: DemoAgent, version: str, since: int) -> dict[str, Any] | None:
    if any(e.get("version") == version for e in agent.events("model_kept", since)):
        return {"state": "kept", "error": None}
    for s in reversed(agent.states(since, version)):
        if s.get("state") in ("failed", "rolled_back"):
            return {"state": s["state"], "error": s.get("error"), "detail": s.get("detail")}
    return None


def _gaps(agent: DemoAgent, since: int) -> tuple[float, int, list[str]]:
    """Longest silence between detections messages since `since`, their count, the versions in order."""
    at = [m.at for m in agent.col.messages[since:] if m.topic.endswith("/cam0/detections")]
    versions: list[str] = []
    for d in agent.dets(since):
        v = str(d["model"]["version"])
        if not versions or versions[-1] != v:
            versions.append(v)
    gap = max((b - a for a, b in itertools.pairwise(at)), default=float("inf"))
    return gap, len(at), versions


def _cycle(ctx: Context, case: str, k: int, broker: Broker, signer: Signer, free_bytes: int,
           fill: bool) -> dict[str, Any]:
    dev = f"{case[0]}{k}"
    work = ctx.work / dev
    mnt = work / "mnt"
    size = (free_bytes if case == "models" else ENGINE_BYTES + free_bytes) + 256 * 1024  # + layout, state, locks
    row: dict[str, Any] = {"case": case, "cycle": k + 1, "tmpfs_bytes": size, "ballast": fill}
    with tmpfs(mnt, size):
        # the tmpfs holds the model store or the engine cache; the other stays at its default (None)
        agent = DemoAgent(work, broker, signer, device_id=dev, models_dir=mnt if case == "models" else None,
                          cache_dir=None if case == "models" else mnt)
        try:
            agent.start()
            if not agent.wait_ready(90) or not agent.wait_dets(3, since=agent.mark, timeout=30):
                row["problems"] = [f"agent did not start on the tmpfs: {agent.log(1500)}"]
                return row
            if fill:
                row["ballast_bytes"] = _fill(mnt)
            free_before = _free(mnt)
            row["free_before"] = free_before
            mark = len(agent.col.messages)
            push = start_push(broker, signed_manifest(signer, DEMO_V2, "2", devices=[dev]), DEMO_V2)
            agent.wait(lambda: _outcome(agent, "2", mark) is not None, 90)
            out = _outcome(agent, "2", mark)
            row["report_s"] = round(time.monotonic() - push.started, 3) if out else None
            agent.wait_dets(15, timeout=20)  # a second of serving after the end
            gap, ndets, versions = _gaps(agent, mark)
            push.join(30)
            problems: list[str] = []
            events = [str(e.get("event")) for e in agent.events(since=mark)]
            row.update(outcome=out, max_gap_s=round(gap, 3), detections=ndets, versions=versions,
                       events=sorted(set(events) - {"update_rejected"}), push_error=push.error)
            if out is None:
                problems.append("no end of the update reported on model/state")
            if gap > MAX_GAP_S:
                problems.append(f"detections stopped for {gap:.2f} s")
            expected = ["1", "2"] if out and out["state"] == "kept" else ["1"]
            if versions != expected:
                problems.append(f"served versions {versions}, expected {expected}")
            if case == "models":
                if out and out["state"] != "failed":
                    problems.append(f"the update did not fail on a full store: {out}")
                left = leftovers(mnt)
                staged = sorted(p.name for p in (mnt / "staging").iterdir()) if (mnt / "staging").is_dir() else []
                versions_dir = sorted(p.name for p in (mnt / "versions").iterdir()) if (mnt / "versions").is_dir() \
                    else []
                row.update(leftovers=left, staging=staged, installed=versions_dir, free_after=_free(mnt))
                if left or staged or versions_dir:
                    problems.append(f"left on the store: {left + staged + versions_dir}")
                if row["free_after"] < free_before - 64 * 1024:
                    problems.append(f"free space {row['free_after']} after, {free_before} before")
            else:
                if out and out["state"] == "kept" and "engine_cache_full" not in events:
                    problems.append("kept without an engine_cache_full event: where is its engine?")
                from agent.cache.store import EngineCache

                infos = EngineCache(mnt, 1 << 40, check=False).verify()
                tmp_left = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if ".tmp-" in p.name)
                row.update(cache_entries=[(i.key[:12], i.state, i.reason) for i in infos], cache_tmp_left=tmp_left)
                if tmp_left or any(i.state != "ok" for i in infos):
                    problems.append(f"cache holds temp files {tmp_left} / entries {row['cache_entries']}")
                # A restart with the cache still full: the agent must serve again.
                served = versions[-1] if versions else "1"
                agent.stop()
                agent.start()
                got = agent.wait_dets(3, since=agent.mark, timeout=60)
                first = agent.first_detection_at()
                row["restart_s"] = round(first - agent.started_at, 3) if first is not None else None
                row["restart_events"] = sorted({str(e.get("event")) for e in agent.events(since=agent.mark)})
                if not got:
                    problems.append(f"no detections after a restart on the full cache: {agent.log(1500)}")
                elif {str(d["model"]["version"]) for d in got} != {served}:
                    problems.append(f"after the restart serves {[d['model']['version'] for d in got]}, not {served}")
            row["problems"] = problems
            if problems:
                row["log_tail"] = agent.log(3000)
            return row
        finally:
            agent.close()


def disk_full(ctx: Context) -> ScenarioResult:
    n = ctx.cycles(3, 1)
    # (free bytes, fill the disk with a ballast file once the agent runs)
    plans = {"models": [(2 << 20, False), (512 << 10, False), (4 << 20, True)],
             "cache": [(1 << 20, False), (512 << 10, False), (1 << 20, True)]}
    try:
        with tmpfs(ctx.work / "probe", 1 << 20):
            pass
    except MountRefused as exc:
        return ScenarioResult(name="disk_full", cycles=0, goal=GOAL, met=None, lost="-",
                              note=f"not run: mounting a tmpfs is not permitted here ({exc}); nothing was judged")
    (ctx.work / "broker").mkdir()
    broker = Broker(ctx.work / "broker").start()
    signer = make_signer(ctx.work / "keys")
    rows: list[dict[str, Any]] = []
    try:
        for case in ("models", "cache"):
            for k in range(n):
                free, fill = plans[case][k % len(plans[case])]
                row = _cycle(ctx, case, k, broker, signer, free, fill)
                rows.append(row)
                out = row.get("outcome") or {}
                ctx.log(f"{case} {k + 1}/{n}: tmpfs {row['tmpfs_bytes'] >> 10} KiB{' + ballast' if fill else ''}, "
                        f"model {MODEL_BYTES >> 10} KiB -> {out.get('state')} {out.get('error') or ''}; "
                        f"max detections gap {row.get('max_gap_s')} s; versions {row.get('versions')}"
                        + (f"; restart on the full cache -> first detection {row.get('restart_s')} s"
                           if case == "cache" else "")
                        + ("; PROBLEMS " + "; ".join(row["problems"]) if row.get("problems") else ""))
    finally:
        broker.stop()
    bad = [r for r in rows if r.get("problems")]
    recovery = [r["report_s"] for r in rows if r.get("report_s") is not None]

    def span(case: str, key: str) -> str:
        vals = [r[key] for r in rows if r["case"] == case and r.get(key) is not None]
        return f"{min(vals):.2f}-{max(vals):.2f} s" if vals else "-"

    outcomes = {f"{r['case']}:{(r.get('outcome') or {}).get('state')}:{(r.get('outcome') or {}).get('error')}"
                for r in rows}
    return ScenarioResult(
        name="disk_full", cycles=len(rows), goal=GOAL, met=not bad,
        lost=f"{len(bad)} of {len(rows)} cycles with a problem",
        recovery_s=recovery, hard=False,
        note=(f"model {MODEL_BYTES >> 10} KiB pushed onto a tmpfs models dir / cache dir without room for it; "
              f"outcomes {sorted(outcomes)}; recovery = push -> end of the update reported (models: "
              f"{span('models', 'report_s')}; cache: {span('cache', 'report_s')}, with its health window); a "
              f"restart on the still full cache -> first detection {span('cache', 'restart_s')}"
              + (f"; problems: {[(r['case'], r['cycle'], r['problems']) for r in bad]}" if bad else "")),
        details={"cycles": rows})


SCENARIOS = {"disk_full": disk_full}
