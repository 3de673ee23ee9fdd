"""`manifest_attacks`: a corpus of hostile update manifests against the parser and a live agent over MQTT.

The corpus (tests/support/attacks.py) holds duplicate keys, byte-encoding tricks (BOM, UTF-16, overlong
and invalid UTF-8, lone surrogates), NaN / Infinity / floats / oversized integers, type confusion, a
document over the 64 KiB cap, deep nesting, path traversal in names, versions, transfer ids and ids,
manifests for another device or group, a key removed from the trust list, malleated / transplanted /
truncated signatures, expired and future manifests, downgrades. A real agent (plain mosquitto, MQTT chunk
updates on, member of group `line3`) gets each one in turn on its update topic (full size: again through
its group's topic); then a signed manifest whose chunks are not the signed model, a genuine update (the
channel still works) and two replays of that genuine manifest.

Hard invariant: every case rejected and the rejection reported (`update_rejected` / `update_failed` on
`edge/<dev>/events`), nothing written by a rejected manifest anywhere in the agent's folders, the model
that serves unchanged. A rejection for another reason than the expected one is listed in the note.
"""

from __future__ import annotations

from reliability.common import Context, Scenario, ScenarioResult
from tests.support.attacks import run_campaign


def manifest_attacks(ctx: Context) -> ScenarioResult:
    rounds = ctx.cycles(2, 1)  # round 2: the same corpus through the group topic
    c = run_campaign(ctx.work / "campaign", rounds=rounds, log=ctx.log)
    n = c.published
    rejected = sum(o.rejected for o in c.outcomes)
    right = sum(o.right_reason for o in c.outcomes)
    parser_n = len(c.parser)
    problems: list[str] = []
    if c.accepted:
        problems.append(f"ACCEPTED: {c.accepted}")
    if c.unreported:
        problems.append(f"no rejection reported: {c.unreported}")
    if c.parser_accepted:
        problems.append(f"parser accepted: {c.parser_accepted}")
    if c.tree_changes:
        problems.append(f"files changed by rejected manifests: {c.tree_changes[:10]}")
    if c.outside_store_changes or c.tampered_versions_changed:
        problems.append(f"tampered transfer wrote outside the store / into versions/: {c.outside_store_changes[:10]}")
    if c.served_after != {"1"} or c.status_after != "1":
        problems.append(f"model changed: serving {sorted(c.served_after)}, status {c.status_after}")
    if c.tampered_reason not in ("checksum_mismatch", "size_mismatch"):
        problems.append(f"tampered transfer: {c.tampered_reason}")
    if c.replay_reasons != ["replayed", "replayed"]:
        problems.append(f"replays: {c.replay_reasons}")
    if c.stray_paths:
        problems.append(f"paths named by the corpus exist: {c.stray_paths}")
    if not c.agent_alive:
        problems.append("the agent died")
    notes = list(problems)
    if c.control_state != "active":
        # not a safety failure (nothing hostile got in), but the suite must say the channel was not proven
        notes.append(f"the genuine update after the attacks ended {c.control_state}, not active")
    if c.controls_refused:
        notes.append(f"equivalent encodings refused: {c.controls_refused}")
    if c.wrong_reason:
        notes.append(f"rejected for another reason than expected: {c.wrong_reason}")
    skipped = [f"{a}" for a in c.parser if a not in {o.name for o in c.outcomes}]
    notes.append(f"{n} hostile manifests over MQTT ({n - 2} corpus cases in {rounds} round(s), 2 replays of a "
                 f"genuine one): {rejected} rejected and reported, {right} with the expected reason; a signed "
                 f"manifest with tampered chunks: {c.tampered_reason}; the genuine update: {c.control_state}; "
                 "parser alone: "
                 f"{parser_n - len(c.parser_accepted)} of {parser_n} rejected; parser only: {skipped} (over the "
                 "agent's 16 MiB receive cap: the broker never delivers it); telemetry counted "
                 f"{c.telemetry_rejected} rejections")
    met = not problems
    return ScenarioResult(
        name="manifest_attacks", cycles=n,
        goal="100 % rejected and reported; nothing written; model unchanged",
        met=met, hard=True,
        lost=f"{len(c.accepted)} of {n} accepted, {len(c.unreported)} unreported",
        note="; ".join(notes),
        details={"outcomes": [{"name": o.name, "expected": sorted(o.expected), "reason": o.reason,
                               "accepted": o.accepted, "s": o.seconds} for o in c.outcomes],
                 "parser": c.parser, "tampered_reason": c.tampered_reason, "genuine_update": c.control_state,
                 "replays": c.replay_reasons, "telemetry_rejected": c.telemetry_rejected,
                 "tree_changes": c.tree_changes, "log_tail": "" if met else c.log_tail},
    )


SCENARIOS: dict[str, Scenario] = {"manifest_attacks": manifest_attacks}
