"""Applying migrations to a real SQLite file and a real (throwaway) PostgreSQL."""

from __future__ import annotations

import asyncio
import shlex
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from changeover.config import Topology, parse
from changeover.database import (
    applied_migrations,
    migration_pins,
    review,
    run_migrations,
    sqlite_path,
)
from changeover.demo.app import build_app
from changeover.ports import MigrationError
from tests.helpers import wait_until
from tests.postgres import Postgres, running_postgres

CLUSTERS = [
    {"name": "a", "members": [{"name": "a1", "port": 18001}]},
    {"name": "b", "members": [{"name": "b1", "port": 18002}]},
]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.real)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}"
        return
    server: Postgres = request.getfixturevalue("postgres")
    with server.database() as database_url:
        yield database_url


def topology(root: Path, url: str, files: dict[str, str], **database: Any) -> Topology:
    folder = root / "migrations"
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    settings = (
        {"url": url, **database} if database else {"url": url, "migrations_dir": "migrations"}
    )
    return parse({"clusters": CLUSTERS, "database": settings}, root / "changeover.toml")


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(url) as conn:
        cursor = conn.execute(sql.encode())
        return cursor.fetchall() if cursor.description else []


def columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite"):
        return [row[1] for row in query(url, f"PRAGMA table_info({table})")]
    return [
        row[0]
        for row in query(
            url,
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_name = '{table}' ORDER BY ordinal_position",
        )
    ]


class Notes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, message: str) -> None:
        self.seen.append(message)


BASE = {
    "0001_expand_users.sql": "CREATE TABLE users (id integer PRIMARY KEY, name text);\n"
    "INSERT INTO users (id, name) VALUES (1, 'ada');\n",
    "0002_expand_add_email.sql": "ALTER TABLE users ADD COLUMN email text;\n",
    "0003_contract_drop_name.sql": "ALTER TABLE users DROP COLUMN name;\n",
}


async def test_expand_applies_the_expand_files_in_order_and_records_them(
    tmp_path: Path, url: str
) -> None:
    topo = topology(tmp_path, url, BASE)
    notes = Notes()
    detail = await run_migrations(topo, "expand", "2.0", notes)
    assert detail == "applied 0001_expand_users.sql, 0002_expand_add_email.sql"
    assert columns(url, "users") == ["id", "name", "email"]  # contract not applied
    assert sorted(await applied_migrations(topo)) == [
        ("0001_expand_users.sql", "expand", "2.0"),
        ("0002_expand_add_email.sql", "expand", "2.0"),
    ]
    assert [n.split(" in ")[0] for n in notes.seen] == [
        "applied expand migration 0001_expand_users.sql",
        "applied expand migration 0002_expand_add_email.sql",
    ]


async def test_running_a_phase_again_applies_nothing(tmp_path: Path, url: str) -> None:
    topo = topology(tmp_path, url, BASE)
    await run_migrations(topo, "expand", "2.0", Notes())
    again = await run_migrations(topo, "expand", "2.0", Notes())
    assert again == "no pending expand migrations (2 already applied)"
    assert query(url, "SELECT count(*) FROM users") == [(1,)]  # the INSERT ran once


