"""The analyser's verdict against a real SQLite database.

Each SQLite example is applied to a database holding the old release's
schema; the old release's queries must keep working after every migration
the analyser passes in the expand phase, and must break (or the migration
itself fails) for every compatibility rule it flags.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from changeover.migrations import RULES, check_paths

EXAMPLES = Path(__file__).parent.parent / "data" / "migrations" / "sqlite"

OLD_SCHEMA = """
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, nickname TEXT, email TEXT);
CREATE TABLE legacy_sessions (id INTEGER PRIMARY KEY, user_id INTEGER);
INSERT INTO users (name, nickname) VALUES ('ada', 'a');
"""
# What the release still running does.
OLD_RELEASE_QUERIES = (
    "SELECT id, name, nickname, email FROM users",
    "INSERT INTO users (name, nickname, email) VALUES ('bob', 'b', 'b@example.org')",
    "SELECT count(*) FROM legacy_sessions",
)


def old_release_breaks(migration: Path, tmp_path: Path) -> bool:
    db = sqlite3.connect(tmp_path / "site.db")
    try:
        db.executescript(OLD_SCHEMA)
        try:
            db.executescript(migration.read_text())
        except sqlite3.Error:
            return True  # the migration itself fails half way
        for query in OLD_RELEASE_QUERIES:
            try:
                db.execute(query)
            except sqlite3.Error:
                return True
        return False
    finally:
        db.close()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.sql")), ids=lambda p: p.name)
def test_verdict_matches_the_database(path: Path, tmp_path: Path) -> None:
    findings = check_paths([path], dialect="sqlite", phase="expand")
    compatibility = [f for f in findings if RULES[f.rule].phases == {"expand"}]
    if compatibility:
        assert old_release_breaks(path, tmp_path), f"{path.name}: flagged, yet nothing broke"
    elif not findings:
        assert not old_release_breaks(path, tmp_path), f"{path.name}: passed, yet it broke"
