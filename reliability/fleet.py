"""A fleet on one broker: a signed model rollout to a group, then forged updates that must reach no one.

`fleet`: `agents` agent processes (50 full / 5 quick) on this machine, one mosquitto, each with its
own device id, model store and engine cache, all in group `line-1`: a synthetic camera at `fps`
(0.5), the demo model, one CPU thread each (`engine.intra_op_threads: 1`). Start-up is staggered
(at most `start_parallel` agents loading at once: an agent counts as up when its telemetry shows
the update manager), since 50 Python processes importing ONNX Runtime together on 2 cores would
only slow each other down.

1. Rollout: the operator's tool, `python -m agent.cli fleet push-model model_v2.onnx --version 2
   --group line-1` signed with the trusted key, over MQTT chunks. Per agent: time from the push
   command's start to its `active` on `model/state` (and to `received`, the manifest's arrival, and
   the time spent in each state), p50 / p99 / max. An agent that exits meanwhile is started again
   after `restart_s` (2 s), as systemd's `Restart=on-failure` / `RestartSec=2` or a container
   runtime would (outside systemd the agent exits on purpose when a stage stalls > `service.stall_s`).
   Devices not `active` when the wave has settled get the update again by device id
   (`retry_waves`, 1), as an operator reading `fleet status` would do. Then every agent must report
   version 2 in its retained status and `state.json` and keep it through the health window
   (`health_window_s`) without a rollback. recovery_s: first push -> active, per agent.
2. Forged updates, each pushed to the whole group and each to be refused by every agent (a
   `failed` state naming the manifest) and activated by none: (a) the fleet tool with a key no
   agent trusts, under the trusted key's id; (b) a manifest properly signed by the trusted key and
   then tampered with (another version, another model's sha256). Afterwards every agent's status
   and `state.json` still say version 2. This part is a safety invariant: if any agent activates a
   forged model the result is `hard` and fails the run.

Memory (sum of the agents' RSS) and the machine's available memory are sampled throughout; the
launch stops early, and says so, if available memory falls under `min_free_mb` (1500).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.config import DEMO_MODEL
from agent.fleet.push import build_manifest, connect, model_info, push_model
from agent.updates.manifest import generate_keypair, load_private_key, sign_manifest
from agent.updates.state import attempt_records
from reliability.common import Context, ScenarioResult, percentile, wait_until
from tests.support.agent_proc import ROOT, write_config
from tests.support.broker import Broker
from tests.support.mqtt import Collector

GROUP = "line-1"
DEMO_V2 = DEMO_MODEL.with_name("model_v2.onnx")
FORGED = ("3", "4", "5")  # versions the forged pushes carry (v3: untrusted key; v4 signed, altered to v5)
ROLLOUT_GOAL_S = 120.0  # p99 push -> active, on this 2-core machine with every agent on it
FLOW = ("received", "downloading", "verifying", "building", "validating", "active")
TERMINAL = ("active", "failed", "rolled_back")
PHASES = {"transfer": ("received", "verifying"), "verify": ("verifying", "building"),
          "build": ("building", "validating"), "validate_and_swap": ("validating", "active")}


@dataclass
class Agent:
    device: str
    dir: Path
    cfg: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    started: float = 0.0  # monotonic
    up_s: float | None = None  # launch -> update manager running (telemetry with its counters)
    exits: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, exit status) of unplanned exits

    def launch(self) -> None:
        if self.log is None:
            self.log = (self.dir / "agent.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(self.cfg)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()
            self.log = None


class Supervisor:
    """What systemd (`Restart=on-failure`, `RestartSec=2`) or a container runtime does for each device:
    an agent that exits is started again after `delay` seconds. Outside systemd the agent exits on
    purpose when a stage stalls longer than `service.stall_s`, counting on exactly this."""

    def __init__(self, agents: list[Agent], delay: float = 2.0) -> None:
        self.agents, self.delay = agents, delay
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._t.start()
        return self

    def _run(self) -> None:
        due: dict[str, float] = {}
        while not self._stop.wait(0.2):
            with self._lock:
                for a in self.agents:
                    if a.proc is None or a.proc.poll() is None:
                        continue
                    if a.device not in due:
                        a.exits.append((time.monotonic(), int(a.proc.returncode)))
                        due[a.device] = time.monotonic() + self.delay
                    elif time.monotonic() >= due[a.device]:
                        del due[a.device]
                        a.launch()

    def stop(self) -> None:
        """No more restarts (call before stopping the agents)."""
        self._stop.set()
        self._t.join(5)


class MemSampler:
    """Sum of the agents' RSS and the machine's available memory, every `period` seconds."""

    def __init__(self, agents: list[Agent], period: float = 2.0) -> None:
        self.agents, self.period = agents, period
        self.peak_total_mb = 0.0
        self.peak_agent_mb = 0.0
        self.min_available_mb = float("inf")
        self.samples: list[tuple[float, int, float, float]] = []  # (t, agents, total MB, available MB)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def start(self) -> MemSampler:
        self._t.start()
        return self

    def sample(self) -> None:
        total, n = 0.0, 0
        for a in list(self.agents):
            if a.proc is None or a.proc.poll() is not None:
                continue
            try:
                rss = psutil.Process(a.proc.pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
            total += rss
            n += 1
            self.peak_agent_mb = max(self.peak_agent_mb, rss)
        avail = psutil.virtual_memory().available / 2**20
        self.peak_total_mb = max(self.peak_total_mb, total)
        self.min_available_mb = min(self.min_available_mb, avail)
        self.samples.append((time.monotonic(), n, round(total, 1), round(avail, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


@dataclass
class FleetView:
    """What the subscriber saw, per device: model/state payloads (with arrival time) and status."""

    col: Collector
    _parsed: int = 0
    states: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def update(self) -> None:
        msgs = self.col.messages
        n = len(msgs)
        for m in msgs[self._parsed:n]:
            parts = m.topic.split("/")
            if len(parts) < 3 or not m.payload:
                continue
            dev, kind = parts[1], "/".join(parts[2:])
            if kind == "telemetry":
                if b'"manifests"' in m.payload:  # the update manager runs and has subscribed
                    self.ready.add(dev)
                continue
            try:
                doc = json.loads(m.payload)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if kind == "model/state":  # the attempt and refusal records beside what serves
                self.states.setdefault(dev, []).extend((m.at, rec) for rec in attempt_records(doc))
            elif kind == "status":
                self.status[dev] = doc
            elif kind == "events":
                self.events.setdefault(dev, []).append(doc)
        self._parsed = n

    def last(self, dev: str, manifest_id: str, states: tuple[str, ...]) -> tuple[float, dict[str, Any]] | None:
        for at, doc in reversed(self.states.get(dev, [])):
            if doc.get("manifest_id") == manifest_id and doc.get("state") in states:
                return at, doc
        return None

    def first(self, dev: str, manifest_id: str, states: tuple[str, ...]) -> tuple[float, dict[str, Any]] | None:
        for at, doc in self.states.get(dev, []):
            if doc.get("manifest_id") == manifest_id and doc.get("state") in states:
                return at, doc
        return None


def _push_cli(broker: Broker, key: Path, key_id: str, model: Path, version: str, work: Path,
              devices: list[str] | None = None) -> tuple[str, str]:
    """The operator's command, to the group or to `devices`; returns (manifest id, its output)."""
    to = ["--group", GROUP] if not devices else [x for d in devices for x in ("--device", d)]
    args = [sys.executable, "-m", "agent.cli", "fleet", "push-model", str(model), "--version", version,
            "--name", "demo", *to, "--key", str(key), "--key-id", key_id, "--host", broker.host,
            "--port", str(broker.port)]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = r.stdout + r.stderr
    log = work / f"push-{version}-{key_id}-{int(time.time())}.log"
    log.write_text(f"$ {' '.join(args)}\nrc {r.returncode}\n{out}")
    m = re.search(r"^manifest ([0-9a-f]+):", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"push-model printed no manifest id (rc {r.returncode}): {out[-1500:]}")
    return m.group(1), out


