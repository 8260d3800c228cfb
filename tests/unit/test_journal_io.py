"""`[site] state_url` checked when the file loads, and `changeover journal
export` / `import` between SQLite journals (PostgreSQL: tests/integration/
test_journal_postgres.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover import journal as J
from changeover.cli import app
from changeover.config import ConfigError, load, parse
from changeover.journal import Journal, OutputRow, journal_path
from changeover.starter import STARTER

CLUSTERS = [
    {"name": "a", "members": [{"name": "a1", "port": 18001}]},
    {"name": "b", "members": [{"name": "b1", "port": 18002}]},
]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mysql://u:pw@db/x", "expected a postgresql://[user@]host[:port]/database URL"),
        ("db.internal:5432/x", "expected a postgresql://"),
        ("postgresql://u:pw@db/x?nosuchparameter=1", 'invalid URI query parameter: "nosuch'),
        ("postgres://u:pw@[::1/x", "IPv6 host address"),
    ],
)
def test_a_bad_state_url_is_one_line_naming_the_key_without_the_password(
    url: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"clusters": CLUSTERS, "site": {"state_url": url}}, "site.toml")
    text = str(info.value)
    assert text.startswith("site.toml: site.state_url: "), text
    assert why in text and "pw" not in text and "\n" not in text


def test_postgres_urls_are_accepted_and_sqlite_stays_the_default() -> None:
    for url in ("postgresql://app@db:5432/state", "postgres:///state?host=/run/postgresql"):
        topo = parse({"clusters": CLUSTERS, "site": {"state_url": url}})
        assert topo.site.state_url == url
    assert parse({"clusters": CLUSTERS}).site.state_url is None


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def config_at(root: Path, name: str = "web-prod") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "changeover.toml"
    config.write_text(STARTER.replace('name = "web-prod"', f'name = "{name}"', 1))
    return config


def journal_of(config: Path) -> Journal:
    topo = load(config)
    return Journal(journal_path(topo.state_dir(), topo.site.name))


def with_history(config: Path) -> None:
    j = journal_of(config)
    rid = j.create_release("web-prod", "2.0", "1.0", "bluegreen", [{"id": "preflight"}])
    j.add_outputs(rid, [OutputRow(0, "a1", ["appctl", "deploy"], 0, 0.5, "ok")])
    j.add_event(rid, "info", "hello")
    j.set_state(rid, J.DONE)
    j.close()


def test_export_then_import_into_an_empty_sqlite_journal(tmp_path: Path) -> None:
    source, target = config_at(tmp_path / "a"), config_at(tmp_path / "b")
    with_history(source)
    export = tmp_path / "h.jsonl"
    assert cli("journal", "export", str(export), "-c", str(source))[0] == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert lines[0]["format"] == "changeover-journal" and lines[0]["site"] == "web-prod"
    assert [r["type"] for r in lines[1:]] == ["release", "step", "output", "event"]
    code, text = cli("journal", "import", str(export), "-c", str(target))
    assert code == 0 and "imported 1 release(s) of site web-prod" in text, text
    for command in (["history", "--json"], ["show", "1", "--json"]):
        assert cli(*command, "-c", str(target)) == cli(*command, "-c", str(source))


def test_import_over_history_is_refused_unless_forced(tmp_path: Path) -> None:
    source = config_at(tmp_path / "a")
    with_history(source)
    export = tmp_path / "h.jsonl"
    assert cli("journal", "export", str(export), "-c", str(source))[0] == 0
    code, text = cli("journal", "import", str(export), "-c", str(source))
    assert code == 3, text
    assert "the journal already holds 1 release(s) of the site" in text, text
    assert "use --force to replace it" in text
    code, text = cli("journal", "import", str(export), "--force", "-c", str(source))
    assert code == 0, text
    assert [r.id for r in journal_of(source).releases("web-prod")] == [1]


def test_import_is_refused_while_a_release_holds_the_lock(tmp_path: Path) -> None:
    source = config_at(tmp_path / "a")
    with_history(source)
    export = tmp_path / "h.jsonl"
    assert cli("journal", "export", str(export), "-c", str(source))[0] == 0
    holder = journal_of(source)
    holder.acquire("web-prod", 1)  # this process runs: the lock is not stale
    code, text = cli("journal", "import", str(export), "--force", "-c", str(source))
    assert code == 3 and "holds the site's release lock" in text, text
    holder.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "empty"),
        ("not json\n", ":1: not JSON"),
        ('{"format": "other"}\n', "not a changeover journal export"),
        ('{"format": "changeover-journal", "version": 9, "site": "web-prod"}\n', "version 9"),
        ('{"format": "changeover-journal", "version": 1, "site": "shop"}\n', "site 'shop'"),
        (
            '{"format": "changeover-journal", "version": 1, "site": "web-prod"}\n'
            '{"type": "event", "release_id": 4, "at": 1.0, "kind": "i", "message": "m"}\n',
            ":2: a event of release #4, which the file does not hold",
        ),
        (
            '{"format": "changeover-journal", "version": 1, "site": "web-prod"}\n'
            '{"type": "release", "id": 1}\n',
            ":2: a release needs exactly",
        ),
    ],
)
def test_a_file_that_is_not_an_export_of_this_site_is_refused_naming_it(
    tmp_path: Path, content: str, why: str
) -> None:
    config = config_at(tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code, text = cli("journal", "import", str(bad), "-c", str(config))
    assert code == 2 and str(bad) in text and why in text, text
    assert journal_of(config).releases("web-prod") == []
