"""The shared database: apply one phase of the release's migrations, check that
the release still serving survives the expand phase, and review the SQL before
anything runs (the gate of `plan` and `release`).

Migrations come from `[database] migrations_dir` (ordered `*.sql` files whose
phase `phase_of` reads from the name; each applied file is recorded in the
`changeover_migrations` table of the target database, so a resumed release
skips it) or from `apply_command` (run locally with CHANGEOVER_DATABASE_URL;
`sql_command` prints the SQL it would run, which is what gets reviewed).

SQLite is driven through the sqlite3 module and PostgreSQL through psycopg 3,
both synchronously in a worker thread (`asyncio.to_thread`), one connection per
phase. MySQL is supported through the commands only.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from changeover.checks import Checker, public_entry
from changeover.config import ConfigError, Database, Topology
from changeover.executors.base import render_argv
from changeover.executors.local import run_local
from changeover.migrations import Phase
from changeover.ports import MigrationError, Review

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

TABLE = "changeover_migrations"
_OUTPUT_TAIL = 5  # lines of a failed command's output in the error


def _database(topo: Topology) -> Database:
    if topo.database is None:
        raise ConfigError("no [database] in the topology")
    return topo.database


# --- the migration files ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    phase: Phase
    path: Path


def migration_files(topo: Topology) -> list[Migration]:
    """The `*.sql` files of `migrations_dir` in name order, each with its phase."""
    db = _database(topo)
    assert db.migrations_dir is not None
    folder = topo.resolve_path(db.migrations_dir)
    if not folder.is_dir():
        raise ConfigError(f"database.migrations_dir: {folder} is not a directory")
    files = sorted(p for p in folder.glob("*.sql") if p.is_file())
    from changeover.migrations.analysis import phase_of  # the analyser: only for a database

    return [Migration(p.name, phase_of(p), p) for p in files]


def migration_pins(topo: Topology) -> dict[str, str] | None:
    """name -> sha256 of every migration file, as the release's check read them
    (journaled, so a resume applies only what was checked); None without files."""
    if topo.database is None or topo.database.migrations_dir is None:
        return None
    return {m.name: hashlib.sha256(m.path.read_bytes()).hexdigest() for m in migration_files(topo)}


def _unchecked(files: list[Migration], pins: Mapping[str, str]) -> list[str]:
    """The files that differ from what the release's check read: new or edited."""
    return [
        m.name for m in files if pins.get(m.name) != hashlib.sha256(m.path.read_bytes()).hexdigest()
    ]


@dataclass(frozen=True, slots=True)
class _Sql:
    offset: int  # of the statement in its file, for the line in errors
    text: str
    controls_transaction: bool  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT...


def _split_postgres(sql: str, name: str) -> list[_Sql]:
    # pglast is PostgreSQL's own grammar (the analyser's parser too): statements
    # are split on real boundaries, never on a ';' inside a string or $$ body.
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    try:
        raws = parse_sql(sql)
    except ParseError as exc:
        raise MigrationError(f"{name}: PostgreSQL's parser rejects it: {exc.args[0]}") from None
    out = []
    for raw in raws:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        out.append(_Sql(start, sql[start:end], isinstance(raw.stmt, ast.TransactionStmt)))
    return out


# The first word after whitespace and comments; `\s` one at a time keeps it linear.
_FIRST_WORD = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w+)", re.DOTALL)
_SQLITE_TRANSACTION = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"})


def _split_sqlite(sql: str) -> list[_Sql]:
    # SQLite's own completeness test knows strings, comments and trigger bodies.
    out = []
    start = 0
    for end in (m.end() for m in re.finditer(";", sql)):
        chunk = sql[start:end]
        if sqlite3.complete_statement(chunk):
            out.append(chunk)
            start = end
    out.append(sql[start:])  # a last statement without ';' (or only whitespace)
    statements = []
    offset = 0
    for chunk in out:
        word = _FIRST_WORD.match(chunk)
        if word:
            keyword = word.group(1).upper()
            statements.append(_Sql(offset + word.start(1), chunk, keyword in _SQLITE_TRANSACTION))
        offset += len(chunk)
    return statements


