"""The journal through the CLI: a corrupt, foreign or newer-schema journal is a
clear one-line error (exit 2) from every command that opens it, and the file
is left byte for byte as it was; `show --json` prints what the journal holds."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover.cli import app
from changeover.config import load
from changeover.journal import Journal, OutputRow, journal_path
from changeover.starter import STARTER

TOKEN_ENV = {"CHANGEOVER_ADMIN_TOKEN": "t0ken"}


def site(tmp_path: Path) -> tuple[Path, Path]:
    """A starter config and where its journal lives."""
    config = tmp_path / "changeover.toml"
    config.write_text(STARTER)
    topo = load(config)
    return config, journal_path(topo.state_dir(), topo.site.name)


def a_journal_with_history(path: Path) -> None:
    j = Journal(path)
    for n in range(40):  # several pages, so corruption can land past the header
        rid = j.create_release("site", f"{n}.0", None, "rolling-clusters", [{"id": "preflight"}])
        j.add_event(rid, "info", "x" * 500)
    j.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 200)


def truncated(path: Path) -> None:
    a_journal_with_history(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def zeroed_pages(path: Path) -> None:
    a_journal_with_history(path)
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(data), 2 * page):  # every other page after the first
        data[start : start + page] = b"\xff" * page
    path.write_bytes(bytes(data))


def newer_schema(path: Path) -> None:
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "garbage": garbage,
    "truncated": truncated,
    "zeroed-pages": zeroed_pages,
    "newer-schema": newer_schema,
    "foreign": foreign,
}
COMMANDS = [
    ["history"],
    ["show", "1"],
    ["status"],
    ["abort"],
    ["approve"],
    ["unlock", "--force", "--yes"],
    ["release", "9.9"],
    ["resume"],
    ["rollback"],
]


def digest(path: Path) -> str:
    """The journal byte for byte, plus whatever its write-ahead log holds (opening
    a database in WAL mode may create an empty -wal and an -shm index: no change)."""
    wal = path.with_name(path.name + "-wal")
    h = hashlib.sha256(path.read_bytes())
    h.update(wal.read_bytes() if wal.exists() else b"")
    return h.hexdigest()


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_broken_journal_is_a_clear_error_and_left_untouched(
    tmp_path: Path, breakage: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in TOKEN_ENV.items():
        monkeypatch.setenv(k, v)
    config, path = site(tmp_path)
    path.parent.mkdir(parents=True)
    BREAKAGES[breakage](path)
    before = digest(path)

    result = CliRunner().invoke(app, [*command, "-c", str(config)])

    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert str(path) in result.output.replace("\n", "")
    assert "left untouched" in result.output or "newer than" in result.output
    assert "Traceback" not in result.output
    assert digest(path) == before


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    config, path = site(tmp_path)
    path.parent.mkdir(parents=True)
    zeroed_pages(path)
    before = digest(path)
    done = subprocess.run(
        [sys.executable, "-m", "changeover.cli", "history", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | TOKEN_ENV,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "error:" in done.stderr
    assert digest(path) == before


def test_show_json_has_steps_outputs_and_events(tmp_path: Path) -> None:
    config, path = site(tmp_path)
    j = Journal(path)
    rid = j.create_release(
        "site", "2.0", "1.0", "rolling-clusters", [{"id": "stop-a", "description": "stop a"}]
    )
    j.step_started(rid, 0)
    j.add_outputs(rid, [OutputRow(0, "a1", ["ctl", "stop", "a1; x"], 0, 0.25, "stopped\n")])
    j.step_finished(rid, 0, True, "1/1 ok")
    j.add_event(rid, "warn", "took over a stale lock left by someone")
    j.close()

    result = CliRunner().invoke(app, ["show", str(rid), "-c", str(config), "--json"])

    assert result.exit_code == 0, result.exception
    data = json.loads(result.stdout)
    assert data["version"] == "2.0" and data["previous_version"] == "1.0"
    assert [(s["id"], s["state"], s["detail"]) for s in data["steps"]] == [
        ("stop-a", "done", "1/1 ok")
    ]
    assert data["outputs"][0]["argv"] == ["ctl", "stop", "a1; x"]
    assert data["outputs"][0]["member"] == "a1"
    assert [e["message"] for e in data["events"]] == ["took over a stale lock left by someone"]
