"""The migration safety analyser: every rule's failing and safe example, lines, phases."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover.migrations import (
    RULES,
    Dialect,
    Finding,
    Phase,
    Transactions,
    analyse,
    blocking_findings,
    check_paths,
    format_findings,
    phase_of,
)

DATA = Path(__file__).parent.parent / "data" / "migrations"
EXAMPLES = sorted(DATA.glob("*/*.sql"))
LOCK = "SET lock_timeout = '2s'; SET statement_timeout = '5s';\n"
# First words of the statements the bad examples are flagged at.
STATEMENT_WORDS = {
    *("ALTER", "DROP", "CREATE", "DO", "RENAME", "VACUUM", "UPDATE", "TRUNCATE", "REINDEX"),
}


def rules(findings: list[Finding]) -> list[str]:
    return [f.rule for f in findings]


def rerunnable(findings: list[Finding]) -> list[str]:
    """The rules, but for non-idempotent-ddl (files with CONCURRENTLY run as written)."""
    return [f.rule for f in findings if f.rule != "non-idempotent-ddl"]


def pg(sql: str, phase: Phase = "expand") -> list[Finding]:
    return analyse(sql, dialect="postgres", phase=phase)


def example_rule(path: Path) -> str:
    return path.name.split(".")[0]  # <rule>.bad.sql, <rule>.good.sql, <rule>.good-contract.sql


# --- the examples: one failing and one safe file per rule ----------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example(path: Path) -> None:
    dialect: Dialect = path.parent.name  # type: ignore[assignment]
    findings = check_paths([path], dialect=dialect)
    if ".bad." in path.name:
        assert rules(findings) == [example_rule(path)]
        (finding,) = findings
        assert finding.path == str(path)
        assert finding.message and finding.safe_alternative
        assert finding.severity == RULES[finding.rule].severity
        # The finding points at the statement's first line, past comments and SET.
        first_word = path.read_text().splitlines()[finding.line - 1].split()[0].rstrip(";")
        assert first_word.upper() in STATEMENT_WORDS
    else:
        assert findings == []


MYSQL_ONLY = {"mysql-algorithm-copy", "mysql-lock-exclusive"}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_has_a_failing_and_a_safe_example_in_its_dialect(rule: str) -> None:
    dialect = "mysql" if rule in MYSQL_ONLY else "postgres"
    names = {p.name for p in EXAMPLES if p.parent.name == dialect}
    assert f"{rule}.bad.sql" in names
    assert f"{rule}.good.sql" in names or f"{rule}.good-contract.sql" in names


@pytest.mark.parametrize(
    "path",
    [p for p in EXAMPLES if ".bad." in p.name],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_contract_phase_keeps_only_locking_rules(path: Path) -> None:
    rule = example_rule(path)
    dialect: Dialect = path.parent.name  # type: ignore[assignment]
    findings = analyse(path.read_text(), dialect=dialect, phase="contract")
    assert rules(findings) == ([rule] if "contract" in RULES[rule].phases else [])


def test_the_docs_describe_every_rule() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "migrations.md").read_text()
    assert [rule for rule in RULES if f"| `{rule}`" not in docs] == []
    anchors = docs[docs.index("### Where each rule comes from") :].split("\n### ")[0]
    assert [rule for rule in RULES if f"`{rule}`" not in anchors] == []


def test_compatibility_rules_are_expand_only_and_locking_rules_apply_to_both() -> None:
    expand_only = {r.id for r in RULES.values() if r.phases == {"expand"}}
    assert expand_only == {
        "ban-drop-column",
        "ban-drop-table",
        "ban-drop-object",
        "renaming-column",
        "renaming-table",
        "renaming-object",
        "renaming-enum-value",
        "adding-required-field",
        "ban-drop-not-null",
        "dropping-required-field-default",
        "adding-json-field",
        "adding-enum-value-out-of-order",
        "adding-unique-index",
    }
    assert all(
        r.phases == {"expand", "contract"} for r in RULES.values() if r.id not in expand_only
    )


# --- line numbers --------------------------------------------------------------

MULTI = """\
-- héllo: a comment with non-ASCII text, so byte and character offsets differ
SET lock_timeout = '2s'; SET statement_timeout = '5s';

/* a block
   comment */
ALTER TABLE users
    DROP COLUMN nickname;   -- line 6
