"""The update side sees the service only through agent.updates.ports: the imports run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import agent.updates

UPDATES = Path(agent.updates.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any level (TYPE_CHECKING blocks and function bodies too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_nothing_under_agent_updates_imports_the_service() -> None:
    files = sorted(UPDATES.glob("*.py"))
    assert len(files) > 5
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "agent.service" or
                                m.startswith("agent.service."))
                 for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_service_reaches_updates_through_start_updates() -> None:
    service = UPDATES.parent / "service.py"
    assert "agent.updates.host.start_updates" in imported_modules(service)