async def test_files_new_or_edited_since_the_check_are_checked_again(
    tmp_path: Path, url: str
) -> None:
    """What a resume meets when someone changed the folder after `release` checked it."""
    topo = topology(tmp_path, url, BASE)
    pins = migration_pins(topo)
    assert pins is not None and sorted(pins) == sorted(BASE)
    folder = tmp_path / "migrations"
    (folder / "0002_expand_add_email.sql").write_text("ALTER TABLE users DROP COLUMN name;\n")
    (folder / "0002b_expand_more.sql").write_text("ALTER TABLE users ADD COLUMN age int;\n")
    with pytest.raises(MigrationError) as refused:
        await run_migrations(topo, "expand", "2.0", Notes(), pins)
    assert str(refused.value).startswith(
        "0002_expand_add_email.sql, 0002b_expand_more.sql: new or edited"
    )
    assert "0002_expand_add_email.sql:1 ban-drop-column" in str(refused.value)
    assert await applied_migrations(topo) == []  # not even the unchanged 0001
    # The release allowed those rules: the edit passes (and so does the new file).
    # The timeouts: PostgreSQL's.
    allowed = ["ban-drop-column", "require-lock-timeout", "require-statement-timeout"]
    notes = Notes()
    detail = await run_migrations(topo, "expand", "2.0", notes, pins, allowed)
    assert detail == (
        "applied 0001_expand_users.sql, 0002_expand_add_email.sql, 0002b_expand_more.sql"
    )
    assert notes.seen[0] == (
        "checked again (new or edited since the release's check): "
        "0002_expand_add_email.sql, 0002b_expand_more.sql"
    )


async def test_contract_runs_only_the_contract_files(tmp_path: Path, url: str) -> None:
    topo = topology(tmp_path, url, BASE)
    await run_migrations(topo, "expand", "2.0", Notes())
    detail = await run_migrations(topo, "contract", "2.0", Notes())
    assert detail == "applied 0003_contract_drop_name.sql"
    assert columns(url, "users") == ["id", "email"]


async def test_a_failing_file_is_rolled_back_whole_and_not_recorded(
    tmp_path: Path, url: str
) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"],
        "0002_expand_broken.sql": "ALTER TABLE users ADD COLUMN email text;\n\n"
        "INSERT INTO no_such_table VALUES (1);\n",
        "0003_expand_after.sql": "ALTER TABLE users ADD COLUMN phone text;\n",
    }
    topo = topology(tmp_path, url, files)
    with pytest.raises(MigrationError, match=r"^0002_expand_broken\.sql:3: .*no_such_table"):
        await run_migrations(topo, "expand", "2.0", Notes())
    assert columns(url, "users") == ["id", "name"]  # its first statement was undone too
    assert [name for name, _, _ in await applied_migrations(topo)] == ["0001_expand_users.sql"]
    # Fixed, the release resumes with the failed file; the one before is not re-run.
    (tmp_path / "migrations" / "0002_expand_broken.sql").write_text(
        "ALTER TABLE users ADD COLUMN email text;\n"
    )
    detail = await run_migrations(topo, "expand", "2.0", Notes())
    assert detail == "applied 0002_expand_broken.sql, 0003_expand_after.sql (1 already applied)"
    assert columns(url, "users") == ["id", "name", "email", "phone"]


async def test_a_file_with_its_own_transaction_runs_as_written(tmp_path: Path, url: str) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"],
        "0002_expand_tx.sql": "BEGIN;\nALTER TABLE users ADD COLUMN email text;\n"
        "UPDATE users SET email = 'a;b' WHERE id = 1; -- a ';' in a string\nCOMMIT;\n",
    }
    topo = topology(tmp_path, url, files)
    await run_migrations(topo, "expand", "2.0", Notes())
    assert query(url, "SELECT email FROM users") == [("a;b",)]
    assert len(await applied_migrations(topo)) == 2


async def test_a_file_that_leaves_a_transaction_open_is_refused(tmp_path: Path, url: str) -> None:
    files = {"0001_expand_open.sql": "BEGIN;\nCREATE TABLE t (a integer);\n"}
    topo = topology(tmp_path, url, files)
    with pytest.raises(MigrationError, match="leaves a transaction open"):
        await run_migrations(topo, "expand", "2.0", Notes())
    assert await applied_migrations(topo) == []


@pytest.mark.real
async def test_postgres_concurrently_runs_outside_a_transaction(
    tmp_path: Path, postgres: Postgres
) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"],
        "0002_expand_index.sql": "SET lock_timeout = '2s';\n"
        "CREATE INDEX CONCURRENTLY users_name ON users (name);\n",
    }
    with postgres.database() as url:
        topo = topology(tmp_path, url, files)
        await run_migrations(topo, "expand", "2.0", Notes())
        assert query(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'users'") == [
            ("users_pkey",),
            ("users_name",),
        ]
        assert len(await applied_migrations(topo)) == 2


