"""Scenario `fuzz`: every handler of external input, fed seeded structured and random inputs, in process.

Handlers (tests/support/fuzzing.py says what a clean rejection is for each): MQTT update manifests
(device and group topics) and MQTT chunks (topic = the chunk's header: transfer id and index; raw
payload) through the agent's real MqttClient callback into an UpdateManager busy with a half-received
transfer, over a real ModelStore; config files through `load_config`; parsed YAML documents through
`parse_config`; damaged transfer-state files through ChunkAssembler's resume. Inputs: valid manifests,
chunks and configs mutated (bit flips, truncation, splices, field deletions, type swaps, huge values,
unicode, deep nesting, duplicate keys, re-signed after the mutation so the schema and every later
check are reached) and plain random bytes. A sample of the MQTT cases also goes through a real
mosquitto to the connected client.

Hard invariant: 0 crashes (any exception but the handler's rejection, or a traceback the agent logs
from its callbacks' catch-alls) and 0 state changes from a rejected or ignored input (model store
files, state.json, transfer state and bitmaps, the manager's queued / current job, processed ids and
reported update state, compared before / after each input). Full size >= 10,000 cases, quick ~1,200;
`--set cycles=N` sets the total; `--set broker_cases=N` the mosquitto sample.
"""

from __future__ import annotations

import base64
import random
import shutil
import threading
import time
from collections import Counter
from typing import Any

from reliability.common import Context, ScenarioResult
from tests.support import fuzzing as fz

# share of the total per handler: the MQTT handlers are what strangers can reach
WEIGHTS = {"manifest": 0.37, "chunk": 0.27, "config_file": 0.18, "config_data": 0.11, "transfer_state": 0.07}
MAX_FAILURES = 5  # tracebacks kept in the report


class _Tally:
    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.crashes = 0
        self.changes = 0

    def add(self, out: fz.Outcome, kind: str, case: int, data: Any) -> None:
        h = self.handlers.setdefault(out.handler, {"cases": 0, "crashes": 0, "state_changes": 0,
                                                    "verdicts": Counter(), "kinds": Counter(), "reasons": Counter(),
                                                    "wall_s": 0.0})
        h["cases"] += 1
        h["verdicts"][out.verdict] += 1
        h["kinds"][kind] += 1
        if out.detail and out.verdict == "rejected":
            h["reasons"][out.detail.split(":")[0][:40]] += 1
        if out.crash is not None:
            h["crashes"] += 1
            self.crashes += 1
        if out.changed:
            h["state_changes"] += 1
            self.changes += 1
        if fz.is_failure(out) and len(self.failures) < MAX_FAILURES:
            raw = data if isinstance(data, bytes) else repr(data).encode("utf-8", "backslashreplace")
            self.failures.append({"handler": out.handler, "kind": kind, "case": case, "verdict": out.verdict,
                                  "traceback": (out.crash or "")[-3000:], "state_changes": out.changed[:10],
                                  "input_b64": base64.b64encode(raw[:4096]).decode(), "input_len": len(raw)})

    def total(self) -> int:
        return sum(h["cases"] for h in self.handlers.values())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, h in self.handlers.items():
            out[name] = {**h, "verdicts": dict(h["verdicts"]), "kinds": dict(h["kinds"]),
                         "reasons": dict(h["reasons"].most_common(12)), "wall_s": round(h["wall_s"], 1)}
        return out


def _split(total: int) -> dict[str, int]:
    counts = {k: max(1, int(total * w)) for k, w in WEIGHTS.items()}
    counts["manifest"] += total - sum(counts.values())  # rounding goes to the most exposed handler
    return counts


def _mqtt_cases(ctx: Context, tally: _Tally, mut: fz.Mutator, counts: dict[str, int], traces: Any) -> int:
    """Manifests and chunks interleaved (a chunk may then meet a transfer a fuzzed manifest opened)."""
    harness = fz.UpdateHarness(ctx.work / "updates")
    order = ["manifest"] * counts["manifest"] + ["chunk"] * counts["chunk"]
    mut.rng.shuffle(order)
    try:
        for i, handler in enumerate(order):
            t0 = time.monotonic()
            topic: str | bytes  # a chunk's topic may be raw bytes (not UTF-8)
            if handler == "manifest":
                topic, payload, kind = harness.manifest_case(mut)
            else:
                topic, payload, kind = harness.chunk_case(mut)
            out = harness.deliver(handler, topic, payload, traces)
            tally.add(out, kind, i, payload)
            tally.handlers[handler]["wall_s"] += time.monotonic() - t0
            if (i + 1) % 1000 == 0:
                ctx.log(f"mqtt {i + 1}/{len(order)}: {tally.crashes} crashes, {tally.changes} state changes")
    finally:
        harness.close()
    return harness.resets