def _push_tampered(broker: Broker, key: Any, model: Path) -> str:
    """A manifest signed by the trusted key, then altered (version and sha256) before publishing."""
    info = model_info(model)
    signed = sign_manifest(build_manifest(info, name="demo", version="4", groups=[GROUP]), key, "ops")
    signed["model"]["version"] = "5"  # what an attacker on the path would change...
    signed["model"]["sha256"] = "0" * 64  # ...and the checksum of the model he would slip in
    client = connect(broker.host, broker.port)
    try:
        push_model(client, signed, model, group_delay=2.0)
    finally:
        client.disconnect()
        client.loop_stop()
    return str(signed["id"])


def _state_json(a: Agent) -> dict[str, Any]:
    p = a.dir / "models" / "state.json"
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return {}


def _wait_wave(ctx: Context, view: FleetView, devs: list[str], mid: str, t0: float, timeout: float,
               quiet_s: float) -> None:
    """Until every device reached a terminal state for `mid`, or nothing moved for `quiet_s` (an agent
    that lost the update in a restart and did not resume it says nothing more), or `timeout`."""
    seen = [0, time.monotonic()]
    last_log = [time.monotonic()]

    def done() -> bool:
        view.update()
        n_states = sum(1 for d in devs for _, doc in view.states.get(d, []) if doc.get("manifest_id") == mid)
        if n_states != seen[0]:
            seen[0], seen[1] = n_states, time.monotonic()
        finished = [d for d in devs if (last := view.last(d, mid, FLOW + TERMINAL)) and last[1]["state"] in TERMINAL]
        if time.monotonic() - last_log[0] > 15:
            last_log[0] = time.monotonic()
            ctx.log(f"  {len(finished)}/{len(devs)} agents finished ({time.monotonic() - t0:.0f} s after the push)")
        return len(finished) == len(devs) or time.monotonic() - seen[1] > quiet_s

    wait_until(done, timeout=timeout, step=0.5)


