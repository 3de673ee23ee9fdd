"""`tls_acl`: the shipped broker setup (config/mosquitto-tls.conf + config/mosquitto.acl) holds.

A real mosquitto with the shipped config (TLS only, client certificate required, user name = the
certificate's CN) and the shipped ACL's device rules, a PKI from scripts/make_certs.py
(tests/support/tls.py). Each round:

  forged    dev1's certificate publishes on every outgoing topic of dev2, on dev2's, its own and its
            group's update / chunk topics, also claiming user name dev2 and client id edge-agent-dev2,
            and over MQTT 3.1.1; a subscriber allowed to read `edge/#` (and a late one, for retained
            messages) must see none of it, while dev1's own publish does arrive
  reads     dev1 subscribes to `edge/#`; an operator publishes on its own and its group's update topics
            (must arrive) and on dev2's, another group's and dev2's out topics (must not)
  refused   no client certificate; a certificate of another CA with CN dev1; no certificate with a
            user name and password: each refused during the handshake

Then once: the real agent (`python -m agent.cli run`, mqtt.tls with ca_file / cert_file / key_file)
connects and publishes detections; an update pushed to a group its config names but the ACL does not
give it never reaches it; an update pushed to its group with `edge-agent fleet push-model --cafile
--certfile --keyfile` becomes active and serves. A safety invariant (`hard`).
"""

from __future__ import annotations

from reliability.common import Context, Scenario, ScenarioResult
from tests.support.tls import run_tls_acl


def tls_acl(ctx: Context) -> ScenarioResult:
    rounds = ctx.cycles(3, 1)
    r = run_tls_acl(ctx.work / "tls", rounds=rounds, log=ctx.log)
    refused = sum(r.refusals.values())
    notes = [f"{rounds} round(s): {r.forged_sent} forged publishes ({len(r.forged_seen)} seen by a reader of "
             f"edge/#), own publish arrived: {r.control_seen}; reads {r.reads_got}/{r.reads_expected} allowed, "
             f"{len(r.reads_leaked)} leaked; {refused}/{len(r.refusals)} unauthenticated connections refused "
             f"({r.refusal_log_lines} handshake refusals in the broker log); agent over mutual TLS: first "
             f"detections {r.agent_connect_s} s after start, update to a group the ACL does not give it "
             f"reached it: {r.non_member_group_reached}, `fleet push-model` over TLS exit {r.push_cli_rc}, "
             f"group update {r.update_state} {r.update_s} s after the push began (2 s of it the pusher's "
             f"group delay), serving {sorted(r.served_after_update)}"]
    if r.forged_seen:
        notes.append(f"FORGED MESSAGES DELIVERED: {r.forged_seen[:10]}")
    if r.reads_leaked:
        notes.append(f"READ WITHOUT RIGHT: {r.reads_leaked[:10]}")
    if not all(r.refusals.values()):
        notes.append(f"ACCEPTED WITHOUT A VALID CERTIFICATE: {[k for k, v in r.refusals.items() if not v]}")
    return ScenarioResult(
        name="tls_acl", cycles=rounds,
        goal="0 forged or unauthorised messages delivered; 100 % of bad certificates refused; agent works",
        met=r.ok, hard=True,
        lost=f"{len(r.forged_seen)} of {r.forged_sent} forged delivered, {len(r.reads_leaked)} leaked reads, "
             f"{len(r.refusals) - refused} of {len(r.refusals)} bad clients accepted",
        note="; ".join(notes),
        details={"forged_seen": r.forged_seen, "reads_leaked": r.reads_leaked, "refusals": r.refusals,
                 "agent_connect_s": r.agent_connect_s, "update_s": r.update_s, "update_state": r.update_state,
                 "push_cli_rc": r.push_cli_rc, "log_tail": "" if r.ok else r.log_tail},
    )


SCENARIOS: dict[str, Scenario] = {"tls_acl": tls_acl}
