"""What a person sees: the release timeline."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.markup import escape

from changeover.steps import StepKind

if TYPE_CHECKING:
    from rich.console import Console

    from changeover.engine import Event

_LONG_STEPS = {StepKind.WAIT_DRAINED, StepKind.WAIT_HEALTHY, StepKind.APPROVE, StepKind.RUN}


class Timeline:
    """Prints engine events as a readable timeline."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()

    def __call__(self, event: Event) -> None:
        # A message carries versions, outputs and errors: data, never markup.
        elapsed = time.monotonic() - self.t0
        counter = f"{event.index + 1}/{event.total}" if event.index is not None else ""
        mark, style = {
            "step-start": ("…", "dim"),
            "step-done": ("✓", "green"),
            "step-failed": ("✗", "bold red"),
            "warn": ("!", "yellow"),
            "info": ("·", "cyan"),
            "state": ("■", "bold"),
        }.get(event.kind, ("·", ""))
        if event.kind == "step-start" and event.step and event.step.kind not in _LONG_STEPS:
            return  # quick steps: the done line is enough
        self.console.print(
            f"[dim]{elapsed:6.1f}s[/] [{style}]{mark}[/] {counter:>5} {escape(event.message)}",
            highlight=False,
            soft_wrap=True,
        )