@pytest.mark.real
async def test_postgres_percent_and_dollar_quotes_are_sent_as_written(
    tmp_path: Path, postgres: Postgres
) -> None:
    files = {
        "0001_expand_t.sql": "CREATE TABLE t (v text);\nINSERT INTO t VALUES ('100%s %');\n"
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT 'x;y' $$;\n"
    }
    with postgres.database() as url:
        await run_migrations(topology(tmp_path, url, files), "expand", "2.0", Notes())
        assert query(url, "SELECT v, f() FROM t") == [("100%s %", "x;y")]


def test_sqlite_paths_are_relative_to_the_topology_file(tmp_path: Path) -> None:
    topo = topology(tmp_path, "sqlite:///data/app.db", {})
    assert sqlite_path(topo, "sqlite:///data/app.db") == tmp_path / "data" / "app.db"
    assert sqlite_path(topo, "sqlite:////var/app.db") == Path("/var/app.db")
    assert sqlite_path(topo, "app.db") == tmp_path / "app.db"


async def test_review_counts_only_pending_migrations(tmp_path: Path) -> None:
    # SQLite: no locking rules, so the files above are clean (PostgreSQL would
    # want a lock_timeout in each).
    topo = topology(tmp_path, "sqlite:///app.db", BASE)
    before = await review(topo, "2.0")
    assert before.pending == {
        "expand": ["0001_expand_users.sql", "0002_expand_add_email.sql"],
        "contract": ["0003_contract_drop_name.sql"],
    }
    assert before.findings == []  # dropping is fine in contract; SQLite has no locking rules
    # A drop in a new expand file is a finding; once applied, it no longer is.
    (tmp_path / "migrations" / "0004_expand_drop_email.sql").write_text(
        "ALTER TABLE users DROP COLUMN email;\n"
    )
    after = await review(topo, "2.0")
    assert [(f.rule, Path(f.path).name, f.line) for f in after.findings] == [
        ("ban-drop-column", "0004_expand_drop_email.sql", 1)
    ]
    assert after.blocking(["ban-drop-column"]) == []
    await run_migrations(topo, "expand", "2.0", Notes())
    assert (await review(topo, "2.0")).findings == []


@pytest.mark.real
async def test_review_on_postgres_reads_what_was_applied_and_keeps_contract_to_locking(
    tmp_path: Path, postgres: Postgres
) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"],
        "0002_contract_drop_name.sql": "SET lock_timeout = '2s'; SET statement_timeout = '5s';\n"
        "ALTER TABLE users DROP COLUMN name;\n",
    }
    with postgres.database() as url:
        topo = topology(tmp_path, url, files)
        assert (await review(topo, "2.0")).findings == []  # dropping is what contract is for
        await run_migrations(topo, "expand", "2.0", Notes())
        (tmp_path / "migrations" / "0003_contract_index.sql").write_text(
            "SET lock_timeout = '2s'; SET statement_timeout = '5s';\n"
            "CREATE INDEX users_id ON users (id);\n"
        )
        found = await review(topo, "2.0")
        assert found.pending == {
            "expand": [],
            "contract": ["0002_contract_drop_name.sql", "0003_contract_index.sql"],
        }
        assert [(f.rule, Path(f.path).name) for f in found.findings] == [
            ("require-concurrent-index-creation", "0003_contract_index.sql")
        ]


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


