"""The journal in PostgreSQL (`[site] state_url`), shared by every copy of a
site's config: two operators on two machines meet the same release lock, see
the same history, and can approve, abort or resume each other's releases.

The same records as the SQLite journal (journal.py), behind the same
`JournalStore` port, in tables named `changeover_*` keyed by site, so several
sites can share one database; release numbers count per site as in a SQLite
file. The release lock is a session-level advisory lock taken on the store's
own connection and held for the whole release: when the holder dies (SIGKILL,
a crash, a lost machine) its connection ends and the server frees the lock,
so nobody waits on a holder that is gone. A row beside it says who holds it
(who, host, pid, since). The connection is never opened again behind the
caller's back while it held the lock: the lock may be another's by then, so
every later call is a `JournalError` and the engine stops where it is (`resume`
continues). A connection lost while it held no lock (the desk, between
releases) fails the call in progress and is opened again for the next one.

Methods are synchronous, as `JournalStore` says: the engine and the service
call them through `asyncio.to_thread`. Every value is passed as a parameter.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from changeover.config import url_shown
from changeover.journal import (
    DONE,
    HISTORY_COLUMNS,
    RESUMABLE,
    ROLLED_BACK,
    RUNNING,
    SCHEMA_VERSION,
    STEP_DONE,
    STEP_FAILED,
    STEP_PENDING,
    STEP_RUNNING,
    SUPERSEDED,
    EventRow,
    HistoryExists,
    JournalError,
    LockHeld,
    LockInfo,
    OutputRow,
    ReleaseRow,
    StepRow,
    _me,
    _release_row,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changeover_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS changeover_releases (
    site text NOT NULL,
    id bigint NOT NULL,
    version text NOT NULL,
    previous_version text,
    strategy text NOT NULL,
    kind text NOT NULL DEFAULT 'release',
    state text NOT NULL,
    plan text NOT NULL,
    started double precision NOT NULL,
    finished double precision,
    "user" text NOT NULL,
    host text NOT NULL,
    error text,
    request text,
    PRIMARY KEY (site, id)
);
CREATE TABLE IF NOT EXISTS changeover_steps (
    site text NOT NULL,
    release_id bigint NOT NULL,
    idx integer NOT NULL,
    step_id text NOT NULL,
    state text NOT NULL,
    started double precision,
    finished double precision,
    detail text,
    PRIMARY KEY (site, release_id, idx),
    FOREIGN KEY (site, release_id) REFERENCES changeover_releases (site, id)
);
CREATE TABLE IF NOT EXISTS changeover_outputs (
    seq bigserial PRIMARY KEY,
    site text NOT NULL,
    release_id bigint NOT NULL,
    idx integer NOT NULL,
    member text NOT NULL,
    argv text NOT NULL,
    exit_status integer,
    seconds double precision NOT NULL,
    output text NOT NULL,
    at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS changeover_outputs_release
    ON changeover_outputs (site, release_id);
CREATE TABLE IF NOT EXISTS changeover_events (
    seq bigserial PRIMARY KEY,
    site text NOT NULL,
    release_id bigint NOT NULL,
    at double precision NOT NULL,
    kind text NOT NULL,
    message text NOT NULL
);
CREATE INDEX IF NOT EXISTS changeover_events_release ON changeover_events (site, release_id);
CREATE TABLE IF NOT EXISTS changeover_locks (
    site text PRIMARY KEY,
    release_id bigint,
    pid integer NOT NULL,
    host text NOT NULL,
    "user" text NOT NULL,
    acquired double precision NOT NULL,
    proc_start double precision
);
"""

# The advisory lock keys (two int4 each): the release lock of a site; a
# transaction-scoped gate that orders the lock's row with the lock itself; and
# one for creating the schema (two first users at once).
_LOCK = int.from_bytes(b"chgo")
_GATE = int.from_bytes(b"chgx")
_SCHEMA_KEY = int.from_bytes(b"chgs")
_COLUMNS = 'site, release_id, pid, host, "user", acquired, proc_start'
_ORDER = {"releases": "id", "steps": "release_id, idx", "outputs": "at, seq", "events": "seq"}


