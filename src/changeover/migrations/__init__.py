"""Migration safety: find schema changes that break the release still running, or lock.

Both clusters share one database, so an expand migration must keep the old
release working and no migration may hold a long lock.  See docs/migrations.md.
"""

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
