"""Bad input never breaks a release: every command, given a bad argument or a
bad config, exits 2 with one line and no traceback, before anything changed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from changeover.cli import app
from changeover.starter import STARTER

TOKEN_ENV = {"CHANGEOVER_ADMIN_TOKEN": "t0ken"}


def starter(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """The starter config, with `old` replaced by `new`."""
    assert old in STARTER
    config = tmp_path / "changeover.toml"
    config.write_text(STARTER.replace(old, new, 1))
    return config


def one_line_error(result: Result, code: int = 2) -> str:
    """The error line of a CLI run that must fail with `code`, one line, no traceback."""
    output, exception = result.output, result.exception
    assert result.exit_code == code, (output, exception)
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return str(lines[0])


# --- command templates ----------------------------------------------------------------

BAD_TEMPLATES = [
    ('deploy = "/opt/app/bin/ctl deploy {version}"', 'deploy = "echo {nope}"', "release.deploy",
     "unknown placeholder {nope}"),
    ('stop = "/opt/app/bin/ctl stop"', "stop = \"echo 'oops\"", "release.stop", "cannot split"),
    ('start = "/opt/app/bin/ctl start"', 'start = "ctl start {member!r}"', "release.start",
     "unknown placeholder {member}"),
    ('# smoke_command = "./qa-smoke.sh"', 'smoke_command = "./qa.sh {member}"',
     "checks.smoke_command", "unknown placeholder {member}"),
    ('deploy = "/opt/app/bin/ctl deploy {version}"',
     'deploy = "ctl deploy"\nupload = [ { src = "app-{verison}.tar", dest = "/srv/app.tar" } ]',
     "release.upload[0].src", "unknown placeholder {verison}"),
]  # fmt: skip


@pytest.mark.parametrize("command", [["check"], ["plan", "2.0", "--offline"], ["release", "2.0"]])
@pytest.mark.parametrize(("old", "new", "key", "why"), BAD_TEMPLATES)
def test_a_bad_command_template_is_refused_before_anything_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    old: str,
    new: str,
    key: str,
    why: str,
) -> None:
    monkeypatch.setenv("CHANGEOVER_ADMIN_TOKEN", "t0ken")
    config = starter(tmp_path, old, new)

    line = one_line_error(CliRunner().invoke(app, [*command, "-c", str(config)]))

    assert f"{config}: {key}: " in line and why in line
    assert not (tmp_path / ".changeover").exists()  # no journal, no lock: nothing began
