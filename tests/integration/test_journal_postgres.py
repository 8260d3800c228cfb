"""The shared journal (`[site] state_url`) against a real, throwaway PostgreSQL:
the same records as the SQLite journal, and a release lock that the server
frees when its holder dies."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from changeover import journal as J
from changeover.cli import app
from changeover.config import load
from changeover.journal import Journal, JournalError, LockHeld, OutputRow, journal_path
from changeover.pgjournal import PgJournal
from changeover.starter import STARTER
from tests.helpers import (
    assert_a_step_ends_in_one_transaction,
    assert_withdraw_clears_only_what_it_read,
)
from tests.postgres import Postgres, running_postgres

pytestmark = pytest.mark.real

PLAN = [{"id": "preflight", "description": "p"}, {"id": "drain-a", "description": "d"}]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def url(postgres: Postgres) -> Iterator[str]:
    with postgres.database() as database_url:
        yield database_url


def backends(url: str) -> list[int]:
    """The server processes of the journal's sessions (application_name)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'changeover journal'"
        ).fetchall()
    return [int(r[0]) for r in rows]


def test_a_step_ends_with_its_event_and_reads_what_was_asked_in_one_transaction(
    url: str,
) -> None:
    assert_a_step_ends_in_one_transaction(PgJournal(url, "site"), "fine\x00", "fine\ufffd")


def test_release_and_steps_round_trip(url: str) -> None:
    j = PgJournal(url, "site")
    rid = j.create_release("site", "2.0", "1.0", "rolling-clusters", PLAN)
    j.step_started(rid, 0)
    j.step_finished(rid, 0, True, "fine")
    j.add_outputs(rid, [OutputRow(1, "a1", ["ctl", "stop"], 0, 0.1, "stopped\x00here")])
    j.add_event(rid, "info", "hello")
    states = [(s.step_id, s.state) for s in j.steps(rid)]
    assert states == [("preflight", "done"), ("drain-a", "pending")]
    output = j.outputs(rid)[0]
    assert output.argv == ["ctl", "stop"] and output.output == "stopped\ufffdhere"
    assert [e.message for e in j.events(rid)] == ["hello"]
    assert j.unfinished("site") is not None and j.last_done("site") is None
    j.request(rid, "abort")
    assert j.release(rid).request == "abort"
    j.set_state(rid, J.DONE)
    assert j.unfinished("site") is None
    done = j.last_done("site")
    assert done is not None and done.finished is not None and done.plan == PLAN
    with pytest.raises(KeyError):
        j.release(rid + 1)
    j.close()


def test_withdraw_clears_only_the_request_it_read(url: str) -> None:
    assert_withdraw_clears_only_what_it_read(PgJournal(url, "site"))


def test_release_numbers_count_per_site_as_in_a_sqlite_file(url: str) -> None:
    a, b = PgJournal(url, "a"), PgJournal(url, "b")
    assert [a.create_release("a", v, None, "rolling-clusters", PLAN) for v in "12"] == [1, 2]
    assert b.create_release("b", "1", None, "rolling-clusters", PLAN) == 1
    assert [r.version for r in b.releases("b")] == ["1"]
    assert b.steps(1) and [s.step_id for s in a.steps(2)] == ["preflight", "drain-a"]
    a.close()
    b.close()


def _hold_lock(url: str, ready: Event) -> None:
    journal = PgJournal(url, "site")  # its connection holds the lock while it lives
    journal.acquire("site", 7)
    ready.set()
    time.sleep(120)  # until it is killed
    journal.close()


def test_lock_refuses_a_second_holder_and_names_it_then_is_freed_when_it_is_killed(
    url: str,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(url, ready))
    proc.start()
    try:
        assert ready.wait(60)
        other = PgJournal(url, "site")
        with pytest.raises(LockHeld) as info:
            other.acquire("site", None)
        text = str(info.value)
        assert f"pid {proc.pid}" in text and "release #7" in text, text
        assert f"@{socket.gethostname()}" in text and " since " in text
        holder = other.lock_holder("site")
        assert holder is not None and holder.alive and not holder.is_stale()
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join(30)
    # The server ends the dead holder's session and frees its lock; the row
    # it left is stale and the next acquire takes it over.
    deadline = time.monotonic() + 30
    while (h := other.lock_holder("site")) is not None and not h.is_stale():
        assert time.monotonic() < deadline, "the killed holder's lock was never freed"
        time.sleep(0.05)
    stale = other.acquire("site", 7)
    assert stale is not None and stale.pid == proc.pid
    mine = other.lock_holder("site")
    assert mine is not None and mine.pid == os.getpid() and mine.alive
    other.close()


