"""MySQL and SQLite statements, parsed by sqlglot, classified into Hits.

The file is split into statements on the tokenizer's `;` tokens (never by
text), and each statement is parsed on its own so that one unparseable
statement becomes a needs-review finding without hiding the others.
Anything sqlglot can only parse as an opaque `Command`, and any statement or
ALTER TABLE action not handled here, is needs-review.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect as SqlglotDialect
from sqlglot.errors import ErrorLevel, TokenError
from sqlglot.tokenizer_core import Token, TokenType

from changeover.migrations.analysis import (
    NEEDS_REVIEW,
    UNPARSEABLE,
    ColumnInfo,
    FileState,
    Hit,
    Statement,
    WholeFile,
    retype,
)
from changeover.migrations.coltypes import ColType
from changeover.migrations.rules import Dialect

# Functions whose value differs per row: a DEFAULT using them makes MySQL copy
# the table (and SQLite refuses a non-constant default in ADD COLUMN).
VOLATILE_FUNCTIONS = frozenset({"rand", "random", "uuid", "uuid_short", "randomblob"})

_HARMLESS: tuple[type[exp.Expr], ...] = (
    exp.Select,
    exp.SetOperation,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Set,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Use,
    exp.Pragma,
)
# ALTER TABLE ... DROP of these kinds leaves every column the old release uses.
_DROP_HARMLESS_IN_ALTER = frozenset({"INDEX", "KEY", "CONSTRAINT", "FOREIGN KEY", "CHECK"})
# How far past its start a tokenizer window ends (at the next `;`): a few statements.
_WINDOW = 1024


@functools.cache
def _dialect(dialect: Dialect) -> SqlglotDialect:
    return SqlglotDialect.get_or_raise(dialect)


@contextmanager
def _quiet_sqlglot() -> Iterator[None]:
    """sqlglot logs a warning when it falls back to Command; the finding says it better."""
    logger = logging.getLogger("sqlglot")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _chunks(tokens: Iterable[list[Token]]) -> Iterator[list[Token]]:
    """Each statement's tokens, without the `;` tokens between them."""
    chunk: list[Token] = []
    for window in tokens:
        for token in window:
            if token.token_type == TokenType.SEMICOLON:
                if chunk:
                    yield chunk
                chunk = []
            else:
                chunk.append(token)
    if chunk:
        yield chunk


# The tokenizer's state, saved before each window so that a window cut in the
# middle of a string or comment can be scanned again from where it began.
_SCAN_STATE = ("_current", "_start", "_line", "_col", "_char", "_peek", "_end", "_prev_token_line")


def _windows(
    core: Any, sql: str, step: int = _WINDOW, skip: Callable[[str, int], int] | None = None
) -> Iterator[list[Token]]:
    """The file's tokens, exactly as `tokenize(sql)` gives them, a few statements at
    a time, so that the whole file's tokens (about 300 bytes each) are never alive
    at once and the cyclic collector does not walk them over and over.

    sqlglot's tokenizer scans `sql[:size]`; each window sets `size` just past a
    `;` character and scans on from where the previous window stopped, in the
    same state.  A window is kept only when it ended on that `;` as a token of
    its own, with no comment pending: then the whole file's tokenizer was in
    that very state there (no sqlglot token contains a `;`).  A `;` inside a
    string or comment fails that test (an unterminated string raises), and the
    window is scanned again from its start, twice as long, up to the end of the
    file, where an error is the file's own, raised as `tokenize` raises it.

    `skip(sql, start)`, where a statement starts, gives the end (just past its
    `;`) of a statement to leave out untokenized, or 0; the tokenizer then goes on
    from there in the state it would have reached (`_skipped`).
    """
    size = len(sql)
    core.reset()
    core.sql = sql
    scanned = 0  # where the previous window ended: just past a `;` token
    last: list[Token] = []  # that token: a trailing comment attaches to it
    while scanned < size:
        if skip is not None and (skipped := skip(sql, scanned)):
            last = [_skipped(core, sql, scanned, skipped)]
            scanned = skipped
            continue
        saved = [getattr(core, name) for name in _SCAN_STATE]
        # A comment after it is attached to `last` by the scan: undone with the rest.
        comments = len(last[0].comments) if last else 0
        reach = step
        while True:
            cut = sql.find(";", scanned + reach)
            cut = size if cut < 0 else cut + 1
            core.size = cut
            core._end = False
            core.tokens = list(last)
            core._comments = []
            try:
                core._scan()
            except Exception as error:
                if cut == size:  # the file's own error: as tokenize() reports it
                    start = max(core._current - 50, 0)
                    context = sql[start : min(core._current + 50, size - 1)]
                    raise TokenError(f"Error tokenizing '{context}'") from error
            else:
                tokens = core.tokens
                end = tokens[-1] if tokens else None
                if cut == size or (
                    end is not None
                    and end.token_type == TokenType.SEMICOLON
                    and end.end == cut - 1
                    and not core._comments
                ):
                    break
            for name, value in zip(_SCAN_STATE, saved, strict=True):
                setattr(core, name, value)
            if last:
                del last[0].comments[comments:]
            reach *= 2
        yield tokens[len(last) :]
        last = tokens[-1:]
        scanned = cut