def _line(sql: str, offset: int) -> int:
    return sql.count("\n", 0, offset) + 1


# --- connections (synchronous: always called through asyncio.to_thread) -----------


class _Connection(ABC):
    """What applying needs from a database: run SQL, transactions, the record table."""

    @abstractmethod
    def execute(self, sql: str) -> None: ...

    @abstractmethod
    def in_transaction(self) -> bool: ...

    @abstractmethod
    def cannot_run_in_transaction(self, exc: Exception) -> bool:
        """The statement refused to run inside a transaction block (e.g. CONCURRENTLY)."""

    @abstractmethod
    def applied(self) -> list[tuple[str, str, str]]:
        """(name, phase, version) of every recorded migration; none when no table."""

    @abstractmethod
    def create_table(self) -> None: ...

    @abstractmethod
    def record(self, migration: Migration, version: str) -> None: ...

    @abstractmethod
    def split(self, sql: str, name: str) -> list[_Sql]: ...

    def invalid_indexes(self) -> list[str]:
        """Indexes a failed concurrent build left behind (INVALID); none by default."""
        return []

    @abstractmethod
    def close(self) -> None: ...

    def rollback_if_open(self) -> None:
        if self.in_transaction():
            self.execute("ROLLBACK")


class _Sqlite(_Connection):
    def __init__(self, path: Path) -> None:
        # isolation_level=None: no implicit transactions, files run as written.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 10000")  # the app servers read meanwhile

    def execute(self, sql: str) -> None:
        self.conn.execute(sql)

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def cannot_run_in_transaction(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "within a transaction" in str(exc)

    def applied(self) -> list[tuple[str, str, str]]:
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
        if not exists:
            return []
        return self.conn.execute(f"SELECT name, phase, version FROM {TABLE}").fetchall()

    def create_table(self) -> None:
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (name TEXT PRIMARY KEY, phase TEXT NOT NULL, "
            "version TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )

    def record(self, migration: Migration, version: str) -> None:
        self.conn.execute(
            f"INSERT INTO {TABLE} (name, phase, version) VALUES (?, ?, ?)",
            (migration.name, migration.phase, version),
        )

    def split(self, sql: str, name: str) -> list[_Sql]:
        return _split_sqlite(sql)

    def close(self) -> None:
        self.conn.close()


class _Postgres(_Connection):
    def __init__(self, url: str) -> None:
        import psycopg

        self.errors = psycopg.errors
        # autocommit: statements run as written; atomic files get an explicit BEGIN.
        self.conn: psycopg.Connection[Any] = psycopg.connect(
            url, autocommit=True, connect_timeout=10, application_name="changeover"
        )

    def execute(self, sql: str) -> None:
        self.conn.execute(sql)  # no parameters: a "%" in the SQL is sent as written

    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.conn.info.transaction_status is not TransactionStatus.IDLE

    def cannot_run_in_transaction(self, exc: Exception) -> bool:
        return isinstance(exc, self.errors.ActiveSqlTransaction)

    def applied(self) -> list[tuple[str, str, str]]:
        row = self.conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
        if row is None or row[0] is None:
            return []
        return [
            (str(n), str(p), str(v))
            for n, p, v in self.conn.execute(f"SELECT name, phase, version FROM {TABLE}")
        ]

    def create_table(self) -> None:
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (name text PRIMARY KEY, phase text NOT NULL, "
            "version text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )

    def record(self, migration: Migration, version: str) -> None:
        self.conn.execute(
            f"INSERT INTO {TABLE} (name, phase, version) VALUES (%s, %s, %s)",
            (migration.name, migration.phase, version),
        )

    def split(self, sql: str, name: str) -> list[_Sql]:
        return _split_postgres(sql, name)

    def invalid_indexes(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE NOT i.indisvalid ORDER BY c.relname"
        )
        return [str(name) for (name,) in rows]

    def close(self) -> None:
        self.conn.close()


def sqlite_path(topo: Topology, url: str) -> Path:
    """The file of `sqlite:///relative`, `sqlite:////absolute` or a plain path;
    relative to the topology file's folder."""
    path = url.removeprefix("sqlite://")
    path = path[1:] if path.startswith("/") and url.startswith("sqlite://") else path
    return topo.resolve_path(path)


def _open(topo: Topology) -> _Connection:
    db = _database(topo)
    try:
        if db.sql_dialect() == "sqlite":
            return _Sqlite(sqlite_path(topo, db.url))
        scheme, sep, rest = db.url.partition("://")
        return _Postgres(scheme.partition("+")[0] + sep + rest)  # libpq knows no +driver
    except Exception as exc:
        raise MigrationError(f"cannot open the database: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _apply(conn: _Connection, migration: Migration, version: str) -> None:
    """Apply one file and record it; atomically unless the file cannot be wrapped.

    A file without transaction statements runs in one transaction together
    with its record, so an interruption leaves it either applied and recorded
    or not applied at all. A file with its own BEGIN/COMMIT, or a statement
    that refuses to run in a transaction (CREATE INDEX CONCURRENTLY), runs as
    written and is recorded afterwards: such a file must be safe to re-run.
    """
    try:
        sql = migration.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"{migration.name}: cannot read it: {exc}") from None
    statements = conn.split(sql, migration.name)

    def run_all() -> None:
        for statement in statements:
            try:
                conn.execute(statement.text)
            except Exception as exc:
                where = f"{migration.name}:{_line(sql, statement.offset)}"
                raise _StatementFailed(f"{where}: {_one_line(exc)}", exc, statement.text) from exc

    if not any(s.controls_transaction for s in statements):
        try:
            conn.execute("BEGIN")
            run_all()
            conn.record(migration, version)
            conn.execute("COMMIT")
            return
        except _StatementFailed as failed:
            conn.rollback_if_open()
            if not conn.cannot_run_in_transaction(failed.cause):
                raise MigrationError(str(failed)) from failed.cause
        except Exception:
            conn.rollback_if_open()
            raise
    try:
        run_all()
    except _StatementFailed as failed:
        conn.rollback_if_open()
        raise MigrationError(str(failed) + _left_invalid(conn, failed.statement)) from failed.cause
    if conn.in_transaction():
        conn.rollback_if_open()
        raise MigrationError(f"{migration.name}: leaves a transaction open (BEGIN without COMMIT)")
    # CREATE INDEX CONCURRENTLY IF NOT EXISTS succeeds on a resume while the
    # INVALID index of the failed attempt is still there: not applied, then.
    invalid = _left_invalid(conn, sql)
    if invalid:
        raise MigrationError(f"{migration.name}: ran, but{invalid.removeprefix(';')}")
    conn.record(migration, version)


class _StatementFailed(Exception):
    def __init__(self, message: str, cause: Exception, statement: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.statement = statement


def _left_invalid(conn: _Connection, statement: str) -> str:
    """A failed CREATE INDEX CONCURRENTLY leaves its index behind, INVALID, and the
    retry on resume then fails with "already exists": say so, and what to do."""
    words = set(re.findall(r"\w+", statement.lower()))
    try:
        invalid = conn.invalid_indexes()
    except Exception:  # e.g. the connection broke: the statement's own error matters more
        return ""
    left = [name for name in invalid if name.lower() in words]
    if not left:
        return ""
    names = ", ".join(left)
    return (
        f"; it left INVALID index {names} behind (a failed concurrent build): "
        f"DROP INDEX CONCURRENTLY {names}, fix the cause, then resume"
    )


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking database work off the event loop; its errors as MigrationError."""
    try:
        return await asyncio.to_thread(fn)
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"database error: {_one_line(exc)}") from exc


def _read_applied(topo: Topology) -> list[tuple[str, str, str]]:
    db = _database(topo)
    if db.sql_dialect() == "sqlite" and not sqlite_path(topo, db.url).exists():
        return []  # nothing applied yet; reading must not create the file
    conn = _open(topo)
    try:
        return conn.applied()
    finally:
        conn.close()


async def applied_migrations(topo: Topology) -> list[tuple[str, str, str]]:
    """(name, phase, version) of every migration recorded in the database."""
    return await _in_thread(functools.partial(_read_applied, topo))


# --- commands -------------------------------------------------------------------------


def _database_url(topo: Topology) -> str:
    """The URL for commands; a relative SQLite path is made absolute (they run elsewhere)."""
    db = _database(topo)
    if db.sql_dialect() == "sqlite":
        return f"sqlite:///{sqlite_path(topo, db.url)}"
    return db.url


async def _command(topo: Topology, template: str, version: str, phase: Phase) -> str:
    """Run a migrations command locally in the topology's folder; its output."""
    db = _database(topo)
    argv = render_argv(template, {"version": version})
    env = os.environ | {
        "CHANGEOVER_DATABASE_URL": _database_url(topo),
        "CHANGEOVER_VERSION": version,
        "CHANGEOVER_MIGRATION_PHASE": phase,
    }
    cwd = topo.source.parent if topo.source else Path.cwd()
    done = await run_local(argv, db.timeout, env=env, cwd=cwd, merge_stderr=False)
    if done.problem:
        raise MigrationError(f"`{template}`: {done.problem}")
    if done.status != 0:
        tail = done.err.decode("utf-8", "replace").strip().splitlines()[-_OUTPUT_TAIL:]
        raise MigrationError(f"`{template}` failed (exit {done.status}): " + " | ".join(tail))
    return done.out.decode("utf-8", "replace")


# --- the engine's steps ------------------------------------------------------------------


async def run_migrations(
    topo: Topology,
    phase: Phase,
    version: str,
    note: Callable[[str], Awaitable[None]],
    pins: Mapping[str, str] | None = None,
    allowed: Sequence[str] = (),
) -> str:
    """Apply the pending migrations of `phase`; the step's detail.

    `note` is told about each file as soon as it is applied (the journal).
    `pins` (name -> sha256, from `migration_pins` when the release was checked):
    pending files that are new or edited since then (a fix before `resume`, say)
    are checked again first; a finding whose rule the release did not allow
    refuses them all, and nothing is applied.
    """
    db = _database(topo)
    if db.apply_command is not None:
        output = await _command(topo, db.apply_command, version, phase)
        last = output.strip().splitlines()[-1:] or ["no output"]
        return f"`{db.apply_command}`: {last[0]}"
    try:
        files = [m for m in migration_files(topo) if m.phase == phase]
    except ConfigError as exc:  # e.g. the folder went away before a resume
        raise MigrationError(str(exc)) from None
    conn = await asyncio.to_thread(_open, topo)
    try:
        await _in_thread(conn.create_table)
        done = {name for name, _, _ in await _in_thread(conn.applied)}
        pending = [m for m in files if m.name not in done]
        changed = await asyncio.to_thread(_unchecked, pending, pins) if pins is not None else []
        if changed:
            await _recheck(topo, version, changed, allowed, note)
        applied = []
        for migration in pending:
            started = time.monotonic()
            await _in_thread(functools.partial(_apply, conn, migration, version))
            applied.append(migration.name)
            await note(
                f"applied {phase} migration {migration.name} in {time.monotonic() - started:.2f}s"
            )
    finally:
        await asyncio.to_thread(conn.close)
    skipped = len(files) - len(applied)
    if not applied:
        return f"no pending {phase} migrations" + (
            f" ({skipped} already applied)" if skipped else ""
        )
    return f"applied {', '.join(applied)}" + (f" ({skipped} already applied)" if skipped else "")


async def _recheck(
    topo: Topology,
    version: str,
    changed: list[str],
    allowed: Sequence[str],
    note: Callable[[str], Awaitable[None]],
) -> None:
    try:
        found = await review(topo, version)
    except ConfigError as exc:
        raise MigrationError(str(exc)) from None
    blocking = [f for f in found.blocking(allowed) if Path(f.path).name in changed]
    if blocking:
        raise MigrationError(
            f"{', '.join(changed)}: new or edited since this release's migration check, "
            "which now finds "
            + "; ".join(f"{Path(f.path).name}:{f.line} {f.rule}" for f in blocking)
            + ". Nothing applied: fix them and resume, or abort"
        )
    await note(f"checked again (new or edited since the release's check): {', '.join(changed)}")


async def _expand_applied_by(topo: Topology, version: str) -> str:
    """The expand migrations this release applied, for the live check's error."""
    db = _database(topo)
    if db.apply_command is not None:
        return f"the expand migrations applied by `{db.apply_command}`"
    names = [n for n, p, v in await applied_migrations(topo) if p == "expand" and v == version]
    if not names:
        return "no migration of this release (the damage predates it)"
    return "expand migration(s) " + ", ".join(sorted(names))


async def verify_live(
    topo: Topology, checker: Checker, version: str, old_version: str | None
) -> str:
    """After the expand phase: the release still serving passes its health checks
    on every member and its smoke checks through the public live pool.

    `old_version` fills `{version}` in the smoke checks; unknown (no earlier
    release in the journal), `{version}` matches any body.
    """
    members = [m for _, m in topo.members()]
    health = await asyncio.gather(*(checker.health(m) for m in members))
    smoke = await checker.smoke_via(public_entry(topo), None, old_version or "")
    bad = [r for r in (*health, *smoke) if not r.ok]
    if bad:
        shown = "; ".join(f"{r.target}: {r.detail}" for r in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        cause = await _expand_applied_by(topo, version)
        raise MigrationError(
            f"the release still serving ({old_version or 'previous version'}) fails its checks "
            f"after {cause}; stopped before any swap: {shown}{more}"
        )
    return f"{len(members)} member(s) healthy, {len(smoke)} smoke check(s) passed on the live pool"


class SiteDatabase:
    """The engine's `Migrator` port for the topology's `[database]`."""

    def __init__(self, topo: Topology, checker: Checker) -> None:
        self.topo = topo
        self.checker = checker

    async def migrate(
        self,
        phase: Phase,
        version: str,
        note: Callable[[str], Awaitable[None]],
        pins: Mapping[str, str] | None,
        allowed: Sequence[str],
    ) -> str:
        return await run_migrations(self.topo, phase, version, note, pins, allowed)

    async def verify_live(self, version: str, old_version: str | None) -> str:
        return await verify_live(self.topo, self.checker, version, old_version)

    async def review(self, version: str) -> Review:
        return await review(self.topo, version)

    def pins(self) -> dict[str, str] | None:
        return migration_pins(self.topo)


# --- the review (the gate of plan and release) ----------------------------------------------


async def review(topo: Topology, version: str) -> Review:
    """Analyse what this release would apply, before anything is applied."""
    from changeover.migrations.analysis import analyse, check_paths

    db = _database(topo)
    dialect = db.sql_dialect()
    if db.sql_command is not None:
        sql = await _command(topo, db.sql_command, version, db.phase)
        where = f"`{db.sql_command}`"
        findings = analyse(sql, dialect=dialect, phase=db.phase, path=where)
        return Review({db.phase: [where] if sql.strip() else []}, findings)
    files = migration_files(topo)
    done = {name for name, _, _ in await applied_migrations(topo)}
    pending = [m for m in files if m.name not in done]
    # Every file is read, in order, so that column types declared by applied
    # migrations are known; only findings in pending files count.
    try:
        findings = check_paths([m.path for m in files], dialect=dialect)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"database.migrations_dir: {exc}") from None
    paths = {str(m.path) for m in pending}
    return Review(
        {phase: [m.name for m in pending if m.phase == phase] for phase in db.phases()},
        [f for f in findings if f.path in paths],
    )