async def test_commands_get_the_url_and_their_sql_is_reviewed(tmp_path: Path) -> None:
    url = "sqlite:///app.db"
    apply = python_command(
        "import os, sqlite3, sys; url = os.environ['CHANGEOVER_DATABASE_URL'];"
        "sqlite3.connect(url.removeprefix('sqlite:///')).execute('CREATE TABLE t (a)');"
        "print('upgraded to', sys.argv[1], os.environ['CHANGEOVER_MIGRATION_PHASE'])"
    )
    topo = topology(
        tmp_path,
        url,
        {},
        apply_command=apply + " {version}",
        sql_command=python_command("print('ALTER TABLE users DROP COLUMN email;')"),
    )
    found = await review(topo, "2.0")
    assert found.pending == {"expand": [f"`{topo.database and topo.database.sql_command}`"]}
    assert [f.rule for f in found.findings] == ["ban-drop-column"]
    detail = await run_migrations(topo, "expand", "2.0", Notes())
    assert detail.endswith(": upgraded to 2.0 expand")
    assert query(f"sqlite:///{tmp_path / 'app.db'}", "SELECT count(*) FROM t") == [(0,)]


async def test_a_failing_command_is_reported_with_its_output(tmp_path: Path) -> None:
    failing = python_command("import sys; sys.exit('alembic: cannot locate revision 42')")
    topo = topology(tmp_path, "sqlite:///app.db", {}, apply_command=failing, sql_command=failing)
    with pytest.raises(MigrationError, match=r"failed \(exit 1\): alembic: cannot locate"):
        await run_migrations(topo, "expand", "2.0", Notes())


async def test_an_unreachable_database_is_a_migration_error(tmp_path: Path) -> None:
    topo = topology(tmp_path, "postgresql://nobody@127.0.0.1:1/none", BASE)
    with pytest.raises(MigrationError, match="cannot open the database"):
        await run_migrations(topo, "expand", "2.0", Notes())


async def test_the_sample_app_serves_users_until_a_column_it_reads_is_dropped(
    tmp_path: Path, url: str
) -> None:
    topo = topology(tmp_path, url, BASE)
    await run_migrations(topo, "expand", "1.0", Notes())
    app = build_app("a1", "a1", "1.0", db=url.removeprefix("sqlite:///"))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/db")
        assert resp.status == 200
        assert (await resp.json())["users"] == [{"id": 1, "name": "ada", "email": None}]
        query(url, "ALTER TABLE users DROP COLUMN email")
        resp = await client.get("/db")
        assert resp.status == 500
        assert "email" in (await resp.json())["error"]


# --- transactions: what the old release waits for while a file is applied ----------

ROWS = 10
SLOW_TABLE = (
    "CREATE TABLE items (id integer PRIMARY KEY, v text);\n"
    f"INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, {ROWS}) i;\n"
    # 0.1 s per row, so a scan or a backfill of the table takes about 1 s.
    "CREATE FUNCTION slow_ok(v text) RETURNS boolean LANGUAGE sql\n"
    "    AS $$ SELECT true FROM pg_sleep(0.1) $$;\n"
    "CREATE FUNCTION slow_copy(v text) RETURNS text LANGUAGE sql\n"
    "    AS $$ SELECT v FROM pg_sleep(0.1) $$;\n"
)
LOCK_TIMEOUT = "SET lock_timeout = '5s'; SET statement_timeout = '30s';\n"
# (the statement that locks, the slow statements after it, what the slow one runs)
TRANSACTION_CASES = {
    "not-valid-then-validate": (
        "ALTER TABLE items ADD CONSTRAINT ok CHECK (slow_ok(v)) NOT VALID;\n",
        "ALTER TABLE items VALIDATE CONSTRAINT ok;\n",
        "VALIDATE",
    ),
    "set-not-null-sequence": (
        "ALTER TABLE items ADD CONSTRAINT nn CHECK (v IS NOT NULL AND slow_ok(v)) NOT VALID;\n",
        "ALTER TABLE items VALIDATE CONSTRAINT nn;\n"
        "ALTER TABLE items ALTER COLUMN v SET NOT NULL;\n"
        "ALTER TABLE items DROP CONSTRAINT nn;\n",
        "VALIDATE",
    ),
    "add-column-then-backfill": (
        "ALTER TABLE items ADD COLUMN w text;\n",
        "UPDATE items SET w = slow_copy(v);\n",
        "UPDATE",
    ),
}


