"""The release journal: SQLite in WAL mode, one file per site.

Every step is written before and after it runs, with its outputs, so `resume`
knows where to pick up and `rollback` knows what was done. The journal also
holds the site's release lock. Methods are synchronous and short; the engine
calls them through `asyncio.to_thread` so the event loop never blocks on disk.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    version TEXT NOT NULL,
    previous_version TEXT,
    strategy TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'release',
    state TEXT NOT NULL,
    plan TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    user TEXT NOT NULL,
    host TEXT NOT NULL,
    error TEXT,
    request TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    release_id INTEGER NOT NULL REFERENCES releases(id),
    idx INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL,
    finished REAL,
    detail TEXT,
    PRIMARY KEY (release_id, idx)
);
CREATE TABLE IF NOT EXISTS outputs (
    release_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    member TEXT NOT NULL,
    argv TEXT NOT NULL,
    exit_status INTEGER,
    seconds REAL NOT NULL,
    output TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    site TEXT PRIMARY KEY,
    release_id INTEGER,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    user TEXT NOT NULL,
    acquired REAL NOT NULL,
    proc_start REAL
);
"""

# Release states. ACTIVE ones hold (or held, if the tool died) the site lock.
RUNNING = "running"
AWAITING_APPROVAL = "awaiting-approval"
INTERRUPTED = "interrupted"  # stopped at a safe point by Ctrl-C; resumable
FAILED = "failed"  # a step failed; the site is still served; resumable or roll back
ABORTED = "aborted"  # stopped at a safe point by `changeover abort`; resumable
SUPERSEDED = "superseded"  # a stopped release replaced by a rollback or a new release
ROLLED_BACK = "rolled-back"  # the bake failed and the engine flipped back on its own
DONE = "done"
RESUMABLE = (RUNNING, AWAITING_APPROVAL, INTERRUPTED, FAILED, ABORTED)

# Event kind: JSON {"files": {name: sha256}, "allow": [rule]}: the migration files
# the release's check read, and the rules it was allowed to break.
MIGRATION_PINS = "migration-pins"
# Event kind: a member's name. It failed a step within `executor.max_failed` and
# stays out of the live pool for the rest of that release.
KEPT_OUT = "kept-out"

STEP_PENDING = "pending"
STEP_RUNNING = "running"
STEP_DONE = "done"
STEP_FAILED = "failed"


class JournalError(Exception):
    """The journal cannot be used (corrupt, newer schema, unwritable)."""


class LockHeld(Exception):
    """Another release holds the site's lock."""

    def __init__(self, holder: LockInfo) -> None:
        super().__init__(holder.describe())
        self.holder = holder


@dataclass(frozen=True, slots=True)
class LockInfo:
    site: str
    release_id: int | None
    pid: int
    host: str
    user: str
    acquired: float
    proc_start: float | None
    # Whether a live session holds it, where the store can tell (PostgreSQL's
    # advisory lock); None: judged by the process on this host (`is_stale`).
    alive: bool | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        rel = f"release #{self.release_id}" if self.release_id else "a command"
        return f"{rel} by {self.user}@{self.host} (pid {self.pid}) since {when}"

    def is_stale(self) -> bool:
        """True when the holder was a process on this host that no longer runs
        (or, in a shared journal, when no session holds the lock any more)."""
        if self.alive is not None:
            return not self.alive
        if self.host != socket.gethostname():
            return False  # cannot tell from here; `unlock --force` exists for that
        import psutil  # only where a lock is looked at

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return True
        # A reused pid is another process: compare start times.
        return self.proc_start is not None and abs(proc.create_time() - self.proc_start) > 1.0


@dataclass(frozen=True, slots=True)
class ReleaseRow:
    id: int
    site: str
    version: str
    previous_version: str | None
    strategy: str
    kind: str
    state: str
    plan: list[dict[str, Any]]
    started: float
    finished: float | None
    user: str
    host: str
    error: str | None
    request: str | None


@dataclass(frozen=True, slots=True)
class StepRow:
    idx: int
    step_id: str
    state: str
    started: float | None
    finished: float | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class OutputRow:
    idx: int
    member: str
    argv: list[str]
    exit_status: int | None
    seconds: float
    output: str


@dataclass(frozen=True, slots=True)
class EventRow:
    at: float
    kind: str
    message: str


def _me() -> tuple[int, str, str, float]:
    import psutil  # only where a lock is taken

    pid = os.getpid()
    return pid, socket.gethostname(), getpass.getuser(), psutil.Process(pid).create_time()


