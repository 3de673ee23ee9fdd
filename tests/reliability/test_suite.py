"""The fault suite's runner (`python3 -m reliability`): discovery, argument errors, the report.

Runs the real runner in-process and as `python3 -m reliability` in a child; no scenario is run (those
are the suite itself, run by CI at quick size)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reliability import suite
from reliability.common import ScenarioResult
from tests.support.agent_proc import ROOT


def test_every_scenario_module_is_found() -> None:
    scenarios, absent = suite.discover()
    assert absent == []
    assert {"broker_kill", "update_kill", "manifest_attacks", "fleet", "soak"} <= set(scenarios)


def test_the_package_runs_as_a_module_from_the_repository_root() -> None:
    res = subprocess.run([sys.executable, "-m", "reliability", "--list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "broker_kill" in res.stdout.split()


@pytest.mark.parametrize("argv", [["--only", "no_such_scenario"], ["--skip", "nope"], ["--set", "cycles"]])
def test_bad_arguments_exit_2_with_a_reason(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert suite.main(argv) == 2
    assert "reliability:" in capsys.readouterr().err


def test_the_report_marks_a_missed_goal_and_keeps_notes() -> None:
    ok = ScenarioResult(name="a", cycles=3, goal="g", met=True, lost="0")
    missed = ScenarioResult(name="b", cycles=1, goal="g", met=False, lost="1", note="why it missed")
    md = suite.markdown([ok, missed], {"size": "quick", "date": "2026-12-01", "commit": "abc", "machine": "m",
                                       "absent_modules": ["reliability.x"]})
    assert "| a | 3 | 0 |" in md and "| b | 1 | 1 |" in md and "**no**" in md
    assert "- **b**: why it missed" in md and "reliability.x" in md
