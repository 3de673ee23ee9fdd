"""Network faults between the agent and its broker: partitions, random packet loss, added delay.

The agent runs in its own network namespace (`tests/support/netns.py`: a veth pair, a /30 on each
end) as `ip netns exec NAME python -m agent.cli run -c cfg`, on the demo video (paced at its 15 fps,
looping: a file source is lossless, so every frame has a `seq` and a gap is a lost message), with
QoS 1 detections. mosquitto listens on 127.0.0.1 (for the host-side subscriber, which no fault
touches) and on the host end of the veth (for the agent). Faults are nftables rules on the
namespace's end of the link (netdev ingress + egress: the cable, below TCP); delay comes from a
user-space proxy (`tests/support/tcp_proxy.py`), since this kernel has no `tc netem`.

- `network_partition`: every packet dropped for a random `partition_min_s`..`partition_max_s`
  (2-10 s), then healed. The agent's MQTT keepalive is 5 s here (`--set keepalive_s=30` for the
  shipped default): paho notices a dead link after ~1-2 keepalives, so short partitions are ridden
  out by TCP retransmission on the same connection and long ones end in a reconnect with QoS 1
  re-sends. Both paths are exercised and told apart in the details.
- `network_loss`: `loss_s` seconds of random loss, alternating 5 % and 20 % (each direction).
- `network_delay`: `delay_s` seconds with 200 ms added in each direction (`delay_ms`).

Per cycle: inference continuity (frames captured during the fault, from `seq` / capture `ts`, and
the agent's own frame counter from telemetry), the backlog (detections captured before the heal
and delivered after it) and when its last message arrived, detections lost (missing `seq`) against
what the agent counted as dropped (`mqtt.dropped`: its bounded queue, `mqtt.queue_size`, drops the
oldest when full), and duplicates (QoS 1 re-sends after a reconnect). recovery_s: from the heal to
the moment the backlog is delivered and detections are live again (arriving within `live_s`, 1 s,
of their capture).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import DEMO_MODEL, DEMO_VIDEO, MqttConfig
from reliability.common import Context, ScenarioResult, percentile, wait_until
from tests.support.agent_proc import ROOT, write_config
from tests.support.broker import Broker, free_port
from tests.support.mqtt import Collector
from tests.support.netns import NetNs, NetNsError, cleanup_stale, unavailable_reason
from tests.support.tcp_proxy import DelayProxy

DEVICE = "net1"
DET = f"edge/{DEVICE}/cam0/detections"
TELEMETRY = f"edge/{DEVICE}/telemetry"
EVENTS = f"edge/{DEVICE}/events"
STALL_S = 1.0  # a gap this long between two consecutive frames' capture times is a stall (15 fps: 67 ms)
DRAIN_GOAL_S = 10.0
LOSS_LIVE_GOAL_S = 5.0
DELAY_LIVE_GOAL_S = 2.0


@dataclass(frozen=True)
class Det:
    seq: int
    ts: float  # capture time (agent's wall clock)
    arrived: float  # wall clock at the host-side subscriber


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


class NsAgent:
    """The agent as a child process inside the namespace (`ip netns exec` execs it: same pid)."""

    def __init__(self, ns: NetNs, config: Path) -> None:
        self.log = config.parent / "agent.log"
        self._fh = self.log.open("ab")
        self.proc = ns.popen([sys.executable, "-m", "agent.cli", "run", "-c", str(config)], cwd=ROOT,
                             stdout=self._fh, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


class NetRig:
    """Namespace + broker (+ delay proxy) + agent + a host-side subscriber; `close()` undoes all of it."""

    def __init__(self, ctx: Context, *, proxy: bool = False) -> None:
        self.ctx = ctx
        self.use_proxy = proxy
        self.keepalive = int(ctx.param("keepalive_s", 5))
        self.queue_size = int(ctx.param("queue_size", MqttConfig().queue_size))
        self.live_s = ctx.param("live_s", 1.0)
        self.ns: NetNs | None = None
        self.broker: Broker | None = None
        self.proxy: DelayProxy | None = None
        self.col: Collector | None = None
        self.agent: NsAgent | None = None
        self._dets: list[Det] = []
        self._parsed = 0
        self._offset = time.time() - time.monotonic()  # the subscriber stamps monotonic; payloads carry wall time
        self.base: dict[str, Any] = {}

    def start(self) -> None:
        stale = cleanup_stale()
        if stale:
            self.ctx.log(f"removed stale namespaces {stale}")
        self.ns = NetNs("net").up()
        port = free_port()
        bdir = self.ctx.work / "broker"
        bdir.mkdir(exist_ok=True)
        # second listener on the veth's host end: the agent's only way to the broker
        self.broker = Broker(bdir, extra_conf=f"listener {port} {self.ns.host_ip}\n").start()
        host, agent_port = self.ns.host_ip, port
        if self.use_proxy:
            self.proxy = DelayProxy((self.ns.host_ip, 0), ("127.0.0.1", self.broker.port)).start()
            agent_port = self.proxy.port
        self.col = Collector("127.0.0.1", self.broker.port, [DET, TELEMETRY, EVENTS])
        default_rc = MqttConfig().reconnect
        cfg = write_config(
            self.ctx.work / "agent.yaml", agent_port, DEMO_MODEL, str(DEMO_VIDEO), device_id=DEVICE,
            cameras=[{"id": "cam0", "source": str(DEMO_VIDEO), "pace": True, "loop": True}],
            model={"name": "demo", "version": "1"},
            mqtt={"host": host, "detections_qos": 1, "keepalive_s": self.keepalive, "queue_size": self.queue_size,
                  # the shipped reconnect backoff (agent_proc's test default is faster)
                  "reconnect": {"initial_s": default_rc.initial_s, "max_s": default_rc.max_s,
                                "jitter": default_rc.jitter}},
            telemetry={"period_s": 1})
        self.agent = NsAgent(self.ns, cfg)
        if wait_until(lambda: len(self.dets()) >= 30, timeout=180, step=0.1) is None:
            raise RuntimeError(f"the agent sent no detections in 180 s; log:\n{self.agent.tail()}")
        t0 = time.time()
        time.sleep(4)  # steady state for the baseline
        lat = [d.arrived - d.ts for d in self.dets() if d.ts >= t0]
        tel = self.telemetry(t0)
        rate = None
        if len(tel) >= 2 and tel[-1]["uptime_s"] > tel[0]["uptime_s"]:
            # everything the agent sends (detections, counts, telemetry, ...), as acknowledged
            rate = (tel[-1]["mqtt"]["sent"] - tel[0]["mqtt"]["sent"]) / (tel[-1]["uptime_s"] - tel[0]["uptime_s"])
        self.base = {"latency_p50_s": _r(percentile(lat, 50)), "latency_p99_s": _r(percentile(lat, 99)),
                     "fps": _r(self.fps_since(t0), 2), "messages_per_s": _r(rate, 1)}
        self.ctx.log(f"agent streaming in namespace {self.ns.name} ({self.ns.ns_ip} -> {host}:{agent_port}); "
                     f"baseline {self.base}")

    def close(self) -> None:
        """Every step runs even when one before it fails: nothing of ours is left behind."""
        steps = [lambda: self.agent.stop() if self.agent else None,
                 lambda: self.col.close() if self.col else None,
                 lambda: self.proxy.close() if self.proxy else None,
                 lambda: self.broker.stop() if self.broker else None,
                 lambda: self.ns.close() if self.ns else None]
        for step in steps:
            try:
                step()
            except Exception as exc:
                self.ctx.log(f"cleanup step failed: {type(exc).__name__}: {exc}")

    # ---- what arrived -----------------------------------------------------------------------------
    def dets(self) -> list[Det]:
        """Detections received so far, parsed once each."""
        assert self.col is not None
        msgs = self.col.messages  # append-only list; reading a prefix is safe without the lock
        n = len(msgs)
        for m in msgs[self._parsed:n]:
            if m.topic != DET:
                continue
            try:
                d = json.loads(m.payload)
                self._dets.append(Det(int(d["seq"]), float(d["ts"]), m.at + self._offset))
            except (ValueError, KeyError, TypeError):
                continue
        self._parsed = n
        return self._dets

    def telemetry(self, since_wall: float = 0.0) -> list[dict[str, Any]]:
        assert self.col is not None
        out = []
        for m in self.col.on(TELEMETRY):
            try:
                t = json.loads(m.payload)
            except ValueError:
                continue
            if float(t.get("ts", 0)) >= since_wall:
                out.append(t)
        return out

    def events(self, since_wall: float = 0.0) -> list[dict[str, Any]]:
        assert self.col is not None
        out = []
        for m in self.col.on(EVENTS):
            try:
                e = json.loads(m.payload)
            except ValueError:
                continue
            if float(e.get("ts", 0)) >= since_wall:
                out.append(e)
        return out

    def fps_since(self, t_wall: float) -> float | None:
        ds = sorted((d for d in self.dets() if d.ts >= t_wall), key=lambda d: d.seq)
        if len(ds) < 2 or ds[-1].ts <= ds[0].ts:
            return None
        return (ds[-1].seq - ds[0].seq) / (ds[-1].ts - ds[0].ts)

    def fresh_telemetry(self, timeout: float = 5.0) -> dict[str, Any]:
        """The first telemetry sent after now (the agent's counters as they are now)."""
        t0 = time.time()
        wait_until(lambda: bool(self.telemetry(t0)), timeout=timeout, step=0.1)
        tel = self.telemetry(t0)
        return tel[0] if tel else (self.telemetry() or [{}])[-1]

    def wait_live(self, t_heal: float, timeout: float) -> float | None:
        """Wall time of the first detection captured after `t_heal` that arrived within `live_s`."""
        found: list[float] = []

        def live() -> bool:
            for d in reversed(self.dets()):
                if d.ts <= t_heal:
                    break
                if d.arrived - d.ts <= self.live_s:
                    found.append(d.arrived)
            return bool(found)

        if wait_until(live, timeout=timeout, step=0.1) is None:
            return None
        return min(found)


@dataclass
class CycleFig:
    """One fault cycle's figures (what goes into details["cycles"])."""

    kind: str
    fault_s: float
    recovery_s: float | None = None
    drained_s: float | None = None  # heal -> the last detection captured before the heal arrived
    backlog: int = 0  # detections captured before the heal and delivered after it
    frames: int = 0  # detections (by seq) in the cycle's window
    lost: int = 0
    duplicates: int = 0
    counted_drops: int = 0  # the agent's mqtt.dropped over the cycle (detections and other QoS 1 messages)
    fault_frames: int | None = None  # frames captured during the fault (by seq)
    fault_fps: float | None = None
    max_frame_gap_s: float | None = None
    processed_fps: float | None = None  # from the agent's frame counter, across the whole cycle
    reconnected: bool = False
    agent: dict[str, int] = field(default_factory=dict)  # counter deltas
    latency: dict[str, float | None] = field(default_factory=dict)  # capture -> arrival during the fault
    max_queued: int | None = None
    stalled: bool = False
    note: str = ""


_COUNTERS = ("dropped", "dropped_qos0_offline", "resent", "disconnects", "connects")


def _analyse(rig: NetRig, fig: CycleFig, t_start: float, t_fault: float, t_heal: float, t_live: float | None,
             tel0: dict[str, Any], tel1: dict[str, Any], fps_pre: float | None) -> None:
    t_end = time.time() - 1.0  # frames captured in the last second may still be on their way
    ds = [d for d in rig.dets() if t_start <= d.ts <= t_end]
    if not ds:
        fig.note = "no detection in the cycle window"
        fig.stalled = True
        return
    seqs = Counter(d.seq for d in ds)
    lo, hi = min(seqs), max(seqs)
    fig.frames = hi - lo + 1
    fig.lost = sum(1 for s in range(lo, hi + 1) if s not in seqs)
    fig.duplicates = sum(c - 1 for c in seqs.values())
    first: dict[int, Det] = {}
    for d in ds:
        first.setdefault(d.seq, d)
    # inference continuity: frames captured while the link was down
    during = sorted((d for d in first.values() if t_fault <= d.ts <= t_heal), key=lambda d: d.seq)
    if len(during) >= 2:
        fig.fault_frames = during[-1].seq - during[0].seq + 1
        span = during[-1].ts - during[0].ts
        fig.fault_fps = _r(fig.fault_frames / span, 2) if span > 0 else None
    around = sorted((d for d in first.values() if t_fault - 1 <= d.ts <= t_heal + 1), key=lambda d: d.seq)
    gaps = [b.ts - a.ts for a, b in itertools.pairwise(around) if b.seq == a.seq + 1]
    fig.max_frame_gap_s = _r(max(gaps)) if gaps else None
    after = [d for d in first.values() if d.ts <= t_heal and d.arrived > t_heal]
    fig.backlog = len(after)
    captured_before = [d.arrived for d in first.values() if d.ts <= t_heal]
    if captured_before:
        fig.drained_s = _r(max(0.0, max(captured_before) - t_heal))
    if t_live is not None:
        fig.recovery_s = _r(max(t_live, t_heal + (fig.drained_s or 0.0)) - t_heal)
    lat = [d.arrived - d.ts for d in first.values() if t_fault <= d.ts <= t_heal]
    fig.latency = {"p50": _r(percentile(lat, 50)), "p99": _r(percentile(lat, 99)), "max": _r(max(lat, default=None))}
    m0, m1 = tel0.get("mqtt", {}), tel1.get("mqtt", {})
    fig.agent = {k: int(m1.get(k, 0)) - int(m0.get(k, 0)) for k in _COUNTERS}
    fig.counted_drops = fig.agent["dropped"]
    fig.reconnected = fig.agent["disconnects"] > 0
    queued = [int(t.get("mqtt", {}).get("queued", 0)) for t in rig.telemetry(t_fault) if float(t["ts"]) <= t_heal + 5]
    fig.max_queued = max(queued) if queued else None
    if "uptime_s" in tel0 and "uptime_s" in tel1 and tel1["uptime_s"] > tel0["uptime_s"]:
        fig.processed_fps = _r((tel1["frames_processed"] - tel0["frames_processed"])
                               / (tel1["uptime_s"] - tel0["uptime_s"]), 2)
    # a stall: two consecutive frames far apart, or far fewer frames during the fault than before it
    slow = (fps_pre is not None and fig.fault_fps is not None and fig.fault_fps < 0.5 * fps_pre)
    slow_counter = fps_pre is not None and fig.processed_fps is not None and fig.processed_fps < 0.5 * fps_pre
    fig.stalled = bool((fig.max_frame_gap_s or 0) > STALL_S or slow or slow_counter)


def _run_cycles(ctx: Context, rig: NetRig, plan: list[tuple[str, float]], apply: Any, clear: Any,
                pre_s: float = 2.0) -> list[CycleFig]:
    """Each planned (kind, seconds): baseline, fault, heal, wait until live, settle, measure."""
    figs: list[CycleFig] = []
    for k, (kind, secs) in enumerate(plan):
        assert rig.agent is not None
        if not rig.agent.alive():
            ctx.log(f"agent exited with {rig.agent.proc.returncode} before cycle {k + 1}")
            break
        t_start = time.time()
        time.sleep(pre_s)
        fps_pre = rig.fps_since(t_start)
        tel0 = (rig.telemetry() or [{}])[-1]
        t_fault = time.time()
        apply(kind)
        time.sleep(secs)
        clear()
        t_heal = time.time()
        t_live = rig.wait_live(t_heal, timeout=120)
        time.sleep(2.0)  # stragglers (re-sends held for ordering) arrive
        tel1 = rig.fresh_telemetry()
        fig = CycleFig(kind=kind, fault_s=round(secs, 2))
        _analyse(rig, fig, t_start, t_fault, t_heal, t_live, tel0, tel1, fps_pre)
        if t_live is None:
            fig.note = (fig.note + "; " if fig.note else "") + "not live again within 120 s"
        if not rig.agent.alive():
            fig.stalled = True
            fig.note = (fig.note + "; " if fig.note else "") + f"agent exited ({rig.agent.proc.returncode})"
        figs.append(fig)
        ctx.log(f"cycle {k + 1}/{len(plan)} {kind} {secs:.1f} s: recovery {fig.recovery_s} s (drained "
                f"{fig.drained_s} s, backlog {fig.backlog}), lost {fig.lost}/{fig.frames} (agent dropped "
                f"{fig.counted_drops}), dup {fig.duplicates}, reconnect {fig.reconnected}, "
                f"frames during fault {fig.fault_frames} @ {fig.fault_fps} fps, max gap {fig.max_frame_gap_s} s"
                f"{'; ' + fig.note if fig.note else ''}")
    return figs


def _summary(figs: list[CycleFig]) -> tuple[int, int, int, int, int, list[float]]:
    lost = sum(f.lost for f in figs)
    frames = sum(f.frames for f in figs)
    dups = sum(f.duplicates for f in figs)
    uncounted = sum(max(0, f.lost - f.counted_drops) for f in figs)
    stalls = sum(1 for f in figs if f.stalled)
    rec = [f.recovery_s for f in figs if f.recovery_s is not None]
    return lost, frames, dups, uncounted, stalls, rec


def _unavailable(name: str, goal: str, cycles: int) -> ScenarioResult | None:
    why = unavailable_reason()
    if why is None:
        return None
    return ScenarioResult(name=name, cycles=0, goal=goal, met=None, lost="-",
                          note=f"not run: {why}", details={"planned_cycles": cycles, "unavailable": why})


def _details(rig: NetRig, figs: list[CycleFig], **extra: Any) -> dict[str, Any]:
    return {"baseline": rig.base, "keepalive_s": rig.keepalive, "queue_cap": rig.queue_size, "live_s": rig.live_s,
            "namespace": rig.ns.name if rig.ns else None, **extra,
            "cycles": [f.__dict__ for f in figs]}


# ---- scenarios ----------------------------------------------------------------------------------

def network_partition(ctx: Context) -> ScenarioResult:
    name = "network_partition"
    cycles = ctx.cycles(20, 2)
    lo, hi = ctx.param("partition_min_s", 2.0), ctx.param("partition_max_s", 10.0)
    goal = f"no stall; 0 lost within the queue cap, every drop counted; backlog drained <= {DRAIN_GOAL_S:g} s"
    skip = _unavailable(name, goal, cycles)
    if skip is not None:
        return skip
    rng = random.Random(ctx.seed)
    plan = [("partition", rng.uniform(lo, hi)) for _ in range(cycles)]
    rig = NetRig(ctx)
    try:
        rig.start()
        assert rig.ns is not None
        ns = rig.ns
        figs = _run_cycles(ctx, rig, plan, lambda kind: ns.partition(), ns.heal)
        alive = rig.agent is not None and rig.agent.alive()
        stalled_events = [e for e in rig.events() if e.get("event") == "pipeline_stalled"]
    finally:
        rig.close()
    lost, frames, dups, uncounted, stalls, rec = _summary(figs)
    # a loss is acceptable only when the agent's queue overflowed (and then it must be counted)
    over_cap = [f for f in figs if f.lost and f.counted_drops == 0]
    p99 = percentile(rec, 99)
    met = (len(figs) == cycles and alive and stalls == 0 and not stalled_events and uncounted == 0
           and not over_cap and len(rec) == len(figs) and p99 is not None and p99 <= DRAIN_GOAL_S)
    tcp = [f.recovery_s for f in figs if not f.reconnected and f.recovery_s is not None]
    rc = [f.recovery_s for f in figs if f.reconnected and f.recovery_s is not None]
    note = (f"{len(rc)} of {len(figs)} partitions ended in a reconnect (keepalive {rig.keepalive} s), recovery "
            f"p50 {percentile(rc, 50)} s; {len(tcp)} were ridden out on the same TCP connection (resumed by "
            f"retransmission), p50 {percentile(tcp, 50)} s. {dups} duplicate detections (QoS 1 re-sends), "
            f"{stalls} cycles with an inference stall, {uncounted} losses the agent did not count.")
    if len(figs) < cycles:
        note += f" Only {len(figs)} of {cycles} cycles ran: the agent exited."
    return ScenarioResult(name=name, cycles=len(figs), goal=goal, met=met,
                          lost=f"{lost} of {frames} detections ({dups} duplicates)", recovery_s=rec, note=note,
                          details=_details(rig, figs, partition_s=[round(s, 2) for _, s in plan],
                                           agent_alive=alive, pipeline_stalled_events=stalled_events))


def network_loss(ctx: Context) -> ScenarioResult:
    name = "network_loss"
    pcts = [float(p) for p in ctx.params.get("loss_pcts", "5,20").split(",")]
    cycles = ctx.cycles(20, 2)
    secs = ctx.param("loss_s", 10.0 if ctx.quick else 20.0)
    goal = f"no stall; 0 lost; live <= {LOSS_LIVE_GOAL_S:g} s after the loss ends"
    skip = _unavailable(name, goal, cycles)
    if skip is not None:
        return skip
    plan = [(f"loss {pcts[k % len(pcts)]:g}%", secs) for k in range(cycles)]
    rig = NetRig(ctx)
    try:
        rig.start()
        assert rig.ns is not None
        ns = rig.ns
        figs = _run_cycles(ctx, rig, plan, lambda kind: ns.loss(float(kind.split()[1].rstrip("%"))), ns.heal)
        alive = rig.agent is not None and rig.agent.alive()
    finally:
        rig.close()
    lost, frames, dups, uncounted, stalls, rec = _summary(figs)
    p99 = percentile(rec, 99)
    met = (len(figs) == cycles and alive and stalls == 0 and lost == 0 and len(rec) == len(figs)
           and p99 is not None and p99 <= LOSS_LIVE_GOAL_S)
    by: dict[str, dict[str, Any]] = {}
    for f in figs:
        b = by.setdefault(f.kind, {"cycles": 0, "latency_p99_s": [], "reconnects": 0, "lost": 0})
        b["cycles"] += 1
        b["latency_p99_s"].append(f.latency.get("p99"))
        b["reconnects"] += int(f.reconnected)
        b["lost"] += f.lost
    note = "; ".join(f"{k}: detection latency p99 during the loss "
                     f"{max((x for x in v['latency_p99_s'] if x), default=None)} s (worst cycle), "
                     f"{v['reconnects']} of {v['cycles']} cycles reconnected" for k, v in by.items())
    note += f". {dups} duplicates, {stalls} stalls, {uncounted} uncounted losses."
    return ScenarioResult(name=name, cycles=len(figs), goal=goal, met=met,
                          lost=f"{lost} of {frames} detections ({dups} duplicates)", recovery_s=rec, note=note,
                          details=_details(rig, figs, loss_s=secs, by_kind=by, agent_alive=alive))


def network_delay(ctx: Context) -> ScenarioResult:
    name = "network_delay"
    cycles = ctx.cycles(20, 2)
    delay = ctx.param("delay_ms", 200.0) / 1000.0
    secs = ctx.param("delay_s", 10.0)
    goal = f"0 lost; latency rises by about the added delay, no backlog; live <= {DELAY_LIVE_GOAL_S:g} s after"
    skip = _unavailable(name, goal, cycles)
    if skip is not None:
        return skip
    plan = [(f"delay {delay * 1000:g} ms each way", secs) for _ in range(cycles)]
    rig = NetRig(ctx, proxy=True)
    try:
        rig.start()
        proxy = rig.proxy
        assert proxy is not None
        figs = _run_cycles(ctx, rig, plan, lambda kind: proxy.set_delay(delay, delay),
                           lambda: proxy.set_delay(0.0, 0.0))
        alive = rig.agent is not None and rig.agent.alive()
    finally:
        rig.close()
    lost, frames, dups, _, stalls, rec = _summary(figs)
    base99 = float(rig.base.get("latency_p99_s") or 0.0)
    # one way up (agent -> broker) is delayed; the PUBACK's way back limits QoS 1 throughput
    bound = base99 + delay + 0.5
    backlog = [f for f in figs if (f.latency.get("p99") or 0) > bound]
    p99 = percentile(rec, 99)
    met = (len(figs) == cycles and alive and stalls == 0 and lost == 0 and not backlog and len(rec) == len(figs)
           and p99 is not None and p99 <= DELAY_LIVE_GOAL_S)
    lat50 = [x for f in figs if (x := f.latency.get("p50")) is not None]
    lat99 = [x for f in figs if (x := f.latency.get("p99")) is not None]
    note = (f"detection latency (capture -> subscriber) under {delay * 1000:g} ms each way: p50 "
            f"{percentile(lat50, 50)} s, worst cycle p99 {max(lat99, default=None)} s (baseline p50 "
            f"{rig.base.get('latency_p50_s')} / p99 {rig.base.get('latency_p99_s')} s; bound {bound:.3f} s); "
            f"{len(backlog)} cycles over the bound; {dups} duplicates, {stalls} stalls. The agent sends "
            f"{rig.base.get('messages_per_s')} messages/s; paho keeps at most 20 QoS 1 messages in flight, so a "
            f"{2 * delay * 1000:g} ms round trip caps it near {20 / (2 * delay) if delay else float('inf'):.0f}/s.")
    return ScenarioResult(name=name, cycles=len(figs), goal=goal, met=met,
                          lost=f"{lost} of {frames} detections ({dups} duplicates)", recovery_s=rec, note=note,
                          details=_details(rig, figs, delay_s_each_way=delay, delay_window_s=secs,
                                           latency_bound_s=round(bound, 3), agent_alive=alive))


SCENARIOS = {"network_partition": network_partition, "network_loss": network_loss, "network_delay": network_delay}

__all__ = ["SCENARIOS", "NetNsError"]
