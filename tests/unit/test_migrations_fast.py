"""The migration check's fast paths give what the slow ones give (issue 13's speed goal).

MySQL and SQLite files are tokenized a few statements at a time (`generic._windows`)
and plain `INSERT ... VALUES` statements are not parsed (`generic._plain_insert`);
both must change no finding.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp
from sqlglot.errors import ErrorLevel, TokenError

from changeover.migrations import Dialect, analyse, check_paths, generic
from changeover.migrations.analysis import FileState, Schema

DATA = Path(__file__).parent.parent / "data" / "migrations"

# Statements and pieces that are hard to split: `;` in strings, identifiers and
# comments, comments after a `;` on its line, escapes, unterminated things.
PIECES = (
    "INSERT INTO t (a, b) VALUES (1, 'x');\n",
    'INSERT INTO `t` VALUES (1,\'a;b\'),(2,"c\\";");\n',
    "INSERT IGNORE INTO s.t (`a`) VALUES (-1, NULL, TRUE);\n",
    "INSERT INTO t VALUES (1)\nDROP TABLE users;\n",
    "INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 1;\n",
    "INSERT INTO t (a, b) VALUES (1, 'it''s; here'), (2, 'back\\\\');\n",
    "INSERT INTO t VALUES (1); -- a comment; on the same line\n",
    "INSERT INTO t VALUES (1);",  # the next piece on the same line
    "INSERT INTO t VALUES ('a\r\nb',\r'c');\r",
    "INSERT INTO t VALUES (now());\n",
    "INSERT INTO t VALUES (1,);\n",
    "ALTER TABLE users DROP COLUMN nickname;\n",
    "/* a ; comment */ ALTER TABLE a ADD COLUMN b int NOT NULL; -- trailing ;\n",
    "# a hash ; comment\n",
    "SELECT ';', `x;y`;\n",
    "CREATE TABLE t2 (a int, b varchar(10));\n",
    "ALTER TABLE t2 MODIFY b varchar(20);\n",
    "DROP TABLE t2;\n",
    "RENAME TABLE a TO b;\n",
    "SELEC oops;\n",
    "ALTER TABLE t ADD COLUMN c int, ALGORITHM=COPY;\n",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END;\n",
    ";;\n",
    "\n",
)
UNFINISHED = ("'unterminated;\n", "`unterminated;\n", "/* unterminated ;\n", '"x;')


def corpus(seed: int, count: int, pieces: tuple[str, ...] = PIECES) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(1, 300))) for _ in range(count)]


def token_view(tokens: Sequence[object]) -> list[tuple[object, ...]]:
    names = ("token_type", "text", "line", "col", "start", "end", "comments")
    return [tuple(getattr(t, n) for n in names) for t in tokens]


@pytest.mark.parametrize("dialect", ["mysql", "sqlite"])
@pytest.mark.parametrize("step", [1, 5, 64, generic._WINDOW])
def test_windows_give_the_whole_files_tokens(dialect: Dialect, step: int) -> None:
    sg = generic._dialect(dialect)
    core = sg.tokenizer()._core
    checked = 0
    for sql in corpus(step, 40):
        try:
            whole = sg.tokenize(sql)
        except TokenError as error:
            with pytest.raises(TokenError) as raised:
                list(generic._windows(core, sql, step))
            assert str(raised.value) == str(error)
            continue
        windows = list(generic._windows(core, sql, step))
        assert token_view([t for w in windows for t in w]) == token_view(whole)
        # Every window but the last ends on a `;` token, so no statement spans two.
        assert all(w[-1].text == ";" for w in windows[:-1] if w)
        checked += len(windows) > 3
    assert checked > 5  # the corpus does cut files into many windows


@pytest.mark.parametrize("dialect", ["mysql", "sqlite"])
@pytest.mark.parametrize("tail", UNFINISHED)
def test_a_tokenizer_error_is_the_whole_files_as_before(dialect: Dialect, tail: str) -> None:
    """Found only when the windows reach it, it still makes the file one
    unparseable statement at line 1, with tokenize()'s own message."""
    sg = generic._dialect(dialect)
    sql = "ALTER TABLE a DROP COLUMN x;\n" * 3000 + "CREATE TABLE n (c int);\n" + tail
    try:
        sg.tokenize(sql)
    except Exception as error:
        message = str(error)
    else:
        pytest.skip(f"{dialect} tokenizes {tail!r}")
    findings = analyse(sql, dialect=dialect, phase="expand")
    assert [(f.rule, f.line) for f in findings] == [("unparseable-statement", 1)]
    assert message in findings[0].message