def test_the_holder_itself_is_refused_a_second_release_but_may_resume_its_own(url: str) -> None:
    j = PgJournal(url, "site")
    assert j.acquire("site", None) is None
    j.set_lock_release("site", 3)
    with pytest.raises(LockHeld, match="release #3"):
        j.acquire("site", None)
    with pytest.raises(LockHeld):
        j.acquire("site", 4)
    assert j.acquire("site", 3) is None
    j.release_lock("site")
    assert j.lock_holder("site") is None
    other = PgJournal(url, "site")
    assert other.acquire("site", None) is None  # let go of: free for another session
    j.release_lock("site")  # not the holder: nothing happens
    holder = j.lock_holder("site")
    assert holder is not None and holder.alive
    other.close()
    j.close()


def test_unlock_force_ends_the_holders_session_and_the_holder_then_stops(url: str) -> None:
    holder, breaker = PgJournal(url, "site"), PgJournal(url, "site")
    rid = holder.create_release("site", "2.0", None, "rolling-clusters", PLAN)
    holder.acquire("site", rid)
    broken = breaker.force_unlock("site")
    assert broken is not None and broken.release_id == rid
    assert breaker.lock_holder("site") is None
    assert breaker.acquire("site", None) is None  # free at once
    with pytest.raises(JournalError, match="lost the connection to the state database"):
        holder.step_started(rid, 0)
    with pytest.raises(JournalError, match="was lost earlier"):
        holder.steps(rid)
    breaker.close()


def terminate_sessions(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        for pid in backends(url):
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


def test_a_connection_lost_while_holding_the_lock_is_never_reopened(url: str) -> None:
    j = PgJournal(url, "site")
    rid = j.create_release("site", "2.0", None, "rolling-clusters", PLAN)
    j.acquire("site", rid)
    terminate_sessions(url)
    with pytest.raises(JournalError, match=r"site\.state_url postgresql://") as info:
        j.step_started(rid, 0)
    assert "a release lock it held went with it" in str(info.value)
    with pytest.raises(JournalError, match="was lost earlier"):
        j.release(rid)
    assert backends(url) == []  # not opened again


def test_a_connection_lost_while_holding_no_lock_is_opened_again(url: str) -> None:
    j = PgJournal(url, "site")
    rid = j.create_release("site", "2.0", None, "rolling-clusters", PLAN)
    terminate_sessions(url)
    with pytest.raises(JournalError, match="lost the connection"):
        j.release(rid)
    assert j.release(rid).version == "2.0"  # the next call opens a new one
    assert j.acquire("site", rid) is None
    j.close()


def test_a_newer_schema_is_refused_and_left_untouched(url: str) -> None:
    PgJournal(url, "site").close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE changeover_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="newer than this changeover"):
        PgJournal(url, "site")


def test_an_unreachable_state_database_is_one_line_naming_the_key_without_the_password(
    postgres: Postgres,
) -> None:
    bad = f"postgresql://postgres:s3cret@127.0.0.1:{postgres.port}/no_such_db"
    with pytest.raises(JournalError) as info:
        PgJournal(bad, "site")
    text = str(info.value)
    assert text.startswith("site.state_url postgresql://127.0.0.1:"), text
    assert "no_such_db" in text and "s3cret" not in text and "\n" not in text


# --- through the CLI ------------------------------------------------------------------


SITE = "web-prod"  # the starter's


def site_config(root: Path, state_url: str | None) -> Path:
    """The starter config; with `state_url`, its journal is the shared one."""
    root.mkdir(parents=True, exist_ok=True)
    text = STARTER
    if state_url:
        text = text.replace("[site]\n", f"[site]\nstate_url = {json.dumps(state_url)}\n", 1)
    config = root / "changeover.toml"
    config.write_text(text)
    return config


