"""The journal: durable, locked, and never silently reset."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from changeover import journal as J
from changeover.journal import Journal, JournalError, LockHeld
from tests.helpers import (
    assert_a_step_ends_in_one_transaction,
    assert_withdraw_clears_only_what_it_read,
)

PLAN = [{"id": "preflight"}, {"id": "drain-a"}]


def test_release_and_steps_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    rid = j.create_release("site", "2.0", "1.0", "rolling-clusters", PLAN)
    j.step_started(rid, 0)
    j.step_finished(rid, 0, True, "fine")
    j.add_outputs(rid, [J.OutputRow(1, "a1", ["ctl", "stop"], 0, 0.1, "stopped")])
    steps = j.steps(rid)
    assert [(s.step_id, s.state) for s in steps] == [("preflight", "done"), ("drain-a", "pending")]
    assert j.outputs(rid)[0].argv == ["ctl", "stop"]
    assert j.unfinished("site") is not None
    j.set_state(rid, J.DONE)
    assert j.unfinished("site") is None
    assert j.last_done("site") is not None


def test_a_step_ends_with_its_event_and_reads_what_was_asked_in_one_transaction(
    tmp_path: Path,
) -> None:
    assert_a_step_ends_in_one_transaction(Journal(tmp_path / "j.sqlite"), "fine", "fine")


def test_withdraw_clears_only_the_request_it_read(tmp_path: Path) -> None:
    assert_withdraw_clears_only_what_it_read(Journal(tmp_path / "j.sqlite"))


def test_journal_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    Journal(tmp_path / "j.sqlite").close()
    db = sqlite3.connect(tmp_path / "j.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _hold_lock(
    path: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    Journal(Path(path)).acquire("site", 7)
    ready.set()
    done.wait(30)


def test_lock_refuses_a_second_holder_and_names_it(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path / "j.sqlite"), ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockHeld) as info:
            Journal(tmp_path / "j.sqlite").acquire("site", None)
        assert f"pid {proc.pid}" in str(info.value)
        assert "release #7" in str(info.value)
    finally:
        done.set()
        proc.join(30)
    # The holder is dead now: its lock is stale and is taken over.
    stale = Journal(tmp_path / "j.sqlite").acquire("site", None)
    assert stale is not None and stale.pid == proc.pid


def test_corrupt_journal_is_an_error_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="not a usable changeover journal"):
        Journal(path)
    assert path.read_bytes() == b"this is not a database" * 100


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="newer than this changeover"):
        Journal(path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="not a changeover journal"):
        Journal(path)


def test_interrupted_step_goes_back_to_pending(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    rid = j.create_release("site", "2.0", "1.0", "rolling-clusters", PLAN)
    j.step_started(rid, 1)
    j.step_interrupted(rid, 1, "Ctrl-C")
    assert j.steps(rid)[1].state == J.STEP_PENDING


def test_a_read_only_journal_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    rid = j.create_release("s", "1.0", None, "rolling-clusters", [{"id": "preflight"}])
    j._db.execute("PRAGMA query_only = ON")  # SQLite refuses writes from here on
    with pytest.raises(JournalError) as caught:
        j.step_started(rid, 0)
    assert str(caught.value).startswith(f"{tmp_path / 'j.sqlite'}: cannot use the journal: ")
    assert "read-only" in str(caught.value)
    assert j.steps(rid)[0].state == J.STEP_PENDING  # reads still work; nothing half-written


def test_a_full_disk_is_a_clear_error_and_the_journal_stays_usable(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    rid = j.create_release("s", "1.0", None, "rolling-clusters", [{"id": "preflight"}])
    pages = j._db.execute("PRAGMA page_count").fetchone()[0]
    j._db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow
    with pytest.raises(JournalError, match="the disk is full"):
        j.add_event(rid, "info", "x" * 1_000_000)
    j.add_event(rid, "info", "small")  # rolled back cleanly: the next write works
    assert [e.message for e in j.events(rid)] == ["small"]


def test_a_journal_that_cannot_be_opened_is_not_called_a_broken_one(tmp_path: Path) -> None:
    (tmp_path / "j.sqlite").mkdir()  # SQLite cannot open it, as in a directory it may not write
    with pytest.raises(JournalError, match="cannot open it") as caught:
        Journal(tmp_path / "j.sqlite")
    assert "not a usable" not in str(caught.value)


def test_journals_opened_at_once_on_a_new_file_all_open_it(tmp_path: Path) -> None:
    # A release and `status --watch` started together on a site with no journal
    # yet: each opens its own connection and finds the file new. The collisions
    # are rare per attempt (7 in 300 seen here before the WAL switch was retried),
    # so enough attempts that one of them collides.
    for attempt in range(300):
        path = tmp_path / f"j{attempt}.sqlite"
        start = threading.Barrier(4)
        errors: list[Exception] = []

        def open_it(path: Path, start: threading.Barrier, errors: list[Exception]) -> None:
            start.wait()
            try:
                J.Journal(path).close()
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it, args=(path, start, errors)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [], (attempt, errors)