def test_a_file_that_does_not_tokenize_leaves_the_runs_schema_alone(tmp_path: Path) -> None:
    # The first file declares a column (then fails to tokenize); the second widens it.
    declared = "CREATE TABLE t (c varchar(20));\n" * 2000 + "SELECT 'unterminated;\n"
    (tmp_path / "0001.sql").write_text(declared)
    (tmp_path / "0002.sql").write_text("ALTER TABLE t MODIFY c varchar(50);\n")
    findings = check_paths([tmp_path], dialect="mysql")
    # Not the safe widening of a declared column: nothing of 0001 was taken in.
    assert [(Path(f.path).name, f.rule) for f in findings] == [
        ("0001.sql", "unparseable-statement"),
        ("0002.sql", "changing-column-type"),
    ]
    assert "old type not declared" in findings[1].message


NAMES = ("t", "`t`", "`a;b`", "s.t", "users", "ignore", "value", "values", "key", "status")
PLAIN_VALUES: tuple[str, ...] = ("1", "-1", "+2.5e3", "'x'", "'a;b'", '"q"', "NULL", "TRUE")
PLAIN_VALUES += ("FALSE", "NOW()", "now ( )", "UUID()", "CURRENT_TIMESTAMP", "current_timestamp()")
ODD_VALUES: tuple[str, ...] = ("- -1", "x'0A'", "0x1F", "b'01'", "N'x'", "now(6)", "a", "DEFAULT")
ODD_VALUES += ("(1)", "1 + 1", "", "ROUND()", "LEFT()", "CURDATE()", "NOW", "f()", "UUID")
ODD_VALUES += ("NOW()()", "- NOW()")
EXTRA = ("", "", "", " ON DUPLICATE KEY UPDATE a = 1", " DROP TABLE users", " (2)", ",")
EXTRA_MORE = (" AS new", " SELECT 1", " RETURNING a")


VALUES = st.one_of(st.sampled_from(PLAIN_VALUES), st.sampled_from(ODD_VALUES))


@st.composite
def inserts(draw: st.DrawFn) -> str:
    """INSERT statements, most of the plain kind, many one token off it."""
    verb = draw(st.sampled_from(["INSERT INTO", "INSERT IGNORE INTO", "INSERT", "REPLACE INTO"]))
    table = draw(st.sampled_from(NAMES))
    columns: list[str] = draw(st.lists(st.sampled_from(NAMES), max_size=3))
    listed = bool(columns) or draw(st.booleans())  # () alone sometimes
    head = f"{verb} {table}" + (f" ({', '.join(columns)})" if listed else "")
    keyword = draw(st.sampled_from(["VALUES", "VALUES", "VALUE", "SET"]))
    rows = draw(st.lists(st.lists(VALUES, min_size=0, max_size=4), min_size=0, max_size=3))
    body = ", ".join("(" + ", ".join(row) + ")" for row in rows)
    return f"{head} {keyword} {body}{draw(st.sampled_from(EXTRA + EXTRA_MORE))}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sql=inserts(), dialect=st.sampled_from(["mysql", "sqlite"]))
def test_a_plain_insert_is_what_sqlglot_parses_into_an_insert(sql: str, dialect: Dialect) -> None:
    """Every statement `_plain_insert` lets through unparsed parses into one Insert,
    which the classifier finds harmless."""
    sg = generic._dialect(dialect)
    tokens = sg.tokenize(sql)
    if not tokens or not generic._plain_insert(tokens):
        return
    (node,) = sg.parser(error_level=ErrorLevel.IMMEDIATE).parse(tokens, sql)
    assert isinstance(node, exp.Insert)
    assert generic._classify(node, dialect, FileState(Schema())) == []


