"""`changeover migrations check`: the analyser as a gate (the lead mounts `app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from changeover.migrations.report import Format, format_findings
from changeover.migrations.rules import Dialect, Phase, Transactions

EXIT_CLEAN, EXIT_FINDINGS, EXIT_BAD_INPUT = 0, 1, 2

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def migrations() -> None:
    """Check migrations against the release that is still running."""


@app.command()
def check(
    paths: Annotated[
        list[Path], typer.Argument(metavar="PATH", help=".sql files, or directories of them")
    ],
    dialect: Annotated[Dialect, typer.Option(help="SQL dialect of the files")] = "postgres",
    phase: Annotated[
        Phase | None,
        typer.Option(
            help="phase of every file; default: from each file name (expand unless "
            "it names 'contract')"
        ),
    ] = None,
    transactions: Annotated[
        Transactions,
        typer.Option(
            help="how the files are applied: per-file as changeover applies them (PostgreSQL: "
            "one transaction per file without its own BEGIN/COMMIT or CONCURRENTLY), or "
            "per-statement (autocommit)"
        ),
    ] = "per-file",
    fmt: Annotated[Format, typer.Option("--format", help="output format")] = "text",
    allow: Annotated[
        list[str] | None, typer.Option(metavar="RULE", help="rule id to accept (repeatable)")
    ] = None,
) -> None:
    """Exit 1 when a statement breaks the old release or locks a table, 0 when clean."""
    # The analyser loads here, not with `changeover --help`.
    from changeover.migrations.analysis import allow_refusal, blocking_findings, check_paths

    allowed = set(allow or ())
    refusal = allow_refusal(allowed)
    if refusal:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        findings = check_paths(paths, dialect=dialect, phase=phase, transactions=transactions)
    except (OSError, UnicodeDecodeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    blocking = blocking_findings(findings, allowed)
    typer.echo(format_findings(blocking, fmt))
    if len(blocking) < len(findings):
        typer.echo(f"{len(findings) - len(blocking)} finding(s) allowed by --allow", err=True)
    raise typer.Exit(EXIT_FINDINGS if blocking else EXIT_CLEAN)
