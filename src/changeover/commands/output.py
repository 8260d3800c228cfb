"""The consoles and the one-line errors: Rich and nothing else, so the CLI's
own usage errors print without importing the rest."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if console.color_system is None:
        # Nothing will be coloured (a pipe, a file, TERM=dumb): highlighting numbers
        # and strings would change no character, and its expressions take tens of
        # ms to compile.
        return Console(stderr=stderr, highlight=False)
    return console


out = _console()
err = _console(stderr=True)


def print_error(message: str) -> None:
    # The message carries user text (versions, paths, rule names): data, not markup.
    err.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True
    )


def fail(code: int, message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """A command's --json result: one document on stdout."""
    print(json.dumps(data, indent=2, default=str), flush=True)
