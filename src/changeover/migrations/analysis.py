"""The dialect-neutral part of the check: state across statements, filtering, Findings.

Each dialect module turns SQL into a stream of `Statement`s, each with the
`Hit`s its classifier found.  This module decides which hits become findings:
hits on objects created earlier in the same file are dropped (no old release
reads them, nobody else holds locks on them), hits outside the phase are
dropped, and the lock_timeout rule fires at most once per file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from changeover.migrations.coltypes import ColType, is_safe_widening
from changeover.migrations.rules import RULES, Dialect, Finding, Phase

NEEDS_REVIEW = "needs-review"
LOCK_TIMEOUT = "require-lock-timeout"
_EXCERPT_CHARS = 80


@dataclass(frozen=True)
class Hit:
    """A rule a statement matched, before phase and new-object filtering."""

    rule: str
    detail: str  # what this statement does, e.g. "drops column users.email"
    obj: str | None = None  # the table/index/type concerned; None when unknown


@dataclass(frozen=True)
class Statement:
    offset: int  # character offset of the statement's first token in the file
    text: str
    hits: list[Hit]


@dataclass(frozen=True)
class ColumnInfo:
    type: ColType
    not_null: bool


@dataclass
class Schema:
    """Column declarations seen so far in a check; shared by the files of one run."""

    columns: dict[tuple[str, str], ColumnInfo] = field(default_factory=dict)
    # The safe way to SET NOT NULL: a CHECK (col IS NOT NULL) constraint added
    # NOT VALID, then validated; PostgreSQL 12+ then skips the table scan.
    unvalidated_not_null_checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    validated_not_null: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class FileState:
    """What earlier statements of the same file established."""

    schema: Schema
    created: set[str] = field(default_factory=set)  # objects created in this file
    in_transaction: bool = False
    session_lock_timeout: bool = False
    local_lock_timeout: bool = False  # SET LOCAL: only until the transaction ends
    lock_timeout_reported: bool = False

    @property
    def lock_timeout(self) -> bool:
        return self.session_lock_timeout or self.local_lock_timeout

    def end_transaction(self) -> None:
        self.in_transaction = False
        self.local_lock_timeout = False


def retype(
    state: FileState,
    dialect: Dialect,
    table: str,
    column: str,
    new: ColType,
    *,
    new_name: str | None = None,
    not_null: bool | None = None,
) -> Hit | None:
    """Record a column's new type (and name); a changing-column-type hit unless it is
    a known-safe widening of a type declared earlier.  `not_null=None` keeps the old
    nullability."""
    old = state.schema.columns.pop((table, column), None)
    if not_null is None:
        not_null = old.not_null if old else False
    state.schema.columns[(table, new_name or column)] = ColumnInfo(new, not_null)
    if old is not None and is_safe_widening(old.type, new, dialect):
        return None
    was = f"from {old.type} " if old else "(old type not declared in the checked files) "
    return Hit("changing-column-type", f"changes {table}.{column} {was}to {new}", table)


def _line(sql: str, offset: int) -> int:
    return sql.count("\n", 0, offset) + 1


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 1] + "…"


def _keep(hit: Hit, state: FileState, phase: Phase) -> bool:
    rule = RULES[hit.rule]
    if phase not in rule.phases:
        return False
    if hit.obj is not None and hit.obj in state.created and not rule.applies_to_new_objects:
        return False
    if hit.rule == LOCK_TIMEOUT:
        if state.lock_timeout or state.lock_timeout_reported:
            return False
        state.lock_timeout_reported = True
    return True


def _statements(sql: str, dialect: Dialect, state: FileState) -> Iterator[Statement]:
    # Imported here so that each dialect's parser loads only when it is used.
    if dialect == "postgres":
        from changeover.migrations import postgres

        return postgres.statements(sql, state)
    from changeover.migrations import generic

    return generic.statements(sql, dialect, state)


def _analyse(sql: str, dialect: Dialect, phase: Phase, path: str, schema: Schema) -> list[Finding]:
    state = FileState(schema)
    findings: list[Finding] = []
    # The stream is consumed statement by statement, so `_keep` sees the state
    # (transaction, lock_timeout, created objects) as of each statement.
    for statement in _statements(sql, dialect, state):
        for hit in statement.hits:
            if not _keep(hit, state, phase):
                continue
            rule = RULES[hit.rule]
            findings.append(
                Finding(
                    rule=rule.id,
                    path=path,
                    line=_line(sql, statement.offset),
                    statement=_excerpt(statement.text),
                    message=f"{hit.detail}: {rule.why}",
                    safe_alternative=rule.safe_alternative,
                    severity=rule.severity,
                )
            )
    return findings


def analyse(sql: str, *, dialect: Dialect, phase: Phase, path: str = "<sql>") -> list[Finding]:
    """Findings for one migration's SQL, in statement order."""
    return _analyse(sql, dialect, phase, path, Schema())


_WORDS = re.compile(r"[a-z0-9]+")  # splits a file name, never SQL


def phase_of(path: Path) -> Phase:
    """The phase a migration file belongs to, by its name.

    A name with the word `contract` (e.g. `0007_contract_drop_old.sql`) is
    contract; anything else, including names with neither word, is expand:
    the strict default, because expand runs every rule.  Words are split on
    non-alphanumerics, so `0004_add_contractor.sql` is expand.
    """
    words = set(_WORDS.findall(path.name.lower()))
    return "contract" if "contract" in words and "expand" not in words else "expand"


def migration_files(paths: Iterable[Path]) -> list[Path]:
    """Files to check: each path itself, or a directory's *.sql files in name order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.sql") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such migration file or directory: {path}")
    return files


def check_paths(
    paths: Sequence[Path], *, dialect: Dialect, phase: Phase | None = None
) -> list[Finding]:
    """Findings for migration files and directories, in file order.

    `phase=None` takes each file's phase from its name (`phase_of`).  Column
    types declared in earlier files are remembered, so a later widening of
    such a column is recognised as safe.  Raises FileNotFoundError for a
    missing path and UnicodeDecodeError for a file that is not UTF-8.
    """
    schema = Schema()
    findings: list[Finding] = []
    for file in migration_files(paths):
        sql = file.read_text(encoding="utf-8")
        findings.extend(_analyse(sql, dialect, phase or phase_of(file), str(file), schema))
    return findings