@pytest.mark.parametrize(
    ("sql", "plain"),
    [
        ("INSERT INTO t (a, b) VALUES (1, 'x')", True),
        ("INSERT IGNORE INTO `s`.t VALUES (-1, NULL, TRUE), (+2, 'y', FALSE)", True),
        ("INSERT INTO t VALUES (1)\nDROP TABLE users", False),  # a missing semicolon
        ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 1", False),
        ("INSERT INTO t VALUES (now(), UUID(), CURRENT_TIMESTAMP, current_timestamp())", True),
        ("INSERT INTO t VALUES (now(6))", False),
        ("INSERT INTO t VALUES (ROUND())", False),  # sqlglot: 'this' missing
        ("INSERT INTO t SELECT 1", False),
        ("INSERT INTO t VALUES ()", False),
        ("INSERT INTO t VALUES (1,)", False),
        ("INSERT INTO t VALUES (1),", False),
        ("INSERT INTO t (a,) VALUES (1)", False),
        ("INSERT INTO t VALUES (- -1)", False),
    ],
)
def test_which_inserts_are_plain(sql: str, plain: bool) -> None:
    assert generic._plain_insert(generic._dialect("mysql").tokenize(sql)) is plain


@pytest.mark.parametrize("dialect", ["mysql", "sqlite"])
def test_the_fast_paths_change_no_finding(
    dialect: Dialect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same findings with the whole file tokenized at once and every statement
    parsed, on the examples and a corpus of the hard pieces."""
    files = [p.read_text() for p in sorted(DATA.glob("*/*.sql"))]
    texts = files + corpus(7, 60) + [text + UNFINISHED[0] for text in corpus(8, 5)]

    def findings() -> list[list[dict[str, object]]]:
        return [
            [dataclasses.asdict(f) for f in analyse(sql, dialect=dialect, phase="expand")]
            for sql in texts
        ]

    fast = findings()
    monkeypatch.setattr(generic, "_plain_insert", lambda chunk: False)
    monkeypatch.setattr(generic, "_tokens", lambda sg, sql, dialect: iter([sg.tokenize(sql)]))
    assert findings() == fast
    kinds = {finding["rule"] for file in fast for finding in file}
    assert len(kinds) > 8  # the corpus has findings of many kinds


# PostgreSQL statements around the ones left unbuilt (`postgres._needs_classifying`):
# data changes, SELECTs, and CREATE ... IF NOT EXISTS / OR REPLACE, with what makes
# them matter (a held lock, a function created in the file, a new enum value).
PG_PIECES = (
    "CREATE TABLE IF NOT EXISTS users (id int);\n",
    "CREATE TABLE users (id int NOT NULL, j json);\n",
    "CREATE TABLE IF NOT EXISTS scratch.users (id int);\n",
    "CREATE TABLE IF NOT EXISTS t AS SELECT 1 AS a;\n",
    "CREATE SEQUENCE IF NOT EXISTS s;\n",
    "CREATE OR REPLACE VIEW v AS SELECT 'happy'::mood;\n",
    "CREATE VIEW v AS SELECT 1;\n",
    "CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql;\n",
    "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql;\n",
    "SELECT f();\n",
    "SELECT 1;\n",
    "SELECT set_config('lock_timeout', '1s', false);\n",
    "DROP TABLE users;\n",
    "DROP VIEW v;\n",
    "ALTER TYPE mood ADD VALUE 'happy';\n",
    "INSERT INTO t (a) VALUES ('happy');\n",
    "INSERT INTO t SELECT * FROM u;\n",
    "UPDATE users SET id = 1;\n",
    "ALTER TABLE users ADD COLUMN c int NOT NULL;\n",
    "CREATE INDEX CONCURRENTLY i ON users (id);\n",
    "SET search_path = scratch;\n",
    "SET lock_timeout = '1s';\n",
    "COMMENT ON TABLE users IS 'x';\n",
    "BEGIN;\n",
    "COMMIT;\n",
)


def test_the_postgres_statements_left_unbuilt_change_no_finding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from changeover.migrations import pgjson, postgres

    texts = corpus(11, 120, PG_PIECES)

    def findings() -> list[list[dict[str, object]]]:
        return [
            [dataclasses.asdict(f) for f in analyse(sql, dialect="postgres", phase="expand")]
            for sql in texts
        ]

    fast = findings()
    monkeypatch.setattr(
        postgres, "_needs_classifying", lambda text, state: pgjson.raw_statement(text)
    )
    assert findings() == fast
    kinds = {finding["rule"] for file in fast for finding in file}
    assert {"non-idempotent-ddl", "needs-review", "adding-enum-value-in-transaction"} <= kinds


def test_a_classified_tree_is_freed_without_the_cyclic_collector() -> None:
    """`generic._unlink`: a file of DDL leaves no cycles behind for the collector
    (which, walking every finding made so far, was a third of such a file's check)."""
    import gc

    sql = (
        "ALTER TABLE users DROP COLUMN nickname;\n"
        "CREATE TABLE t (a int NOT NULL DEFAULT 1, b varchar(10));\n"
        "ALTER TABLE t MODIFY b varchar(20) NOT NULL, ALGORITHM=COPY;\n"
        "DROP TABLE x;\nRENAME TABLE a TO b;\n"
    ) * 200
    analyse(sql, dialect="mysql", phase="expand")  # imports, caches
    gc.collect()
    gc.disable()
    try:
        findings = analyse(sql, dialect="mysql", phase="expand")
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert len(findings) > 500


@settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=120),
        st.text(alphabet=" \t\n\r\x0b\x0c\x85\xa0\u2003ab;'", max_size=100),
    )
)
def test_the_excerpt_shortcut_is_the_flattened_text(text: str) -> None:
    """`_excerpt` returns short printable text as it is when flattening would not
    change it: the same as flattening every time."""
    from changeover.migrations.analysis import _EXCERPT_CHARS, _excerpt

    flat = " ".join(text.split())
    expected = flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 1] + "…"
    assert _excerpt(text) == expected


