"""`changeover journal export | import`: a site's history between SQLite and [site] state_url."""

from __future__ import annotations

from pathlib import Path

from changeover import journalio
from changeover.commands import EXIT_BAD_INPUT, EXIT_REFUSED
from changeover.commands.common import load_config
from changeover.commands.output import err, fail, out
from changeover.journal import JournalError


def export(config: Path, target: Path | None, sqlite: bool) -> None:
    topo = load_config(config)
    try:
        count = journalio.export_history(topo, target, sqlite)
    except (JournalError, OSError) as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    err.print(f"exported {count} release(s) of site {topo.site.name}", markup=False)


def import_(config: Path, source: Path, force: bool, sqlite: bool) -> None:
    topo = load_config(config)
    try:
        count = journalio.import_history(
            topo, None if str(source) == "-" else source, force, sqlite
        )
    except (JournalError, journalio.HistoryFileError) as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    except journalio.ImportRefused as exc:
        fail(EXIT_REFUSED, str(exc))
    out.print(f"imported {count} release(s) of site {topo.site.name}", markup=False)
