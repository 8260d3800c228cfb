"""The layering docs/architecture.md promises, read from the imports themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "changeover"

CONCRETE_EDGES = {
    "changeover.checks",
    "changeover.database",
    "changeover.runtime",
    "changeover.executors.local",
    "changeover.executors.ssh",
    "changeover.balancers.apache",
    "changeover.balancers.builtin",
    "changeover.balancers.factory",
    "changeover.balancers.group",
    "changeover.balancers.haproxy",
    "changeover.balancers.nginx",
    "changeover.balancers.nginxtls",
    "changeover.balancers.process",
}


def imports(module: str) -> set[str]:
    """Every module `module` imports, at any depth of its code."""
    tree = ast.parse((SRC / module).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("module", ["engine.py", "policy.py", "plan.py", "steps.py", "ports.py"])
def test_the_engine_and_its_decisions_import_no_concrete_edge(module: str) -> None:
    assert imports(module) & CONCRETE_EDGES == set()


def test_the_cli_reaches_the_journal_only_through_the_service() -> None:
    used = imports("cli.py")
    assert "changeover.journal.Journal" not in used
    assert "changeover.runtime.open_journal" not in used
    assert not any(name.startswith("changeover.engine") for name in used)


def test_the_check_sees_a_concrete_import() -> None:
    """The parser really finds imports: runtime.py builds the concrete edges."""
    assert {"changeover.checks", "changeover.database"} <= imports("runtime.py")
