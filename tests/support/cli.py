"""The real `edge-agent` console script, run as a subprocess (what a user types), for CLI tests.

`edge_agent(*args)` runs it and returns the completed process; `assert_clean` checks that a run
on bad input ended with the expected exit code and a message, and printed no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def entry_point() -> str:
    """The installed `edge-agent` script of the interpreter running the tests (its venv's bin)."""
    beside = Path(sys.executable).parent / "edge-agent"
    found = str(beside) if beside.exists() else shutil.which("edge-agent")
    if found is None:
        raise RuntimeError("the edge-agent console script is not installed for this interpreter "
                           "(scripts/test.sh installs the project into its venv)")
    return found


def edge_agent(*args: str, timeout: float = 120, cwd: Path | None = None, prefix: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, entry_point(), *args], capture_output=True, text=True, check=False,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def assert_clean(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit `code`, no traceback anywhere, and each needle in stderr (the message says what is wrong)."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    assert res.returncode == code, f"exit {res.returncode}, wanted {code}:\n{out[-2000:]}"
    for n in needles:
        assert n in res.stderr, f"{n!r} not in stderr:\n{res.stderr[-2000:]}"


def without_dac_override() -> tuple[str, ...]:
    """A command prefix under which permissions apply: root reads any folder otherwise (the tests
    run as root in CI). util-linux's setpriv drops the two capabilities that bypass them."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is needed to test unreadable folders as root")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