# --- MySQL: plain INSERTs recognised in the text, before tokenizing ----------------

SPACES = st.sampled_from([" ", "  ", "\n", "\r\n", "\r", "\t", " \n "])
TEXT_NAMES = (*NAMES, "`we``ird`", "`a b`", "group", "lock", "char", "x1", "_y", "t$", "ñ")
TEXT_VALUES = (
    *PLAIN_VALUES,
    *ODD_VALUES,
    "'it''s'",
    "'back\\\\'",
    "'esc\\'aped'",
    "'line\nbreak'",
    "'cr\r\nlf'",
    '"dq\\"x"',
    "'\\n'",
    "1.5",
    "1.",
    ".5",
    "1e5",
    "12abc",
    "- 7",
    "-\n7",
    "--7",
    "null",
    "True",
    "NULLx",
    "'a' 'b'",
    "NOW()",
    "now\n(\r\n)",
    "UUID( )",
    "CURRENT_TIMESTAMP",
    "Current_Timestamp()",
    "NOW(6)",
    "ROUND()",
    "NOWX()",
    "NOW",
)


@st.composite
def insert_texts(draw: st.DrawFn) -> str:
    """INSERT statements as text, spaced in the ways sqlglot counts lines and columns."""
    sp = draw(SPACES)
    verb = draw(st.sampled_from(["INSERT INTO", "insert into", "INSERT IGNORE INTO", "INSERT"]))
    verb = verb.replace(" ", sp)
    table = draw(st.sampled_from(TEXT_NAMES))
    if draw(st.booleans()):
        table = f"{draw(st.sampled_from(TEXT_NAMES))}{draw(st.sampled_from(['.', ' . ']))}{table}"
    columns: list[str] = draw(st.lists(st.sampled_from(TEXT_NAMES), max_size=3))
    head = f"{verb}{sp}{table}" + (f"{sp}({(',' + sp).join(columns)})" if columns else "")
    values = st.sampled_from(TEXT_VALUES)
    rows = draw(st.lists(st.lists(values, min_size=1, max_size=4), min_size=1, max_size=3))
    body = ("," + draw(SPACES)).join("(" + f",{sp}".join(row) + ")" for row in rows)
    tail = draw(st.sampled_from(["", "", " ON DUPLICATE KEY UPDATE a = 1", " -- c", ","]))
    return f"{draw(SPACES)}{head}{sp}VALUES{sp}{body}{tail}{draw(SPACES)};"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=insert_texts(),
    before=st.sampled_from(["", "SELECT 1;", "SELECT\r\n'x';\n", "SELECT\n1; "]),
    after=st.sampled_from(["\nDROP TABLE t;", " DROP TABLE t;", "DROP\rTABLE t; -- c", ""]),
)
def test_a_plain_insert_in_the_text_is_one_in_the_tokens(
    text: str, before: str, after: str
) -> None:
    """Every statement `_plain_insert_text` leaves untokenized is tokenized by sqlglot
    into a plain INSERT (`_plain_insert`) ending at that `;`, and the tokenizer goes
    on after it exactly where and as it would have (`_skipped`)."""
    sg = generic._dialect("mysql")
    sql = before + text + after
    end = generic._plain_insert_text(sql, len(before))
    if not end:
        return
    tokens = sg.tokenize(sql)
    statement = [t for t in tokens if len(before) <= t.start < end]
    assert statement[-1].text == ";" and statement[-1].end == end - 1
    assert generic._plain_insert(statement[:-1])
    core = sg.tokenizer()._core
    # One statement a window (step 1), so the insert starts one: a skip is tried there.
    skipped = list(generic._windows(core, sql, 1, skip=generic._plain_insert_text))
    rest = [t for t in tokens if t.start >= end or t.start < len(before)]
    assert token_view([t for w in skipped for t in w]) == token_view(rest)