def site_key(site: str) -> int:
    """The site's half of its advisory lock keys (a 31-bit hash of its name)."""
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:4]) & 0x7FFFFFFF


def _text(value: object) -> object:
    """PostgreSQL's text holds no NUL character (a command's output may)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class PgJournal:
    """One site's journal in a PostgreSQL database. Thread-safe: one connection
    (which also holds the release lock) behind a lock."""

    def __init__(self, url: str, site: str) -> None:
        self.site = site
        self.where = f"site.state_url {url_shown(url)}"
        self._key = site_key(site)
        self._held = False  # this connection holds the site's release lock
        self._lost_lock = False  # the connection went while it held the lock
        self._lock = threading.Lock()
        self._url = url
        self._db = self._connect()
        try:
            self._check_schema()
        except psycopg.Error as exc:
            self._db.close()
            raise JournalError(f"{self.where}: cannot use the journal: {_why(exc)}") from None
        except JournalError:
            self._db.close()
            raise

    def _check_schema(self) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_SCHEMA_KEY,))
            found = self._db.execute("SELECT to_regclass('changeover_meta') AS t").fetchone()
            if found is None or found["t"] is None:
                self._db.execute(_SCHEMA.encode())
                self._db.execute(
                    "INSERT INTO changeover_meta VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = self._db.execute(
                "SELECT value FROM changeover_meta WHERE key = 'schema_version'"
            ).fetchone()
        version = int(row["value"]) if row else 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.where}: journal schema {version} is newer than this changeover "
                f"understands ({SCHEMA_VERSION}); upgrade changeover, "
                "the journal was left untouched"
            )
        if version < SCHEMA_VERSION:
            raise JournalError(f"{self.where}: journal schema {version} is unknown; left untouched")

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        try:
            return psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=10,
                application_name="changeover journal",
            )
        except psycopg.Error as exc:
            raise JournalError(
                f"{self.where}: cannot reach the state database: {_why(exc)}"
            ) from None

    def close(self) -> None:
        self._held = False  # the server lets go of it with the session
        self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """The connection, to this thread alone; the driver's errors become a
        JournalError that says which database and what happened."""
        with self._lock:
            if self._lost_lock:
                raise JournalError(
                    f"{self.where}: the connection to the state database was lost earlier "
                    "(the release lock it held went with it): `changeover resume` continues"
                )
            if self._db.closed:  # lost while it held no lock: nothing to lose by a new one
                self._db = self._connect()
            try:
                yield self._db
            except psycopg.Error as exc:
                if self._db.broken or self._db.closed:
                    self._lost_lock, self._held = self._held, False
                    self._db.close()
                    raise JournalError(
                        f"{self.where}: lost the connection to the state database "
                        f"({_why(exc)}); a release lock it held went with it"
                    ) from None
                raise JournalError(f"{self.where}: cannot use the journal: {_why(exc)}") from None

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        with self._locked() as db, db.transaction():
            yield db

    def _run(self, sql: str, *params: object) -> None:
        with self._tx() as db:
            db.execute(sql, tuple(_text(p) for p in params))

    def _one(self, sql: str, *params: object) -> dict[str, Any] | None:
        with self._locked() as db:
            return db.execute(sql, params).fetchone()

    def _all(self, sql: str, *params: object) -> list[dict[str, Any]]:
        with self._locked() as db:
            return db.execute(sql, params).fetchall()

    # --- the site lock ---------------------------------------------------------

    def _gate(self, db: psycopg.Connection[dict[str, Any]]) -> None:
        """Wait for any other session that is taking or letting go of the lock
        (until its transaction ends), so the row and the lock agree."""
        db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_GATE, self._key))

    def _holder_pid(self, db: psycopg.Connection[dict[str, Any]]) -> int | None:
        """The server process of the session holding the site's release lock."""
        row = db.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2",
            (_LOCK, self._key),
        ).fetchone()
        return int(row["pid"]) if row else None

    def _row(self, db: psycopg.Connection[dict[str, Any]], alive: bool) -> LockInfo | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM changeover_locks WHERE site = %s", (self.site,)
        ).fetchone()
        return LockInfo(**row, alive=alive) if row else None

    def lock_holder(self, site: str) -> LockInfo | None:
        with self._tx() as db:
            self._gate(db)
            alive = self._held or self._holder_pid(db) is not None
            return self._row(db, alive)

    def acquire(self, site: str, release_id: int | None) -> LockInfo | None:
        """Take the site's release lock; returns the lock row of a holder that is
        gone (its session ended), taken over, if any. Held by this store already
        counts as held unless for `release_id` itself (see `Journal.acquire`)."""
        pid, host, user, start = _me()
        taken = False
        try:
            with self._tx() as db:
                self._gate(db)
                stale: LockInfo | None = None
                if self._held:
                    mine = self._row(db, alive=True)
                    if mine is not None and (release_id is None or mine.release_id != release_id):
                        raise LockHeld(mine)
                else:
                    got = db.execute(
                        "SELECT pg_try_advisory_lock(%s, %s) AS got", (_LOCK, self._key)
                    ).fetchone()
                    if not (got and got["got"]):
                        raise LockHeld(self._row(db, alive=True) or _unnamed(site))
                    taken = True
                    stale = self._row(db, alive=False)
                db.execute(
                    f"INSERT INTO changeover_locks ({_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s)"
                    " ON CONFLICT (site) DO UPDATE SET release_id = EXCLUDED.release_id,"
                    ' pid = EXCLUDED.pid, host = EXCLUDED.host, "user" = EXCLUDED."user",'
                    " acquired = EXCLUDED.acquired, proc_start = EXCLUDED.proc_start",
                    (self.site, release_id, pid, host, user, time.time(), start),
                )
        except BaseException:
            # A session-level lock outlives the transaction that took it.
            if taken and not self._db.closed and not self._lost_lock:
                with self._locked() as db:
                    db.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK, self._key))
            raise
        self._held = True
        return stale

    def set_lock_release(self, site: str, release_id: int) -> None:
        self._run("UPDATE changeover_locks SET release_id = %s WHERE site = %s", release_id, site)

    def release_lock(self, site: str) -> None:
        if not self._held:
            return  # as in SQLite: only the holder lets go of its lock
        with self._tx() as db:
            self._gate(db)
            db.execute("DELETE FROM changeover_locks WHERE site = %s", (self.site,))
            db.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK, self._key))
        self._held = False

    def force_unlock(self, site: str) -> LockInfo | None:
        """Break the lock: its row goes, and the session holding it (a holder
        that hangs) is ended, so the lock is free and that holder's next journal
        call fails: it stops where it is."""
        with self._tx() as db:
            self._gate(db)
            holder_pid = self._holder_pid(db)
            holder = self._row(db, alive=self._held or holder_pid is not None)
            db.execute("DELETE FROM changeover_locks WHERE site = %s", (self.site,))
            if self._held:
                db.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK, self._key))
                self._held = False
            elif holder_pid is not None:
                try:
                    ended = db.execute(
                        "SELECT pg_terminate_backend(%s, 5000) AS ended", (holder_pid,)
                    ).fetchone()
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise JournalError(
                        f"{self.where}: cannot end the session that holds the lock (server "
                        f"process {holder_pid}): {_why(exc)}; stop its holder, or have the "
                        "database's administrator end that session"
                    ) from None
                if not (ended and ended["ended"]):
                    raise JournalError(
                        f"{self.where}: the session that holds the lock (server process "
                        f"{holder_pid}) did not end within 5 s; try again"
                    )
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
            self._gate(db)  # numbers per site, one at a time
            row = db.execute(
                "INSERT INTO changeover_releases (site, id, version, previous_version,"
                ' strategy, kind, state, plan, started, "user", host)'
                " SELECT %s, COALESCE(MAX(id), 0) + 1, %s, %s, %s, %s, %s, %s, %s, %s, %s"
                " FROM changeover_releases WHERE site = %s RETURNING id",
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
                    site,
                ),
            ).fetchone()
            assert row is not None
            release_id = int(row["id"])
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO changeover_steps (site, release_id, idx, step_id, state)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(site, release_id, i, s["id"], STEP_PENDING) for i, s in enumerate(plan)],
                )
        return release_id

    def set_state(self, release_id: int, state: str, error: str | None = None) -> None:
        finished = time.time() if state in (DONE, SUPERSEDED, ROLLED_BACK) else None
        self._run(
            "UPDATE changeover_releases SET state = %s, error = %s,"
            " finished = COALESCE(%s, finished) WHERE site = %s AND id = %s",
            state,
            error,
            finished,
            self.site,
            release_id,
        )

    def request(self, release_id: int, what: str | None) -> None:
        """Ask a running release (from another process) to 'abort' or 'approve:<step>'."""
        self._run(
            "UPDATE changeover_releases SET request = %s WHERE site = %s AND id = %s",
            what,
            self.site,
            release_id,
        )

    def withdraw(self, release_id: int, seen: str) -> bool:
        """Clear the release's request if it is still `seen`; False if another
        process asked something else meanwhile (then that stands)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE changeover_releases SET request = NULL"
                " WHERE site = %s AND id = %s AND request = %s",
                (self.site, release_id, _text(seen)),
            )
            return cur.rowcount == 1

    def step_started(self, release_id: int, idx: int) -> None:
        self._step("state = %s, started = %s, finished = NULL, detail = NULL", release_id, idx,
                   STEP_RUNNING, time.time())  # fmt: skip

    def step_finished(
        self,
        release_id: int,
        idx: int,
        ok: bool,
        detail: str,
        event: tuple[str, str] | None = None,
    ) -> ReleaseRow:
        """As the SQLite journal's: the step, `event` and the release read in one
        transaction."""
        now = time.time()
        state = STEP_DONE if ok else STEP_FAILED
        with self._tx() as db:
            db.execute(
                "UPDATE changeover_steps SET state = %s, finished = %s, detail = %s"
                " WHERE site = %s AND release_id = %s AND idx = %s",
                (state, now, _text(detail), self.site, release_id, idx),
            )
            if event is not None:
                db.execute(
                    "INSERT INTO changeover_events (site, release_id, at, kind, message)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (self.site, release_id, now, _text(event[0]), _text(event[1])),
                )
            row = db.execute(self._RELEASE + " AND id = %s", (self.site, release_id)).fetchone()
        if row is None:
            raise KeyError(release_id)
        return _release_row(row)

    def step_interrupted(self, release_id: int, idx: int, why: str) -> None:
        """Back to pending: the step did not finish and runs again on resume."""
        self._step("state = %s, finished = NULL, detail = %s", release_id, idx, STEP_PENDING, why)

    def _step(self, assignments: str, release_id: int, idx: int, *values: object) -> None:
        self._run(
            f"UPDATE changeover_steps SET {assignments}"
            " WHERE site = %s AND release_id = %s AND idx = %s",
            *values,
            self.site,
            release_id,
            idx,
        )

    def add_outputs(self, release_id: int, rows: Sequence[OutputRow]) -> None:
        """Members' outputs in one transaction."""
        now = time.time()
        with self._tx() as db, db.cursor() as cur:
            cur.executemany(
                "INSERT INTO changeover_outputs (site, release_id, idx, member, argv,"
                " exit_status, seconds, output, at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [
                    (self.site, release_id, r.idx, _text(r.member), json.dumps(r.argv),
                     r.exit_status, r.seconds, _text(r.output), now)
                    for r in rows
                ],
            )  # fmt: skip

    def add_event(self, release_id: int, kind: str, message: str) -> None:
        self._run(
            "INSERT INTO changeover_events (site, release_id, at, kind, message)"
            " VALUES (%s, %s, %s, %s, %s)",
            self.site,
            release_id,
            time.time(),
            kind,
            message,
        )

    # --- reading ---------------------------------------------------------------

    _RELEASE = (
        "SELECT id, site, version, previous_version, strategy, kind, state, plan, started,"
        ' finished, "user", host, error, request FROM changeover_releases WHERE site = %s'
    )

    def release(self, release_id: int) -> ReleaseRow:
        row = self._one(self._RELEASE + " AND id = %s", self.site, release_id)
        if row is None:
            raise KeyError(release_id)
        return _release_row(row)

    def releases(self, site: str, limit: int = 20) -> list[ReleaseRow]:
        rows = self._all(self._RELEASE + " ORDER BY id DESC LIMIT %s", site, limit)
        return [_release_row(r) for r in rows]

    def unfinished(self, site: str) -> ReleaseRow | None:
        """The newest release that neither finished nor was superseded."""
        row = self._one(
            self._RELEASE + " AND state = ANY(%s) ORDER BY id DESC LIMIT 1", site, list(RESUMABLE)
        )
        return _release_row(row) if row else None

    def newest(self, site: str) -> ReleaseRow | None:
        """The newest release of the site, whatever its state."""
        row = self._one(self._RELEASE + " ORDER BY id DESC LIMIT 1", site)
        return _release_row(row) if row else None

    def last_done(self, site: str) -> ReleaseRow | None:
        row = self._one(self._RELEASE + " AND state = %s ORDER BY id DESC LIMIT 1", site, DONE)
        return _release_row(row) if row else None

    def steps(self, release_id: int) -> list[StepRow]:
        rows = self._all(
            "SELECT idx, step_id, state, started, finished, detail FROM changeover_steps"
            " WHERE site = %s AND release_id = %s ORDER BY idx",
            self.site,
            release_id,
        )
        return [StepRow(**r) for r in rows]

    def outputs(self, release_id: int) -> list[OutputRow]:
        rows = self._all(
            "SELECT idx, member, argv, exit_status, seconds, output FROM changeover_outputs"
            " WHERE site = %s AND release_id = %s ORDER BY at, seq",
            self.site,
            release_id,
        )
        return [
            OutputRow(
                r["idx"], r["member"], json.loads(r["argv"]), r["exit_status"], r["seconds"],
                r["output"],
            )
            for r in rows
        ]  # fmt: skip

    def events(self, release_id: int) -> list[EventRow]:
        rows = self._all(
            "SELECT at, kind, message FROM changeover_events"
            " WHERE site = %s AND release_id = %s ORDER BY seq",
            self.site,
            release_id,
        )
        return [EventRow(**r) for r in rows]

    # --- moving history (journalio.py) ------------------------------------------

    def history_rows(self, site: str) -> dict[str, list[dict[str, Any]]]:
        """Every release of `site` with its steps, outputs and events, in order."""
        found: dict[str, list[dict[str, Any]]] = {}
        with self._tx() as db:  # one snapshot of all four
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for table, columns in HISTORY_COLUMNS.items():
                names = ", ".join(f'"{c}"' for c in columns)
                found[table] = db.execute(
                    f"SELECT {names} FROM changeover_{table} WHERE site = %s"
                    f" ORDER BY {_ORDER[table]}",
                    (site,),
                ).fetchall()
        return found

    def replace_history(
        self, site: str, history: Mapping[str, list[dict[str, Any]]], force: bool
    ) -> int:
        """As `Journal.replace_history`, in one transaction."""
        with self._tx() as db:
            self._gate(db)
            row = db.execute(
                "SELECT count(*) AS n FROM changeover_releases WHERE site = %s", (site,)
            ).fetchone()
            had = int(row["n"]) if row else 0
            if had and not force:
                raise HistoryExists(had)
            for table in reversed(HISTORY_COLUMNS):
                db.execute(f"DELETE FROM changeover_{table} WHERE site = %s", (site,))
            for table, columns in HISTORY_COLUMNS.items():
                names = ", ".join(f'"{c}"' for c in ("site", *columns))
                marks = ", ".join(["%s"] * (len(columns) + 1))
                with db.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO changeover_{table} ({names}) VALUES ({marks})",
                        [(site, *(_text(r[c]) for c in columns)) for r in history[table]],
                    )
        return had


def _unnamed(site: str) -> LockInfo:
    """A holder whose row cannot be read (it wrote none): another session."""
    return LockInfo(site, None, 0, "another session of the state database", "?", time.time(),
                    None, alive=True)  # fmt: skip


def _why(exc: psycopg.Error) -> str:
    """The server's or libpq's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
