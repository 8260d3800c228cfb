"""`changeover journal export` / `import`: a site's history as JSON lines, to
move it between the SQLite journal and the shared one in PostgreSQL.

The file's first line says what it is (`{"format": "changeover-journal",
"version": 1, "site": ...}`); then one line per release, step, command output
and event, each tagged with `type`, in the order the journal keeps them.
Release numbers, times, who ran what and every detail are kept as they were,
so `history` and `show` read the same after the move. An import is one
transaction and refuses a journal that already holds releases of the site
unless forced (which replaces them), and a site whose release lock is held.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from changeover.config import Topology
from changeover.journal import HISTORY_COLUMNS, SCHEMA_VERSION, HistoryExists, Journal
from changeover.runtime import open_store

if TYPE_CHECKING:
    from changeover.pgjournal import PgJournal

FORMAT = "changeover-journal"
VERSION = 1
# The `type` of each line per table, and the columns that hold JSON as text.
_TYPES = {"releases": "release", "steps": "step", "outputs": "output", "events": "event"}
_TABLES = {kind: table for table, kind in _TYPES.items()}
_JSON = {"releases": "plan", "outputs": "argv"}


class HistoryFileError(Exception):
    """The file is not a history this changeover can import; one line naming it."""


class ImportRefused(Exception):
    """The journal cannot take the history as asked (exit 3)."""


@contextmanager
def _store(topo: Topology, sqlite: bool) -> Iterator[Journal | PgJournal]:
    store = open_store(topo, sqlite)
    try:
        yield store
    finally:
        store.close()


def lines(site: str, history: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    """The export, line by line (each ends with a newline)."""
    header = {"format": FORMAT, "version": VERSION, "site": site, "schema": SCHEMA_VERSION,
              "exported": time.time()}  # fmt: skip
    yield json.dumps(header) + "\n"
    for table, rows in history.items():
        for row in rows:
            record = dict(row)
            if table in _JSON:
                record[_JSON[table]] = json.loads(record[_JSON[table]])
            yield json.dumps({"type": _TYPES[table], **record}, ensure_ascii=False) + "\n"


def parse(text: Iterable[str], source: str, site: str) -> dict[str, list[dict[str, Any]]]:
    """The history in an export of `site`; HistoryFileError naming the line."""
    history: dict[str, list[dict[str, Any]]] = {table: [] for table in HISTORY_COLUMNS}
    releases: set[int] = set()
    number = 0
    for number, line in enumerate(text, 1):
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise HistoryFileError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise HistoryFileError(f"{where}: expected a JSON object")
        if number == 1:
            _check_header(record, where, site)
            continue
        kind = record.pop("type", None)
        table = _TABLES.get(kind) if isinstance(kind, str) else None
        if table is None:
            raise HistoryFileError(f"{where}: unknown type {kind!r}; expected {sorted(_TABLES)}")
        columns = HISTORY_COLUMNS[table]
        if set(record) != set(columns):
            missing, extra = set(columns) - set(record), set(record) - set(columns)
            raise HistoryFileError(
                f"{where}: a {kind} needs exactly {list(columns)}"
                + (f"; missing {sorted(missing)}" if missing else "")
                + (f"; unknown {sorted(extra)}" if extra else "")
            )
        key = "id" if table == "releases" else "release_id"
        if not isinstance(record[key], int) or isinstance(record[key], bool):
            raise HistoryFileError(f"{where}: {key} must be a whole number")
        if table == "releases":
            if record["id"] in releases:
                raise HistoryFileError(f"{where}: release #{record['id']} appears twice")
            releases.add(record["id"])
        elif record["release_id"] not in releases:
            raise HistoryFileError(
                f"{where}: a {kind} of release #{record['release_id']}, which the file "
                "does not hold (before this line)"
            )
        if table in _JSON:
            record[_JSON[table]] = json.dumps(record[_JSON[table]])
        history[table].append({c: record[c] for c in columns})
    if number == 0:
        raise HistoryFileError(
            f"{source}: empty; expected an export of `changeover journal export`"
        )
    return history


def _check_header(record: dict[str, Any], where: str, site: str) -> None:
    if record.get("format") != FORMAT:
        raise HistoryFileError(
            f'{where}: not a changeover journal export (no "format": {FORMAT!r} header)'
        )
    if record.get("version") != VERSION:
        raise HistoryFileError(
            f"{where}: export format version {record.get('version')!r}; this changeover "
            f"reads version {VERSION}"
        )
    if record.get("site") != site:
        raise HistoryFileError(
            f"{where}: the history of site {record.get('site')!r}, not of this site {site!r}"
        )


def export_history(topo: Topology, target: Path | None, sqlite: bool) -> int:
    """Write the site's history to `target` (None: stdout); how many releases."""
    with _store(topo, sqlite) as store:
        history = store.history_rows(topo.site.name)
    out: IO[str]
    with open(target, "w", encoding="utf-8") if target else _stdout() as out:
        out.writelines(lines(topo.site.name, history))
    return len(history["releases"])


@contextmanager
def _stdout() -> Iterator[IO[str]]:
    yield sys.stdout
    sys.stdout.flush()


def import_history(topo: Topology, source: Path | None, force: bool, sqlite: bool) -> int:
    """Read an export (None: stdin) into the site's journal; how many releases.
    ImportRefused over existing history unless `force`, and while a release
    holds the site's lock."""
    name = str(source) if source else "<stdin>"
    try:
        if source is None:
            history = parse(sys.stdin, name, topo.site.name)
        else:
            with open(source, encoding="utf-8") as text:
                history = parse(text, name, topo.site.name)
    except OSError as exc:
        raise HistoryFileError(f"{name}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise HistoryFileError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    with _store(topo, sqlite) as store:
        holder = store.lock_holder(topo.site.name)
        if holder is not None and not holder.is_stale():
            raise ImportRefused(
                f"refused: {holder.describe()} holds the site's release lock; "
                "import when no release runs"
            )
        try:
            store.replace_history(topo.site.name, history, force)
        except HistoryExists as exc:
            raise ImportRefused(
                f"refused: {exc} ({_which(topo, sqlite)}); importing would mix two "
                "histories: use --force to replace it"
            ) from None
    return len(history["releases"])


def _which(topo: Topology, sqlite: bool) -> str:
    if topo.site.state_url and not sqlite:
        return "the shared journal of site.state_url"
    return "the SQLite journal in the state directory"
