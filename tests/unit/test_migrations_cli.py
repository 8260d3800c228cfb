"""`changeover migrations check`: exit codes, formats, --allow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover.migrations.cli import app

DATA = Path(__file__).parent.parent / "data" / "migrations"
BAD = DATA / "postgres" / "ban-drop-column.bad.sql"
GOOD = DATA / "postgres" / "renaming-column.good.sql"

runner = CliRunner()


def check(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["check", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_clean_exits_0() -> None:
    code, out, _ = check(GOOD)
    assert (code, out.strip()) == (0, "no findings")


def test_findings_exit_1_with_file_line_rule_and_alternative() -> None:
    code, out, _ = check(BAD)
    assert code == 1
    assert f"{BAD}:3: error [ban-drop-column]" in out
    assert "instead:" in out


def test_phase_contract_lets_compatibility_rules_pass() -> None:
    assert check(BAD, "--phase", "contract")[0] == 0


def test_phase_defaults_to_the_file_name(tmp_path: Path) -> None:
    contract = tmp_path / "0009_contract_drop.sql"
    contract.write_text(BAD.read_text())
    assert check(contract)[0] == 0
    assert check(contract, "--phase", "expand")[0] == 1


def test_transactions_per_file_by_default_or_per_statement() -> None:
    held = DATA / "postgres" / "transaction-holds-lock.bad.sql"
    code, out, _ = check(held)
    assert code == 1 and "[transaction-holds-lock]" in out
    assert check(held, "--transactions", "per-statement")[0] == 0
    assert check(held, "--transactions", "per-file")[0] == 1


def test_allow_refuses_the_unparseable_statement_rule() -> None:
    unparseable = DATA / "postgres" / "unparseable-statement.bad.sql"
    code, _, err = check(unparseable, "--allow", "unparseable-statement")
    assert code == 2 and "cannot accept unparseable-statement" in err
    assert check(unparseable, "--allow", "needs-review")[0] == 1


def test_directory_and_dialect() -> None:
    code, out, _ = check(DATA / "sqlite", "--dialect", "sqlite", "--format", "json")
    assert code == 1
    found = {(Path(f["path"]).name, f["rule"]) for f in json.loads(out)}
    assert ("renaming-table.bad.sql", "renaming-table") in found
    assert not any(".good" in name for name, _ in found)


def test_allow_accepts_a_rule_and_says_so() -> None:
    code, out, err = check(BAD, "--allow", "ban-drop-column")
    assert (code, out.strip()) == (0, "no findings")
    assert "1 finding(s) allowed" in err


def test_allow_only_the_named_rule() -> None:
    both = DATA / "postgres" / "require-lock-timeout.bad.sql"
    assert check(BAD, both, "--allow", "ban-drop-column")[0] == 1


@pytest.mark.parametrize(
    "args",
    [
        ["missing.sql"],
        [str(BAD), "--allow", "no-such-rule"],
        [str(BAD), "--dialect", "oracle"],
        [str(BAD), "--format", "xml"],
        [],
    ],
)
def test_bad_input_exits_2(args: list[str]) -> None:
    result = runner.invoke(app, ["check", *args])
    assert result.exit_code == 2


def test_bad_input_message_is_one_line(tmp_path: Path) -> None:
    code, out, err = check(tmp_path / "missing.sql")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: no such migration file")


def test_non_utf8_file_exits_2(tmp_path: Path) -> None:
    latin1 = tmp_path / "0001_expand.sql"
    latin1.write_bytes("-- café\n".encode("latin-1"))
    assert check(latin1)[0] == 2


def test_formats_parse() -> None:
    code, out, _ = check(BAD, "--format", "json")
    assert code == 1 and json.loads(out)[0]["rule"] == "ban-drop-column"
    code, out, _ = check(BAD, "--format", "sarif")
    sarif = json.loads(out)
    assert code == 1 and sarif["version"] == "2.1.0"
    assert sarif["runs"][0]["results"][0]["ruleId"] == "ban-drop-column"
    code, out, _ = check(GOOD, "--format", "sarif")
    assert code == 0 and json.loads(out)["runs"][0]["results"] == []
