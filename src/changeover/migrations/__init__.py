"""Migration safety: find schema changes that break the release still running, or lock.

Both clusters share one database, so an expand migration must keep the old
release working and no migration may hold a long lock.  See docs/migrations.md.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The names below load on first use (PEP 562): `changeover --help` and the
# commands that check no migration do not pay for the analyser.
if TYPE_CHECKING:
    from changeover.migrations.analysis import (
        allow_refusal,
        analyse,
        blocking_findings,
        check_paths,
        migration_files,
        phase_of,
    )
    from changeover.migrations.report import format_findings
    from changeover.migrations.rules import (
        RULES,
        Dialect,
        Finding,
        Phase,
        Rule,
        Severity,
        Transactions,
    )

_HOME = {
    "allow_refusal": "analysis",
    "analyse": "analysis",
    "blocking_findings": "analysis",
    "check_paths": "analysis",
    "migration_files": "analysis",
    "phase_of": "analysis",
    "format_findings": "report",
    "RULES": "rules",
    "Dialect": "rules",
    "Finding": "rules",
    "Phase": "rules",
    "Rule": "rules",
    "Severity": "rules",
    "Transactions": "rules",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = [
    "RULES",
    "Dialect",
    "Finding",
    "Phase",
    "Rule",
    "Severity",
    "Transactions",
    "allow_refusal",
    "analyse",
    "blocking_findings",
    "check_paths",
    "format_findings",
    "migration_files",
    "phase_of",
]
