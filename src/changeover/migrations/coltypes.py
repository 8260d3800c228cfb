"""Column types as the parsers report them, and which changes are known-safe widenings.

A type change is only known to be safe when the old type is known, so the
analyser remembers the types declared by CREATE TABLE / ADD COLUMN / ALTER
COLUMN TYPE earlier in the checked files (see `Schema` in analysis.py).
"""

from __future__ import annotations

from typing import NamedTuple

from changeover.migrations.rules import Dialect


class ColType(NamedTuple):
    name: str  # lower case, as the parser normalises it: varchar, numeric, text, enum ...
    params: tuple[str, ...] = ()  # length/precision/scale, or enum labels

    def __str__(self) -> str:
        return f"{self.name}({', '.join(self.params)})" if self.params else self.name


# PostgreSQL stores these without rewriting when the limit grows or is removed.
# Fractional-second precision, like a length limit, may grow or go without a rewrite
# (strong_migrations lists these as safe).
_PG_LENGTH_LIMITED = frozenset({"varchar", "varbit", "timestamp", "timestamptz", "time", "timetz"})
# MySQL keeps a VARCHAR change in place only while the number of length bytes
# stays the same: 1 byte up to 255 bytes.  The character set is unknown here,
# so only lengths that are <= 255 bytes in every charset (<= 63 chars at 4
# bytes/char) or > 255 bytes in every charset (>= 256 chars) are trusted.
_MYSQL_SHORT_VARCHAR = 63
_MYSQL_LONG_VARCHAR = 256


def _int(value: str) -> int | None:
    return int(value) if value.isdigit() else None


def _grows(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """A single length limit grows or disappears."""
    if not new:
        return True
    old_n, new_n = (_int(old[0]) if old else None), _int(new[0])
    return old_n is not None and new_n is not None and new_n >= old_n


def _numeric_grows(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """numeric(p,s) -> numeric(p2>=p, s) or unconstrained numeric."""
    if not new:
        return True
    if not old:
        return False
    old_p, new_p = _int(old[0]), _int(new[0])
    old_s = old[1] if len(old) > 1 else "0"
    new_s = new[1] if len(new) > 1 else "0"
    return old_p is not None and new_p is not None and new_p >= old_p and old_s == new_s


def is_safe_widening(old: ColType, new: ColType, dialect: Dialect) -> bool:
    """True when changing `old` to `new` neither rewrites the table nor rejects old values."""
    if old == new:
        return True
    if dialect == "postgres":
        if old.name in _PG_LENGTH_LIMITED and new.name == old.name:
            return _grows(old.params, new.params)
        if old.name in ("varchar", "text") and new.name == "text":
            return True
        if old.name == "text" and new.name == "varchar":
            return not new.params
        if old.name == new.name == "numeric":
            return _numeric_grows(old.params, new.params)
        if old.name == new.name == "interval":  # params: (fields, precision)
            if not new.params:
                return True
            return old.params[:1] == new.params[:1] and _grows(old.params[1:], new.params[1:])
        if old.name == "citext" and new.name == "text":  # binary-coercible
            return True
        return old.name == "cidr" and new.name == "inet"
    if dialect == "mysql":
        if old.name == new.name == "varchar" and old.params and new.params:
            old_n, new_n = _int(old.params[0]), _int(new.params[0])
            if old_n is None or new_n is None or new_n < old_n:
                return False
            both_short = new_n <= _MYSQL_SHORT_VARCHAR
            both_long = old_n >= _MYSQL_LONG_VARCHAR
            return both_short or both_long
        # Appending labels to an ENUM or SET is an in-place metadata change.
        if old.name == new.name and old.name in ("enum", "set"):
            return new.params[: len(old.params)] == old.params
    return False