def _wave_figures(view: FleetView, devs: list[str], mid: str, t_wave: float, t_first: float) -> dict[str, Any]:
    active_s: list[float] = []
    received_s: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    failed: dict[str, int] = {}
    per: dict[str, dict[str, Any]] = {}
    silent = 0
    for d in devs:
        at = {st: hit[0] for st in FLOW if (hit := view.first(d, mid, (st,))) is not None}
        for ph, (a, b) in PHASES.items():
            if a in at and b in at:
                phases[ph].append(at[b] - at[a])
        last = view.last(d, mid, FLOW + TERMINAL)
        row: dict[str, Any] = {"state": None if last is None else last[1].get("state")}
        if "received" in at:
            received_s.append(at["received"] - t_wave)
            row["received_s"] = round(at["received"] - t_wave, 2)
        if last is not None and last[1].get("state") == "active":
            active_s.append(last[0] - t_wave)
            row["active_s"] = round(last[0] - t_wave, 2)
        elif last is not None and last[1].get("state") in TERMINAL:
            why = str(last[1].get("error"))
            failed[why] = failed.get(why, 0) + 1
            row["error"] = {k: last[1].get(k) for k in ("error", "detail")}
        elif last is None:
            silent += 1
        per[d] = row
    return {"active": len(active_s), "failed_reasons": failed, "silent": silent,
            "wave_started_after_first_push_s": round(t_wave - t_first, 1),
            "active_s": {"p50": _r(percentile(active_s, 50)), "p99": _r(percentile(active_s, 99)),
                         "max": _r(max(active_s, default=None)), "min": _r(min(active_s, default=None))},
            "received_s": {"p50": _r(percentile(received_s, 50)), "max": _r(max(received_s, default=None))},
            # where the time goes, per agent (a state's arrival at the subscriber to the next one's)
            "phases_s": {ph: {"p50": _r(percentile(v, 50)), "max": _r(max(v, default=None))}
                         for ph, v in phases.items()},
            "per_agent": per}