def _skipped(core: Any, sql: str, start: int, end: int) -> Token:
    """Put the tokenizer where it would be after scanning `sql[start:end]` (from
    the state it has at `start`, just past a `;`), and make the `;` token it would
    have ended with.  That text has whitespace, words, numbers, strings and
    punctuation only (`_PLAIN_INSERT_TEXT`): the tokenizer would have counted a
    line at each \\n and each \\r not followed by one, and the column from the
    last of them (as sqlglot's `_advance` does)."""
    semicolon = end - 1
    breaks = sql.count("\n", start, semicolon) + sql.count("\r", start, semicolon)
    breaks -= sql.count("\r\n", start, semicolon)
    line = core._line + breaks
    if breaks:
        col = semicolon - max(sql.rfind("\n", start, semicolon), sql.rfind("\r", start, semicolon))
    else:
        col = core._col + end - start
    core._current, core._start, core._line, core._col = end, semicolon, line, col
    core._char, core._peek, core._end = ";", sql[end] if end < len(sql) else "", end >= len(sql)
    core._prev_token_line = line
    return Token(TokenType.SEMICOLON, ";", line, col, semicolon, semicolon)


def _tokens(sg: SqlglotDialect, sql: str, dialect: Dialect) -> Iterator[list[Token]]:
    """The file's tokens in windows (`_windows`), or all at once from a tokenizer
    that does not have the state `_windows` drives; MySQL's plain INSERTs left
    out by their text (`_plain_insert_text`)."""
    core = getattr(sg.tokenizer(), "_core", None)
    if core is None or not all(hasattr(core, name) for name in (*_SCAN_STATE, "_scan")):
        return iter([sg.tokenize(sql)])
    return _windows(core, sql, skip=_plain_insert_text if dialect == "mysql" else None)


# A plain INSERT (`_plain_insert`) recognised in MySQL's text before it is tokenized,
# for the files where sqlglot's tokenizer is the time (a dump of 5 MiB of short
# values is 5 million tokens): every text this matches is tokenized by sqlglot
# into tokens `_plain_insert` accepts, ending with that `;` (a test checks it).
# Only what sqlglot tokenizes one way is matched: ASCII whitespace, no comments,
# numbers followed by a separator, strings as sqlglot ends them (a backslash takes
# the next character, '' is a quote), names checked against the keywords.
_WS = r"[ \t\r\n]"
_NAME = r"(?:`(?:[^`]|``)*+`|[A-Za-z_][A-Za-z0-9_]*+)"
_VALUE = (
    r"(?:[-+]" + _WS + r"*+[0-9]++(?:\.[0-9]++)?+(?=[ \t\r\n,)])"
    r"|[0-9]++(?:\.[0-9]++)?+(?=[ \t\r\n,)])"
    r"|'(?:[^'\\]++|\\[\s\S]|'')*+'"
    r'|"(?:[^"\\]++|\\[\s\S]|"")*+"'
    r"|(?:NULL|TRUE|FALSE|CURRENT_TIMESTAMP)(?=[ \t\r\n,)])"
    r"|(?:NOW|UUID|CURRENT_TIMESTAMP)" + _WS + r"*+\(" + _WS + r"*+\))"
)
_ROW = rf"\({_WS}*+{_VALUE}(?:{_WS}*+,{_WS}*+{_VALUE})*+{_WS}*+\)"
_PLAIN_INSERT_TEXT = re.compile(
    rf"{_WS}*+INSERT{_WS}++(?:IGNORE{_WS}++)?INTO{_WS}++"
    rf"(?P<names>{_NAME}(?:{_WS}*+\.{_WS}*+{_NAME})?+{_WS}*+"
    rf"(?:\({_WS}*+{_NAME}(?:{_WS}*+,{_WS}*+{_NAME})*+{_WS}*+\){_WS}*+)?+)"
    rf"VALUES{_WS}*+{_ROW}(?:{_WS}*+,{_WS}*+{_ROW})*+{_WS}*+;",
    re.IGNORECASE | re.ASCII,
)
_WORD = re.compile(r"`(?:[^`]|``)*`|([A-Za-z_][A-Za-z0-9_]*)", re.ASCII)