def a_history(config: Path) -> None:
    """Three releases of the config's site in its SQLite journal."""
    topo = load(config)
    site = topo.site.name
    j = Journal(journal_path(topo.state_dir(), site))
    for n in range(3):
        rid = j.create_release(site, f"{n}.0", f"{n - 1}.0" if n else None, "bluegreen", PLAN)
        j.step_started(rid, 0)
        j.add_outputs(rid, [OutputRow(0, "a1", ["appctl", "deploy", f"{n}.0"], 0, 0.25, "ok ü\n")])
        j.add_outputs(
            rid, [OutputRow(0, "a2", ["appctl", "deploy", f"{n}.0"], None, 5.0, "timeout")]
        )
        j.step_finished(rid, 0, n != 1, "fine" if n != 1 else "broke")
        j.add_event(rid, "asked", "approve approve-a by qa@desk")
        j.add_event(rid, "info", "done")
        j.set_state(rid, J.DONE if n != 1 else J.FAILED, None if n != 1 else "broke")
    j.request(2, '{"approve": "approve-a"}')
    j.close()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def shown(config: Path) -> tuple[str, list[str]]:
    code, history = cli("history", "--json", "-c", str(config))
    assert code == 0, history
    details = []
    for row in json.loads(history):
        code, text = cli("show", str(row["id"]), "--json", "-c", str(config))
        assert code == 0, text
        details.append(text)
    return history, details


def test_export_from_sqlite_import_to_postgres_and_back_reads_the_same(
    tmp_path: Path, url: str
) -> None:
    local = site_config(tmp_path / "local", None)
    a_history(local)
    shared = site_config(tmp_path / "shared", url)
    export = tmp_path / "history.jsonl"

    code, text = cli("journal", "export", str(export), "-c", str(local))
    assert code == 0, text
    code, text = cli("journal", "import", str(export), "-c", str(shared))
    assert code == 0 and "imported 3 release(s)" in text, text
    assert shown(shared) == shown(local)
    # The shared journal goes on counting where the history ended.
    pg = PgJournal(url, SITE)
    assert pg.create_release(SITE, "9.0", "2.0", "bluegreen", PLAN) == 4
    pg.close()

    # And back: the shared history into the (empty) SQLite journal of the same
    # config (--sqlite), which then exports the same lines.
    back = tmp_path / "back.jsonl"
    assert cli("journal", "export", str(back), "-c", str(shared))[0] == 0
    code, text = cli("journal", "import", str(back), "--sqlite", "-c", str(shared))
    assert code == 0, text
    again = tmp_path / "again.jsonl"
    assert cli("journal", "export", str(again), "--sqlite", "-c", str(shared))[0] == 0
    assert again.read_text().splitlines()[1:] == back.read_text().splitlines()[1:]
    assert len(back.read_text().splitlines()) == 1 + 4 + 4 * 2 + 3 * 2 + 3 * 2  # fmt: skip


def test_import_over_history_is_refused_unless_forced(tmp_path: Path, url: str) -> None:
    local = site_config(tmp_path / "local", None)
    a_history(local)
    shared = site_config(tmp_path / "shared", url)
    export = tmp_path / "history.jsonl"
    assert cli("journal", "export", str(export), "-c", str(local))[0] == 0
    pg = PgJournal(url, SITE)
    pg.create_release(SITE, "7.0", None, "bluegreen", PLAN)
    pg.close()

    code, text = cli("journal", "import", str(export), "-c", str(shared))
    assert code == 3, text
    assert "the journal already holds 1 release(s) of the site" in " ".join(text.split())
    assert "use --force to replace it" in " ".join(text.split())
    assert [r["version"] for r in json.loads(cli("history", "--json", "-c", str(shared))[1])] == [
        "7.0"
    ]  # untouched

    code, text = cli("journal", "import", str(export), "--force", "-c", str(shared))
    assert code == 0, text
    assert shown(shared) == shown(local)


def test_a_sqlite_history_file_is_not_taken_for_an_export(tmp_path: Path, url: str) -> None:
    shared = site_config(tmp_path / "shared", url)
    db = tmp_path / "x.jsonl"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    code, text = cli("journal", "import", str(db), "-c", str(shared))
    assert code == 2, text
    assert str(db) in " ".join(text.split()) and "Traceback" not in text


def test_an_unreachable_state_database_is_exit_2_and_one_line(
    tmp_path: Path, postgres: Postgres
) -> None:
    config = site_config(tmp_path, f"postgresql://postgres:s3cret@127.0.0.1:{postgres.port}/nope")
    code, text = cli("history", "-c", str(config))
    assert code == 2, text
    assert text.startswith("error: site.state_url postgresql://127.0.0.1:"), text
    assert "s3cret" not in text and len(text.strip().splitlines()) == 1