def fleet(ctx: Context) -> ScenarioResult:
    n = int(ctx.param("agents", 5 if ctx.quick else 50))
    # 0.5 fps: an idle agent costs ~2.3 % of a core per fps plus ~1.2 % (measured here), so 50 agents at
    # 1 fps keep both cores busy before any update starts (--set fps=1 to see that)
    fps = ctx.param("fps", 0.5)
    parallel = int(ctx.param("start_parallel", 2))
    health_s = ctx.param("health_window_s", 30.0)  # the shipped default: ~15 frames at 0.5 fps to judge fps by
    min_free = ctx.param("min_free_mb", 1500)
    timeout = ctx.param("rollout_timeout_s", 900.0)
    quiet_s = ctx.param("quiet_s", 90.0)  # > updates.download_timeout_s (60): a stalled transfer has failed by then
    retries = int(ctx.param("retry_waves", 1))  # operator re-pushes to the devices not on v2
    # the smoke test's latency budget: the shipped default unless set (a tiny one makes every update fail)
    budget = {"latency_budget_ms": ctx.param("latency_budget_ms", 0)} if "latency_budget_ms" in ctx.params else {}
    goal = (f"all converge on v2 (p99 first push -> active <= {ROLLOUT_GOAL_S:g} s, one re-push allowed); forged "
            "updates activated by none and refused by all")
    keys = generate_keypair(ctx.work / "keys", "ops")
    rogue = generate_keypair(ctx.work / "rogue", "rogue")
    (ctx.work / "broker").mkdir()
    broker = Broker(ctx.work / "broker").start()
    col = Collector(broker.host, broker.port, ["edge/+/model/state", "edge/+/status", "edge/+/events",
                                                "edge/+/telemetry"])
    view = FleetView(col)
    agents: list[Agent] = []
    mem = MemSampler(agents).start()
    details: dict[str, Any] = {"agents": n, "fps": fps, "start_parallel": parallel, "health_window_s": health_s,
                               "cpus": os.cpu_count()}
    notes: list[str] = []
    supervisor: Supervisor | None = None
    try:
        # ---- staggered start ---------------------------------------------------------------------
        t_launch0 = time.monotonic()
        for i in range(n):
            dev = f"fleet-{i:03d}"
            adir = ctx.work / dev
            adir.mkdir()
            cfg = write_config(
                adir / "agent.yaml", broker.port, DEMO_MODEL, f"synthetic:320x240@{fps:g}", device_id=dev,
                cameras=[{"id": "cam0", "source": f"synthetic:320x240@{fps:g}"}],
                model={"name": "demo", "version": "1"},
                engine={"intra_op_threads": 1, "warmup_runs": 1},
                telemetry={"period_s": 5},
                # no drain wait at stop: 50 agents stopping together need not each wait for the broker
                service={"drain_s": 1},
                updates={"enabled": True, "trusted_keys": {"ops": keys.public_b64}, "groups": [GROUP],
                         "models_dir": str(adir / "models"), "health_window_s": health_s, **budget})
            agents.append(Agent(dev, adir, cfg))
        pending = list(agents)
        starting: list[Agent] = []
        logged = 0
        while pending or starting:
            view.update()
            for a in list(starting):
                if a.device in view.ready:
                    a.up_s = time.monotonic() - a.started
                    starting.remove(a)
                elif a.proc is not None and a.proc.poll() is not None:
                    raise RuntimeError(f"{a.device} exited with {a.proc.returncode} at start; see {a.dir}")
                elif time.monotonic() - a.started > 300:
                    raise RuntimeError(f"{a.device} not up after 300 s")
            while pending and len(starting) < parallel:
                avail = psutil.virtual_memory().available / 2**20
                if avail < min_free:
                    notes.append(f"launch stopped at {len(agents) - len(pending)} agents: {avail:.0f} MB available")
                    ctx.log(notes[-1])
                    pending.clear()
                    break
                a = pending.pop(0)
                a.launch()
                starting.append(a)
            up = sum(1 for a in agents if a.up_s is not None)
            if up >= logged + 10:
                logged = up
                ctx.log(f"{up}/{n} agents up ({time.monotonic() - t_launch0:.0f} s)")
            time.sleep(0.1)
        live = [a for a in agents if a.up_s is not None]
        startup = [a.up_s for a in live if a.up_s is not None]
        details["startup"] = {"wall_s": round(time.monotonic() - t_launch0, 1), "agents_up": len(live),
                              "per_agent_s": {"p50": percentile(startup, 50), "max": max(startup, default=None)}}
        mem.sample()
        details["memory_idle"] = {"agents_total_mb": mem.samples[-1][2], "available_mb": mem.samples[-1][3]}
        ctx.log(f"{len(live)} agents up in {details['startup']['wall_s']} s (each {percentile(startup, 50):.1f} s "
                f"p50 to load); agents' RSS {mem.samples[-1][2]:.0f} MB, {mem.samples[-1][3]:.0f} MB available")
        cpu0 = psutil.cpu_times_percent(interval=3.0)
        details["cpu_busy_before_push_pct"] = round(100 - cpu0.idle, 1)
        details["loadavg_before_push"] = [round(x, 2) for x in os.getloadavg()]
        devs = [a.device for a in live]

        # ---- 1. rollout ----------------------------------------------------------------------------
        supervisor = Supervisor(agents, delay=ctx.param("restart_s", 2.0)).start()
        t_push_wall = time.time()
        t_push = time.monotonic()
        waves: list[dict[str, Any]] = []
        targets = list(devs)
        outcome: dict[str, tuple[str, float, dict[str, Any]]] = {}  # device -> (last terminal state, at, payload)
        for wave in range(1 + retries):
            if not targets:
                break
            t_w = time.monotonic()
            # wave 0: the group, as an operator rolls out; later waves: the devices still not on v2, by id
            mid, out = _push_cli(broker, keys.private_path, "ops", DEMO_V2, "2", ctx.work,
                                 devices=None if wave == 0 else targets)
            push_cmd_s = time.monotonic() - t_w
            ctx.log(f"wave {wave + 1}: pushed v2 (manifest {mid}) to {'group ' + GROUP if wave == 0 else targets} "
                    f"in {push_cmd_s:.1f} s; waiting for {len(targets)} agents")
            _wait_wave(ctx, view, targets, mid, t_w, timeout, quiet_s)
            w = _wave_figures(view, targets, mid, t_w, t_push)
            w.update({"manifest_id": mid, "targets": len(targets), "push_command_s": round(push_cmd_s, 2),
                      "push_output": out[-1500:]})
            waves.append(w)
            for d in targets:
                last = view.last(d, mid, TERMINAL)
                if last is not None:
                    outcome[d] = (last[1].get("state", "?"), last[0], last[1])
            ctx.log(f"wave {wave + 1}: {w['active']}/{len(targets)} active; push -> active p50 "
                    f"{w['active_s']['p50']} / p99 {w['active_s']['p99']} / max {w['active_s']['max']} s; "
                    f"failed {w['failed_reasons']}; no answer {w['silent']}; phases p50/max "
                    + ", ".join(f"{k} {v['p50']}/{v['max']}" for k, v in w["phases_s"].items()))
            targets = [d for d in devs if outcome.get(d, ("",))[0] != "active"]
        cpu1 = psutil.cpu_times_percent(interval=None)  # averaged since cpu0: the rollout
        details["cpu_busy_during_rollout_pct"] = round(100 - cpu1.idle, 1)
        details["loadavg_after_rollout"] = [round(x, 2) for x in os.getloadavg()]
        # time to converge: first push -> active on v2, whichever wave brought it
        converge_s = [at - t_push for st, at, _ in outcome.values() if st == "active"]
        details["rollout"] = {"push_wall": t_push_wall, "waves": waves,
                              "converge_s": {"p50": _r(percentile(converge_s, 50)),
                                             "p99": _r(percentile(converge_s, 99)),
                                             "max": _r(max(converge_s, default=None))}}

        # the health window: every agent keeps v2 after its LAST activation (a rollback in wave 1 followed
        # by a kept re-push counts as kept) and its status and state.json say v2
        def verdict(d: str) -> str | None:
            ev = view.events.get(d, [])
            last_act = max((i for i, e in enumerate(ev) if e.get("event") == "model_activated"
                            and e.get("version") == "2"), default=None)
            if last_act is None:
                return None
            after = [e["event"] for e in ev[last_act + 1:] if e.get("event") in ("model_kept", "model_rolled_back")
                     and e.get("version") == "2"]
            return after[0] if after else "pending"

        def judged() -> bool:
            view.update()
            return all(verdict(d) not in ("pending",) for d in devs)

        wait_until(judged, timeout=health_s + 120, step=0.5)
        view.update()
        kept = [d for d in devs if verdict(d) == "model_kept"]
        rolled = [d for d in devs if verdict(d) == "model_rolled_back"]
        rolled_any = [d for d in devs if any(e.get("event") == "model_rolled_back" and e.get("version") == "2"
                                             for e in view.events.get(d, []))]
        on_v2 = [a.device for a in live if (view.status.get(a.device, {}).get("model") or {}).get("version") == "2"
                 and _state_json(a).get("active") == "demo-2"]
        versions = sorted({str((view.status.get(d, {}).get("model") or {}).get("version")) for d in devs})
        restarts = {a.device: [rc for _, rc in a.exits] for a in live if a.exits}
        details["convergence"] = {"active": len(converge_s), "kept_after_health_window": len(kept),
                                  "rolled_back_finally": rolled, "rolled_back_at_some_point": rolled_any,
                                  "rollback_reasons": {d: [str(e.get("reason"))[:80] for e in view.events.get(d, [])
                                                           if e.get("event") == "model_rolled_back"]
                                                       for d in rolled_any},
                                  "on_v2_status_and_disk": len(on_v2),
                                  "versions_seen": versions, "restarts": restarts,
                                  "first_wave_active": waves[0]["active"] if waves else 0}
        converged = len(on_v2) == len(devs) == len(kept) and not rolled
        ctx.log(f"converged: {converged} (on v2 {len(on_v2)}/{len(devs)}, kept {len(kept)}, rolled back "
                f"{len(rolled)}, versions {versions}); agents restarted: {len(restarts)} {restarts}")

        # ---- 2. forged updates ---------------------------------------------------------------------
        forged: dict[str, Any] = {}
        attempts = [("untrusted_key", lambda: _push_cli(broker, rogue.private_path, "ops", DEMO_MODEL, "3",
                                                         ctx.work)[0]),
                    ("tampered", lambda: _push_tampered(broker, load_private_key(keys.private_path), DEMO_MODEL))]
        for label, do in attempts:
            t0 = time.monotonic()
            fid = do()

            def refused(fid: str = fid) -> bool:
                view.update()
                return all(view.first(d, fid, ("failed",)) for d in devs)

            wait_until(refused, timeout=120, step=0.5)
            time.sleep(3)  # anything that would (wrongly) follow a refusal has time to show
            view.update()
            reasons: dict[str, int] = {}
            refusal_s = []
            for d in devs:
                f = view.first(d, fid, ("failed",))
                if f is not None:
                    reasons[str(f[1].get("error"))] = reasons.get(str(f[1].get("error")), 0) + 1
                    refusal_s.append(f[0] - t0)
            accepted = [d for d in devs if view.first(d, fid, ("downloading", "verifying", "building",
                                                               "validating", "active"))]
            forged[label] = {"manifest_id": fid, "refused_by": len(refusal_s), "reasons": reasons,
                             "accepted_by": accepted, "refusal_s": {"p50": _r(percentile(refusal_s, 50)),
                                                                    "max": _r(max(refusal_s, default=None))}}
            ctx.log(f"forged ({label}): refused by {len(refusal_s)}/{len(devs)} {reasons}; went further on "
                    f"{len(accepted)}")
        mem.sample()
        view.update()
        still_v2 = [a.device for a in live if (view.status.get(a.device, {}).get("model") or {}).get("version") == "2"
                    and _state_json(a).get("active") == "demo-2"]
        forged["still_on_v2_after"] = len(still_v2)
        # a forged version anywhere: in a status, or as the active model on disk
        forged["forged_version_active"] = [
            a.device for a in live if str((view.status.get(a.device, {}).get("model") or {}).get("version")) in FORGED
            or str(_state_json(a).get("active")) in {f"demo-{v}" for v in FORGED}]
        details["forged"] = forged
        details["alive_at_end"] = sum(1 for a in live if a.proc is not None and a.proc.poll() is None)
    finally:
        if supervisor is not None:
            supervisor.stop()
        for a in agents:
            a.stop()
        for a in agents:
            a.reap(30)
        mem.stop()
        col.close()
        broker.stop()
    details["memory"] = {"peak_agents_total_mb": round(mem.peak_total_mb), "peak_agent_mb": round(mem.peak_agent_mb),
                         "min_available_mb": round(mem.min_available_mb),
                         "samples": mem.samples[:: max(1, len(mem.samples) // 60)]}

    attempts_seen = [v for v in forged.values() if isinstance(v, dict)]
    forged_ok = all(v["accepted_by"] == [] and v["refused_by"] == len(devs) for v in attempts_seen)
    # the safety invariant (hard): no agent went past verification with a forged manifest, none serves one
    forged_accepted = any(v["accepted_by"] for v in attempts_seen) or bool(forged["forged_version_active"])
    # a device that never got there counts as slower than any figure: p99 over all devices
    per_device = converge_s + [float("inf")] * (len(devs) - len(converge_s))
    p99 = percentile(per_device, 99)
    timing_ok = p99 is not None and p99 <= ROLLOUT_GOAL_S
    met = bool(converged and forged_ok and timing_ok and len(live) == n)
    w0 = waves[0] if waves else {"active": 0, "active_s": {}, "push_command_s": None, "failed_reasons": {}}
    cv = details["rollout"]["converge_s"]
    notes.insert(0, f"{len(live)} agents on {os.cpu_count()} CPUs at {fps:g} fps (machine shared with other work: "
                    f"load average {details['loadavg_before_push'][0]} before the push, "
                    f"{details['loadavg_after_rollout'][0]} after). Group push: {w0['active']}/{len(devs)} active, "
                    f"push -> active p50 {w0['active_s'].get('p50')} / p99 {w0['active_s'].get('p99')} / max "
                    f"{w0['active_s'].get('max')} s (the push command itself {w0['push_command_s']} s), failed "
                    f"{w0['failed_reasons'] or 'none'}")
    if len(waves) > 1:
        notes.append(f"after {len(waves) - 1} re-push to the rest by device id: {len(converge_s)}/{len(devs)} active, "
                     f"first push -> active p50 {cv['p50']} / p99 {cv['p99']} / max {cv['max']} s")
    restarts = details["convergence"]["restarts"]
    if restarts:
        codes = sorted({rc for v in restarts.values() for rc in v})
        notes.append(f"{len(restarts)} agents exited during the rollout and were restarted by the supervisor "
                     f"(exit status {codes}; 1 = the agent's own stall exit, service.stall_s; -6 = SIGABRT)")
    notes.append(f"converged on v2: {len(on_v2)}/{len(devs)} on v2 in status and state.json, {len(kept)} kept it "
                 f"after the health window ({len(rolled_any)} had rolled a first activation back: "
                 f"{details['convergence']['rollback_reasons'] or 'none'})")
    for k, v in forged.items():
        if isinstance(v, dict) and "reasons" in v:
            notes.append(f"forged {k}: refused by {v['refused_by']}/{len(devs)} {v['reasons']}, activated by "
                         f"{len(v['accepted_by'])}")
    notes.append(f"memory: agents' RSS peak {details['memory']['peak_agents_total_mb']} MB "
                 f"({details['memory']['peak_agent_mb']} MB max per agent), "
                 f"{details['memory']['min_available_mb']} MB available at the lowest")
    lost = (f"{len(devs) - len(on_v2)} of {len(devs)} agents not on v2; forged accepted by "
            f"{sum(len(v['accepted_by']) for v in attempts_seen)}")
    return ScenarioResult(name="fleet", cycles=max(1, len(waves)), goal=goal, met=met, lost=lost,
                          recovery_s=[round(x, 3) for x in converge_s], hard=forged_accepted,
                          note="; ".join(notes), details=details)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


SCENARIOS = {"fleet": fleet}
