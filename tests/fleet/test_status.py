"""`fleet status`'s table from model/state payloads: what serves, with the last attempt and refusal beside it.

Rows are built from payloads as agents publish them (from 0.3.0 on, and up to 0.2.0); the retained-topic
reading itself runs against a real mosquitto in tests/fleet/test_fleet.py and tests/test_updates_e2e.py."""

from __future__ import annotations

from typing import Any

from agent.fleet.status import DeviceRow, format_table

NOW = 1_800_000_000.0


def row(model_state: dict[str, Any], status: dict[str, Any] | None = None) -> DeviceRow:
    return DeviceRow("orin-1", status or {"state": "online", "ts": NOW - 1, "model": {"name": "w", "version": "2"}},
                     model_state)


def cells(r: DeviceRow) -> dict[str, str]:
    header, line = format_table({"orin-1": r}, now=NOW).splitlines()
    starts = [header.index(h) for h in header.split()[:-2]] + [header.index("LAST SEEN")]
    bounds = [*starts, len(line) + 1]
    names = [*header.split()[:-2], "LAST SEEN"]
    return {n: line[a:b].strip() for n, a, b in zip(names, bounds, bounds[1:], strict=False)}


def test_a_rollback_shows_what_serves_the_attempt_and_a_later_refusal() -> None:
    r = row({"state": "rolled_back", "name": "w", "version": "1", "ts": NOW - 3,
             "last_attempt": {"state": "rolled_back", "name": "w", "version": "2", "manifest_id": "m2",
                              "progress": 1.0, "error": "health", "detail": "fps fell", "ts": NOW - 3},
             "last_refused": {"state": "failed", "manifest_id": None, "error": "malformed", "ts": NOW - 5}})
    c = cells(r)
    assert c["MODEL"] == "w:1 (rolled back)"  # model/state names what serves, not the status topic's copy
    assert c["UPDATE"] == "rolled_back (w:2)" and c["ERROR"] == "health"
    assert c["REFUSED"] == "malformed (5s ago)"


def test_an_update_in_progress_leaves_the_served_model_in_place() -> None:
    c = cells(row({"state": "active", "name": "w", "version": "2", "ts": NOW - 1, "last_refused": None,
                   "last_attempt": {"state": "downloading", "name": "w", "version": "3", "progress": 0.42,
                                    "error": None, "ts": NOW - 1}}))
    assert (c["MODEL"], c["UPDATE"], c["PROGRESS"], c["ERROR"], c["REFUSED"]) == \
        ("w:2", "downloading (w:3)", "42%", "-", "-")


def test_a_device_that_never_updated_and_an_agent_of_0_2_0() -> None:
    c = cells(row({"state": "active", "name": "w", "version": "2", "ts": NOW, "last_attempt": None,
                   "last_refused": None}))
    assert (c["MODEL"], c["UPDATE"], c["ERROR"]) == ("w:2", "-", "-")
    old = cells(row({"state": "failed", "version": "9", "error": "bad_signature", "ts": NOW - 60}))
    assert (old["MODEL"], old["UPDATE"], old["ERROR"]) == ("w:2", "failed (:9)", "bad_signature")
