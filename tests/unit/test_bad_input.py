"""Bad input never breaks a release: every command, given a bad argument or a
bad config, exits 2 with one line and no traceback, before anything changed."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from changeover import journal as J
from changeover.cli import app
from changeover.commands import output
from changeover.config import load
from changeover.engine import Engine
from changeover.journal import Journal, journal_path
from changeover.releases import Begin, Releases
from changeover.starter import STARTER
from changeover.steps import Preflight
from changeover.ui import Timeline
from tests.unit.engine_fakes import Site

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


# --- versions are data ----------------------------------------------------------------

MARKUP_VERSIONS = ["[/]", "2.0 [beta]", "[bold red]x[/]", "1.0\\[x]"]


def closed_port() -> int:
    """A loopback port nothing listens on (the balancer is unreachable there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site_with_release(tmp_path: Path, version: str) -> Path:
    """The starter config (its balancer unreachable) and a journal holding an
    unfinished release of `version`."""
    config = starter(tmp_path, 'admin_listen = "127.0.0.1:8089"',
                     f'admin_listen = "127.0.0.1:{closed_port()}"')  # fmt: skip
    topo = load(config)
    j = Journal(journal_path(topo.state_dir(), topo.site.name))
    rid = j.create_release(topo.site.name, version, f"old {version}", "rolling-clusters",
                           [Preflight("preflight", "check the balancer").to_dict()])  # fmt: skip
    j.set_state(rid, J.FAILED, f"it broke on {version}")
    j.close()
    return config


@pytest.mark.parametrize("version", MARKUP_VERSIONS)
@pytest.mark.parametrize(
    ("command", "code"),
    [(["plan", "{v}", "--offline"], 0), (["history"], 0), (["show", "1"], 0), (["status"], 1)],
)  # fmt: skip
def test_a_version_is_printed_as_itself_by_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, command: list[str], code: int
) -> None:
    monkeypatch.setenv("CHANGEOVER_ADMIN_TOKEN", "t0ken")
    monkeypatch.setattr("changeover.engine.APPLY_BACKOFF", 0.01)
    monkeypatch.setattr(output.out, "width", 300)  # a table cell is not wrapped
    config = site_with_release(tmp_path, version)
    argv = [version if word == "{v}" else word for word in command]

    result = CliRunner().invoke(app, [*argv, "-c", str(config)])

    assert result.exit_code == code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    # Quoted where the command quotes it (repr doubles a backslash), else as it is.
    assert version in result.output or repr(version) in result.output
    if command[0] in ("status", "show"):  # the release's error, which holds it too
        assert f"it broke on {version}" in result.output


@pytest.mark.parametrize("how", ["release", "resume"])
@pytest.mark.parametrize("version", MARKUP_VERSIONS)
async def test_the_release_timeline_prints_a_version_as_itself(
    tmp_path: Path, how: str, version: str
) -> None:
    """What `release` and `resume` print as they run (the balancer here is a fake)."""
    site = Site.build(tmp_path)
    screen = io.StringIO()
    timeline = Timeline(Console(file=screen, width=300))
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect, timeline)
    if how == "resume":  # begun, then the tool died before its first step
        release_id = await Engine(site.topo, site.ports()).begin(version)
        site.journal.release_lock("t")
        done = await service.resume()
        assert done.release_id == release_id
    else:
        done = await service.release(Begin(version))

    assert done.state == J.DONE
    assert f"release #{done.release_id}: {version} on t" in screen.getvalue()
    assert f"release #{done.release_id} done: t serves {version}" in screen.getvalue()


@pytest.mark.parametrize(
    ("version", "why"),
    [("-rf", "starts with '-'"), ("2.0\n", "control character ('\\n')"),
     ("1\x1b[31m", "control character ('\\x1b')"), ("a\u2028b", "control character"),
     (" ", "the version is empty"), ("9" * 201, "longer than 200"),
     ("2.0-beta", "does not match release.version_pattern")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["plan", "release"])
def test_a_bad_version_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, version: str, why: str
) -> None:
    monkeypatch.setenv("CHANGEOVER_ADMIN_TOKEN", "t0ken")
    pattern = r'version_pattern = "\\d+\\.\\d+(\\.\\d+)?"'
    config = starter(tmp_path, "[release]\n", f"[release]\n{pattern}\n")
    if "2.0-beta" not in version:
        config = starter(tmp_path)

    line = one_line_error(CliRunner().invoke(app, [command, "-c", str(config), "--", version]))

    assert why in line
    assert not (tmp_path / ".changeover").exists()