class Journal:
    """One site's journal file. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_S * 1000:d}")
            # Check first: switching to WAL rewrites the header of a foreign file.
            self._check_schema()
            mode = self._switch_to_wal()
            # FULL: every commit (each step boundary) is on disk before we go on.
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            if (exc.sqlite_errorname or "").startswith(_CANNOT_WRITE):
                raise JournalError(f"{path}: cannot use the journal: {why(exc)}") from None
            raise JournalError(
                f"{path}: not a usable changeover journal ({exc}); it was left untouched"
            ) from None
        except OSError as exc:
            raise JournalError(f"{path}: cannot open the journal: {exc}") from None
        if mode.lower() != "wal":
            raise JournalError(f"{path}: SQLite refused WAL mode ({mode})")
        self._lock = threading.Lock()

    def _switch_to_wal(self) -> str:
        # SQLite answers a journal-mode switch that finds another connection
        # reading with SQLITE_BUSY at once, without its busy handler: two
        # processes opening a new journal together collide here (seen in CI).
        # Once a file is in WAL mode the switch is a no-op that takes no lock.
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                return str(self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _check_schema(self) -> None:
        tables = {
            r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "meta" in tables:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            found = int(row[0]) if row else 0
            if found > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path}: journal schema {found} is newer than this changeover "
                    f"understands ({SCHEMA_VERSION}); upgrade changeover, "
                    "the journal was left untouched"
                )
            if found < SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path}: journal schema {found} is unknown; left untouched"
                )
            verdict = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise JournalError(
                    f"{self.path}: the journal is damaged ({verdict}); it was left untouched"
                )
            return
        if tables:
            raise JournalError(
                f"{self.path}: not a changeover journal (tables: {sorted(tables)}); left untouched"
            )
        # One transaction, taken before anything is written: two processes that
        # open a new journal at once (a release and `status --watch`) create it
        # once, and neither sees a half-made one.
        self._db.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA}; INSERT OR IGNORE INTO meta "
            f"VALUES ('schema_version', '{SCHEMA_VERSION:d}'); COMMIT;"
        )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, to this thread alone; SQLite's errors (a full disk, a
        read-only state directory) become a JournalError that says which."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: cannot use the journal: {why(exc)}") from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- the site lock ---------------------------------------------------------

    def lock_holder(self, site: str) -> LockInfo | None:
        with self._locked():
            row = self._db.execute("SELECT * FROM locks WHERE site=?", (site,)).fetchone()
        return LockInfo(**dict(row)) if row else None

    def acquire(
        self, site: str, release_id: int | None, take_stale: bool = True
    ) -> LockInfo | None:
        """Take the site lock; returns the stale lock that was taken over, if any.
        This process holding it already counts as held, unless for `release_id`
        itself: a second release begun in one process (the desk runs releases)
        must be refused, not let go of the first one's lock when it gives up."""
        pid, host, user, start = _me()
        with self._tx() as db:
            row = db.execute("SELECT * FROM locks WHERE site=?", (site,)).fetchone()
            stale: LockInfo | None = None
            if row:
                holder = LockInfo(**dict(row))
                if holder.pid == pid and holder.host == host:
                    if release_id is None or holder.release_id != release_id:
                        raise LockHeld(holder)
                elif take_stale and holder.is_stale():
                    stale = holder
                else:
                    raise LockHeld(holder)
            db.execute(
                "INSERT OR REPLACE INTO locks VALUES (?,?,?,?,?,?,?)",
                (site, release_id, pid, host, user, time.time(), start),
            )
        return stale

    def set_lock_release(self, site: str, release_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE locks SET release_id=? WHERE site=?", (release_id, site))

    def release_lock(self, site: str) -> None:
        pid, host, _, _ = _me()
        with self._tx() as db:
            db.execute("DELETE FROM locks WHERE site=? AND pid=? AND host=?", (site, pid, host))

    def force_unlock(self, site: str) -> LockInfo | None:
        holder = self.lock_holder(site)
        with self._tx() as db:
            db.execute("DELETE FROM locks WHERE site=?", (site,))
        return holder

    # --- releases and steps ----------------------------------------------------

    def create_release(
        self,
        site: str,
        version: str,
        previous_version: str | None,
        strategy: str,
        plan: list[dict[str, Any]],
        kind: str = "release",
    ) -> int:
        _, host, user, _ = _me()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO releases (site, version, previous_version, strategy, kind, state,"
                " plan,"
                " started, user, host) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    site,
                    version,
                    previous_version,
                    strategy,
                    kind,
                    RUNNING,
                    json.dumps(plan),
                    time.time(),
                    user,
                    host,
                ),
            )
            release_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO steps (release_id, idx, step_id, state) VALUES (?,?,?,?)",
                [(release_id, i, s["id"], STEP_PENDING) for i, s in enumerate(plan)],
            )
        return release_id

    def set_state(self, release_id: int, state: str, error: str | None = None) -> None:
        finished = time.time() if state in (DONE, SUPERSEDED, ROLLED_BACK) else None
        with self._tx() as db:
            db.execute(
                "UPDATE releases SET state=?, error=?, finished=COALESCE(?, finished) WHERE id=?",
                (state, error, finished, release_id),
            )

    def request(self, release_id: int, what: str | None) -> None:
        """Ask a running release (from another process) to 'abort' or 'approve:<step>'."""
        with self._tx() as db:
            db.execute("UPDATE releases SET request=? WHERE id=?", (what, release_id))

    def withdraw(self, release_id: int, seen: str) -> bool:
        """Clear the release's request if it is still `seen`; False if another
        process asked something else meanwhile (then that stands)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE releases SET request=NULL WHERE id=? AND request=?", (release_id, seen)
            )
            return cur.rowcount == 1

    def step_started(self, release_id: int, idx: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET state=?, started=?, finished=NULL, detail=NULL"
                " WHERE release_id=? AND idx=?",
                (STEP_RUNNING, time.time(), release_id, idx),
            )

    def step_finished(
        self,
        release_id: int,
        idx: int,
        ok: bool,
        detail: str,
        event: tuple[str, str] | None = None,
    ) -> ReleaseRow:
        """The step done (or failed), with `event` (kind, message) in the same
        transaction; the release as it stands then, with what another shell
        asked of it (the engine's check between steps)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET state=?, finished=?, detail=? WHERE release_id=? AND idx=?",
                (STEP_DONE if ok else STEP_FAILED, now, detail, release_id, idx),
            )
            if event is not None:
                db.execute(
                    "INSERT INTO events (release_id, at, kind, message) VALUES (?,?,?,?)",
                    (release_id, now, *event),
                )
            row = db.execute("SELECT * FROM releases WHERE id=?", (release_id,)).fetchone()
        if row is None:
            raise KeyError(release_id)
        return _release_row(row)

    def step_interrupted(self, release_id: int, idx: int, why: str) -> None:
        """Back to pending: the step did not finish and runs again on resume."""
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET state=?, finished=NULL, detail=? WHERE release_id=? AND idx=?",
                (STEP_PENDING, why, release_id, idx),
            )

    def add_outputs(self, release_id: int, rows: Sequence[OutputRow]) -> None:
        """Members' outputs in one transaction (one fsync however many)."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO outputs VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        release_id,
                        r.idx,
                        r.member,
                        json.dumps(r.argv),
                        r.exit_status,
                        r.seconds,
                        r.output,
                        now,
                    )
                    for r in rows
                ],
            )

    def add_event(self, release_id: int, kind: str, message: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (release_id, at, kind, message) VALUES (?,?,?,?)",
                (release_id, time.time(), kind, message),
            )

    # --- reading ---------------------------------------------------------------

    def release(self, release_id: int) -> ReleaseRow:
        with self._locked():
            row = self._db.execute("SELECT * FROM releases WHERE id=?", (release_id,)).fetchone()
        if row is None:
            raise KeyError(release_id)
        return _release_row(row)

    def releases(self, site: str, limit: int = 20) -> list[ReleaseRow]:
        with self._locked():
            rows = self._db.execute(
                "SELECT * FROM releases WHERE site=? ORDER BY id DESC LIMIT ?", (site, limit)
            ).fetchall()
        return [_release_row(r) for r in rows]

    def unfinished(self, site: str) -> ReleaseRow | None:
        """The newest release that neither finished nor was superseded."""
        marks = ",".join("?" * len(RESUMABLE))
        with self._locked():
            row = self._db.execute(
                f"SELECT * FROM releases WHERE site=? AND state IN ({marks})"
                " ORDER BY id DESC LIMIT 1",
                (site, *RESUMABLE),
            ).fetchone()
        return _release_row(row) if row else None

    def newest(self, site: str) -> ReleaseRow | None:
        """The newest release of the site, whatever its state."""
        with self._locked():
            row = self._db.execute(
                "SELECT * FROM releases WHERE site=? ORDER BY id DESC LIMIT 1", (site,)
            ).fetchone()
        return _release_row(row) if row else None

    def last_done(self, site: str) -> ReleaseRow | None:
        with self._locked():
            row = self._db.execute(
                "SELECT * FROM releases WHERE site=? AND state=? ORDER BY id DESC LIMIT 1",
                (site, DONE),
            ).fetchone()
        return _release_row(row) if row else None

    def steps(self, release_id: int) -> list[StepRow]:
        with self._locked():
            rows = self._db.execute(
                "SELECT idx, step_id, state, started, finished, detail FROM steps"
                " WHERE release_id=? ORDER BY idx",
                (release_id,),
            ).fetchall()
        return [StepRow(**dict(r)) for r in rows]

    def outputs(self, release_id: int) -> list[OutputRow]:
        with self._locked():
            rows = self._db.execute(
                "SELECT idx, member, argv, exit_status, seconds, output FROM outputs"
                " WHERE release_id=? ORDER BY at",
                (release_id,),
            ).fetchall()
        return [
            OutputRow(
                r["idx"],
                r["member"],
                json.loads(r["argv"]),
                r["exit_status"],
                r["seconds"],
                r["output"],
            )
            for r in rows
        ]

    def events(self, release_id: int) -> list[EventRow]:
        with self._locked():
            rows = self._db.execute(
                "SELECT at, kind, message FROM events WHERE release_id=? ORDER BY id", (release_id,)
            ).fetchall()
        return [EventRow(**dict(r)) for r in rows]

    # --- moving history (journalio.py) ------------------------------------------

    def history_rows(self, site: str) -> dict[str, list[dict[str, Any]]]:
        """Every release of `site` with its steps, outputs and events, in order."""
        ordering = {"releases": "id", "steps": "release_id, idx", "outputs": "at, rowid"}
        found: dict[str, list[dict[str, Any]]] = {}
        with self._locked() as db:
            for table, columns in HISTORY_COLUMNS.items():
                names = ", ".join(f'"{c}"' for c in columns)
                where = "site=?" if table == "releases" else (
                    "release_id IN (SELECT id FROM releases WHERE site=?)"
                )  # fmt: skip
                rows = db.execute(
                    f"SELECT {names} FROM {table} WHERE {where}"
                    f" ORDER BY {ordering.get(table, 'id')}",
                    (site,),
                ).fetchall()
                found[table] = [dict(r) for r in rows]
        return found

    def replace_history(
        self, site: str, history: Mapping[str, list[dict[str, Any]]], force: bool
    ) -> int:
        """Write `history` (as `history_rows` gives it) as the site's; refused
        (HistoryExists) over releases already there unless `force`, which
        replaces them. The number of releases the site had."""
        with self._tx() as db:
            ids = "SELECT id FROM releases WHERE site=?"
            had = int(db.execute(f"SELECT count(*) FROM ({ids})", (site,)).fetchone()[0])
            if had and not force:
                raise HistoryExists(had)
            for table in reversed(HISTORY_COLUMNS):
                key = "id" if table == "releases" else "release_id"
                db.execute(f"DELETE FROM {table} WHERE {key} IN ({ids})", (site,))
            for table, columns in HISTORY_COLUMNS.items():
                extra = ("site",) if table == "releases" else ()
                names = ", ".join(f'"{c}"' for c in (*columns, *extra))
                marks = ",".join("?" * (len(columns) + len(extra)))
                db.executemany(
                    f"INSERT INTO {table} ({names}) VALUES ({marks})",
                    [(*(r[c] for c in columns), *(site for _ in extra)) for r in history[table]],
                )
        return had


class HistoryExists(Exception):
    """The journal already holds releases of the site."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the journal already holds {count} release(s) of the site")
        self.count = count


