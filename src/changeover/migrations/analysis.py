"""The dialect-neutral part of the check: state across statements, filtering, Findings.

Each dialect module turns SQL into a stream of `Statement`s, each with the
`Hit`s its classifier found.  This module decides which hits become findings:
hits on objects created earlier in the same file are dropped (no old release
reads them, nobody else holds locks on them), hits outside the phase are
dropped, and the timeout rules fire at most once per file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from changeover.migrations.coltypes import ColType, is_safe_widening
from changeover.migrations.rules import RULES, Dialect, Finding, Phase, Transactions

NEEDS_REVIEW = "needs-review"
UNPARSEABLE = "unparseable-statement"
LOCK_TIMEOUT = "require-lock-timeout"
STATEMENT_TIMEOUT = "require-statement-timeout"
# The setting each timeout rule wants in force before DDL that locks an existing object.
TIMEOUT_SETTINGS = {LOCK_TIMEOUT: "lock_timeout", STATEMENT_TIMEOUT: "statement_timeout"}
HELD_LOCK = "transaction-holds-lock"
_EXCERPT_CHARS = 80


class Hit(NamedTuple):
    """A rule a statement matched, before phase and new-object filtering.  (A
    NamedTuple: a big file makes several per statement, and it is the cheapest.)"""

    rule: str
    detail: str  # what this statement does, e.g. "drops column users.email"
    obj: str | None = None  # the table/index/type concerned; None when unknown
    # The lock this statement takes on `obj` when that lock blocks the old
    # release's reads or writes; a transaction keeps it until it ends.
    lock: str | None = None


class Statement(NamedTuple):
    offset: int  # character offset of the statement's first token in the file
    text: str
    hits: list[Hit]


class WholeFile(Exception):
    """Raised by a dialect's statement stream that finds, part way through the
    file, that the file as a whole cannot be read (a streamed tokenizer's error):
    the file is then this one statement, as if none of it had been read."""

    def __init__(self, statement: Statement) -> None:
        super().__init__(statement.hits[0].detail if statement.hits else "")
        self.statement = statement


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

    def copy(self) -> Schema:
        return Schema(
            dict(self.columns),
            dict(self.unvalidated_not_null_checks),
            set(self.validated_not_null),
        )

    def restore(self, saved: Schema) -> None:
        """Back to `saved` (a `copy()`), in place: the object is shared by the run."""
        self.columns = saved.columns
        self.unvalidated_not_null_checks = saved.unvalidated_not_null_checks
        self.validated_not_null = saved.validated_not_null


@dataclass
class FileState:
    """What earlier statements of the same file established."""

    schema: Schema
    # "per-file": the file is applied as changeover's applier does (one
    # transaction unless the file controls its own or refuses one).
    transactions: Transactions = "per-file"
    created: set[str] = field(default_factory=set)  # objects created in this file
    in_transaction: bool = False
    # Blocking locks on existing objects taken earlier in the open transaction:
    # object -> (lock mode, line of the statement that took it).
    held: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Enum labels ADD VALUE added in the open transaction -> their type: PostgreSQL
    # refuses to use them before that transaction commits.
    new_enum_values: dict[str, str] = field(default_factory=dict)
    session_timeouts: set[str] = field(default_factory=set)  # settings set non-zero
    local_timeouts: set[str] = field(default_factory=set)  # SET LOCAL: until the end
    timeouts_reported: set[str] = field(default_factory=set)  # rules, once per file

    def timeout(self, setting: str) -> bool:
        return setting in self.session_timeouts or setting in self.local_timeouts

    def end_transaction(self) -> None:
        self.in_transaction = False
        self.local_timeouts.clear()
        self.held.clear()
        self.new_enum_values.clear()

    def held_lock(self, what: str) -> list[Hit]:
        """A transaction-holds-lock hit when `what` (a slow statement) runs while the
        transaction still holds a lock that blocks the old release."""
        if not self.held:
            return []
        obj, (mode, line) = next(iter(self.held.items()))
        detail = (
            f"{what} while this file's transaction still holds the {mode} lock on {obj} "
            f"taken at line {line}, until the transaction ends"
        )
        return [Hit(HELD_LOCK, detail)]


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


class _Lines:
    """Line numbers of increasing offsets, counted on from the last one: linear in
    the file, however many findings it has (an earlier offset counts from the start)."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.offset = 0
        self.line = 1

    def of(self, offset: int) -> int:
        if offset < self.offset:
            self.offset, self.line = 0, 1
        self.line += self.sql.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _excerpt(text: str) -> str:
    # Printable: no whitespace but the ASCII space; then nothing to change when no
    # space is doubled or at either end (the common case, told cheaply).
    short = len(text) <= _EXCERPT_CHARS
    if short and text.isprintable() and "  " not in text and text[:1] != " " != text[-1:]:
        return text
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 1] + "…"