@functools.cache
def _keyword_words() -> frozenset[str]:
    """Every word that starts one of MySQL's tokenizer keywords: a name that is one
    is not a plain name to sqlglot."""
    keywords = _dialect("mysql").tokenizer_class.KEYWORDS
    return frozenset(word.split()[0].upper() for word in keywords if word.split())


def _plain_insert_text(sql: str, start: int) -> int:
    """The end (just past its `;`) of the plain INSERT at `start`, or 0."""
    match = _PLAIN_INSERT_TEXT.match(sql, start)
    if match is None:
        return 0
    keywords = _keyword_words()
    for word in _WORD.finditer(match["names"]):
        if word[1] is not None and word[1].upper() in keywords:
            return 0
    return match.end()


# Statements that need no parse: INSERT [IGNORE] INTO t [(a, b)] VALUES (1, 'x', NULL), ...
# with names and literal values only (and NOW(), UUID(), CURRENT_TIMESTAMP).  sqlglot
# parses every such statement into an Insert, which `_classify` finds harmless
# (tests/unit/test_migrations_fast.py checks both on a corpus); a data file is mostly
# these, and parsing them was most of its check.  Anything else, a malformed one
# included, is parsed.
_NAMES = frozenset({TokenType.VAR, TokenType.IDENTIFIER})
_LITERALS = frozenset(
    {
        TokenType.NUMBER,
        TokenType.STRING,
        TokenType.NULL,
        TokenType.TRUE,
        TokenType.FALSE,
        TokenType.CURRENT_TIMESTAMP,
    }
)
_SIGNS = frozenset({TokenType.DASH, TokenType.PLUS})
# Calls without arguments that seed data uses for a row's time or id, and that
# sqlglot parses (a known function called without its arguments does not parse).
_NILADIC = frozenset({"NOW", "UUID", "CURRENT_TIMESTAMP"})
_NILADIC_TYPES = frozenset({TokenType.VAR, TokenType.UUID, TokenType.CURRENT_TIMESTAMP})


def _niladic_call(chunk: list[Token], types: list[TokenType], i: int) -> bool:
    return (
        types[i] in _NILADIC_TYPES
        and i + 2 < len(types)
        and types[i + 1] == TokenType.L_PAREN
        and types[i + 2] == TokenType.R_PAREN
        and chunk[i].text.upper() in _NILADIC
    )


def _plain_insert(chunk: list[Token]) -> bool:
    if chunk[0].token_type != TokenType.INSERT or len(chunk) < 7:
        return False
    types = [token.token_type for token in chunk]
    count = len(types)
    i = 2 if types[1] == TokenType.IGNORE else 1
    if types[i] != TokenType.INTO or types[i + 1] not in _NAMES:
        return False
    i += 2
    if types[i] == TokenType.DOT:
        if types[i + 1] not in _NAMES:
            return False
        i += 2
    if types[i] == TokenType.L_PAREN:  # the column list: names
        i += 1
        while i + 1 < count and types[i] in _NAMES and types[i + 1] == TokenType.COMMA:
            i += 2
        if i + 1 >= count or types[i] not in _NAMES or types[i + 1] != TokenType.R_PAREN:
            return False
        i += 2
    if i >= count or types[i] != TokenType.VALUES:
        return False
    i += 1
    while i < count and types[i] == TokenType.L_PAREN:  # a row: literal values
        i += 1
        while i < count:
            if types[i] in _SIGNS and i + 1 < count and types[i + 1] == TokenType.NUMBER:
                i += 1  # to the number
            elif _niladic_call(chunk, types, i):
                i += 2  # to the call's `)`
            elif types[i] not in _LITERALS:
                return False
            if i + 1 >= count:
                return False
            i += 2
            if types[i - 1] == TokenType.R_PAREN:
                break
            if types[i - 1] != TokenType.COMMA:
                return False
        else:
            return False
        if i == count:
            return True
        if types[i] != TokenType.COMMA:
            return False
        i += 1
    return False


