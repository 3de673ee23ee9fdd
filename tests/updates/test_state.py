from __future__ import annotations

from typing import Any

import pytest

from agent.errors import UpdateError
from agent.updates.state import IllegalTransition, UpdateStateReporter, attempt_records, record_for


def make(served: tuple[str | None, str | None] = ("w", "1"),
         full: list[dict[str, Any]] | None = None) -> tuple[UpdateStateReporter, list[dict[str, Any]]]:
    """A reporter whose published attempt records land in the returned list (full payloads in `full`)."""
    out: list[dict[str, Any]] = []

    def publish(p: dict[str, Any]) -> None:
        if full is not None:
            full.append(p)
        if p["last_attempt"] is not None:
            out.append(p["last_attempt"])

    r = UpdateStateReporter(publish, clock=lambda: 1000.0, min_interval_s=10, min_step=0.25,
                            served=lambda: served)
    return r, out


def test_happy_path_payloads() -> None:
    r, out = make()
    r.transition("received", version="3", name="w", manifest_id="m1")
    r.report_progress(0, 100)
    for d in (10, 20, 30, 60, 99):
        r.report_progress(d, 100)
    r.report_progress(100, 100)
    for s in ("verifying", "building", "validating", "active"):
        r.transition(s)
    states = [p["state"] for p in out]
    assert states[0] == "received" and states[-4:] == ["verifying", "building", "validating", "active"]
    downloads = [p for p in out if p["state"] == "downloading"]
    assert [p["progress"] for p in downloads] == [0.0, 0.3, 0.6, 0.99, 1.0]  # steps >= 0.25, last always
    assert out[-1] == {"state": "active", "version": "3", "name": "w", "manifest_id": "m1", "progress": 1.0,
                       "error": None, "detail": None, "ts": 1000.0}
    assert r.history == ["idle", "received", "downloading", "verifying", "building", "validating", "active"]


def test_failures_and_rollback() -> None:
    r, out = make()
    r.transition("received", version="3")
    r.fail("checksum_mismatch", "sha differs")
    assert out[-1]["state"] == "failed" and out[-1]["error"] == "checksum_mismatch"
    r.transition("received", version="4")
    assert out[-1]["error"] is None and out[-1]["version"] == "4"
    for s in ("verifying", "building", "validating", "active"):
        r.transition(s)
    r.transition("rolled_back", error="health", detail="errors in window")
    assert out[-1]["state"] == "rolled_back" and out[-1]["version"] == "4"
    with pytest.raises(IllegalTransition):
        r.transition("failed", error="x")  # rolled_back -> failed is not an edge
    r.transition("received")
    with pytest.raises(UpdateError):
        r.transition("failed")  # failed needs a reason


@pytest.mark.parametrize(("path", "bad"), [
    ([], "active"), ([], "downloading"), (["received"], "active"), (["received", "verifying"], "validating"),
    (["received", "verifying", "building"], "downloading"), (["received", "failed"], "verifying"),
])
def test_illegal_transitions(path: list[str], bad: str) -> None:
    r, _ = make()
    for s in path:
        r.transition(s, error="x" if s == "failed" else None)
    with pytest.raises(IllegalTransition):
        r.transition(bad)


def test_publish_errors_do_not_break_the_machine() -> None:
    def boom(p: dict[str, Any]) -> None:
        raise RuntimeError("broker gone")

    r = UpdateStateReporter(boom)
    r.transition("received")
    assert r.state == "received" and r.busy


def test_the_payload_says_what_serves_with_the_attempt_beside_it() -> None:
    served = ["w", "1"]
    full: list[dict[str, Any]] = []
    r = UpdateStateReporter(full.append, clock=lambda: 1000.0, served=lambda: (served[0], served[1]))
    assert r.publish() == {"state": "active", "name": "w", "version": "1", "ts": 1000.0, "last_attempt": None,
                           "last_refused": None}
    r.transition("received", version="2", name="w", manifest_id="m2")
    assert (full[-1]["state"], full[-1]["version"], full[-1]["last_attempt"]["version"]) == ("active", "1", "2")
    for s in ("verifying", "building", "validating"):
        r.transition(s)
    served[1] = "2"
    r.transition("active")
    assert (full[-1]["state"], full[-1]["version"]) == ("active", "2")
    served[1] = "1"  # the host swapped back before the rollback is reported
    r.transition("rolled_back", error="health", detail="fps fell")
    assert (full[-1]["state"], full[-1]["version"]) == ("rolled_back", "1")
    assert full[-1]["last_attempt"]["state"] == "rolled_back" and full[-1]["last_attempt"]["version"] == "2"


def test_a_failed_rollback_does_not_claim_the_old_model_serves() -> None:
    full: list[dict[str, Any]] = []
    r = UpdateStateReporter(full.append, served=lambda: ("w", "2"))
    r.transition("received", version="2", name="w")
    for s in ("verifying", "building", "validating", "active"):
        r.transition(s)
    r.transition("rolled_back", error="health", detail="the rollback failed")
    assert (full[-1]["state"], full[-1]["version"]) == ("active", "2")


def test_a_refusal_is_reported_beside_and_never_moves_the_machine() -> None:
    full: list[dict[str, Any]] = []
    r, _ = make(full=full)
    r.transition("received", version="2", name="w", manifest_id="m2")
    for s in ("verifying", "building", "validating", "active"):
        r.transition(s)
    r.refuse("malformed", "not JSON")  # garbage in a health window
    assert r.state == "active" and full[-1]["last_attempt"]["state"] == "active"
    assert full[-1]["last_refused"]["error"] == "malformed" and full[-1]["version"] == "1"
    r.transition("rolled_back", error="health")  # still a legal step: the rollback reaches the state
    assert full[-1]["last_attempt"]["state"] == "rolled_back" and full[-1]["last_refused"]["error"] == "malformed"
    r.refuse("bad_signature", "x", manifest_id="m9")
    assert [x["state"] for x in attempt_records(full[-1])] == ["rolled_back", "failed"]
    assert record_for(full[-1], "m9") == full[-1]["last_refused"]
    assert record_for(full[-1], "m2") == full[-1]["last_attempt"]
    assert record_for(full[-1], "nope") is None


def test_records_of_an_older_agent_are_read_as_the_attempt() -> None:
    old = {"state": "failed", "version": "9", "manifest_id": "m9", "error": "bad_signature"}
    assert attempt_records(old) == [old] and record_for(old, "m9") == old


def test_a_served_lookup_that_raises_says_nothing_rather_than_guess() -> None:
    def boom() -> tuple[str | None, str | None]:
        raise IndexError("no pipeline yet")

    r = UpdateStateReporter(lambda p: None, served=boom)
    assert (r.payload()["name"], r.payload()["version"]) == (None, None)
