"""PostgreSQL statements, parsed by pglast (PostgreSQL's own grammar), classified into Hits.

Every statement type is either handled, known to be harmless (`_HARMLESS`),
or reported as needs-review: nothing passes just because it was not foreseen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import (
    AlterTableType,
    BoolExprType,
    ConstrType,
    DropBehavior,
    NullTestType,
    ObjectType,
    TransactionStmtKind,
    VariableSetKind,
)
from pglast.parser import ParseError, parse_sql_json, scan, split

from changeover.migrations import pgjson
from changeover.migrations.analysis import (
    LOCK_TIMEOUT,
    NEEDS_REVIEW,
    UNPARSEABLE,
    ColumnInfo,
    FileState,
    Hit,
    Statement,
    retype,
)
from changeover.migrations.coltypes import ColType

# Built-in functions known not to be volatile (immutable or stable), so a DEFAULT
# using only them is computed once and stored in the catalog (no rewrite since
# PostgreSQL 11).  Any other function, a user's included, may be volatile: an
# allow-list, as squawk's adding-field-with-default has.
NON_VOLATILE_FUNCTIONS = frozenset(
    {
        "now",
        "statement_timestamp",
        "transaction_timestamp",
        "current_setting",
        "lower",
        "upper",
        "btrim",
        "concat",
        "length",
        "abs",
        "make_date",
        "make_interval",
        "make_timestamp",
        "make_timestamptz",
        "to_timestamp",
        "to_date",
        "date_trunc",
        "jsonb_build_object",
        "jsonb_build_array",
        "json_build_object",
        "json_build_array",
        "array_fill",
        "int4range",
        "int8range",
        "tstzrange",
    }
)
_SERIAL_TYPES = frozenset({"serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"})

# Statements that neither lock an existing table for long nor change what the
# old release sees.  Data changes (INSERT/UPDATE/DELETE) are the author's business.
_HARMLESS = frozenset(
    {
        "CreateSchemaStmt",
        "CreateExtensionStmt",
        "CommentStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "AlterDefaultPrivilegesStmt",
        "AlterSeqStmt",
        "AlterOwnerStmt",
        "CreatePolicyStmt",
        "ExplainStmt",
        "CheckPointStmt",
    }
)
# Objects whose names an application does not use: renaming them is harmless.
_RENAME_HARMLESS = frozenset(
    {
        ObjectType.OBJECT_INDEX,
        ObjectType.OBJECT_TABCONSTRAINT,
        ObjectType.OBJECT_TRIGGER,
        ObjectType.OBJECT_POLICY,
        ObjectType.OBJECT_RULE,
        ObjectType.OBJECT_STATISTIC_EXT,
    }
)
# ALTER TABLE subcommands that only change catalog entries under a brief lock.
_ALTER_HARMLESS = frozenset(
    {
        AlterTableType.AT_DropConstraint,
        AlterTableType.AT_SetStatistics,
        AlterTableType.AT_SetOptions,
        AlterTableType.AT_ResetOptions,
        AlterTableType.AT_SetRelOptions,
        AlterTableType.AT_ResetRelOptions,
        AlterTableType.AT_ChangeOwner,
        AlterTableType.AT_EnableTrig,
        AlterTableType.AT_EnableAlwaysTrig,
        AlterTableType.AT_EnableReplicaTrig,
        AlterTableType.AT_DisableTrig,
        AlterTableType.AT_EnableTrigAll,
        AlterTableType.AT_DisableTrigAll,
        AlterTableType.AT_EnableTrigUser,
        AlterTableType.AT_DisableTrigUser,
        AlterTableType.AT_EnableRowSecurity,
        AlterTableType.AT_DisableRowSecurity,
        AlterTableType.AT_ForceRowSecurity,
        AlterTableType.AT_NoForceRowSecurity,
        AlterTableType.AT_ReplicaIdentity,
        AlterTableType.AT_AddIdentity,  # on an existing column: catalog only
        AlterTableType.AT_SetIdentity,
        AlterTableType.AT_DropIdentity,
    }
)
# Table constraints that check or index every existing row, and their rule.
# NOT VALID (skip_validation) or USING INDEX (indexname) avoids the long lock.
_CONSTRAINT_RULES = {
    ConstrType.CONSTR_FOREIGN: "adding-foreign-key-constraint",
    ConstrType.CONSTR_CHECK: "constraint-missing-not-valid",
    ConstrType.CONSTR_NOTNULL: "adding-not-nullable-field",
    ConstrType.CONSTR_UNIQUE: "disallowed-unique-constraint",
    ConstrType.CONSTR_EXCLUSION: "disallowed-unique-constraint",
    ConstrType.CONSTR_PRIMARY: "adding-serial-primary-key-field",
}
# Lock modes that block the old release: ACCESS EXCLUSIVE its reads, the others its writes.
ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"
SHARE = "SHARE"
# ALTER TABLE subcommands that take less than ACCESS EXCLUSIVE (None: a lock that
# blocks neither reads nor writes, SHARE UPDATE EXCLUSIVE).
_ALTER_LOCKS: dict[Any, str | None] = {
    AlterTableType.AT_ValidateConstraint: None,
    AlterTableType.AT_SetStatistics: None,
    AlterTableType.AT_AttachPartition: None,
    AlterTableType.AT_EnableTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableAlwaysTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableReplicaTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableTrigAll: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrigAll: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableTrigUser: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrigUser: SHARE_ROW_EXCLUSIVE,
}
_LOCK_STRENGTH = {None: 0, SHARE: 1, SHARE_ROW_EXCLUSIVE: 2, ACCESS_EXCLUSIVE: 3}
_TRANSACTION_START = frozenset(
    {TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START}
)
_TRANSACTION_END = frozenset(
    {
        TransactionStmtKind.TRANS_STMT_COMMIT,
        TransactionStmtKind.TRANS_STMT_ROLLBACK,
        TransactionStmtKind.TRANS_STMT_PREPARE,
    }
)


# --- splitting and parsing ---------------------------------------------------


def _parsed(
    sql: str, wanted: Callable[[str], dict[str, Any] | None] | None = None, *, broken: bool = True
) -> Iterator[tuple[int, str, Any]]:
    """(offset, text, node) per statement; node is a ParseError when it does not parse.

    The file is split by the parser (cheap: no Python AST), then each statement
    is parsed on its own, so only one statement's AST is alive at a time, built
    from the parser's JSON (`pgjson`: pglast's own AST costs several times more).  With
    `wanted`, only the statements for which it gives the parser's RawStmt (it decides
    by the text, or by the RawStmt: `pgjson.raw_statement`) are built and yielded.
    A file PostgreSQL cannot parse is parsed statement by statement (each one,
    whatever `wanted` says), or with `broken=False` yields only its REPACK
    statements (`Repack`: pglast's grammar does not know them).
    """
    if "\0" in sql:  # libpg_query reads C strings: it would silently stop at the NUL
        yield 0, sql, ParseError("the file contains a NUL character")
        return
    try:
        pieces = split(sql, with_parser=True, only_slices=True)
    except ParseError as whole_file_error:
        if broken:
            yield from _parsed_one_by_one(sql, whole_file_error)
        else:
            texts = ((begin, sql[begin:end]) for begin, end in _scanned(sql) or ())
            yield from ((b, text, r) for b, text in texts if (r := _repack(text)) is not None)
        return
    for piece in pieces:
        text = sql[piece]
        if wanted is None:
            yield piece.start, text, pgjson.statement(text)
        elif (raw := wanted(text)) is not None:
            yield piece.start, text, pgjson.statement(text, raw)


def _scanned(sql: str) -> list[tuple[int, int]] | None:
    """Each statement's (start, end), split on the scanner's `;` tokens, so semicolons
    inside strings, dollar quotes and comments are never split on; None when the
    scanner fails (e.g. an unterminated string: nothing can be split reliably)."""
    try:
        tokens = scan(sql)
    except ParseError:
        return None
    start: int | None = None
    end = 0
    bounds: list[tuple[int, int]] = []
    for token in tokens:
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            continue
        if token.name == "ASCII_59":  # ';'
            if start is not None:
                bounds.append((start, token.start))
            start = None
        elif start is None:
            start = token.start
        end = token.end + 1
    if start is not None:
        bounds.append((start, end))
    return bounds


def _parsed_one_by_one(sql: str, whole_file_error: ParseError) -> Iterator[tuple[int, str, Any]]:
    """After a syntax error, parse statement by statement so the others are still checked."""
    bounds = _scanned(sql)
    if bounds is None:
        location = whole_file_error.args[1] if len(whole_file_error.args) > 1 else 0
        yield location if isinstance(location, int) else 0, sql, whole_file_error
        return
    for begin, finish in bounds:
        text = sql[begin:finish]
        repack = _repack(text)
        if repack is not None:
            yield begin, text, repack
            continue
        try:
            raws = parse_sql(text)
        except ParseError as error:
            yield begin, text, error
            continue
        for raw in raws:
            yield begin + (raw.stmt_location or 0), text, raw.stmt


@dataclass(frozen=True)
class Repack:
    """REPACK (PostgreSQL 19: VACUUM FULL and CLUSTER in one, and a CONCURRENTLY form),
    which pglast's grammar (PostgreSQL 18) does not know yet."""

    table: str | None  # as written, schema included; None: every table
    concurrently: bool


_IDENT = r'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")'
# REPACK [ ( option [, ...] ) ] [ table [ ( column [, ...] ) ] [ USING INDEX [ index ] ] ],
# nothing else: anything more (a missing semicolon, say) is left to the parser to reject.
_REPACK = re.compile(
    rf"repack\s*(?:\((?P<options>[^()]*)\)\s*)?"
    rf"(?:(?!using\b)(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)\s*"
    rf"(?:\(\s*{_IDENT}(?:\s*,\s*{_IDENT})*\s*\)\s*)?)?"
    rf"(?:using\s+index(?:\s+{_IDENT})?\s*)?",
    re.IGNORECASE,
)
_IDENTS = re.compile(_IDENT, re.IGNORECASE)
_REPACK_OPTION = re.compile(
    r"\s*(verbose|analyze|concurrently)(?:\s+(true|on|1|false|off|0))?\s*", re.IGNORECASE
)


def _unquoted(ident: str) -> str:
    """A name as PostgreSQL (and pglast) gives it: quotes removed, else lowercased."""
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident.lower()


def _repack(text: str) -> Repack | None:
    """The REPACK statement `text` is, or None when it is anything else."""
    match = _REPACK.fullmatch(text.strip())
    if match is None:
        return None
    concurrently = False
    for option in (match["options"] or "").split(",") if match["options"] is not None else ():
        parts = _REPACK_OPTION.fullmatch(option)
        if parts is None:
            return None
        if parts[1].lower() == "concurrently":
            concurrently = (parts[2] or "true").lower() in ("true", "on", "1")
    table = ".".join(map(_unquoted, _IDENTS.findall(match["table"]))) if match["table"] else None
    if concurrently and table is None:  # PostgreSQL refuses it: leave it to the parser
        return None
    return Repack(table, concurrently)


def _refuses_transaction(node: Any) -> bool:
    """PostgreSQL refuses to run it inside a transaction block."""
    if isinstance(node, Repack):  # every table, or CONCURRENTLY (as the other concurrent forms)
        return node.table is None or node.concurrently
    if isinstance(node, (ast.IndexStmt, ast.DropStmt)):
        return bool(node.concurrent)
    if isinstance(node, ast.ReindexStmt):
        return any(p.defname == "concurrently" for p in node.params or ())
    if isinstance(node, ast.VacuumStmt):
        return bool(node.is_vacuumcmd)
    if isinstance(node, ast.AlterTableStmt):
        return any(
            cmd.subtype == AlterTableType.AT_DetachPartition and cmd.def_.concurrent
            for cmd in node.cmds or ()
        )
    return isinstance(
        node,
        (
            ast.CreatedbStmt,
            ast.DropdbStmt,
            ast.AlterSystemStmt,
            ast.CreateTableSpaceStmt,
            ast.DropTableSpaceStmt,
        ),
    )


# A word every transaction statement, and every statement that refuses a
# transaction block, contains; only statements with one are parsed to find out.
# Searched in lowercased text: several times faster than re.IGNORECASE.
_MAY_UNWRAP_WORDS = re.compile(
    r"\b(?:begin|start|commit|end|rollback|abort|savepoint|release|prepare|vacuum"
    r"|concurrently|database|system|tablespace)\b"
)


def _may_unwrap(text: str) -> bool:
    return _MAY_UNWRAP_WORDS.search(text.lower()) is not None


def _raw_if_it_may_unwrap(text: str) -> dict[str, Any] | None:
    return pgjson.raw_statement(text) if _may_unwrap(text) else None


def _applier_wraps(sql: str) -> bool:
    """Whether changeover's applier runs the file in one transaction (database.py):
    yes, unless it has a transaction statement of its own or a statement that
    refuses a transaction block (the applier then runs it as written)."""
    if not _may_unwrap(sql):  # one search of the file decides most files
        return True
    return not any(
        isinstance(node, ast.TransactionStmt) or _refuses_transaction(node)
        # The applier refuses a file PostgreSQL cannot parse: nothing to decide.
        for _, _, node in _parsed(sql, _raw_if_it_may_unwrap, broken=False)
        if not isinstance(node, ParseError)
    )


_DATA_CHANGES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt"})
_DDL = re.compile(r"(?:alter|create|drop)\b", re.IGNORECASE)  # always classified


# CREATE statements whose classifier and `_not_rerunnable` find nothing and change
# nothing when this flag is set (IF NOT EXISTS, OR REPLACE: the object may exist).
_INERT_WITH = {
    "CreateStmt": "if_not_exists",
    "CreateTableAsStmt": "if_not_exists",
    "CreateSeqStmt": "if_not_exists",
    "ViewStmt": "replace",
    "CreateFunctionStmt": "replace",
}


def _needs_classifying(text: str, state: FileState) -> dict[str, Any] | None:
    """The parser's RawStmt of the statement (`pgjson.raw_statement`), or None when the
    statement's classifier would find nothing and change nothing, as its type and
    flags (from the parser's JSON, cheap) show; such statements are not turned into
    a Python AST, the slow part of a big file of data statements."""
    if state.new_enum_values:  # any statement may use the new value
        return pgjson.raw_statement(text)
    if _DDL.match(text):  # (a statement starts at its first token)
        raw = pgjson.raw_statement(text)
        node = raw.get("stmt")
        if isinstance(node, dict) and len(node) == 1:
            ((kind, fields),) = node.items()
            flag = _INERT_WITH.get(kind)
            if flag is not None and isinstance(fields, dict) and fields.get(flag):
                return None
        return raw
    tree = parse_sql_json(text)
    start = tree.index('"stmt":{"') + len('"stmt":{"')
    kind = tree[start : tree.index('"', start)]
    if kind in _HARMLESS:
        return None
    if kind in _DATA_CHANGES and not state.held:  # a backfill only matters under a held lock
        return None
    if kind == "SelectStmt" and '"FuncCall"' not in tree:
        return None  # only set_config(), or a function created in the file, matters
    return pgjson.raw_statement(text, tree)


def _not_rerunnable(node: Any) -> str | None:
    """Why the statement fails when run a second time, for the statements that have a
    form that would not (IF [NOT] EXISTS, OR REPLACE)."""
    if isinstance(
        node,
        (
            ast.CreateStmt,
            ast.IndexStmt,
            ast.CreateSeqStmt,
            ast.CreateSchemaStmt,
            ast.CreateExtensionStmt,
            ast.CreateTableAsStmt,
        ),
    ):
        return None if node.if_not_exists else "CREATE without IF NOT EXISTS"
    if isinstance(node, (ast.ViewStmt, ast.CreateFunctionStmt)):
        return None if node.replace else "CREATE without OR REPLACE"
    if isinstance(node, ast.DropStmt):
        return None if node.missing_ok else "DROP without IF EXISTS"
    if isinstance(node, ast.AlterEnumStmt) and node.oldVal is None:
        return None if node.skipIfNewValExists else "ADD VALUE without IF NOT EXISTS"
    if isinstance(node, ast.AlterTableStmt):
        for cmd in node.cmds or ():
            if cmd.subtype == AlterTableType.AT_AddColumn and not cmd.missing_ok:
                return "ADD COLUMN without IF NOT EXISTS"
            if cmd.subtype == AlterTableType.AT_DropColumn and not cmd.missing_ok:
                return "DROP COLUMN without IF EXISTS"
    return None


def statements(sql: str, state: FileState) -> Iterator[Statement]:
    # changeover's applier runs a file it cannot wrap as written, and on resume
    # runs it again from the top: each statement must then be safe to repeat.
    as_written = False
    if state.transactions == "per-file":
        state.in_transaction = _applier_wraps(sql)
        as_written = not state.in_transaction
    # Lazy: each statement is judged after the previous one updated `state`.
    for offset, text, node in _parsed(sql, lambda text: _needs_classifying(text, state)):
        if isinstance(node, ParseError):
            hits = [Hit(UNPARSEABLE, f"PostgreSQL's parser rejects it ({node.args[0]})")]
        else:
            hits = _uses_new_enum_value(node, state) if state.new_enum_values else []
            hits += _classify(node, state)
            if as_written and (why := _not_rerunnable(node)):
                hits.append(Hit("non-idempotent-ddl", f"{why}, in a file run as written"))
        yield Statement(offset, text, hits)


# --- small AST helpers -------------------------------------------------------


def _name(node: Any) -> str:
    """The unqualified name in a String, a qualified-name tuple, a TypeName or a function."""
    if isinstance(node, ast.String):
        return str(node.sval)
    if isinstance(node, (tuple, list)):
        return _name(node[-1]) if node else "?"
    if isinstance(node, ast.TypeName):
        return _name(node.names)
    if isinstance(node, ast.ObjectWithArgs):
        return _name(node.objname)
    if isinstance(node, ast.RangeVar):
        return str(node.relname)
    return "?"


def _qualified(node: Any) -> str:
    """An object's name as written, schema included (`scratch.users`), so that an
    object created in the file is not confused with another schema's."""
    if isinstance(node, ast.RangeVar):
        return f"{node.schemaname}.{node.relname}" if node.schemaname else str(node.relname)
    if isinstance(node, (tuple, list)):
        return ".".join(_qualified(part) for part in node) or "?"
    if isinstance(node, ast.TypeName):
        return _qualified(node.names)
    if isinstance(node, ast.ObjectWithArgs):
        return _qualified(node.objname)
    return _name(node)


def _creates(node: Any) -> bool:
    """False for IF NOT EXISTS and OR REPLACE: the object may exist, and be in use."""
    return not (getattr(node, "if_not_exists", False) or getattr(node, "replace", False))


def _col_type(type_name: Any) -> ColType:
    params = tuple(
        str(mod.val.ival if isinstance(mod.val, ast.Integer) else _name(mod.val))
        for mod in (type_name.typmods or ())
        if isinstance(mod, ast.A_Const)
    )
    name = _name(type_name.names).lower() + ("[]" if type_name.arrayBounds else "")
    return ColType(name, params)


def _reversed_attributes(cls: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """A node's attribute values, last first, in one C call (`attrgetter`)."""
    names = tuple(reversed(tuple(cls.__slots__)))
    if len(names) > 1:
        return attrgetter(*names)
    return (lambda node: (getattr(node, names[0]),)) if names else (lambda node: ())


_ATTRIBUTES_REVERSED: dict[type[Any], Callable[[Any], tuple[Any, ...]]] = {}


def _walk(node: Any) -> Iterator[Any]:
    """Every node under `node`, itself first, in attribute order (a stack, not
    nested generators: each level of those costs a resumption per node)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, ast.Node):
            yield item
            cls = type(item)
            attributes = _ATTRIBUTES_REVERSED.get(cls)
            if attributes is None:
                attributes = _ATTRIBUTES_REVERSED[cls] = _reversed_attributes(cls)
            stack.extend(attributes(item))


def _volatile_call(expr: Any) -> str | None:
    """A function in the expression that is not a known non-volatile built-in."""
    for node in _walk(expr):
        if isinstance(node, ast.FuncCall):
            parts = tuple(node.funcname or ())
            schema = _qualified(parts[:-1]) if len(parts) > 1 else "pg_catalog"
            if schema != "pg_catalog" or _name(parts).lower() not in NON_VOLATILE_FUNCTIONS:
                return _qualified(parts)
    return None


def _constraint_hit(table: str, con: Any) -> Hit | None:
    rule = _CONSTRAINT_RULES.get(con.contype)
    if rule is None or con.skip_validation or con.indexname:
        return None
    kind = ConstrType(con.contype).name.removeprefix("CONSTR_")
    label = f" {con.conname}" if con.conname else ""
    return Hit(rule, f"adds {kind} constraint{label} to {table}", table)


# --- classifiers, one per statement type --------------------------------------

Classifier = Callable[[Any, FileState], list[Hit]]


def _lock(table: str | None, mode: str | None = ACCESS_EXCLUSIVE) -> Hit:
    return Hit(LOCK_TIMEOUT, f"locks {table or 'an existing object'}", table, mode)


def _row_filler(ctype: ColType, kinds: set[Any], stored: bool) -> str | None:
    """What, besides a DEFAULT, gives every existing row a computed value."""
    if ctype.name in _SERIAL_TYPES:
        return "serial"
    if ConstrType.CONSTR_IDENTITY in kinds:
        return "identity"
    return "stored generated" if stored else None


def _add_column(table: str, col: Any, state: FileState) -> list[Hit]:
    column, ctype = str(col.colname), _col_type(col.typeName)
    cons = list(col.constraints or ())
    kinds = {c.contype for c in cons}
    default = next((c.raw_expr for c in cons if c.contype == ConstrType.CONSTR_DEFAULT), None)
    stored = any(c.contype == ConstrType.CONSTR_GENERATED and c.generated_kind == "s" for c in cons)
    filler = _row_filler(ctype, kinds, stored)
    not_null = bool(col.is_not_null) or ConstrType.CONSTR_NOTNULL in kinds
    where = f"{table}.{column}"
    hits: list[Hit] = []
    if not_null and default is None and filler is None:
        hits.append(Hit("adding-required-field", f"adds NOT NULL column {where}", table))
    volatile = _volatile_call(default)
    if volatile or filler:
        what = (
            f"default {volatile}() (not a known non-volatile built-in)"
            if volatile
            else (f"{filler} column")
        )
        hits.append(Hit("adding-field-with-default", f"adds {where} with a {what}", table))
    if ctype.name == "json":
        hits.append(Hit("adding-json-field", f"adds json column {where}", table))
    # An inline NOT NULL was judged above; the other inline constraints lock like table ones.
    inline = (c for c in cons if c.contype != ConstrType.CONSTR_NOTNULL)
    hits.extend(h for c in inline if (h := _constraint_hit(table, c)))
    state.schema.columns[(table, column)] = ColumnInfo(ctype, not_null)
    return hits


def _not_null_column(expr: Any) -> str | None:
    """The column of `col IS NOT NULL`, alone or ANDed with more (PostgreSQL proves
    NOT NULL from either)."""
    if isinstance(expr, ast.BoolExpr) and expr.boolop == BoolExprType.AND_EXPR:
        return next(filter(None, map(_not_null_column, expr.args or ())), None)
    if (
        isinstance(expr, ast.NullTest)
        and expr.nulltesttype == NullTestType.IS_NOT_NULL
        and isinstance(expr.arg, ast.ColumnRef)
    ):
        return _name(expr.arg.fields)
    return None


def _drop_default(table: str, cmd: Any, state: FileState) -> list[Hit]:
    """DROP DEFAULT affects new rows only, but the old release's INSERTs that omit a
    NOT NULL column relied on it.  Passes only for a column known to be nullable."""
    info = state.schema.columns.get((table, str(cmd.name)))
    if info is not None and not info.not_null:
        return []
    known = "NOT NULL" if info else "nullability not declared in the checked files"
    detail = f"drops the default of {table}.{cmd.name} ({known})"
    return [Hit("dropping-required-field-default", detail, table)]


def _remember_not_null_check(table: str, con: Any, state: FileState) -> None:
    """Note CHECK (col IS NOT NULL), so that a later SET NOT NULL is known to be cheap."""
    name = _not_null_column(con.raw_expr) if con.contype == ConstrType.CONSTR_CHECK else None
    if name is None:
        return
    column = (table, name)
    if con.skip_validation and con.conname:
        state.schema.unvalidated_not_null_checks[str(con.conname)] = column
    elif not con.skip_validation:
        state.schema.validated_not_null.add(column)


def _alter_table_cmd(table: str, cmd: Any, state: FileState) -> list[Hit]:
    subtype = cmd.subtype
    if subtype == AlterTableType.AT_AddColumn:
        return _add_column(table, cmd.def_, state)
    if subtype == AlterTableType.AT_DropColumn:
        state.schema.columns.pop((table, str(cmd.name)), None)
        return [Hit("ban-drop-column", f"drops column {table}.{cmd.name}", table)]
    if subtype == AlterTableType.AT_AlterColumnType:
        hit = retype(state, "postgres", table, str(cmd.name), _col_type(cmd.def_.typeName))
        return [hit] if hit else []
    if subtype == AlterTableType.AT_SetNotNull:
        if (table, str(cmd.name)) in state.schema.validated_not_null:
            return []
        return [Hit("adding-not-nullable-field", f"sets {table}.{cmd.name} NOT NULL", table)]
    if subtype == AlterTableType.AT_AddConstraint:
        _remember_not_null_check(table, cmd.def_, state)
        hit = _constraint_hit(table, cmd.def_)
        return [hit] if hit else []
    if subtype == AlterTableType.AT_ValidateConstraint:
        checked = state.schema.unvalidated_not_null_checks.pop(str(cmd.name), None)
        if checked:
            state.schema.validated_not_null.add(checked)
        return state.held_lock(f"VALIDATE CONSTRAINT {cmd.name} scans {table}")
    if subtype == AlterTableType.AT_DropNotNull:
        state.schema.columns.pop((table, str(cmd.name)), None)
        return [Hit("ban-drop-not-null", f"drops NOT NULL of {table}.{cmd.name}", table)]
    if subtype == AlterTableType.AT_ColumnDefault:
        return _drop_default(table, cmd, state) if cmd.def_ is None else []
    if subtype == AlterTableType.AT_DetachPartition:
        if cmd.def_.concurrent:
            return _concurrently(state, "detaches a partition")
        detail = f"detaches partition {_qualified(cmd.def_.name)} from {table}"
        return [Hit("require-concurrent-partition-detach", detail, table)]
    if subtype in _ALTER_HARMLESS:
        return []
    what = AlterTableType(subtype).name.removeprefix("AT_")
    return [Hit(NEEDS_REVIEW, f"ALTER TABLE {table} {what} is not classified")]


def _cmd_lock(cmd: Any) -> str | None:
    if cmd.subtype == AlterTableType.AT_AddConstraint and (
        cmd.def_.contype == ConstrType.CONSTR_FOREIGN
    ):
        return SHARE_ROW_EXCLUSIVE
    return _ALTER_LOCKS.get(cmd.subtype, ACCESS_EXCLUSIVE)


def _foreign_tables(cmds: Any) -> list[str]:
    """Tables an added foreign key references: locked SHARE ROW EXCLUSIVE too."""
    return [
        _qualified(node.pktable)
        for cmd in cmds
        if cmd.def_ is not None
        for node in _walk(cmd.def_)
        if isinstance(node, ast.Constraint) and node.contype == ConstrType.CONSTR_FOREIGN
    ]


def _alter_table(node: Any, state: FileState) -> list[Hit]:
    table = _qualified(node.relation)
    cmds = list(node.cmds or ())
    if node.objtype not in (ObjectType.OBJECT_TABLE, ObjectType.OBJECT_FOREIGN_TABLE):
        return [_lock(table)]
    if len(cmds) == 1:  # the usual ALTER TABLE: one subcommand
        mode = _cmd_lock(cmds[0])
    else:
        mode = max(map(_cmd_lock, cmds), key=_LOCK_STRENGTH.__getitem__, default=None)
    hits = [_lock(table, mode)]
    hits.extend(_lock(other, SHARE_ROW_EXCLUSIVE) for other in _foreign_tables(cmds))
    for cmd in cmds:
        hits.extend(_alter_table_cmd(table, cmd, state))
    return hits


def _concurrently(state: FileState, what: str) -> list[Hit]:
    if state.in_transaction:
        return [Hit("ban-concurrent-index-creation-in-transaction", f"{what} CONCURRENTLY")]
    return []


def _create_index(node: Any, state: FileState) -> list[Hit]:
    table = _qualified(node.relation)
    if node.idxname and _creates(node):
        schema = node.relation.schemaname  # an index lives in its table's schema
        state.created.add(f"{schema}.{node.idxname}" if schema else str(node.idxname))
    name = f" {node.idxname}" if node.idxname else ""
    # Also CONCURRENTLY: from now on the old release's duplicate writes fail.
    unique = [Hit("adding-unique-index", f"creates unique index{name} on {table}", table)]
    hits = unique if node.unique else []
    if node.concurrent:
        return hits + _concurrently(state, "creates an index")
    rule = "require-concurrent-index-creation"
    return [*hits, Hit(rule, f"creates index{name} on {table}", table), _lock(table, SHARE)]


def _drop(node: Any, state: FileState) -> list[Hit]:
    kind = node.removeType
    if kind == ObjectType.OBJECT_INDEX and node.concurrent:
        return _concurrently(state, "drops an index")
    hits: list[Hit] = []
    for obj in node.objects or ():
        name = _qualified(obj)
        if kind == ObjectType.OBJECT_INDEX:
            hits.append(Hit("require-concurrent-index-deletion", f"drops index {name}", name))
        elif kind == ObjectType.OBJECT_TABLE:
            hits.append(Hit("ban-drop-table", f"drops table {name}", name))
        else:
            what = ObjectType(kind).name.removeprefix("OBJECT_").lower()
            hits.append(Hit("ban-drop-object", f"drops {what} {name}", name))
        hits.append(_lock(name))
    return hits


def _rename(node: Any, state: FileState) -> list[Hit]:
    kind, new = node.renameType, node.newname
    table = _qualified(node.relation) if node.relation else None
    if kind == ObjectType.OBJECT_COLUMN:
        hit = Hit("renaming-column", f"renames {table}.{node.subname} to {new}", table)
    elif kind == ObjectType.OBJECT_TABLE:
        hit = Hit("renaming-table", f"renames table {table} to {new}", table)
    elif kind in _RENAME_HARMLESS:
        return [_lock(table)]
    else:
        old = table or (str(node.subname) if node.subname else _qualified(node.object))
        what = ObjectType(kind).name.removeprefix("OBJECT_").lower()
        hit = Hit("renaming-object", f"renames {what} {old} to {new}", old)
    return [hit, _lock(hit.obj)]


def _set_schema(node: Any, state: FileState) -> list[Hit]:
    name = _qualified(node.relation) if node.relation else _qualified(node.object)
    hit = Hit("renaming-object", f"moves {name} to schema {node.newschema}", name)
    return [hit, _lock(name)]


def _alter_enum(node: Any, state: FileState) -> list[Hit]:
    name = _qualified(node.typeName)
    if node.oldVal is not None:
        detail = f"renames value {node.oldVal!r} of {name} to {node.newVal!r}"
        return [Hit("renaming-enum-value", detail, name), _lock(name)]
    hits = [_lock(name)]
    if node.newValNeighbor is not None:
        where = "after" if node.newValIsAfter else "before"
        detail = f"adds value {node.newVal!r} to {name} {where} {node.newValNeighbor!r}"
        hits.append(Hit("adding-enum-value-out-of-order", detail, name))
    # PostgreSQL 12+ accepts ADD VALUE in a transaction (the applier's or the file's
    # own), but refuses to use the value before it commits: `_uses_new_enum_value`.
    if state.in_transaction:
        state.new_enum_values[str(node.newVal)] = name
    return hits


def _uses_new_enum_value(node: Any, state: FileState) -> list[Hit]:
    """A string constant equal to a label ADD VALUE added in the open transaction:
    PostgreSQL fails it with 'unsafe use of new value' (and the file with it)."""
    for const in _walk(node):
        if isinstance(const, ast.A_Const) and isinstance(const.val, ast.String):
            enum = state.new_enum_values.get(str(const.val.sval))
            if enum is not None:
                detail = (
                    f"uses {const.val.sval!r}, which ADD VALUE added to {enum} earlier in "
                    "this transaction"
                )
                return [Hit("adding-enum-value-in-transaction", detail, enum)]
    return []


_TIMEOUTS = frozenset({"lock_timeout", "statement_timeout"})


def _disables_timeout(arg: Any) -> bool:
    """SET lock_timeout = 0 (in any unit) switches the timeout off."""
    value = arg.val.ival if isinstance(arg.val, ast.Integer) else _name(arg.val)
    digits = "".join(ch for ch in str(value) if ch.isdigit() or ch == ".")
    return not digits or float(digits) == 0


def _set_timeout(state: FileState, setting: str, enabled: bool, local: bool) -> None:
    # SET LOCAL outside a transaction block has no effect (PostgreSQL warns).
    timeouts = state.local_timeouts if local else state.session_timeouts
    if enabled and (state.in_transaction or not local):
        timeouts.add(setting)
    else:
        timeouts.discard(setting)


def _set(node: Any, state: FileState) -> list[Hit]:
    if node.kind == VariableSetKind.VAR_RESET_ALL:
        state.session_timeouts.clear()
        state.local_timeouts.clear()
    if node.name == "search_path":
        # Unqualified names may now mean another schema's objects.
        state.created = {name for name in state.created if "." in name}
    if node.name not in _TIMEOUTS:
        return []
    args = [a for a in node.args or () if isinstance(a, ast.A_Const)]
    enabled = bool(args) and not _disables_timeout(args[0])  # RESET / DEFAULT: off
    _set_timeout(state, str(node.name), enabled, bool(node.is_local))
    return []


def _select(node: Any, state: FileState) -> list[Hit]:
    """SELECT is harmless, except set_config('lock_timeout', ...), which sets it (and
    statement_timeout),
    and a call of a function created in this file, which may hide any DDL."""
    hits: list[Hit] = []
    for call in _walk(node):
        if not isinstance(call, ast.FuncCall):
            continue
        name = _qualified(call.funcname)
        args = list(call.args or ())
        if name in ("set_config", "pg_catalog.set_config") and len(args) == 3:
            setting, value, local = args
            if isinstance(setting, ast.A_Const) and _name(setting.val) in _TIMEOUTS:
                enabled = isinstance(value, ast.A_Const) and not _disables_timeout(value)
                is_local = isinstance(local, ast.A_Const) and bool(
                    getattr(local.val, "boolval", False)
                )
                _set_timeout(state, _name(setting.val), enabled, is_local)
        elif name in state.created:
            detail = f"calls {name}(), created in this file: its body may run any DDL"
            hits.append(Hit(NEEDS_REVIEW, detail))
    return hits


def _transaction(node: Any, state: FileState) -> list[Hit]:
    if node.kind in _TRANSACTION_START:
        state.in_transaction = True
    elif node.kind in _TRANSACTION_END:
        state.end_transaction()
        # COMMIT AND CHAIN / ROLLBACK AND CHAIN open the next transaction at once.
        state.in_transaction = bool(node.chain)
    return []


def _created(name_of: Callable[[Any], Any]) -> Classifier:
    """A classifier for CREATE statements: remember the new object, nothing to report."""

    def classify(node: Any, state: FileState) -> list[Hit]:
        if _creates(node):
            state.created.add(_qualified(name_of(node)))
        return []

    return classify


def _create_table(node: Any, state: FileState) -> list[Hit]:
    table = _qualified(node.relation)
    if not _creates(node):
        return []  # the existing table, with columns of its own
    state.created.add(table)
    for element in node.tableElts or ():
        if isinstance(element, ast.ColumnDef):
            not_null = bool(element.is_not_null) or any(
                c.contype == ConstrType.CONSTR_NOTNULL for c in element.constraints or ()
            )
            info = ColumnInfo(_col_type(element.typeName), not_null)
            state.schema.columns[(table, str(element.colname))] = info
    return []


def _create_trigger(node: Any, state: FileState) -> list[Hit]:
    table = _qualified(node.relation)
    if _creates(node):
        state.created.add(f"{table}.{node.trigname}")  # as DROP TRIGGER tr ON t names it
    return [_lock(table, SHARE_ROW_EXCLUSIVE)]


def _data_change(node: Any, state: FileState) -> list[Hit]:
    """UPDATE, DELETE and INSERT ... SELECT: a backfill that may run long.  Data
    changes are the author's business, unless a held lock makes them block."""
    if isinstance(node, ast.InsertStmt):
        select = node.selectStmt
        if not (isinstance(select, ast.SelectStmt) and select.fromClause):
            return []
    verb = type(node).__name__.removesuffix("Stmt").upper()
    return state.held_lock(f"{verb} of {_qualified(node.relation)} touches every matching row")


def _repack_table(node: Repack, state: FileState) -> list[Hit]:
    if node.concurrently:
        return _concurrently(state, "repacks")
    name = node.table or "every table"
    return [Hit("prefer-repack", f"REPACK {name} without CONCURRENTLY", name), _lock(name)]


def _reindex(node: Any, state: FileState) -> list[Hit]:
    name = _qualified(node.relation) if node.relation else str(node.name)
    if _refuses_transaction(node):
        return _concurrently(state, "reindexes")
    return [Hit("require-concurrent-reindex", f"reindexes {name}", name), _lock(name)]


def _rewrites_in_place(node: Any, state: FileState) -> list[Hit]:
    """VACUUM FULL and CLUSTER rewrite the table under ACCESS EXCLUSIVE; a plain VACUUM
    or ANALYZE does not."""
    if isinstance(node, ast.VacuumStmt):
        if not any(o.defname == "full" for o in node.options or ()):
            return []
        names = [_qualified(r.relation) for r in node.rels or ()] or ["every table"]
        return [h for n in names for h in (Hit("prefer-repack", f"VACUUM FULL {n}", n), _lock(n))]
    name = _qualified(node.relation) if node.relation else "every clustered table"
    return [Hit("prefer-repack", f"CLUSTER {name}", name), _lock(name)]


def _truncate(node: Any, state: FileState) -> list[Hit]:
    names = [_qualified(r) for r in node.relations or ()]
    hits = [_lock(n) for n in names]
    if node.behavior == DropBehavior.DROP_CASCADE:
        detail = f"truncates {', '.join(names)} and every table referencing them"
        hits.append(Hit("ban-truncate-cascade", detail))
    return hits


def _alter_domain(node: Any, state: FileState) -> list[Hit]:
    name = _qualified(node.typeName)
    con = node.def_
    if node.subtype == "C" and isinstance(con, ast.Constraint) and not con.skip_validation:
        detail = f"adds a constraint to domain {name}, checked on every column using it"
        return [Hit("ban-alter-domain-with-add-constraint", detail, name), _lock(name)]
    return [_lock(name)]


def _drop_database(node: Any, state: FileState) -> list[Hit]:
    return [Hit("ban-drop-database", f"drops database {node.dbname}")]


def _do(node: Any, state: FileState) -> list[Hit]:
    return [Hit(NEEDS_REVIEW, "a DO block runs procedural code the analyser cannot see into")]


_CLASSIFIERS: dict[type[Any], Classifier] = {
    ast.AlterTableStmt: _alter_table,
    ast.IndexStmt: _create_index,
    ast.DropStmt: _drop,
    ast.RenameStmt: _rename,
    ast.AlterObjectSchemaStmt: _set_schema,
    ast.AlterEnumStmt: _alter_enum,
    ast.VariableSetStmt: _set,
    ast.TransactionStmt: _transaction,
    ast.CreateStmt: _create_table,
    ast.CreateTrigStmt: _create_trigger,
    ast.DoStmt: _do,
    ast.SelectStmt: _select,
    ast.ReindexStmt: _reindex,
    Repack: _repack_table,
    ast.VacuumStmt: _rewrites_in_place,
    ast.ClusterStmt: _rewrites_in_place,
    ast.TruncateStmt: _truncate,
    ast.AlterDomainStmt: _alter_domain,
    ast.DropdbStmt: _drop_database,
    ast.UpdateStmt: _data_change,
    ast.DeleteStmt: _data_change,
    ast.InsertStmt: _data_change,
    ast.CreateTableAsStmt: _created(lambda n: n.into.rel),
    ast.ViewStmt: _created(lambda n: n.view),
    ast.CreateSeqStmt: _created(lambda n: n.sequence),
    ast.CreateEnumStmt: _created(lambda n: n.typeName),
    ast.CreateDomainStmt: _created(lambda n: n.domainname),
    ast.CompositeTypeStmt: _created(lambda n: n.typevar),
    ast.CreateFunctionStmt: _created(lambda n: n.funcname),
}


def _classify(node: Any, state: FileState) -> list[Hit]:
    classifier = _CLASSIFIERS.get(type(node))
    if classifier is not None:
        return classifier(node, state)
    kind = type(node).__name__
    if kind in _HARMLESS:
        return []
    return [Hit(NEEDS_REVIEW, f"{kind.removesuffix('Stmt')} statements are not classified")]