def _keep(hit: Hit, state: FileState, phase: Phase) -> bool:
    rule = RULES[hit.rule]
    if phase not in rule.phases:
        return False
    if hit.obj is not None and hit.obj in state.created and not rule.applies_to_new_objects:
        return False
    if hit.rule in TIMEOUT_SETTINGS:
        if hit.rule in state.timeouts_reported or state.timeout(TIMEOUT_SETTINGS[hit.rule]):
            return False
        state.timeouts_reported.add(hit.rule)
    return True


def _statements(sql: str, dialect: Dialect, state: FileState) -> Iterator[Statement]:
    # Imported here so that each dialect's parser loads only when it is used.
    if dialect == "postgres":
        from changeover.migrations import postgres

        return postgres.statements(sql, state)
    from changeover.migrations import generic

    return generic.statements(sql, dialect, state)


def _hold(hits: list[Hit], state: FileState, line: int) -> None:
    """Remember the blocking locks a statement took inside a transaction."""
    if not state.in_transaction:
        return
    for hit in hits:
        if hit.lock and hit.obj is not None and hit.obj not in state.created:
            state.held.setdefault(hit.obj, (hit.lock, line))


def _analyse(
    sql: str,
    dialect: Dialect,
    phase: Phase,
    path: str,
    schema: Schema,
    transactions: Transactions,
) -> list[Finding]:
    saved = schema.copy()
    state = FileState(schema, transactions)
    findings: list[Finding] = []
    lines = _Lines(sql)
    try:
        # The stream is consumed statement by statement, so `_keep` sees the state
        # (transaction, timeouts, created objects) as of each statement.  A
        # statement without hits adds nothing: a stream may leave such ones out.
        for statement in _statements(sql, dialect, state):
            if statement.hits:
                _add_findings(statement, state, phase, path, lines.of(statement.offset), findings)
    except WholeFile as whole:
        schema.restore(saved)
        findings = []
        state = FileState(schema, transactions)
        _add_findings(whole.statement, state, phase, path, 1, findings)
    return findings


def _add_findings(
    statement: Statement,
    state: FileState,
    phase: Phase,
    path: str,
    line: int,
    findings: list[Finding],
) -> None:
    _hold(statement.hits, state, line)
    # Whatever locks an existing object wants both timeouts (squawk's
    # require-timeout-settings): the lock wait and the statement bounded.
    # Reported once per file, so not made again after that.
    hits = statement.hits
    if STATEMENT_TIMEOUT not in state.timeouts_reported:
        hits = hits + [
            Hit(STATEMENT_TIMEOUT, h.detail, h.obj) for h in hits if h.rule == LOCK_TIMEOUT
        ]
    excerpt = None
    for hit in hits:
        if not _keep(hit, state, phase):
            continue
        rule = RULES[hit.rule]
        if excerpt is None:
            excerpt = _excerpt(statement.text)
        message = f"{hit.detail}: {rule.why}"
        findings.append(
            Finding(rule.id, path, line, excerpt, message, rule.safe_alternative, rule.severity)
        )


def analyse(
    sql: str,
    *,
    dialect: Dialect,
    phase: Phase,
    path: str = "<sql>",
    transactions: Transactions = "per-file",
) -> list[Finding]:
    """Findings for one migration's SQL, in statement order.

    `transactions="per-file"` models changeover's applier (PostgreSQL: the file
    runs in one transaction unless it has its own transaction statements or a
    statement that refuses a transaction block); "per-statement" models a
    runner that sends each statement on its own (autocommit).
    """
    return _analyse(sql, dialect, phase, path, Schema(), transactions)


_WORDS = re.compile(r"[a-z0-9]+")  # splits a file name, never SQL


def allow_refusal(allowed: Iterable[str]) -> str | None:
    """Why `--allow` cannot take these rules (unknown, or not allowable), or None."""
    rules = set(allowed)
    unknown = sorted(rules - RULES.keys())
    if unknown:
        return f"unknown rule(s) for --allow: {', '.join(unknown)}"
    refused = sorted(r for r in rules if not RULES[r].allowable)
    if refused:
        return f"--allow cannot accept {', '.join(refused)}: fix the SQL"
    return None


def blocking_findings(findings: Iterable[Finding], allowed: Iterable[str]) -> list[Finding]:
    """The findings `--allow` does not accept; a rule that is not allowable always blocks."""
    accepted = {rule for rule in allowed if RULES[rule].allowable} if allowed else set()
    return [f for f in findings if f.rule not in accepted]


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
    paths: Sequence[Path],
    *,
    dialect: Dialect,
    phase: Phase | None = None,
    transactions: Transactions = "per-file",
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
        file_phase = phase or phase_of(file)
        findings.extend(_analyse(sql, dialect, file_phase, str(file), schema, transactions))
    return findings