SELECT 'ünïcode; not a separator';
ALTER TABLE users RENAME COLUMN a TO b; ALTER TABLE users RENAME TO accounts;
CREATE INDEX users_email ON users (email);
"""


def test_lines_in_a_multi_statement_file() -> None:
    findings = pg(MULTI)
    assert [(f.rule, f.line) for f in findings] == [
        ("ban-drop-column", 6),
        ("renaming-column", 9),
        ("renaming-table", 9),
        ("require-concurrent-index-creation", 10),
    ]
    assert findings[0].statement == "ALTER TABLE users DROP COLUMN nickname"


def test_a_syntax_error_does_not_hide_the_other_statements() -> None:
    sql = LOCK + "ALTER TABLE users DROP COLUMN a;\nALTER TABLE WHAT;\n\nDROP TABLE b;\n"
    assert [(f.rule, f.line) for f in pg(sql)] == [
        ("ban-drop-column", 2),
        ("unparseable-statement", 3),
        ("ban-drop-table", 5),
    ]


def test_semicolons_in_strings_do_not_split_after_a_syntax_error() -> None:
    sql = LOCK + "SELECT $$;;$$, ';';\nBOGUS;\nDROP TABLE b;"
    expected = [("unparseable-statement", 3), ("ban-drop-table", 4)]
    assert [(f.rule, f.line) for f in pg(sql)] == expected


@pytest.mark.parametrize("sql", ["SELECT 'unterminated", "DROP TABLE a;\0DROP TABLE b;"])
def test_unsplittable_files_are_one_unparseable_statement(sql: str) -> None:
    assert rules(pg(sql)) == ["unparseable-statement"]


@pytest.mark.parametrize("dialect", ["postgres", "mysql", "sqlite"])
def test_no_blanket_allow_accepts_an_unparseable_statement(dialect: Dialect) -> None:
    sql = "ALTER TABLE users ADD COLUMN nickname text\nDROP TABLE users;\n\\i other.sql"
    findings = analyse(sql, dialect=dialect, phase="expand")
    assert "unparseable-statement" in rules(findings)
    everything = list(RULES)
    assert rules(blocking_findings(findings, everything)) == ["unparseable-statement"] * len(
        [f for f in findings if f.rule == "unparseable-statement"]
    )
    assert blocking_findings(findings, []) == findings


def test_mysql_and_sqlite_lines() -> None:
    sql = "-- c\nALTER TABLE a DROP COLUMN x;\n\nSELEC oops;\nALTER TABLE a\n  RENAME TO b;\n"
    for dialect in ("mysql", "sqlite"):
        findings = analyse(sql, dialect=dialect, phase="expand")
        assert [(f.rule, f.line) for f in findings] == [
            ("ban-drop-column", 2),
            ("needs-review", 4),
            ("renaming-table", 5),
        ]


# --- objects created in the same file are new ------------------------------------


def test_operations_on_tables_created_in_the_same_file_are_safe() -> None:
    sql = """
        CREATE TABLE invoices (id bigint, note varchar(10), total numeric);
        CREATE INDEX invoices_note ON invoices (note);
        ALTER TABLE invoices ADD CONSTRAINT invoices_total CHECK (total >= 0);
        ALTER TABLE invoices ALTER COLUMN id TYPE text, ALTER COLUMN note SET NOT NULL;
        ALTER TABLE invoices ADD COLUMN code text NOT NULL;
        ALTER TABLE invoices RENAME COLUMN note TO memo;
        DROP INDEX invoices_note;
        DROP TABLE invoices;
    """
    assert pg(sql) == []


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # The object may already exist (and be used by the old release): not new.
        ("CREATE TABLE IF NOT EXISTS users (id int);\nDROP TABLE users;", ["ban-drop-table"]),
        ("CREATE OR REPLACE VIEW v AS SELECT 1;\nDROP VIEW v;", ["ban-drop-object"]),
        (
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;\n"
            "DROP FUNCTION f();",
            ["ban-drop-object"],
        ),
        (
            "CREATE INDEX IF NOT EXISTS i ON t (a);\nDROP INDEX i;",
            ["require-concurrent-index-deletion"],
        ),
        # Another schema's table of the same name is another table.
        ("CREATE TABLE scratch.users (id int);\nDROP TABLE public.users;", ["ban-drop-table"]),
        ("CREATE TABLE scratch.users (id int);\nDROP TABLE users;", ["ban-drop-table"]),
        (
            "CREATE TABLE users (id int);\nSET search_path = other;\nDROP TABLE users;",
            ["ban-drop-table"],
        ),
        ("CREATE TABLE scratch.users (id int);\nDROP TABLE scratch.users;", []),
        ("CREATE TABLE users (id int);\nDROP TABLE users;", []),
        ("CREATE INDEX i ON s.t (a);\nDROP INDEX s.i;", None),
        ("CREATE TRIGGER tr AFTER INSERT ON t EXECUTE FUNCTION f();\nDROP TRIGGER tr ON t;", None),
    ],
)
def test_created_in_this_file_means_created_here_under_that_name(
    sql: str, expected: list[str] | None
) -> None:
    found = [r for r in rules(pg(LOCK + sql)) if r != "require-concurrent-index-creation"]
    if expected is None:  # only the index build / trigger itself, nothing about the drop
        assert not [r for r in found if "drop" in r or "deletion" in r], found
    else:
        assert found == expected


def test_concurrently_in_a_transaction_fails_even_on_a_new_table() -> None:
    sql = "CREATE TABLE t (a int);\nBEGIN;\nCREATE INDEX CONCURRENTLY t_a ON t (a);\nCOMMIT;"
    assert rerunnable(pg(sql)) == ["ban-concurrent-index-creation-in-transaction"]


def test_new_tables_are_per_file(tmp_path: Path) -> None:
    (tmp_path / "0001_expand.sql").write_text("CREATE TABLE t (a int);")
    (tmp_path / "0002_expand.sql").write_text(LOCK + "ALTER TABLE t DROP COLUMN a;")
    assert rules(check_paths([tmp_path], dialect="postgres")) == ["ban-drop-column"]


# --- transactions: a file applied in one transaction holds its locks to the end ---------

NOT_VALID_THEN_VALIDATE = (
    "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total >= 0) NOT VALID;\n"
    "ALTER TABLE orders VALIDATE CONSTRAINT positive;"
)
SET_NOT_NULL_SEQUENCE = (
    "ALTER TABLE users ADD CONSTRAINT nn CHECK (email IS NOT NULL) NOT VALID;\n"
    "ALTER TABLE users VALIDATE CONSTRAINT nn;\n"
    "ALTER TABLE users ALTER COLUMN email SET NOT NULL;"
)
ADD_THEN_BACKFILL = "ALTER TABLE users ADD COLUMN nick text;\nUPDATE users SET nick = name;"


@pytest.mark.parametrize(
    "sql",
    [
        NOT_VALID_THEN_VALIDATE,
        SET_NOT_NULL_SEQUENCE,
        ADD_THEN_BACKFILL,
        "ALTER TABLE t ADD COLUMN c int;\nDELETE FROM u WHERE old;",
        "ALTER TABLE t ADD COLUMN c int;\nINSERT INTO u SELECT * FROM v;",
        # A foreign key locks both tables against writes while the backfill runs.
        "ALTER TABLE o ADD CONSTRAINT fk FOREIGN KEY (u) REFERENCES users (id) NOT VALID;\n"
        "UPDATE o SET n = 1;",
        "CREATE INDEX i ON t (a);\nUPDATE u SET n = 1;",  # plus its own finding
        # COMMIT AND CHAIN opens the next transaction at once, so this is still one.
        "BEGIN;\nSELECT 1;\nCOMMIT AND CHAIN;\nALTER TABLE t ADD c int;\nUPDATE t SET c = 1;\n"
        "COMMIT;",
    ],
)
def test_a_slow_statement_under_a_lock_held_since_an_earlier_statement(sql: str) -> None:
    findings = pg(LOCK + sql)
    held = [f for f in findings if f.rule == "transaction-holds-lock"]
    assert len(held) == 1
    slow = (LOCK + sql).splitlines()[held[0].line - 1]
    assert slow.split()[0] in {"UPDATE", "DELETE", "INSERT"} or "VALIDATE" in slow
    assert "lock on" in held[0].message and "taken at line" in held[0].message
    assert "split the file" in held[0].safe_alternative


@pytest.mark.parametrize(
    "sql",
    [
        # Split by the file's own transaction statements: each part commits on its own.
        "BEGIN;\n" + NOT_VALID_THEN_VALIDATE.replace(";\n", ";\nCOMMIT;\n", 1),
        "BEGIN;\n" + ADD_THEN_BACKFILL.replace(";\n", ";\nCOMMIT;\n", 1),
        # CONCURRENTLY makes changeover's applier run the file statement by statement.
        "CREATE INDEX CONCURRENTLY i ON t (a);\n" + ADD_THEN_BACKFILL,
        # The lock is on a table this file created: nobody else reads it.
        "CREATE TABLE n (a int);\nALTER TABLE n ADD COLUMN b int;\nUPDATE n SET b = a;",
        # VALIDATE alone takes SHARE UPDATE EXCLUSIVE: it blocks neither reads nor writes.
        "ALTER TABLE orders VALIDATE CONSTRAINT positive;\nUPDATE orders SET n = 1;",
        "ALTER TABLE t ADD COLUMN c int;\nINSERT INTO u VALUES (1);",  # no backfill
        "UPDATE users SET nick = name;\nALTER TABLE users ADD COLUMN nick2 text;",
    ],
)
def test_no_held_lock_when_the_slow_statement_runs_in_a_transaction_of_its_own(sql: str) -> None:
    assert "transaction-holds-lock" not in rules(pg(LOCK + sql))


@pytest.mark.parametrize("sql", [NOT_VALID_THEN_VALIDATE, SET_NOT_NULL_SEQUENCE, ADD_THEN_BACKFILL])
def test_per_statement_runners_do_not_hold_locks_across_statements(sql: str) -> None:
    findings = analyse(LOCK + sql, dialect="postgres", phase="expand", transactions="per-statement")
    assert findings == []


@pytest.mark.parametrize(
    ("check", "flagged"), [("c IS NOT NULL AND c <> ''", False), ("c <> ''", True)]
)
def test_set_not_null_after_a_validated_check_that_proves_not_null(
    tmp_path: Path, check: str, flagged: bool
) -> None:
    (tmp_path / "0001.sql").write_text(
        f"{LOCK}ALTER TABLE t ADD CONSTRAINT k CHECK ({check}) NOT VALID;"
    )
    (tmp_path / "0002.sql").write_text(
        f"{LOCK}ALTER TABLE t VALIDATE CONSTRAINT k;\nALTER TABLE t ALTER COLUMN c SET NOT NULL;"
    )
    findings = check_paths([tmp_path], dialect="postgres")
    assert rules(findings) == (["adding-not-nullable-field"] if flagged else [])


def test_commit_and_chain_keeps_concurrently_inside_a_transaction() -> None:
    sql = "BEGIN;\nCOMMIT AND CHAIN;\nCREATE INDEX CONCURRENTLY i ON t (a);\nCOMMIT;"
    assert rerunnable(pg(sql)) == ["ban-concurrent-index-creation-in-transaction"]


@pytest.mark.parametrize(
    ("sql", "flagged"),
    [
        ("CREATE INDEX CONCURRENTLY i ON t (a);", True),
        ("CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a);", False),
        ("DROP INDEX CONCURRENTLY i;", True),
        ("DROP INDEX CONCURRENTLY IF EXISTS i;", False),
        ("BEGIN;\nALTER TABLE t ADD COLUMN c int;\nCOMMIT;", True),
        ("BEGIN;\nALTER TABLE t ADD COLUMN IF NOT EXISTS c int;\nCOMMIT;", False),
        ("BEGIN;\nALTER TABLE t DROP COLUMN c;\nCOMMIT;", True),
        ("BEGIN;\nCREATE TABLE n (a int);\nCOMMIT;", True),
        ("BEGIN;\nCREATE OR REPLACE VIEW v AS SELECT 1;\nCOMMIT;", False),
        ("ALTER TYPE e ADD VALUE 'x';\nVACUUM t;", True),
        # Applied in one transaction: never half applied, so safe to run again.
        ("ALTER TABLE t ADD COLUMN c int;", False),
        ("CREATE TABLE n (a int);\nDROP TABLE n;", False),
    ],
)
def test_files_run_as_written_must_be_safe_to_run_again(sql: str, flagged: bool) -> None:
    found = rules(pg(LOCK + sql))
    assert ("non-idempotent-ddl" in found) == flagged, found


# --- lock_timeout ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prelude", "flagged"),
    [
        ("", True),
        ("SET lock_timeout = '2s';", False),
        ("SET lock_timeout TO 2000;", False),
        ("SET SESSION lock_timeout = '1min';", False),
        ("SET lock_timeout = 0;", True),
        ("SET lock_timeout = '0s';", True),
        ("SET lock_timeout = '2s'; RESET lock_timeout;", True),
        ("SET lock_timeout = '2s'; SET lock_timeout TO DEFAULT;", True),
        ("SET statement_timeout = '2s';", True),
        # changeover applies a plain file in one transaction: SET LOCAL lasts to its end.
        ("SET LOCAL lock_timeout = '2s';", False),
        ("SET lock_timeout = '2s'; RESET ALL;", True),
        ("SELECT set_config('lock_timeout', '2s', false);", False),
        ("SELECT set_config('lock_timeout', '0', false);", True),
        ("BEGIN; SELECT set_config('lock_timeout', '2s', true); COMMIT;", True),
        ("BEGIN; SET LOCAL lock_timeout = '2s'; COMMIT;", True),  # ended with it
        ("BEGIN; SET LOCAL lock_timeout = '2s';", False),
    ],
)
def test_lock_timeout(prelude: str, flagged: bool) -> None:
    findings = pg(prelude + "\nALTER TABLE users ADD COLUMN bio text;")
    lock = [r for r in rules(findings) if r == "require-lock-timeout"]
    assert lock == (["require-lock-timeout"] if flagged else [])


@pytest.mark.parametrize(
    ("prelude", "flagged"),
    [
        ("SET lock_timeout = '2s';", True),
        ("SET statement_timeout = '5s';", False),
        ("SET statement_timeout = 0;", True),
        ("SET statement_timeout = '5s'; RESET ALL;", True),
        ("SELECT set_config('statement_timeout', '5s', false);", False),
        ("BEGIN; SET LOCAL statement_timeout = '5s'; COMMIT;", True),
    ],
)
def test_statement_timeout(prelude: str, flagged: bool) -> None:
    findings = pg(prelude + "\nALTER TABLE users ADD COLUMN bio text;")
    timed = [r for r in rules(findings) if r == "require-statement-timeout"]
    assert timed == (["require-statement-timeout"] if flagged else [])


def test_set_local_does_not_count_when_each_statement_commits_on_its_own() -> None:
    sql = "SET LOCAL lock_timeout = '2s';\nALTER TABLE users ADD COLUMN bio text;"
    findings = analyse(sql, dialect="postgres", phase="expand", transactions="per-statement")
    assert "require-lock-timeout" in rules(findings)


def test_lock_timeout_is_reported_once_per_file() -> None:
    sql = "ALTER TABLE a ADD COLUMN x int;\nALTER TABLE b ADD COLUMN y int;"
    assert [(f.rule, f.line) for f in pg(sql)] == [
        ("require-lock-timeout", 1),
        ("require-statement-timeout", 1),
    ]


def test_new_objects_and_concurrent_indexes_need_no_lock_timeout() -> None:
    # CONCURRENTLY takes a lock that does not conflict with reads and writes.
    sql = "CREATE TABLE t (a int);\nALTER TABLE t ADD COLUMN b int;\n"
    sql += "CREATE INDEX CONCURRENTLY i ON u (a);"
    assert rerunnable(pg(sql)) == []


# --- type changes: known-safe widenings need the old type ---------------------------


@pytest.mark.parametrize(
    ("dialect", "old", "new", "safe"),
    [
        ("postgres", "varchar(10)", "varchar(20)", True),
        ("postgres", "varchar(20)", "varchar(10)", False),
        ("postgres", "varchar(20)", "varchar", True),
        ("postgres", "varchar(20)", "text", True),
        ("postgres", "text", "varchar", True),
        ("postgres", "text", "varchar(10)", False),
        ("postgres", "numeric(10,2)", "numeric(12,2)", True),
        ("postgres", "numeric(10,2)", "numeric(12,3)", False),
        ("postgres", "numeric(10,2)", "numeric", True),
        ("postgres", "integer", "bigint", False),
        ("postgres", "cidr", "inet", True),
        ("postgres", "timestamp(3)", "timestamp(6)", True),
        ("postgres", "timestamp(3)", "timestamp", True),
        ("postgres", "timestamp", "timestamp(3)", False),
        ("postgres", "timestamptz(0)", "timestamptz(3)", True),
        ("postgres", "timestamp(3)", "timestamptz(3)", False),
        ("postgres", "time(1)", "time(4)", True),
        ("postgres", "timetz(4)", "timetz(1)", False),
        ("postgres", "interval(2)", "interval(5)", True),
        ("postgres", "interval day to second(2)", "interval", True),
        ("postgres", "interval(5)", "interval(2)", False),
        ("postgres", "citext", "text", True),
        ("postgres", "text", "citext", False),
        ("postgres", "text[]", "text", False),
        ("mysql", "varchar(20)", "varchar(50)", True),
        ("mysql", "varchar(50)", "varchar(100)", False),  # may cross the 255-byte boundary
        ("mysql", "varchar(300)", "varchar(500)", True),
        ("mysql", "varchar(20)", "text", False),
        ("mysql", "decimal(10,2)", "decimal(12,2)", False),  # MySQL copies the table
        ("mysql", "enum('a','b')", "enum('a','b','c')", True),
        ("mysql", "enum('a','b','c')", "enum('a','c')", False),
    ],
)
def test_type_change(tmp_path: Path, dialect: Dialect, old: str, new: str, safe: bool) -> None:
    (tmp_path / "0001_create.sql").write_text(f"CREATE TABLE t (c {old});")
    change = (
        f"{LOCK}ALTER TABLE t ALTER COLUMN c TYPE {new};"
        if dialect == "postgres"
        else f"ALTER TABLE t MODIFY COLUMN c {new};"
    )
    (tmp_path / "0002_expand.sql").write_text(change)
    findings = check_paths([tmp_path], dialect=dialect)
    assert rules(findings) == ([] if safe else ["changing-column-type"])


def test_unknown_old_type_is_flagged_and_says_so() -> None:
    (finding,) = pg(LOCK + "ALTER TABLE users ALTER COLUMN name TYPE text;")
    assert finding.rule == "changing-column-type"
    assert "old type not declared" in finding.message


def test_mysql_modify_to_not_null_of_a_known_nullable_column(tmp_path: Path) -> None:
    (tmp_path / "0001.sql").write_text("CREATE TABLE t (c varchar(10) NULL);")
    (tmp_path / "0002.sql").write_text("ALTER TABLE t MODIFY c varchar(10) NOT NULL;")
    assert rules(check_paths([tmp_path], dialect="mysql")) == ["adding-not-nullable-field"]


def test_mysql_change_is_a_rename_and_a_redefinition() -> None:
    findings = analyse("ALTER TABLE t CHANGE a b int;", dialect="mysql", phase="expand")
    assert rules(findings) == ["renaming-column", "changing-column-type"]


# --- PostgreSQL details ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("ALTER TABLE t ADD COLUMN c timestamptz DEFAULT now()", []),  # stable: no rewrite
        ("ALTER TABLE t ADD COLUMN c float8 DEFAULT random()", ["adding-field-with-default"]),
        ("ALTER TABLE t ADD COLUMN c bigserial", ["adding-field-with-default"]),
        (
            "ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS IDENTITY",
            ["adding-field-with-default"],
        ),
        (
            "ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a * 2) STORED",
            ["adding-field-with-default"],
        ),
        ("ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a * 2) VIRTUAL", []),
        ("ALTER TABLE t ADD COLUMN c int REFERENCES u (id)", ["adding-foreign-key-constraint"]),
        ("ALTER TABLE t ADD COLUMN c int UNIQUE", ["disallowed-unique-constraint"]),
        ("ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 0", []),
        ("ALTER TABLE t ALTER COLUMN c DROP NOT NULL", ["ban-drop-not-null"]),
        ("ALTER TABLE t ALTER COLUMN c SET DEFAULT 1", []),
        ("ALTER TABLE t ADD CONSTRAINT c NOT NULL c", ["adding-not-nullable-field"]),
        ("ALTER TABLE t SET SCHEMA archive", ["renaming-object"]),
        ("ALTER INDEX i RENAME TO j", []),
        ("ALTER VIEW v RENAME TO w", ["renaming-object"]),
        ("DROP TYPE order_status", ["ban-drop-object"]),
        ("DROP INDEX a, b", ["require-concurrent-index-deletion"] * 2),
        ("ALTER TABLE t SET TABLESPACE slow", ["needs-review"]),  # rewrites: not classified
        ("VACUUM FULL t", ["prefer-repack"]),
        ("VACUUM t", []),
        ("CLUSTER t USING i", ["prefer-repack"]),
        # REPACK (PostgreSQL 19) is recognised before parsing: pglast's grammar lacks it.
        ("REPACK (CONCURRENTLY) t", []),
        ("REPACK (VERBOSE, CONCURRENTLY true) s.t (a) USING INDEX i", []),
        ("REPACK t", ["prefer-repack"]),
        ("REPACK (CONCURRENTLY false) t USING INDEX", ["prefer-repack"]),
        ("REPACK", ["prefer-repack"]),  # every table
        ("REPACK (CONCURRENTLY)", ["unparseable-statement"]),  # PostgreSQL refuses it
        ("REPACK (FULL) t", ["unparseable-statement"]),
        ("REPACK t DROP TABLE u", ["unparseable-statement"]),  # a missing semicolon
        ("REPACK /* why */ t", ["unparseable-statement"]),
        ("ALTER TABLE t ALTER COLUMN c DROP DEFAULT", ["dropping-required-field-default"]),
        ("TRUNCATE t", []),  # brief ACCESS EXCLUSIVE, under the lock_timeout
        ("REINDEX TABLE CONCURRENTLY t", []),
        ("ALTER TABLE t ADD COLUMN c int DEFAULT my_fn()", ["adding-field-with-default"]),
        ("ALTER TABLE t ADD COLUMN c text DEFAULT lower('A')", []),
        (
            "ALTER TABLE t ADD COLUMN c text DEFAULT myschema.lower('A')",
            ["adding-field-with-default"],
        ),
        ("ALTER TABLE t ADD COLUMN c timestamptz DEFAULT CURRENT_TIMESTAMP", []),
        ("ALTER TABLE t ADD COLUMN c text DEFAULT 'x'::text", []),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$", []),
        ("COMMENT ON TABLE t IS 'x'", []),
    ],
)
def test_postgres_statement(statement: str, expected: list[str]) -> None:
    assert rules(pg(LOCK + statement + ";")) == expected


ADD_X = "ALTER TYPE s ADD VALUE IF NOT EXISTS 'x';\n"


@pytest.mark.parametrize(
    ("sql", "per_file", "per_statement"),
    [
        (ADD_X, [], []),  # PostgreSQL 12+ accepts ADD VALUE in a transaction
        (f"BEGIN;\n{ADD_X}COMMIT;", [], []),
        (f"BEGIN;\n{ADD_X}INSERT INTO t VALUES ('x');\nCOMMIT;", ["x"], ["x"]),
        (f"BEGIN;\n{ADD_X}COMMIT;\nINSERT INTO t VALUES ('x');", [], []),  # committed
        (f"{ADD_X}SELECT 'x'::s;", ["x"], []),  # the applier's transaction
        (f"{ADD_X}INSERT INTO t VALUES ('y');", [], []),  # another label
        (f"{ADD_X}CREATE INDEX CONCURRENTLY i ON t (c);\nSELECT 'x'::s;", [], []),  # as written
    ],
)
def test_a_new_enum_value_used_before_its_transaction_commits(
    sql: str, per_file: list[str], per_statement: list[str]
) -> None:
    rule = "adding-enum-value-in-transaction"
    cases: list[tuple[Transactions, list[str]]] = [
        ("per-file", per_file),
        ("per-statement", per_statement),
    ]
    for transactions, expected in cases:
        findings = analyse(
            LOCK + sql, dialect="postgres", phase="expand", transactions=transactions
        )
        assert [f.message.split("'")[1] for f in findings if f.rule == rule] == expected


def test_repack_concurrently_refuses_a_transaction_block() -> None:
    assert rules(pg(LOCK + "BEGIN; REPACK (CONCURRENTLY) t; COMMIT;")) == [
        "ban-concurrent-index-creation-in-transaction"
    ]
    # It makes the file run as written, as CREATE INDEX CONCURRENTLY does.
    sql = LOCK + "REPACK (CONCURRENTLY) t;\nCREATE TABLE u (a int);"
    assert rules(pg(sql)) == ["non-idempotent-ddl"]
    assert rules(pg(LOCK + 'CREATE TABLE "T" (a int); REPACK "T";')) == []  # new: no reader


def test_changeovers_applier_cannot_apply_repack_yet() -> None:
    """As docs/migrations.md says: it splits files with pglast, which lacks REPACK."""
    from changeover.database import _split_postgres
    from changeover.ports import MigrationError

    with pytest.raises(MigrationError, match="parser rejects it"):
        _split_postgres("REPACK (CONCURRENTLY) t;", "0002_expand_repack.sql")


def test_calling_a_function_created_in_the_same_file_needs_review() -> None:
    body = "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ ALTER TABLE t DROP c $$;\n"
    assert rules(pg(LOCK + body + "SELECT f();")) == ["needs-review"]
    assert rules(pg(LOCK + body + "SELECT g();")) == []  # not created here: a query


def test_dropping_a_function_created_in_the_same_file_is_fine() -> None:
    sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;\nDROP FUNCTION f();"
    assert pg(sql) == []


# Statements whose trees hold every kind of node value the JSON carries: constants of
# each type, NULL list items, nested lists, enums, chars, renamed fields (def), one-type
# pointers (RangeVar, TypeName), CREATE FOREIGN TABLE's embedded CreateStmt, non-ASCII.
AST_CORPUS = (
    "SELECT 1, -2.5e3, 'ß', true, NULL, B'101', X'1f', 1::numeric(10, 2)",
    "SELECT DISTINCT a FROM t LEFT JOIN (SELECT DISTINCT id FROM u) AS u ON t.id = u.id",
    "INSERT INTO t (a, b) VALUES (1, 'x'), (2, DEFAULT) ON CONFLICT (a) DO NOTHING",
    "UPDATE t SET a = a + 1 FROM u WHERE t.id = u.id RETURNING *",
    "WITH x AS MATERIALIZED (SELECT * FROM t) DELETE FROM t USING x WHERE t.id = x.id",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b DESC NULLS LAST) FROM t",
    "SELECT * FROM generate_series(1, 10) AS g(i int)",
    "SELECT * FROM JSON_TABLE('[1]'::jsonb, '$[*]' COLUMNS (v int PATH '$'))",
    "DROP OPERATOR ~ (none, bit), ! (bigint, none)",
    "ALTER TABLE ONLY s.t ADD COLUMN IF NOT EXISTS c int NOT NULL DEFAULT 0 "
    "CONSTRAINT k CHECK (c > 0)",
    "ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u (id) ON DELETE CASCADE",
    "ALTER TABLE t ALTER COLUMN c TYPE bigint USING c::bigint, ALTER c SET STATISTICS 100",
    "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
    "ALTER TABLE p ATTACH PARTITION p2 FOR VALUES FROM (1) TO (10)",
    "CREATE TABLE p3 PARTITION OF p FOR VALUES IN (1, 2)",
    "CREATE UNLOGGED TABLE IF NOT EXISTS t (id bigserial PRIMARY KEY, j jsonb DEFAULT '{}', "
    "g int GENERATED ALWAYS AS (id * 2) STORED, UNIQUE NULLS NOT DISTINCT (j))",
    "CREATE FOREIGN TABLE ft (a int OPTIONS (column_name 'x')) SERVER s OPTIONS (n 'v')",
    "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t USING btree (lower(a) DESC) "
    "INCLUDE (b) WHERE b IS NOT NULL",
    "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'meh' BEFORE 'ok'",
    "ALTER DOMAIN d ADD CONSTRAINT k CHECK (VALUE > 0) NOT VALID",
    "CREATE TRIGGER tr BEFORE UPDATE OF a ON t FOR EACH ROW WHEN (OLD.a <> NEW.a) "
    "EXECUTE FUNCTION f()",
    "CREATE FUNCTION f(a int DEFAULT 1, OUT b text) RETURNS SETOF record LANGUAGE plpgsql "
    "AS $$ BEGIN RETURN; END $$",
    "DO $$ BEGIN PERFORM 1; END $$",
    "REINDEX (VERBOSE) TABLE CONCURRENTLY t",
    "VACUUM (FULL, ANALYZE) t (a)",
    "CLUSTER t USING i",
    "GRANT SELECT, UPDATE (a) ON t TO r WITH GRANT OPTION",
    "CREATE POLICY p ON t FOR SELECT USING (owner = current_user)",
    "SET LOCAL lock_timeout TO '2s'",
    "SELECT set_config('statement_timeout', '5s', false)",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "COMMIT AND CHAIN",
    "TRUNCATE a, b RESTART IDENTITY CASCADE",
    "COMMENT ON COLUMN t.c IS 'ünïcode'",
)


def _statements_of(sql: str) -> list[str]:
    """The statements of a file pglast parses (not the ones with REPACK, say)."""
    from pglast.parser import ParseError, split

    try:
        return [sql[piece] for piece in split(sql, with_parser=True, only_slices=True)]
    except ParseError:
        return []


PG_EXAMPLES = [p for p in EXAMPLES if p.parent.name == "postgres"]


@pytest.mark.parametrize(
    "statement",
    [*AST_CORPUS, *(s for p in PG_EXAMPLES for s in _statements_of(p.read_text()))],
)
def test_the_ast_from_the_parsers_json_is_pglasts(statement: str) -> None:
    """The classifiers read nodes built from the parser's JSON (pgjson), which must be
    pglast's own, attribute for attribute (pglast's equality skips only locations)."""
    from pglast import parse_sql
    from pglast.parser import parse_sql_json

    from changeover.migrations import pgjson

    # The fast path itself, not its fallback to pglast.
    built = pgjson._node(json.loads(parse_sql_json(statement))["stmts"][0]["stmt"])
    assert built == parse_sql(statement)[0].stmt


# --- MySQL and SQLite --------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "sql", "expected"),
    [
        ("mysql", "ALTER TABLE t DROP INDEX i, ADD INDEX j (a)", []),
        ("mysql", "ALTER TABLE t ALTER COLUMN a SET DEFAULT 1", []),
        (
            "mysql",
            "ALTER TABLE t ADD COLUMN a INT NOT NULL AUTO_INCREMENT",
            ["adding-field-with-default"],
        ),
        ("mysql", "ALTER TABLE t ADD COLUMN a INT, ALGORITHM=COPY", ["mysql-algorithm-copy"]),
        ("mysql", "ALTER TABLE t ALGORITHM=COPY", ["mysql-algorithm-copy"]),
        ("mysql", "ALTER TABLE t ADD COLUMN a INT, ALGORITHM=INPLACE, LOCK=NONE", []),
        ("mysql", "ALTER TABLE t ADD COLUMN a INT, LOCK=EXCLUSIVE", ["mysql-lock-exclusive"]),
        ("mysql", "ALTER TABLE t ADD COLUMN a INT, LOCK=SHARED", ["mysql-lock-exclusive"]),
        (
            "mysql",
            "ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES u (id)",
            ["adding-foreign-key-constraint"],
        ),
        (
            "mysql",
            "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (id)",
            ["adding-foreign-key-constraint"],
        ),
        ("mysql", "ALTER TABLE t ADD UNIQUE KEY k (a)", []),
        ("mysql", "FLUSH TABLES", ["needs-review"]),
        ("mysql", "RENAME TABLE `users` TO accounts", ["renaming-table"]),
        ("sqlite", "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END", ["needs-review"] * 2),
        ("sqlite", "PRAGMA foreign_keys = off", []),
        (
            "sqlite",
            "ALTER TABLE t ADD COLUMN a TEXT DEFAULT (randomblob(16))",
            ["adding-field-with-default"],
        ),
    ],
)
def test_mysql_and_sqlite_statement(dialect: Dialect, sql: str, expected: list[str]) -> None:
    assert rules(analyse(sql, dialect=dialect, phase="expand")) == expected


# --- phases and paths ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "phase"),
    [
        ("0003_expand_add_email.sql", "expand"),
        ("0007_contract_drop_old.sql", "contract"),
        ("contract-0007.sql", "contract"),
        ("0007_CONTRACT.sql", "contract"),
        ("0004_add_contractor.sql", "expand"),  # a word, not a substring
        ("0005_add_index.sql", "expand"),  # neither: the strict default
        ("0006_expand_then_contract.sql", "expand"),  # both: the strict reading
    ],
)
def test_phase_of(name: str, phase: Phase) -> None:
    assert phase_of(Path("migrations") / name) == phase


def test_check_paths_reads_directories_in_name_order_with_each_files_phase(tmp_path: Path) -> None:
    (tmp_path / "0002_contract_drop.sql").write_text(LOCK + "ALTER TABLE t DROP COLUMN a;")
    (tmp_path / "0001_expand_rename.sql").write_text(LOCK + "ALTER TABLE t RENAME a TO b;")
    (tmp_path / "notes.txt").write_text("DROP TABLE t;")
    findings = check_paths([tmp_path], dialect="postgres")
    assert [(Path(f.path).name, f.rule) for f in findings] == [
        ("0001_expand_rename.sql", "renaming-column")
    ]
    forced = check_paths([tmp_path], dialect="postgres", phase="expand")
    assert rules(forced) == ["renaming-column", "ban-drop-column"]


def test_check_paths_refuses_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_paths([tmp_path / "nope.sql"], dialect="postgres", phase="expand")


# --- output formats ---------------------------------------------------------------


def test_formats() -> None:
    findings = pg(MULTI, "expand")
    text = format_findings(findings, "text")
    assert "<sql>:6: error [ban-drop-column]" in text
    assert text.endswith("4 finding(s)")
    assert format_findings([], "text") == "no findings"

    records = json.loads(format_findings(findings, "json"))
    assert records[0] == {
        "rule": "ban-drop-column",
        "path": "<sql>",
        "line": 6,
        "statement": "ALTER TABLE users DROP COLUMN nickname",
        "message": findings[0].message,
        "safe_alternative": findings[0].safe_alternative,
        "severity": "error",
    }

    sarif = json.loads(format_findings(findings, "sarif"))
    assert sarif["version"] == "2.1.0"
    (run,) = sarif["runs"]
    rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert len(run["results"]) == 4
    for result in run["results"]:
        assert rule_ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] in ("error", "warning")
        region = result["locations"][0]["physicalLocation"]["region"]
        assert region["startLine"] >= 1
    assert json.loads(format_findings([], "sarif"))["runs"][0]["results"] == []


@pytest.mark.parametrize(
    ("path", "uri"),
    [
        ("migrations/0001 add #1.sql", "migrations/0001%20add%20%231.sql"),
        ("/srv/app/mig 100%.sql", "file:///srv/app/mig%20100%25.sql"),
        ("0002_expand.sql", "0002_expand.sql"),
    ],
)
def test_sarif_paths_are_uris(path: str, uri: str) -> None:
    finding = pg("DROP TABLE t;")[0]
    sarif = json.loads(format_findings([dataclasses.replace(finding, path=path)], "sarif"))
    location = sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == uri


# --- robustness -----------------------------------------------------------------------

# Words that drive the parsers and classifiers into their less travelled paths.
SQL_WORDS = (
    "ALTER TABLE DROP COLUMN ADD CREATE INDEX CONCURRENTLY ON t a b ( ) , ; ' $$ -- /* */ "
    "NOT NULL DEFAULT RENAME TO TYPE int varchar(3) BEGIN COMMIT SET lock_timeout = 0 "
    "MODIFY CHANGE ENUM UNIQUE PRIMARY KEY REFERENCES CHECK VALID \n"
)
# Fragments that often make whole statements, so the classifiers see real ASTs.
SQL_FRAGMENTS = (
    "ALTER TABLE t |ADD COLUMN c int |DEFAULT random() |NOT NULL |TYPE varchar(2) |"
    "ALTER COLUMN c |RENAME |TO x |; |BEGIN; |CONSTRAINT k |CHECK (c IS NOT NULL) |"
    "NOT VALID |VALIDATE CONSTRAINT k |SET NOT NULL |MODIFY c ENUM('a') |CHANGE c d int |"
    "DROP |INDEX |CONCURRENTLY |CREATE |TABLE t (c int) "
)
SQLISH = st.one_of(
    st.lists(st.sampled_from(SQL_WORDS.split(" ")), max_size=40).map(" ".join),
    st.lists(st.sampled_from(SQL_FRAGMENTS.split("|")), max_size=30).map("".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sql=st.one_of(st.text(max_size=200), SQLISH),
    dialect=st.sampled_from(["postgres", "mysql", "sqlite"]),
)
def test_any_text_yields_findings_or_nothing_never_an_exception(sql: str, dialect: Dialect) -> None:
    for finding in analyse(sql, dialect=dialect, phase="expand"):
        assert finding.rule in RULES
        assert 1 <= finding.line <= sql.count("\n") + 1