def statements(sql: str, dialect: Dialect, state: FileState) -> Iterator[Statement]:
    """The file's statements that have hits, or may change `state`: a plain INSERT
    (`_plain_insert`) has neither and is left out."""
    sg = _dialect(dialect)
    # One parser for the file (each parse resets it), one logger change for the file.
    parser = sg.parser(error_level=ErrorLevel.IMMEDIATE)
    with _quiet_sqlglot():
        try:
            for chunk in _chunks(_tokens(sg, sql, dialect)):
                if _plain_insert(chunk):
                    continue
                start = chunk[0].start
                text = sql[start : chunk[-1].end + 1]
                try:
                    parsed = parser.parse(chunk, sql)
                except Exception as error:  # ParseError, or a parser bug on odd input
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    hit = Hit(UNPARSEABLE, f"sqlglot cannot parse it ({reason})")
                    yield Statement(start, text, [hit])
                    continue
                for node in parsed:
                    if node is not None:
                        hits = _classify(node, dialect, state)
                        _unlink(node)
                        yield Statement(start, text, hits)
        except TokenError as error:
            # Found only where the windows reach it: the file is one unparseable
            # statement, as if none of it had been read (`analysis.WholeFile`).
            hit = Hit(UNPARSEABLE, f"sqlglot cannot tokenize the file ({error})")
            raise WholeFile(Statement(0, sql, [hit])) from error


def _unlink(node: exp.Expr) -> None:
    """Drop each node's link to its parent, the only cycles in sqlglot's tree: then
    reference counting frees the tree as soon as it is classified, instead of the
    cyclic collector, which a file of DDL kept running (and walking every finding
    made so far, a third of such a file's check)."""
    for sub in node.walk():
        sub.parent = None


# --- helpers ------------------------------------------------------------------


def _col_type(data_type: exp.Expr | None) -> ColType:
    if not isinstance(data_type, exp.DataType):
        return ColType("?")
    params = tuple(p.name for p in data_type.expressions)
    return ColType(data_type.this.name.lower(), params)


def _constraint(col: exp.ColumnDef, kind: type[exp.Expr]) -> exp.Expr | None:
    for constraint in col.constraints:
        if isinstance(constraint.kind, kind):
            return constraint.kind
    return None


def _not_null(col: exp.ColumnDef) -> bool:
    # sqlglot models an explicit NULL as NotNullColumnConstraint(allow_null=True).
    constraint = _constraint(col, exp.NotNullColumnConstraint)
    return constraint is not None and not constraint.args.get("allow_null")


def _volatile_call(expr: exp.Expr | None) -> str | None:
    for func in expr.find_all(exp.Func) if expr is not None else ():
        name = func.name if isinstance(func, exp.Anonymous) else func.sql_name()
        if name.lower() in VOLATILE_FUNCTIONS:
            return name
    return None


# --- ALTER TABLE actions ------------------------------------------------------


def _add_column(table: str, col: exp.ColumnDef, state: FileState) -> list[Hit]:
    where = f"{table}.{col.name}"
    not_null = _not_null(col)
    default = _constraint(col, exp.DefaultColumnConstraint)
    auto = _constraint(col, exp.AutoIncrementColumnConstraint) is not None
    hits: list[Hit] = []
    if not_null and default is None and not auto:
        hits.append(Hit("adding-required-field", f"adds NOT NULL column {where}", table))
    volatile = _volatile_call(default)
    if volatile or auto:
        # MySQL numbers the existing rows of an AUTO_INCREMENT column by copying the table.
        what = f"a default {volatile}()" if volatile else "AUTO_INCREMENT"
        hits.append(Hit("adding-field-with-default", f"adds {where} with {what}", table))
    state.schema.columns[(table, col.name)] = ColumnInfo(_col_type(col.args.get("kind")), not_null)
    return hits


