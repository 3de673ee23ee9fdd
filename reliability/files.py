"""`file_modes`: what the agent leaves on disk is owner-only, and its secrets never show.

Three real agent runs under umask 022 at log level debug, on a mosquitto that wants a client certificate
and a password (tests/support/filemodes.py): password from `mqtt.password_file` with a signed update
applied over MQTT chunks and engines cached; password from `$CREDENTIALS_DIRECTORY/mqtt_password`;
a wrong password. Plus `edge-agent fleet keygen`. Then every path under the model store, the engine
cache and the key directory must be owner-only (files 0600 at most, directories 0700), and neither
password nor any line of the TLS client key or the signing key may appear in the agent's output, in
what it published, or in the files it wrote. A safety invariant (`hard`). Fixed size: quick and full
are the same run.
"""

from __future__ import annotations

from reliability.common import Context, Scenario, ScenarioResult
from tests.support.filemodes import run_file_audit


def file_modes(ctx: Context) -> ScenarioResult:
    a = run_file_audit(ctx.work / "audit", log=ctx.log)
    failed_runs = [k for k, ok in a.runs.items() if not ok]
    notes = [f"{len(a.checked)} paths checked under models/, cache/ and the key dir; {a.secrets_checked} secret "
             f"strings looked for in {a.haystacks} texts (3 agent logs, published payloads, keygen output, "
             "written files)"]
    if a.bad_modes:
        notes.append(f"not owner-only: {a.bad_modes[:10]}")
    if a.leaks:
        notes.append(f"secrets seen: {a.leaks[:10]}")
    if failed_runs:
        notes.append(f"runs that did not do their part: {failed_runs}")
    notes += a.notes
    return ScenarioResult(
        name="file_modes", cycles=len(a.checked),
        goal="every file 0600 / dir 0700; no secret in output, payloads or files",
        met=a.ok, hard=True,
        lost=f"{len(a.bad_modes)} of {len(a.checked)} paths too open, {len(a.leaks)} leaks",
        note="; ".join(notes),
        details={"checked": a.checked, "bad_modes": a.bad_modes, "leaks": a.leaks, "runs": a.runs,
                 "log_tail": "" if a.ok else a.log_tail},
    )


SCENARIOS: dict[str, Scenario] = {"file_modes": file_modes}