async def _slow_statement_running(url: str, marker: str) -> bool:
    rows = await asyncio.to_thread(
        query,
        url,
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'changeover' "
        f"AND state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()",
    )
    return bool(rows)


def _old_release_read(url: str) -> float:
    """Seconds the old release's read of the table takes (its connection already open)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '20s'")
        started = time.monotonic()
        conn.execute("SELECT count(*) FROM items").fetchall()
        return time.monotonic() - started


async def _read_wait_during_apply(url: str, topo: Topology, marker: str) -> float:
    applying = asyncio.create_task(run_migrations(topo, "expand", "2.0", Notes()))
    await wait_until(
        lambda: _slow_statement_running(url, marker),
        timeout=30,
        interval=0.01,
        what=f"the applier to run {marker}",
    )
    waited = await asyncio.to_thread(_old_release_read, url)
    await applying
    return waited


@pytest.mark.real
@pytest.mark.parametrize("case", sorted(TRANSACTION_CASES))
async def test_a_lock_taken_early_in_a_file_blocks_the_old_release_until_the_file_ends(
    tmp_path: Path, postgres: Postgres, case: str
) -> None:
    """The check's transaction-holds-lock, measured: the same statements in one file
    block the old release's read for the slow statement, split into two they do not."""
    locks, slow, marker = TRANSACTION_CASES[case]
    waits = {}
    for layout, files in {
        "one file": {"0002_expand_change.sql": LOCK_TIMEOUT + locks + slow},
        "split": {
            "0002_expand_lock.sql": LOCK_TIMEOUT + locks,
            "0003_expand_slow.sql": LOCK_TIMEOUT + slow,
        },
    }.items():
        root = tmp_path / layout.replace(" ", "-")
        root.mkdir()
        with postgres.database() as url:
            table = topology(root, url, {"0001_expand_items.sql": SLOW_TABLE})
            await run_migrations(table, "expand", "1.0", Notes())
            topo = topology(root, url, files)  # now pending: the release's migrations
            found = [f.rule for f in (await review(topo, "2.0")).findings]
            assert found == (["transaction-holds-lock"] if layout == "one file" else [])
            waits[layout] = await _read_wait_during_apply(url, topo, marker)
    print(f"{case}: old release's read waited {waits}")
    assert waits["one file"] >= 0.4, waits  # the slow statement takes about 1 s
    assert waits["split"] < 0.2, waits


ENUM_TABLE = (
    "CREATE TYPE order_status AS ENUM ('paid');\n"
    "CREATE TABLE orders (id integer PRIMARY KEY, status order_status);\n"
)
ADD_REFUNDED = "ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'refunded';\n"
USE_REFUNDED = "ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'refunded';\n"


