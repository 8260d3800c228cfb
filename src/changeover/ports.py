"""The edges the engine works through, as small Protocols.

The engine imports no concrete driver, executor, checker, database or clock:
it receives a `Ports` built by `runtime.py` (or, in the engine's tests, one of
in-memory fakes). Beside `Balancer` (balancers/base.py) and `Executor`
(executors/base.py), these are the rest of its world.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from changeover.balancers.base import Balancer
from changeover.config import Cluster, Member
from changeover.executors.base import Executor
from changeover.journal import EventRow, LockInfo, OutputRow, ReleaseRow, StepRow
from changeover.migrations import Finding, Phase
from changeover.model import CheckResult, Sample


class MigrationError(Exception):
    """Migrations could not be read or applied, or the old release broke; one line."""


class Checks(Protocol):
    """HTTP checks of members, QA entry points and the live pool."""

    async def health(self, member: Member) -> CheckResult: ...

    async def version(self, member: Member, version: str) -> CheckResult: ...

    async def smoke(self, cluster: Cluster, version: str) -> list[CheckResult]:
        """The smoke checks through the cluster's QA entry point."""
        ...

    async def live_smoke(self, version: str) -> CheckResult | None:
        """The smoke command against the live pool, None when none is configured."""
        ...

    async def versions(self) -> dict[str, str | None]:
        """What each member reports as its version now (None: no answer)."""
        ...

    async def served_version(self) -> str | None:
        """The version the live pool serves now, when it tells."""
        ...

    async def close(self) -> None: ...


class MetricsError(Exception):
    """A metrics query could not be answered (unreachable, refused, malformed); one line."""


class Metrics(Protocol):
    """Where `[policy.analysis]` queries are answered (prometheus.py)."""

    async def query(self, promql: str) -> list[Sample]:
        """The instant answer to `promql`, one Sample per series; MetricsError
        when there is none to give."""
        ...

    async def close(self) -> None: ...


class SiteLock(Protocol):
    """The release lock the balancer itself holds (see `sitelock.py`)."""

    async def claim(self, holder: str) -> None:
        """Take or renew it; PlanRefused when another copy of the config holds it."""
        ...

    async def release(self) -> None: ...


class NoSiteLock:
    """A balancer that holds no lock: the journal's lock alone applies."""

    async def claim(self, holder: str) -> None:
        return None

    async def release(self) -> None:
        return None


@dataclass(frozen=True)
class Review:
    """What a release would apply, and what the migration check found in it."""

    pending: dict[Phase, list[str]]  # names of what the release would apply, per phase
    findings: list[Finding]  # in the pending migrations only

    def blocking(self, allowed: Sequence[str]) -> list[Finding]:
        from changeover.migrations.analysis import blocking_findings  # the analyser's module

        return blocking_findings(self.findings, allowed)


class Migrator(Protocol):
    """The site's database migrations; failures raise `MigrationError`."""

    async def review(self, version: str) -> Review:
        """Check what a release of `version` would apply, before anything is applied."""
        ...

    def pins(self) -> dict[str, str] | None:
        """name -> sha256 of the migration files now (None: the site applies
        them with a command): a resume checks again what changed since."""
        ...

    async def migrate(
        self,
        phase: Phase,
        version: str,
        note: Callable[[str], Awaitable[None]],
        pins: Mapping[str, str] | None,
        allowed: Sequence[str],
    ) -> str:
        """Apply the pending migrations of `phase`; the step's detail."""
        ...

    async def verify_live(self, version: str, old_version: str | None) -> str:
        """After expand: the release still serving passes its checks."""
        ...


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (what the journal records)."""
        ...

    def monotonic(self) -> float:
        """Seconds for deadlines and durations."""
        ...

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        """Wait `seconds`, returning early once `wake` is set."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except TimeoutError:
            return