def test_a_version_pattern_that_is_no_regular_expression_is_a_config_error(
    tmp_path: Path,
) -> None:
    config = starter(tmp_path, "[release]\n", '[release]\nversion_pattern = "(["\n')
    line = one_line_error(CliRunner().invoke(app, ["check", "-c", str(config)]))
    assert "release.version_pattern: not a regular expression" in line


# --- every command, every bad argument ---------------------------------------------------


def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return str(path)


# (argv, environment without the admin token?, what the line must say); "{fifo}" is a FIFO.
BAD_ARGUMENTS: list[tuple[list[str], bool, str]] = [
    (["status"], True, "needs a token"),
    (["plan", "2.0"], True, "needs a token"),
    (["plan", "2.0"], False, "`changeover plan --offline` plans without it"),
    (["probe", "http://127.0.0.1:9/", "--sticky-users", "0"], False, "'--sticky-users'"),
    (["probe", "http://127.0.0.1:9/", "--rate", "-1"], False, "'--rate'"),
    (["probe", "http://127.0.0.1:9/", "--rate", "nan"], False, "'--rate'"),
    (["probe", "http://127.0.0.1:9/", "--duration", "inf"], False, "'--duration'"),
    (["probe", "http://127.0.0.1:9/", "--timeout", "0"], False, "'--timeout'"),
    (["probe", "notaurl"], False, "expected an http:// or https:// URL"),
    (["probe", "http://"], False, "expected an http:// or https:// URL"),
    (["probe", "http://127.0.0.1:9/", "--watch-admin", "ftp://x"], False, "'--watch-admin'"),
    (["probe", "http://127.0.0.1:9/", "--watch-admin", "http://127.0.0.1:9"], True,
     "--watch-admin needs the admin token"),
    (["probe", "http://127.0.0.1:9/", "--watch-config", "{fifo}"], False,
     "fifo.toml: not a regular file"),
    (["history", "--limit", "99999999999999999999"], False, "'--limit'"),
    (["history", "--limit", "0"], False, "'--limit'"),
    (["show", "99999999999999999999"], False, "'RELEASE'"),
    (["show", "abc"], False, "'RELEASE'"),
    (["balancer", "serve", "--workers", "-1"], False, "'--workers'"),
    (["demo", "--rate", "nan"], False, "'--rate'"),
    (["init", "/nonexistent/x.toml"], False, "/nonexistent/x.toml: cannot write"),
    (["check", "-c", "/dev/zero"], False, "/dev/zero: not a regular file"),
    (["check", "-c", "{fifo}"], False, "fifo.toml: not a regular file"),
    (["check", "-c", "/nonexistent.toml"], False, "no such file"),
    (["release"], False, "Missing argument 'version'"),
    (["nosuch"], False, "No such command 'nosuch'"),
    (["unlock"], False, "unlock needs --force"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "no_token", "says"), BAD_ARGUMENTS,
                         ids=[" ".join(a[0]) for a in BAD_ARGUMENTS])  # fmt: skip
def test_every_bad_argument_exits_2_with_one_line(
    tmp_path: Path, argv: list[str], no_token: bool, says: str
) -> None:
    config = starter(tmp_path, 'admin_listen = "127.0.0.1:8089"',
                     f'admin_listen = "127.0.0.1:{closed_port()}"')  # fmt: skip
    words = [fifo(tmp_path) if w == "{fifo}" else w for w in argv]
    env = {k: v for k, v in os.environ.items() if k != "CHANGEOVER_ADMIN_TOKEN"}
    if not no_token:
        env |= TOKEN_ENV
    env["CHANGEOVER_CONFIG"] = str(config)
    env["COLUMNS"] = "80"  # one line must stay one line on a narrow terminal too

    # The installed command (its `main`), as a user runs it: usage errors included.
    done = subprocess.run(
        [sys.executable, "-m", "changeover.cli", *words],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and says in lines[0], lines[0]
