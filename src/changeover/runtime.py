"""Assembling the engine's ports (balancer driver, executor, checks, database,
journal, clock, hooks) from a topology: the one place that names concrete ones."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console

from changeover.balancers.builtin import admin_url_of
from changeover.balancers.factory import make_balancer
from changeover.checks import Checker
from changeover.config import Topology, url_shown
from changeover.database import SiteDatabase
from changeover.executors.base import Executor
from changeover.hooks import HookRunner
from changeover.journal import Journal, journal_path
from changeover.ports import (
    JournalStore,
    Metrics,
    NoSiteLock,
    Ports,
    Review,
    SiteLock,
    SystemClock,
)
from changeover.releases import Begin, Releases, review_gate
from changeover.sitelock import AdminApiLock, owner_id, shared_owner_id
from changeover.ui import Timeline

if TYPE_CHECKING:
    from changeover.pgjournal import PgJournal

T = TypeVar("T")


def make_executor(topo: Topology) -> Executor:
    if topo.executor.kind == "ssh":
        from changeover.executors.ssh import SshExecutor

        return SshExecutor.from_topology(topo)
    from changeover.executors.local import LocalExecutor

    return LocalExecutor()


def open_journal(topo: Topology) -> Journal:
    """The SQLite journal in the state directory."""
    return Journal(journal_path(topo.state_dir(), topo.site.name))


def open_store(topo: Topology, sqlite: bool = False) -> Journal | PgJournal:
    """The site's journal: in PostgreSQL with `[site] state_url` (unless
    `sqlite`), else the SQLite file. Blocks: call it in a worker thread."""
    if topo.site.state_url and not sqlite:
        from changeover.pgjournal import PgJournal

        return PgJournal(topo.site.state_url, topo.site.name)
    return open_journal(topo)


def make_site_lock(topo: Topology) -> SiteLock:
    """The release lock the balancer holds: the embedded balancer's (the first
    instance's, when there are several); the other drivers hold none."""
    bal = topo.balancer
    token = bal.token()
    if bal.driver != "builtin" or not token:  # no token: make_balancer says so
        return NoSiteLock()
    url = bal.instances[0].admin_url if bal.instances else admin_url_of(topo)
    if not url:
        return NoSiteLock()
    if topo.site.state_url:
        owner = shared_owner_id(url_shown(topo.site.state_url), topo.site.name)
    else:
        owner = owner_id(journal_path(topo.state_dir(), topo.site.name))
    return AdminApiLock(url, token, owner)


def make_metrics(topo: Topology) -> Metrics | None:
    """The source `[policy.analysis]` queries: its Prometheus server, or None."""
    analysis = topo.policy.analysis
    if analysis is None:
        return None
    from changeover.prometheus import PrometheusMetrics

    return PrometheusMetrics(analysis)


def make_ports(topo: Topology, journal: JournalStore, checker: Checker | None = None) -> Ports:
    checker = checker or Checker(topo)
    return Ports(
        balancer=make_balancer(topo),
        executor=make_executor(topo),
        checks=checker,
        migrator=SiteDatabase(topo, checker),
        journal=journal,
        clock=SystemClock(),
        site_lock=make_site_lock(topo),
        notifier=HookRunner(topo),
        metrics=make_metrics(topo),
    )


async def close_ports(ports: Ports) -> None:
    await ports.balancer.close()
    await ports.executor.close()
    await ports.checks.close()
    await ports.notifier.close()
    if ports.metrics is not None:
        await ports.metrics.close()


async def review(topo: Topology, begin: Begin) -> Review | None:
    """The migration gate alone (`changeover plan`): no journal, no balancer."""
    checker = Checker(topo)
    try:
        return await review_gate(topo, SiteDatabase(topo, checker), begin)
    finally:
        await checker.close()


async def with_releases(
    topo: Topology, call: Callable[[Releases], Awaitable[T]], console: Console
) -> T:
    """`call` the service (which opens the journal and builds the other ports
    when it needs them), clean up. SIGINT and SIGTERM ask a running release to stop
    at its next safe point."""
    checker = Checker(topo)  # no connection until a check runs
    journals: list[JournalStore] = []
    built: list[Ports] = []

    def journal() -> JournalStore:
        journals.append(open_store(topo))
        return journals[-1]

    def connect(journal: JournalStore) -> Ports:
        built.append(make_ports(topo, journal, checker))
        return built[-1]

    releases = Releases(
        topo, journal, SiteDatabase(topo, checker), connect, on_event=Timeline(console)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, releases.interrupt)
    try:
        return await call(releases)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for ports in built:
            await close_ports(ports)
        await checker.close()
        for opened in journals:
            await asyncio.to_thread(opened.close)  # a network goodbye for PostgreSQL