# The columns of a site's history as `changeover journal export` writes them.
HISTORY_COLUMNS: dict[str, tuple[str, ...]] = {
    "releases": (
        "id", "version", "previous_version", "strategy", "kind", "state", "plan",
        "started", "finished", "user", "host", "error", "request",
    ),
    "steps": ("release_id", "idx", "step_id", "state", "started", "finished", "detail"),
    "outputs": (
        "release_id", "idx", "member", "argv", "exit_status", "seconds", "output", "at",
    ),
    "events": ("release_id", "at", "kind", "message"),
}  # fmt: skip


# What stops writes to a sound journal, as opposed to a damaged or foreign file.
_BUSY_TIMEOUT_S = 5
_CANNOT_WRITE = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR")


def why(exc: sqlite3.Error) -> str:
    """What an operator can do something about, from SQLite's error."""
    name = exc.sqlite_errorname or ""
    if name.startswith("SQLITE_FULL"):
        return f"the disk is full ({exc})"
    if name.startswith("SQLITE_READONLY"):
        return f"the state directory or the journal is read-only ({exc})"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"cannot open it: is the state directory writable? ({exc})"
    if name.startswith("SQLITE_IOERR"):
        return f"a disk I/O error ({exc})"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return f"another process keeps it locked ({exc})"
    return str(exc)


def _release_row(row: sqlite3.Row | Mapping[str, Any]) -> ReleaseRow:
    data = dict(row)
    data["plan"] = json.loads(data["plan"])
    return ReleaseRow(**data)


def journal_path(state_dir: Path, site: str) -> Path:
    return state_dir / f"{site}.journal.sqlite"
