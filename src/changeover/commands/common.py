"""What the command bodies that read a topology share: loading it, and mapping
the release service's failures to exit codes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from changeover import journal as J
from changeover.balancers.base import BalancerError
from changeover.commands import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_STOPPED
from changeover.commands.output import err, fail, out
from changeover.config import ConfigError, Topology, load
from changeover.journal import JournalError, LockHeld
from changeover.migrations import format_findings
from changeover.plan import PlanRefused
from changeover.ports import MigrationError
from changeover.releases import BadRequest, GateRefused, Releases
from changeover.runtime import with_releases

T = TypeVar("T")


def load_config(path: Path) -> Topology:
    try:
        return load(path)
    except ConfigError as exc:
        fail(EXIT_BAD_INPUT, str(exc))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, mapping the expected failures to exit codes."""
    try:
        return asyncio.run(coro)
    except (ConfigError, JournalError, BadRequest) as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    except GateRefused as exc:
        err.print(
            format_findings(exc.findings, "text"), markup=False, highlight=False, soft_wrap=True
        )
        fail(EXIT_REFUSED, str(exc))
    except LockHeld as exc:
        fail(EXIT_REFUSED, f"another release holds the lock: {exc}")
    except PlanRefused as exc:
        fail(EXIT_REFUSED, str(exc))
    except (BalancerError, MigrationError) as exc:
        fail(EXIT_FAILED, str(exc))


def service(
    topo: Topology, call: Callable[[Releases], Awaitable[T]], console: Console | None = None
) -> T:
    """Call the release service with the site's ports, mapping failures to exit codes."""
    return run(with_releases(topo, call, console or out))


_STATE_EXIT = {
    J.DONE: EXIT_OK,
    J.FAILED: EXIT_FAILED,
    J.ROLLED_BACK: EXIT_FAILED,
    J.INTERRUPTED: EXIT_STOPPED,
}


def state_exit(state: str) -> int:
    """The exit code of a command that saw a release end in `state`."""
    return _STATE_EXIT.get(state, EXIT_STOPPED)