def _broker_cases(ctx: Context, tally: _Tally, mut: fz.Mutator, n: int, traces: Any) -> str:
    """The same generators through a real mosquitto to the connected client; '' or why it was skipped."""
    import paho.mqtt.client as paho

    from tests.support.broker import Broker

    bdir = ctx.work / "broker"
    bdir.mkdir(exist_ok=True)
    try:
        broker = Broker(bdir).start()
    except RuntimeError as exc:
        return f"mosquitto sample skipped: {exc}"
    harness: fz.UpdateHarness | None = None
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fuzz-publisher", protocol=paho.MQTTv5)
    connected = threading.Event()
    pub.on_connect = lambda *a: connected.set()
    try:
        harness = fz.UpdateHarness(ctx.work / "updates-broker", broker=(broker.host, broker.port))
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        if not connected.wait(10):
            return "mosquitto sample skipped: the publisher could not connect"
        done = 0
        while done < n:
            handler = "manifest" if mut.rng.random() < 0.55 else "chunk"
            case = harness.manifest_case(mut) if handler == "manifest" else harness.chunk_case(mut)
            topic, payload, kind = case
            if not fz.broker_safe(topic):
                continue  # mosquitto would drop the publisher: the in-process run covers such topics
            t0 = time.monotonic()
            out = harness.deliver(f"{handler}_via_mosquitto", topic, payload, traces, publisher=pub)
            tally.add(out, kind, done, payload)
            tally.handlers[out.handler]["wall_s"] += time.monotonic() - t0
            done += 1
        return ""
    finally:
        pub.loop_stop()
        pub.disconnect()
        if harness is not None:
            harness.close()
        broker.stop()


def run(ctx: Context) -> ScenarioResult:
    total = ctx.cycles(12_000, 1_200)
    counts = _split(total)
    n_broker = int(ctx.param("broker_cases", 100 if ctx.quick else 400))
    mut = fz.Mutator(random.Random(ctx.seed))
    tally = _Tally()
    ctx.log(f"seed {ctx.seed}: {total} cases in process {counts}, {n_broker} through mosquitto")
    t_all = time.monotonic()
    with fz.captured_agent_logs() as traces:
        resets = _mqtt_cases(ctx, tally, mut, counts, traces)

        seeds = fz.config_seeds()
        cfg_dir = ctx.work / "config"
        cfg_dir.mkdir()
        for i in range(counts["config_file"]):
            t0 = time.monotonic()
            data, kind = fz.config_text_case(mut, seeds)
            tally.add(fz.run_config_file(cfg_dir / "agent.yaml", data), kind, i, data)
            tally.handlers["config_file"]["wall_s"] += time.monotonic() - t0
        for i in range(counts["config_data"]):
            t0 = time.monotonic()
            doc, kind = fz.config_data_case(mut, seeds)
            tally.add(fz.run_config_data(doc), kind, i, doc)
            tally.handlers["config_data"]["wall_s"] += time.monotonic() - t0
        ctx.log(f"config {counts['config_file'] + counts['config_data']} cases: {tally.crashes} crashes so far")
        st_dir = ctx.work / "transfer"
        for i in range(counts["transfer_state"]):
            t0 = time.monotonic()
            data, kind = fz.transfer_state_case(mut)
            tally.add(fz.run_transfer_state(st_dir, data), kind, i, data)
            tally.handlers["transfer_state"]["wall_s"] += time.monotonic() - t0
        shutil.rmtree(st_dir, ignore_errors=True)

        skipped = _broker_cases(ctx, tally, mut, n_broker, traces) if n_broker > 0 else "mosquitto sample off"
    wall = time.monotonic() - t_all

    n = tally.total()
    handlers = tally.to_json()
    per = ", ".join(f"{k} {v['cases']}" for k, v in handlers.items())
    enough = 1_000 if ctx.quick else 10_000
    met = tally.crashes == 0 and tally.changes == 0 and (n >= enough or "cycles" in ctx.params)
    note = (f"cases per handler: {per}. Accepted inputs (validly signed manifests, chunks of an open transfer, "
            f"valid configs) are not judged for state; everything else is.")
    if skipped:
        note += f" {skipped}."
    if not met:
        first = tally.failures[0] if tally.failures else {}
        note += (f" FIRST FAILURE ({first.get('handler')}, {first.get('kind')}): "
                 f"{fz.first_line_of(first.get('traceback') or '') or first.get('state_changes')}")
    return ScenarioResult(
        name="fuzz", cycles=n,
        goal=f"0 crashes, 0 state changes from rejected input; >= {enough} cases",
        met=met,
        lost=f"{tally.crashes} crashes, {tally.changes} state changes in {n} cases",
        hard=True, note=note,
        details={"seed": ctx.seed, "cases": n, "handlers": handlers, "failures": tally.failures,
                 "harness_resets": resets, "cases_per_s": round(n / max(wall, 1e-9), 1),
                 "crash_definition": "any exception other than the handler's rejection (UpdateError, "
                                     "ConfigError), or a traceback logged by the agent's callback catch-alls",
                 "state_checked": "model store files (state.json, versions, downloads, .part/.state), the "
                                  "manager's queued/current job, assemblers and bitmaps, seen ids, reported state"},
    )


SCENARIOS = {"fuzz": run}