def test_plain_inserts_are_recognised_in_the_text() -> None:
    """The recogniser does find the common forms (a mysqldump's among them)."""
    for sql in [
        "INSERT INTO `users` VALUES (1,'a\\'b',NULL,-2.5),(2,'c''d',TRUE,+3);",
        '\n insert ignore into s.t (a, `b`)\r\nvalues ( 1 , "x" );',
    ]:
        assert generic._plain_insert_text(sql, 0) == len(sql)
    for sql in [
        "INSERT INTO `t` VALUES (1)\nDROP TABLE users;",
        "INSERT INTO t VALUES (round());",
        "INSERT INTO key VALUES (1);",  # a keyword, not a name
        "INSERT INTO t VALUES (1); ",  # ends at the `;`: what follows is the next one's
    ][:-1]:
        assert generic._plain_insert_text(sql, 0) == 0
    assert generic._plain_insert_text("INSERT INTO t VALUES (1); ", 0) == len(
        "INSERT INTO t VALUES (1);"
    )


@pytest.mark.parametrize("step", [1, 64, generic._WINDOW])
def test_windows_with_plain_inserts_left_out_give_the_other_tokens(step: int) -> None:
    sg = generic._dialect("mysql")
    core = sg.tokenizer()._core
    left_out = 0
    for sql in corpus(step + 100, 30):
        try:
            whole = sg.tokenize(sql)
        except TokenError:
            continue
        spans: list[tuple[int, int]] = []

        def skip(text: str, start: int, spans: list[tuple[int, int]] = spans) -> int:
            end = generic._plain_insert_text(text, start)
            if end:
                spans.append((start, end))
            return end

        windows = list(generic._windows(core, sql, step, skip=skip))
        rest = [t for t in whole if not any(a <= t.start < b for a, b in spans)]
        assert token_view([t for w in windows for t in w]) == token_view(rest)
        left_out += len(spans)
    assert left_out > 10  # inserts are left out, whatever the window