def _modify_column(
    table: str, action: exp.ModifyColumn, dialect: Dialect, state: FileState
) -> list[Hit]:
    """MySQL MODIFY / CHANGE: a rename, a type change and a nullability change in one."""
    col = action.this
    rename_from = action.args.get("rename_from")
    old_name = rename_from.name if rename_from is not None else col.name
    hits: list[Hit] = []
    if old_name != col.name:
        detail = f"renames {table}.{old_name} to {col.name}"
        hits.append(Hit("renaming-column", detail, table))
    old = state.schema.columns.get((table, old_name))
    not_null = _not_null(col)
    new_type = _col_type(col.args.get("kind"))
    type_hit = retype(
        state, dialect, table, old_name, new_type, new_name=col.name, not_null=not_null
    )
    if type_hit:
        hits.append(type_hit)
    elif not_null and old is not None and not old.not_null:
        hits.append(Hit("adding-not-nullable-field", f"sets {table}.{col.name} NOT NULL", table))
    return hits


def _alter_column(
    table: str, action: exp.AlterColumn, dialect: Dialect, state: FileState
) -> list[Hit]:
    dtype = action.args.get("dtype")
    if dtype is not None:
        hit = retype(state, dialect, table, action.name, _col_type(dtype))
        return [hit] if hit else []
    if action.args.get("default") is not None or action.args.get("drop"):
        return []  # SET / DROP DEFAULT: catalog only
    # sqlglot drops clauses it does not model (e.g. SET NOT NULL), so do not guess.
    return [Hit(NEEDS_REVIEW, f"ALTER COLUMN {table}.{action.name} is not classified")]


def _alter_action(table: str, action: exp.Expr, dialect: Dialect, state: FileState) -> list[Hit]:
    if isinstance(action, exp.ColumnDef):
        return _add_column(table, action, state)
    if isinstance(action, exp.ModifyColumn):
        return _modify_column(table, action, dialect, state)
    if isinstance(action, exp.AlterColumn):
        return _alter_column(table, action, dialect, state)
    if isinstance(action, exp.RenameColumn):
        old, new = action.this.name, action.args["to"].name
        return [Hit("renaming-column", f"renames {table}.{old} to {new}", table)]
    if isinstance(action, exp.AlterRename):
        return [Hit("renaming-table", f"renames table {table} to {action.this.name}", table)]
    if isinstance(action, exp.Drop):
        kind = str(action.args.get("kind") or "").upper()
        if kind == "COLUMN":
            names = [c.name for c in action.args.get("tables") or ()]
            return [Hit("ban-drop-column", f"drops column {table}.{n}", table) for n in names]
        if kind in _DROP_HARMLESS_IN_ALTER:
            return []
    if isinstance(action, exp.AddConstraint):
        # InnoDB adds a foreign key in place only with foreign_key_checks=0; otherwise
        # it copies the table.  Indexes and unique keys are built online.
        if dialect == "mysql" and next(action.find_all(exp.ForeignKey), None) is not None:
            return [Hit("adding-foreign-key-constraint", f"adds a foreign key to {table}", table)]
        return []
    what = type(action).__name__
    return [Hit(NEEDS_REVIEW, f"ALTER TABLE {table} action {what} is not classified")]


# --- statements ---------------------------------------------------------------


def _alter_options(table: str, node: exp.Alter) -> list[Hit]:
    """ALGORITHM=COPY copies the table, blocking writes; LOCK=SHARED/EXCLUSIVE asks for
    a lock that blocks writes (and reads) for the whole ALTER."""
    hits = []
    for option in node.args.get("options") or []:
        value = option.name.upper()
        if isinstance(option, exp.AlgorithmProperty) and value == "COPY":
            hits.append(Hit("mysql-algorithm-copy", f"ALTER TABLE {table} ALGORITHM=COPY", table))
        elif isinstance(option, exp.LockProperty) and value in ("SHARED", "EXCLUSIVE"):
            hits.append(Hit("mysql-lock-exclusive", f"ALTER TABLE {table} LOCK={value}", table))
    return hits