class JournalStore(Protocol):
    """The durable record of releases, steps, outputs and the site lock (journal.py:
    SQLite; pgjournal.py: PostgreSQL, with `[site] state_url`).
    Its calls block: the engine and the service run them in a thread."""

    def acquire(self, site: str, release_id: int | None) -> LockInfo | None: ...
    def lock_holder(self, site: str) -> LockInfo | None: ...
    def set_lock_release(self, site: str, release_id: int) -> None: ...
    def release_lock(self, site: str) -> None: ...
    def force_unlock(self, site: str) -> LockInfo | None: ...
    def create_release(
        self,
        site: str,
        version: str,
        previous_version: str | None,
        strategy: str,
        plan: list[dict[str, Any]],
        kind: str = "release",
    ) -> int: ...
    def set_state(self, release_id: int, state: str, error: str | None = None) -> None: ...
    def request(self, release_id: int, what: str | None) -> None: ...
    def withdraw(self, release_id: int, seen: str) -> bool: ...
    def step_started(self, release_id: int, idx: int) -> None: ...
    def step_finished(
        self,
        release_id: int,
        idx: int,
        ok: bool,
        detail: str,
        event: tuple[str, str] | None = None,
    ) -> ReleaseRow:
        """The step's end and `event` (kind, message) in one transaction; the
        release as it stands then (what another shell asked of it)."""
        ...

    def step_interrupted(self, release_id: int, idx: int, why: str) -> None: ...
    def add_outputs(self, release_id: int, rows: Sequence[OutputRow]) -> None: ...
    def add_event(self, release_id: int, kind: str, message: str) -> None: ...
    def release(self, release_id: int) -> ReleaseRow: ...
    def unfinished(self, site: str) -> ReleaseRow | None: ...
    def newest(self, site: str) -> ReleaseRow | None: ...
    def last_done(self, site: str) -> ReleaseRow | None: ...
    def releases(self, site: str, limit: int = 20) -> list[ReleaseRow]: ...
    def steps(self, release_id: int) -> list[StepRow]: ...
    def outputs(self, release_id: int) -> list[OutputRow]: ...
    def events(self, release_id: int) -> list[EventRow]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HookEvent:
    """A release event as the `[[hooks]]` receive it (hooks.py), plain data."""

    event: str  # one of config.HOOK_EVENTS
    site: str
    release: int
    kind: str  # release, first-deploy or rollback
    version: str
    previous_version: str | None
    at: float  # wall-clock seconds
    cluster: str | None = None
    qa_url: str | None = None  # the cluster's QA entry point (filled by the notifier)
    qa_host: str | None = None  # the Host header that reaches it there
    message: str = ""  # what happened, in one line (the error of a failed release)


class Notifier(Protocol):
    """The `[[hooks]]`: `check` runs the ones that may stop a release
    (`pre-release`), `notify` hands an event to the others and returns at once;
    their failures go to `report`, never to the release."""

    async def check(self, event: HookEvent) -> str | None:
        """Run the hooks of `event` in turn; why one refused, or None."""
        ...

    def notify(self, event: HookEvent, report: Callable[[str], Awaitable[None]]) -> None: ...

    async def settle(self) -> None:
        """Wait for the deliveries still under way, each within its timeout and
        retries; what is still not delivered then is reported and dropped."""
        ...

    async def close(self) -> None: ...


class NoNotifier:
    """A site without hooks."""

    async def check(self, event: HookEvent) -> str | None:
        return None

    def notify(self, event: HookEvent, report: Callable[[str], Awaitable[None]]) -> None:
        return None

    async def settle(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Ports:
    """Everything outside the engine's own decisions."""

    balancer: Balancer
    executor: Executor
    checks: Checks
    migrator: Migrator
    journal: JournalStore
    clock: Clock
    site_lock: SiteLock = field(default_factory=NoSiteLock)
    notifier: Notifier = field(default_factory=NoNotifier)
    metrics: Metrics | None = None  # [policy.analysis]'s source, when configured
