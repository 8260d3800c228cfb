"""pglast's AST of a statement, built from PostgreSQL's parser's JSON.

`pglast.parse_sql` builds every node through a validating `__setattr__` that
checks and coerces each attribute: for a big migration file that is most of
the check's time.  The parser's JSON (`parse_sql_json`, libpg_query's output)
holds the same tree, already valid; `json.loads` and the plain construction
below give the same nodes, compared with pglast's own in
tests/unit/test_migrations.py.  Locations are not carried (the JSON counts
bytes, pglast characters; the classifiers read none): they are None.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pglast import ast, enums, parse_sql
from pglast.parser import parse_sql_json

# How each kind of attribute is read from the JSON, by the C type pglast records
# for it; a class's attributes are grouped by kind, so each group is one tight loop.
_INTEGERS = frozenset(
    {
        "int",
        "int16",
        "int32",
        "uint32",
        "uint64",
        "long",
        "Index",
        "AttrNumber",
        "Oid",
        "bits32",
        "AclMode",
        "SubTransactionId",
        "RelFileNumber",
    }
)
_FLOATS = frozenset({"double", "Cardinality", "Cost"})
_CLASSES: dict[str, type[Any]] = {
    name: cls
    for name, cls in vars(ast).items()
    if isinstance(cls, type)
    and issubclass(cls, ast.Node)
    and isinstance(getattr(cls, "__slots__", None), dict)
}
# JSON key -> attribute, where pglast renames a C field that is a Python keyword.
_RENAMED = {"def_": "def"}
_new, _set = object.__new__, object.__setattr__  # no validation: the parser made it


@dataclass(frozen=True)
class _Plan:
    plain: tuple[tuple[str, str, Any], ...]  # (attribute, JSON key, value when absent)
    nodes: tuple[tuple[str, str], ...]  # Node*, Expr*: {"Type": {fields}}
    lists: tuple[tuple[str, str], ...]
    structs: tuple[tuple[str, str, type[Any]], ...]  # one node type: its fields, unwrapped
    # (attribute, JSON key, the enum's members by name, its member 0 for an absent key)
    enums: tuple[tuple[str, str, Mapping[str, Enum], Enum | None], ...]


def _plan_of(cls: type[Any]) -> _Plan:
    plain: list[tuple[str, str, Any]] = []
    nodes: list[tuple[str, str]] = []
    lists: list[tuple[str, str]] = []
    structs: list[tuple[str, str, type[Any]]] = []
    kinds: list[tuple[str, str, Mapping[str, Enum], Enum | None]] = []
    for slot, info in cls.__slots__.items():
        ctype, key = info.c_type, _RENAMED.get(slot, slot)
        enum = getattr(enums, ctype, None)
        target = _CLASSES.get(ctype.removesuffix("*"))
        if ctype == "ParseLoc":
            plain.append((slot, "", None))  # no such key: always None
        elif ctype == "bool":
            plain.append((slot, key, False))
        elif ctype in _INTEGERS:
            plain.append((slot, key, 0))
        elif ctype in _FLOATS:
            plain.append((slot, key, 0.0))
        elif ctype == "char":  # pglast: chr() of the C char, so "\0" when unset
            plain.append((slot, key, "\0"))
        elif ctype == "char*":
            plain.append((slot, key, None))
        elif ctype == "List*":
            lists.append((slot, key))
        elif isinstance(enum, type) and issubclass(enum, Enum):
            zero = next((m for m in enum if m.value == 0), None)
            kinds.append((slot, key, enum.__members__, zero))
        elif target is not None:
            structs.append((slot, key, target))
        else:
            nodes.append((slot, key))
    return _Plan(tuple(plain), tuple(nodes), tuple(lists), tuple(structs), tuple(kinds))


_PLANS = {cls: _plan_of(cls) for cls in _CLASSES.values()}


def _build(cls: type[Any], data: dict[str, Any]) -> Any:
    node = _new(cls)
    plan = _PLANS[cls]
    get = data.get
    for slot, key, absent in plan.plain:
        _set(node, slot, get(key, absent))
    for slot, key, members, zero in plan.enums:
        value = get(key)
        _set(node, slot, zero if value is None else members[value])
    for slot, key in plan.nodes:
        value = get(key)
        _set(node, slot, None if value is None else _node(value))
    for slot, key in plan.lists:
        value = get(key)
        _set(node, slot, None if value is None else tuple(map(_node, value)))
    for slot, key, target in plan.structs:
        value = get(key)
        _set(node, slot, None if value is None else _build(target, value))
    return node


def _a_const(data: dict[str, Any]) -> Any:
    """A_Const keeps its value under the value's own field name (ival, sval...)."""
    node = _new(ast.A_Const)
    value = None
    for key, cls in _CONSTANTS:
        if key in data:
            value = _build(cls, data[key])
            break
    object.__setattr__(node, "isnull", bool(data.get("isnull")))
    object.__setattr__(node, "val", value)
    return node


_CONSTANTS = (
    ("ival", ast.Integer),
    ("sval", ast.String),
    ("fval", ast.Float),
    ("boolval", ast.Boolean),
    ("bsval", ast.BitString),
)
_SPECIAL: dict[str, Callable[[dict[str, Any]], Any]] = {
    "A_Const": _a_const,
    "List": lambda data: tuple(map(_node, data.get("items", ()))),
}


def _node(wrapped: dict[str, Any]) -> Any:
    if not wrapped:  # a NULL list item (DISTINCT's, an operator's missing argument)
        return None
    ((kind, data),) = wrapped.items()
    special = _SPECIAL.get(kind)
    return special(data) if special else _build(_CLASSES[kind], data)


# json.loads without its wrapper's checks (the parser's JSON starts at its first
# character and is all one document): called once per statement.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def raw_statement(text: str, tree: str | None = None) -> dict[str, Any]:
    """The parser's RawStmt of the one statement in `text`, decoded from its JSON
    (`tree`, when the caller has it: `parse_sql_json(text)`).  Raises pglast's
    ParseError as `pglast.parse_sql` does."""
    (raw,) = _scan(parse_sql_json(text) if tree is None else tree, 0)[0]["stmts"]
    return raw  # type: ignore[no-any-return]


def statement(text: str, raw: dict[str, Any] | None = None) -> Any:
    """The node of the one statement in `text` (a RawStmt's stmt), as `pglast.parse_sql`
    gives it, built from `raw` when the caller has it (`raw_statement(text)`).  Raises
    pglast's ParseError as it does."""
    if raw is None:
        raw = raw_statement(text)
    try:
        return _node(raw["stmt"])
    except (KeyError, TypeError, ValueError):  # a node this module cannot build: pglast's
        return parse_sql(text)[0].stmt