def _alter(node: exp.Alter, dialect: Dialect, state: FileState) -> list[Hit]:
    table = node.this.name
    actions = node.args.get("actions") or []
    if str(node.args.get("kind") or "").upper() != "TABLE":
        return []
    hits = _alter_options(table, node)
    if not actions and not hits:  # e.g. ENGINE=InnoDB or FORCE: options sqlglot keeps elsewhere
        return [Hit(NEEDS_REVIEW, f"ALTER TABLE {table} has no action the analyser understands")]
    return hits + [h for action in actions for h in _alter_action(table, action, dialect, state)]


def _create(node: exp.Create, dialect: Dialect, state: FileState) -> list[Hit]:
    target = node.this
    table = target.this if isinstance(target, exp.Schema) else target
    name = table.name if table is not None else "?"
    state.created.add(name)
    if isinstance(target, exp.Schema):
        for col in target.expressions:
            if isinstance(col, exp.ColumnDef):
                not_null = _not_null(col)
                info = ColumnInfo(_col_type(col.args.get("kind")), not_null)
                state.schema.columns[(name, col.name)] = info
    return []


def _drop(node: exp.Drop, dialect: Dialect, state: FileState) -> list[Hit]:
    kind = str(node.args.get("kind") or "").upper()
    if kind == "INDEX":  # MySQL drops an index in place; SQLite has one writer anyway
        return []
    rule = "ban-drop-table" if kind == "TABLE" else "ban-drop-object"
    names = [t.name for t in node.args.get("tables") or ()] or ["?"]
    return [Hit(rule, f"drops {kind.lower()} {n}", n) for n in names]


# A statement that may hide after a missing semicolon inside an opaque Command:
# one of these verbs followed by one of these object kinds (DROP TABLE ...).
_HIDDEN_VERBS = frozenset({TokenType.ALTER, TokenType.DROP, TokenType.RENAME, TokenType.TRUNCATE})
_HIDDEN_OBJECTS = frozenset(
    {TokenType.TABLE, TokenType.VIEW, TokenType.INDEX, TokenType.DATABASE, TokenType.SCHEMA}
)


def _hides_a_statement(words: list[Token]) -> bool:
    pairs = itertools.pairwise(words)
    return any(a.token_type in _HIDDEN_VERBS and b.token_type in _HIDDEN_OBJECTS for a, b in pairs)


def _command(node: exp.Command, dialect: Dialect, state: FileState) -> list[Hit]:
    keyword = str(node.this).upper()
    # sqlglot keeps the rest of an opaque Command as one string; tokenizing it
    # again says which table MySQL's RENAME TABLE a TO b renames, and whether a
    # DROP hides in it.
    expression = node.expression  # a Literal or a plain string, depending on the statement
    rest = expression.name if isinstance(expression, exp.Literal) else str(expression or "")
    try:
        words = _dialect(dialect).tokenize(rest)
    except Exception:  # the same leniency as for any other tokenizer failure
        words = []
    if (
        dialect == "mysql"
        and keyword == "RENAME"
        and words[:1]
        and words[0].token_type == TokenType.TABLE
    ):
        old = words[1].text if len(words) > 1 else "?"
        return [Hit("renaming-table", f"renames table {old}", old)]
    if _hides_a_statement(words):
        return [Hit(UNPARSEABLE, f"sqlglot cannot parse this {keyword} statement")]
    return [Hit(NEEDS_REVIEW, f"sqlglot cannot parse {keyword} statements")]


Classifier = Callable[[Any, Dialect, FileState], list[Hit]]
_CLASSIFIERS: dict[type[exp.Expr], Classifier] = {
    exp.Alter: _alter,
    exp.Create: _create,
    exp.Drop: _drop,
    exp.Command: _command,
}


def _classify(node: exp.Expr, dialect: Dialect, state: FileState) -> list[Hit]:
    classifier = _CLASSIFIERS.get(type(node))
    if classifier is not None:
        return classifier(node, dialect, state)
    if isinstance(node, _HARMLESS):
        return []
    return [Hit(NEEDS_REVIEW, f"{type(node).__name__} statements are not classified")]
