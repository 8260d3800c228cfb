"""Assembling the edges (balancer driver, executor, journal) from a topology."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from rich.console import Console

from changeover.balancers.factory import make_balancer
from changeover.config import Topology
from changeover.engine import Engine
from changeover.executors.base import Executor
from changeover.journal import Journal, journal_path
from changeover.ui import Timeline


def make_executor(topo: Topology) -> Executor:
    if topo.executor.kind == "ssh":
        from changeover.executors.ssh import SshExecutor

        return SshExecutor.from_topology(topo)
    from changeover.executors.local import LocalExecutor

    return LocalExecutor()


def open_journal(topo: Topology) -> Journal:
    return Journal(journal_path(topo.state_dir(), topo.site.name))


async def run_engine(
    topo: Topology,
    go: Callable[[Engine], Coroutine[Any, Any, int]],
    console: Console,
) -> tuple[int, str]:
    """Build the edges, run `go` (which returns a release id to run), clean up.

    SIGINT and SIGTERM ask the engine to stop at the next safe point.
    """
    balancer = make_balancer(topo)
    executor = make_executor(topo)
    journal = await asyncio.to_thread(open_journal, topo)
    engine = Engine(topo, balancer, executor, journal, on_event=Timeline(console))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, engine.interrupt)
    try:
        release_id = await go(engine)
        return release_id, await engine.run(release_id)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await balancer.close()
        await executor.close()
        journal.close()
