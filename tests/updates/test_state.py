from __future__ import annotations

from typing import Any

import pytest

from agent.errors import UpdateError
from agent.updates.state import IllegalTransition, UpdateStateReporter


def make() -> tuple[UpdateStateReporter, list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    return UpdateStateReporter(out.append, clock=lambda: 1000.0, min_interval_s=10, min_step=0.25), out


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
