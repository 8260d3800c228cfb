"""`changeover plan` and `release` check the migrations first: the gate."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover.cli import app
from changeover.commands import EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED

runner = CliRunner()

TOPOLOGY = """
[[clusters]]
name = "a"
members = [ { name = "a1", port = 18101 } ]
[[clusters]]
name = "b"
members = [ { name = "b1", port = 18102 } ]
"""
DATABASE = """
[database]
url = "sqlite:///app.db"
migrations_dir = "migrations"
"""
DROP = "ALTER TABLE users DROP COLUMN email;\n"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_expand_users.sql").write_text(
        "CREATE TABLE users (id integer PRIMARY KEY, name text, email text);\n"
    )
    config = tmp_path / "changeover.toml"
    config.write_text(TOPOLOGY + DATABASE)
    return config


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "-c", str(config)])
    return result.exit_code, result.stdout, result.stderr


def add(config: Path, name: str, sql: str) -> None:
    (config.parent / "migrations" / name).write_text(sql)


def test_plan_shows_both_phases_and_what_is_pending(site: Path) -> None:
    add(site, "0002_expand_add_nick.sql", "ALTER TABLE users ADD COLUMN nick text;\n")
    code, out, err = cli(site, "plan", "2.0", "--offline")
    assert code == EXIT_OK, err
    assert " 2. apply the expand migrations" in out
    assert " 3. check the release still serving" in out
    assert out.strip().splitlines()[-2].endswith("apply the contract migrations (every cluster "
                                                 "serves the new release)")  # fmt: skip
    assert (
        "pending migrations: expand: 0001_expand_users.sql, 0002_expand_add_nick.sql; "
        "contract: none"
    ) in out


def test_a_finding_in_expand_refuses_with_the_findings(site: Path) -> None:
    add(site, "0002_expand_drop_email.sql", DROP)
    for command in ("plan", "release"):
        code, out, err = cli(site, command, "2.0", "--offline" if command == "plan" else "--json")
        assert code == EXIT_REFUSED
        assert "0002_expand_drop_email.sql:1: error [ban-drop-column]" in err
        assert "refused: 1 migration finding(s)" in err
        assert out == ""
    # Refused before anything ran: no database file, no journal.
    assert not (site.parent / "app.db").exists()
    assert not (site.parent / ".changeover").exists()


def test_allow_needs_a_reason_and_a_known_rule(site: Path) -> None:
    add(site, "0002_expand_drop_email.sql", DROP)
    code, _, err = cli(site, "plan", "2.0", "--offline", "--allow", "ban-drop-column")
    assert code == EXIT_BAD_INPUT and "--allow needs --reason" in err
    code, _, err = cli(site, "plan", "2.0", "--offline", "--allow", "no-such-rule", "--reason", "x")
    assert code == EXIT_BAD_INPUT and "unknown rule(s) for --allow: no-such-rule" in err
    args = ("--allow", "unparseable-statement", "--reason", "x")
    code, _, err = cli(site, "plan", "2.0", "--offline", *args)
    assert code == EXIT_BAD_INPUT and "--allow cannot accept unparseable-statement" in err


def test_allowed_with_a_reason_the_plan_goes_ahead_and_says_so(site: Path) -> None:
    add(site, "0002_expand_drop_email.sql", DROP)
    args = (
        "plan",
        "2.0",
        "--offline",
        "--allow",
        "ban-drop-column",
        "--reason",
        "unused since 1.4",
    )
    code, out, err = cli(site, *args)
    assert code == EXIT_OK, err
    assert "--reason 'unused since 1.4'; accepted ban-drop-column at " in out
    assert "0002_expand_drop_email.sql:1" in out
    code, out, _ = cli(site, *args, "--json")
    migrations = json.loads(out)["migrations"]
    assert migrations["pending"]["expand"][-1] == "0002_expand_drop_email.sql"
    assert [f["rule"] for f in migrations["allowed_findings"]] == ["ban-drop-column"]


def test_no_allow_accepts_an_unparseable_statement(site: Path) -> None:
    # SQLite: a missing semicolon hides the DROP in a statement nothing can parse.
    add(site, "0002_expand_oops.sql", "ALTER TABLE users ADD COLUMN nick text\nDROP TABLE users;\n")
    args = ("plan", "2.0", "--offline", "--allow", "needs-review", "--reason", "looks fine")
    code, _, err = cli(site, *args)
    assert code == EXIT_REFUSED, err
    assert "[unparseable-statement]" in err


def test_applied_migrations_are_not_checked_again(site: Path) -> None:
    add(site, "0002_expand_drop_email.sql", DROP)
    with sqlite3.connect(site.parent / "app.db") as conn:
        conn.execute("CREATE TABLE changeover_migrations (name, phase, version, applied_at)")
        conn.execute(
            "INSERT INTO changeover_migrations VALUES "
            "('0001_expand_users.sql', 'expand', '1.0', ''), "
            "('0002_expand_drop_email.sql', 'expand', '1.0', '')"
        )
    code, out, err = cli(site, "plan", "2.0", "--offline")
    assert code == EXIT_OK, err
    assert "pending migrations: expand: none; contract: none" in out


def test_allow_without_a_database_is_bad_input(site: Path) -> None:
    site.write_text(TOPOLOGY)
    code, _, err = cli(site, "plan", "2.0", "--offline", "--allow", "ban-drop-column",
                       "--reason", "x")  # fmt: skip
    assert code == EXIT_BAD_INPUT and "there is no [database]" in err
