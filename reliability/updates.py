"""Model updates under SIGKILL: a real agent killed at a random moment of a signed update, restarted.

`update_kill` (200 cycles / 4 quick; `--set cycles=N`): one agent process on the bundled demo model
and video (paced, 15 fps) with updates on, one mosquitto, the operators' push path. First two
updates run uninterrupted to measure the typical duration T (push start -> `model_kept` at the end
of the health window: download, verify, build, validate, swap and trial). Then every cycle pushes a
new version (alternately `model_v2.onnx` and `model.onnx`, so the bytes differ from what serves),
sleeps a random 0..T, SIGKILLs the agent, restarts it at once and checks, once the update settled:

- hard: the served model (detections' `model` field, the status topic) is the old or the new
  version, and the file behind it (the store's `active`, else the configured model) hashes to that
  version's bytes; every installed version matches its manifest; staging is empty; the retained
  model/state names the version that serves;
- the update ended visibly: `model_kept` (finished), `rolled_back` or `failed` on model/state for
  that version (a resumed or re-delivered manifest counts, as long as it ends); none left hanging;
- recovery: restart -> first detections message of the new process.

Params: `cycles`, `health_window_s` (default 2), `settle_s` (how long an update may take to end after
the restart, default 60).
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from typing import Any

from reliability.common import Context, ScenarioResult, percentile
from tests.support.broker import Broker
from tests.support.update_rig import (
    DEMO_MODEL,
    DEMO_V2,
    DemoAgent,
    Push,
    leftovers,
    make_signer,
    sha256_of,
    signed_manifest,
    start_push,
)

GOAL = "every cycle leaves a complete old or new model (hard); every update ends kept / rolled back / failed"


def _outcome(agent: DemoAgent, version: str, since: int) -> str | None:
    """How the update to `version` ended (None: not yet). `active` is not an end: the trial follows."""
    if any(e.get("version") == version for e in agent.events("model_kept", since)):
        return "kept"
    for s in reversed(agent.states(since, version)):
        if s.get("state") in ("failed", "rolled_back"):
            return f"{s['state']}:{s.get('error')}"
    return None


def _ended(agent: DemoAgent, version: str, since: int) -> Callable[[], bool]:
    return lambda: _outcome(agent, version, since) is not None


def _phase(agent: DemoAgent, version: str, since: int) -> str:
    """Where the update was when the kill landed, from what the agent had published."""
    if any(e.get("version") == version for e in agent.events("model_kept", since)):
        return "kept"
    st = agent.states(since, version)
    return st[-1]["state"] if st else "not_received"


def _served(agent: DemoAgent, n: int = 5, timeout: float = 30) -> tuple[str, str] | None:
    dets = agent.wait_dets(n, timeout=timeout)
    pairs = {(d["model"]["name"], str(d["model"]["version"])) for d in dets[-3:]}
    return pairs.pop() if len(pairs) == 1 else None


def _calibrate(ctx: Context, agent: DemoAgent, push_one: Callable[[], tuple[Push, int]]) -> list[float]:
    """Two uninterrupted updates: how long one takes from push to the end of its health window."""
    durations = []
    for _ in range(2):
        p, mark = push_one()
        if not agent.wait(_ended(agent, p.version, mark), 90):
            raise RuntimeError(f"calibration update {p.version} did not end in 90 s:\n{agent.log()}")
        out = _outcome(agent, p.version, mark)
        if out != "kept":
            raise RuntimeError(f"calibration update {p.version} ended {out}:\n{agent.log()}")
        durations.append(time.monotonic() - p.started)
        p.join(30)
        ctx.log(f"calibration: v{p.version} kept {durations[-1]:.2f} s after the push")
    return durations


def update_kill(ctx: Context) -> ScenarioResult:
    n = ctx.cycles(200, 4)
    rng = random.Random(ctx.seed)
    settle_s = ctx.param("settle_s", 60)
    (ctx.work / "broker").mkdir()
    broker = Broker(ctx.work / "broker").start()
    signer = make_signer(ctx.work / "keys")
    agent = DemoAgent(ctx.work / "dev1", broker, signer, health_window_s=ctx.param("health_window_s", 2))
    known = {sha256_of(DEMO_MODEL): "model.onnx", sha256_of(DEMO_V2): "model_v2.onnx"}
    files = [DEMO_V2, DEMO_MODEL]
    sha_of_version: dict[str, str] = {"1": sha256_of(DEMO_MODEL)}  # what each version's bytes are
    counter = {"next": 2}
    cycles: list[dict[str, Any]] = []
    recovery: list[float] = []
    violations: list[dict[str, Any]] = []
    unresolved: list[dict[str, Any]] = []
    pushes: list[Push] = []

    def push_one() -> tuple[Push, int]:
        version = str(counter["next"])
        model = files[counter["next"] % 2]
        counter["next"] += 1
        sha_of_version[version] = sha256_of(model)
        mark = len(agent.col.messages)
        p = start_push(broker, signed_manifest(signer, model, version), model)
        pushes.append(p)
        return p, mark

    try:
        agent.start()
        if not agent.wait_ready(90) or not agent.wait_dets(1, since=agent.mark, timeout=30):
            raise RuntimeError(f"the agent did not start:\n{agent.log()}")
        durations = _calibrate(ctx, agent, push_one)
        typical = max(durations)
        ctx.log(f"typical update (push -> kept): {typical:.2f} s; killing at random 0..{typical:.2f} s")
        for i in range(n):
            before = _served(agent)
            old_version = before[1] if before else "?"
            p, mark = push_one()
            delay = rng.uniform(0.0, typical)
            time.sleep(max(0.0, p.started + delay - time.monotonic()))
            phase = _phase(agent, p.version, mark)
            agent.kill()
            agent.start()
            restart_at = agent.started_at
            got_det = agent.wait(lambda: agent.first_detection_at() is not None, 60)
            rec = (agent.first_detection_at() or 0.0) - restart_at if got_det else None
            if rec is not None:
                recovery.append(round(rec, 3))
            agent.wait(_ended(agent, p.version, mark), settle_s)
            outcome = _outcome(agent, p.version, mark)
            served = _served(agent) if agent.alive else None
            status = agent.status()
            state = agent.store_state()
            served_file = agent.served_file()
            file_sha = sha256_of(served_file) if served_file.is_file() else None
            problems = agent.store_problems()
            if served is None:
                problems.append("no single model serving after the restart")
            else:
                if served[1] not in (old_version, p.version):
                    problems.append(f"serving v{served[1]}: neither the old v{old_version} nor the new v{p.version}")
                if file_sha not in known:
                    problems.append(f"served file {served_file} hashes to no known model")
                elif sha_of_version.get(served[1]) != file_sha:
                    problems.append(f"v{served[1]} serves {known[file_sha]}, not its own bytes")
                if (state.get("active") or "demo-1") != f"demo-{served[1]}":
                    problems.append(f"store active {state.get('active')} but v{served[1]} serves")
                if status is None or status.get("model", {}).get("version") != served[1]:
                    problems.append(f"status topic says {status and status.get('model')}, detections v{served[1]}")
                if outcome == "kept" and served[1] != p.version:
                    problems.append(f"update kept but v{served[1]} serves")
                if outcome and outcome != "kept" and served[1] != old_version:
                    problems.append(f"update {outcome} but v{served[1]} serves, not the old v{old_version}")
                retained = agent.served_state(agent.mark)  # model/state names what serves, never the attempt
                if outcome and (retained is None or retained.get("version") != served[1]):
                    problems.append(f"model/state says {retained and retained.get('version')} serves, "
                                    f"detections v{served[1]}")
            resumed = sum(1 for s in agent.states(agent.mark, p.version) if s.get("state") == "received") > 0
            row = {"cycle": i + 1, "version": p.version, "old": old_version, "delay_s": round(delay, 3),
                   "phase_at_kill": phase, "outcome": outcome or "unresolved", "resumed_after_restart": resumed,
                   "served": served[1] if served else None, "recovery_s": None if rec is None else round(rec, 3),
                   "problems": problems, "downloads_left": leftovers(agent.models_dir / "downloads")}
            cycles.append(row)
            if problems:
                row["log_tail"] = agent.log(3000)
                violations.append(row)
            if outcome is None:
                unresolved.append(row)
            rec_txt = "-" if rec is None else f"{rec:.2f} s"
            ctx.log(f"cycle {i + 1}/{n}: v{old_version}->v{p.version} killed at {delay:.2f} s ({phase}) -> "
                    f"{outcome or 'UNRESOLVED'}, serving v{served[1] if served else '?'}, recovery {rec_txt}"
                    + ("; PROBLEMS " + "; ".join(problems) if problems else ""))
            p.join(30)
            if not agent.alive:  # never leave the next cycle without an agent
                agent.start()
                agent.wait_ready(90)
        outcomes: dict[str, int] = {}
        phases: dict[str, int] = {}
        for r in cycles:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            phases[r["phase_at_kill"]] = phases.get(r["phase_at_kill"], 0) + 1
        met = not violations and not unresolved
        lost = (f"{len(violations)} of {n} cycles without a complete model; {len(unresolved)} updates left "
                f"unresolved")
        note = (f"typical update {typical:.2f} s (push -> kept, health window "
                f"{ctx.param('health_window_s', 2):g} s); kills by phase {phases}; outcomes {outcomes}; "
                f"recovery = restart -> first detections message")
        if violations:
            note += f"; cycles breaking the invariant: {[v['cycle'] for v in violations]}"
        if unresolved:
            note += f"; unresolved: {[u['cycle'] for u in unresolved]}"
        push_errors = [p.error for p in pushes if p.error]
        return ScenarioResult(
            name="update_kill", cycles=n, goal=GOAL, met=met, lost=lost, recovery_s=recovery, hard=True, note=note,
            details={"typical_update_s": [round(d, 3) for d in durations], "phases": phases, "outcomes": outcomes,
                     "recovery_p50_s": percentile(recovery, 50), "push_errors": push_errors[:20],
                     "cycles": cycles})
    finally:
        agent.close()
        broker.stop()
        shutil.rmtree(ctx.work / "dev1" / "models" / "trash", ignore_errors=True)


SCENARIOS = {"update_kill": update_kill}