@pytest.mark.real
@pytest.mark.parametrize(
    ("files", "fails"),
    [
        # The applier's transaction around a plain file: ADD VALUE is accepted...
        ({"0002_expand_add.sql": LOCK_TIMEOUT + ADD_REFUNDED}, False),
        # ... and so in the file's own: PostgreSQL 12+ refuses only the use.
        ({"0002_expand_add.sql": LOCK_TIMEOUT + f"BEGIN;\n{ADD_REFUNDED}COMMIT;\n"}, False),
        ({"0002_expand_add.sql": LOCK_TIMEOUT + ADD_REFUNDED + USE_REFUNDED}, True),
        (
            {
                "0002_expand_add.sql": LOCK_TIMEOUT + f"BEGIN;\n{ADD_REFUNDED}{USE_REFUNDED}"
                "COMMIT;\n"
            },
            True,
        ),
        (
            {
                "0002_expand_add.sql": LOCK_TIMEOUT + ADD_REFUNDED,
                "0003_expand_use.sql": LOCK_TIMEOUT + USE_REFUNDED,
            },
            False,
        ),
    ],
    ids=["plain", "own-transaction", "plain-then-use", "own-transaction-then-use", "split"],
)
async def test_a_new_enum_value_is_refused_until_its_transaction_commits(
    tmp_path: Path, postgres: Postgres, files: dict[str, str], fails: bool
) -> None:
    """What adding-enum-value-in-transaction says, on the suite's PostgreSQL: the
    check flags exactly the files the applier fails on."""
    with postgres.database() as url:
        await run_migrations(topology(tmp_path, url, {"0001_expand_orders.sql": ENUM_TABLE}),
                             "expand", "1.0", Notes())  # fmt: skip
        topo = topology(tmp_path, url, files)
        found = [f.rule for f in (await review(topo, "2.0")).findings]
        assert found == (["adding-enum-value-in-transaction"] if fails else [])
        if fails:
            with pytest.raises(MigrationError, match="unsafe use of new value"):
                await run_migrations(topo, "expand", "2.0", Notes())
            assert query(url, "SELECT unnest(enum_range(NULL::order_status))::text") == [
                ("paid",)
            ]  # the whole file rolled back
        else:
            await run_migrations(topo, "expand", "2.0", Notes())
            assert len(await applied_migrations(topo)) == 1 + len(files)


@pytest.mark.real
async def test_a_failed_concurrent_index_build_is_reported_with_its_invalid_index(
    tmp_path: Path, postgres: Postgres
) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"]
        + "INSERT INTO users (id, name) VALUES (2, 'ada');\n",  # a duplicate name
        "0002_expand_unique.sql": LOCK_TIMEOUT
        + "CREATE UNIQUE INDEX CONCURRENTLY users_name_key ON users (name);\n",
    }
    with postgres.database() as url:
        topo = topology(tmp_path, url, files)
        for attempt in ("first", "resume"):  # the retry fails with "already exists"
            with pytest.raises(MigrationError) as failed:
                await run_migrations(topo, "expand", "2.0", Notes())
            assert str(failed.value).startswith("0002_expand_unique.sql:2: "), attempt
            assert "it left INVALID index users_name_key behind" in str(failed.value), attempt
            assert "DROP INDEX CONCURRENTLY users_name_key" in str(failed.value)
        assert "already exists" in str(failed.value)
        with psycopg.connect(url, autocommit=True) as conn:  # the operator's repair
            conn.execute("DELETE FROM users WHERE id = 2")
            conn.execute("DROP INDEX CONCURRENTLY users_name_key")
        assert "0002_expand_unique.sql" in await run_migrations(topo, "expand", "2.0", Notes())


@pytest.mark.real
async def test_if_not_exists_does_not_hide_the_invalid_index_of_a_failed_build(
    tmp_path: Path, postgres: Postgres
) -> None:
    files = {
        "0001_expand_users.sql": BASE["0001_expand_users.sql"]
        + "INSERT INTO users (id, name) VALUES (2, 'ada');\n",
        "0002_expand_unique.sql": LOCK_TIMEOUT
        + "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS users_name_key ON users (name);\n",
    }
    with postgres.database() as url:
        topo = topology(tmp_path, url, files)
        with pytest.raises(MigrationError, match="it left INVALID index users_name_key"):
            await run_migrations(topo, "expand", "2.0", Notes())
        # The resume's IF NOT EXISTS skips the build: the file ran, the index is still INVALID.
        with pytest.raises(MigrationError) as resumed:
            await run_migrations(topo, "expand", "2.0", Notes())
        assert str(resumed.value).startswith(
            "0002_expand_unique.sql: ran, but it left INVALID index users_name_key behind"
        )
        assert [name for name, _, _ in await applied_migrations(topo)] == ["0001_expand_users.sql"]
