"""In-memory fakes of the engine's ports: a balancer, a fleet of members that
commands stop, deploy and start, checks that look at that fleet, a database
and a clock that jumps instead of sleeping. No socket, no subprocess.

Each fake records what the engine did to it, so a test asserts the exact
sequence of balancer changes, commands and journal records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.balancers.base import BalancerError
from changeover.config import Cluster, Member, Topology, parse
from changeover.executors.base import CommandResult
from changeover.journal import STEP_RUNNING, Journal
from changeover.migrations import Phase
from changeover.model import COUNTERS, Admission, CheckResult, Counter, MemberState, PoolView
from changeover.ports import HookEvent, JournalStore, MigrationError, Ports, Review


def topology(tmp_path: Path, **sections: dict[str, Any]) -> Topology:
    """Two clusters of two members, commands `ctl <what> <member> <version>`;
    `sections` override or add top-level tables (policy, database, ...)."""
    data: dict[str, Any] = {
        "site": {"name": "t", "state_dir": str(tmp_path)},
        "clusters": [
            {
                "name": "a",
                "qa_port": 8081,
                "members": [{"name": "a1", "port": 1}, {"name": "a2", "port": 2}],
            },
            {
                "name": "b",
                "qa_host": "qa-b.example",
                "members": [{"name": "b1", "port": 3}, {"name": "b2", "port": 4}],
            },
        ],
        "release": {
            "stop": "ctl stop {member} {version}",
            "deploy": "ctl deploy {member} {version}",
            "start": "ctl start {member} {version}",
        },
        "policy": {"session_idle": 1, "drain_timeout": 30, "health_timeout": 5},
    }
    for name, table in sections.items():
        data[name] = data.get(name, {}) | table
    return parse(data, tmp_path / "changeover.toml")


class FakeClock:
    """Time moves only when the engine sleeps; `on_sleep` hooks act as the
    outside world between two of its looks (traffic, a person approving)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.on_sleep: list[Callable[[], None]] = []

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        if wake.is_set():
            return
        self.now += seconds
        for hook in self.on_sleep:
            hook()
        await asyncio.sleep(0)


@dataclass
class Fleet:
    """The members themselves: what they run and whether they answer."""

    version: dict[str, str]
    running: set[str]
    broken_deploy: set[str] = field(default_factory=set)  # deploys the wrong version
    never_healthy: set[str] = field(default_factory=set)
    slow_up: set[str] = field(default_factory=set)  # refuse the first health check after start
    coming_up: set[str] = field(default_factory=set)  # slow_up ones started, not yet asked


class FakeBalancer:
    """Counts what `fills` names (every counter by default); the others read None,
    as a real driver's do."""

    name = "fake"

    def __init__(
        self, topo: Topology, fleet: Fleet, fills: frozenset[Counter] = frozenset(COUNTERS)
    ) -> None:
        self.fleet = fleet
        self.fills = fills
        self.cluster = {m.name: c.name for c, m in topo.members()}
        self.admissions = {name: Admission.LIVE for name in self.cluster}
        self.counts: dict[Counter, dict[str, int]] = {
            c: dict.fromkeys(self.cluster, 0) for c in COUNTERS
        }
        self.requests = self.counts["requests"]
        self.errors = self.counts["errors"]
        self.active = self.counts["active"]
        self.sessions = self.counts["sessions"]
        self.tunnels = self.counts["tunnels"]
        self.changes: list[dict[str, Admission]] = []
        self.refusals = 0  # the next N applies fail as an unreachable balancer would

    async def read(self) -> PoolView:
        return PoolView(
            tuple(
                MemberState(
                    name,
                    self.cluster[name],
                    adm,
                    name in self.fleet.running and name not in self.fleet.never_healthy,
                    **{c: self.counts[c][name] if c in self.fills else None for c in COUNTERS},
                )
                for name, adm in self.admissions.items()
            )
        )

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        if self.refusals:
            self.refusals -= 1
            raise BalancerError("connection refused")
        self.changes.append(dict(desired))
        self.admissions |= desired
        return await self.read()

    async def close(self) -> None:
        return None

    def cluster_changes(self) -> list[dict[str, str]]:
        """Each change as cluster -> admission, the way plans are written."""
        return [
            {self.cluster[name]: adm.value for name, adm in change.items()}
            for change in self.changes
        ]

    def serve(self, cluster: str, requests: int, errors: int = 0) -> None:
        """Traffic reaching the live members of `cluster`."""
        for name, c in self.cluster.items():
            if c == cluster:
                self.requests[name] += requests
                self.errors[name] += errors


class FakeExecutor:
    """`ctl <what> <member> <version>` acts on the fleet; `fail` scripts
    (what, member) -> exit status."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.calls: list[tuple[str, ...]] = []
        self.warmed: list[tuple[str, int]] = []  # (cluster, commands run before it)
        self.closed: list[tuple[str, int]] = []  # (cluster, commands run before it), close_cluster
        self.fail: dict[tuple[str, str], int] = {}
        self.during: Callable[[Sequence[str]], None] | None = None  # runs inside a command

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        self.calls.append(tuple(argv))
        if self.during:
            self.during(argv)
        what, version = argv[1], argv[-1]
        status = self.fail.get((what, member.name), 0)
        if status == 0:
            if what == "stop":
                self.fleet.running.discard(member.name)
            elif what == "deploy":
                broken = member.name in self.fleet.broken_deploy
                self.fleet.version[member.name] = "0.0-broken" if broken else version
            elif what == "start":
                self.fleet.running.add(member.name)
                self.fleet.coming_up |= self.fleet.slow_up & {member.name}
        return CommandResult(member.name, tuple(argv), status, f"{what} said {status}", 0.01)

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        self.calls.append(("upload", member.name, str(src), dest))
        return CommandResult(member.name, ("upload", dest), 0, "", 0.01)

    async def warm(self, cluster: Cluster) -> None:
        self.warmed.append((cluster.name, len(self.calls)))  # and how many commands ran before

    async def close_cluster(self, cluster: Cluster) -> None:
        self.closed.append((cluster.name, len(self.calls)))

    async def close(self) -> None:
        return None


class FakeChecks:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.smoke_fails: set[str] = set()  # clusters whose QA smoke check fails
        self.live_smoke_fails = False
        self.served: str | None = "1.0"  # None: no member answers its version yet
        # (health | version, member, the step running then): `running` says which.
        self.asked: list[tuple[str, str, str | None]] = []
        self.running: Callable[[], str | None] = lambda: None

    async def health(self, member: Member) -> CheckResult:
        self.asked.append(("health", member.name, self.running()))
        ok = member.name in self.fleet.running and member.name not in self.fleet.never_healthy
        if member.name in self.fleet.coming_up:
            self.fleet.coming_up.discard(member.name)
            ok = False
        return CheckResult(member.name, ok, "HTTP 200" if ok else "connection refused")

    async def version(self, member: Member, version: str) -> CheckResult:
        self.asked.append(("version", member.name, self.running()))
        got = self.fleet.version[member.name]
        return CheckResult(member.name, got == version, f"reports {got}")

    async def smoke(self, cluster: Cluster, version: str) -> list[CheckResult]:
        ok = cluster.name not in self.smoke_fails
        return [CheckResult(f"qa-{cluster.name}/", ok, "HTTP 200" if ok else "HTTP 500")]

    async def live_smoke(self, version: str) -> CheckResult | None:
        return CheckResult("smoke command", not self.live_smoke_fails, "exit 0")

    async def versions(self) -> dict[str, str | None]:
        return {
            name: version if name in self.fleet.running else None
            for name, version in self.fleet.version.items()
        }

    async def served_version(self) -> str | None:
        return self.served

    async def close(self) -> None:
        return None


class FakeMigrator:
    def __init__(self) -> None:
        self.applied: list[tuple[Phase, str]] = []
        self.fail_phase: Phase | None = None
        self.old_release_breaks = False

    async def migrate(
        self,
        phase: Phase,
        version: str,
        note: Callable[[str], Awaitable[None]],
        pins: Mapping[str, str] | None,
        allowed: Sequence[str],
    ) -> str:
        if phase == self.fail_phase:
            raise MigrationError(f"0001_{phase}.sql:1: relation does not exist")
        self.applied.append((phase, version))
        await note(f"applied {phase} migration 0001_{phase}.sql")
        return f"applied 0001_{phase}.sql"

    async def verify_live(self, version: str, old_version: str | None) -> str:
        if self.old_release_breaks:
            raise MigrationError(f"the release still serving ({old_version}) fails its checks")
        return "4 member(s) healthy"

    async def review(self, version: str) -> Review:
        return Review({"expand": ["0001_expand.sql"]}, [])

    def pins(self) -> dict[str, str] | None:
        return {"0001_expand.sql": "0" * 64}


class FakeNotifier:
    """Records the events the engine hands the hooks; `refuse` makes the
    pre-release check say no, `failing` makes every delivery report a problem."""

    def __init__(self) -> None:
        self.events: list[HookEvent] = []
        self.refuse: str | None = None
        self.failing: str | None = None
        self.settled = 0
        self._reports: list[Awaitable[None]] = []  # run at `settle`, as deliveries end

    async def check(self, event: HookEvent) -> str | None:
        self.events.append(event)
        return self.refuse

    def notify(self, event: HookEvent, report: Callable[[str], Awaitable[None]]) -> None:
        self.events.append(event)
        if self.failing:
            self._reports.append(report(f"{event.event} hook fake {self.failing}"))

    async def settle(self) -> None:
        self.settled += 1
        for pending in self._reports:
            await pending
        self._reports.clear()

    async def close(self) -> None:
        return None

    def names(self) -> list[tuple[str, str | None]]:
        return [(e.event, e.cluster) for e in self.events]


@dataclass
class Site:
    """One topology with every port faked, and the fakes kept at hand."""

    topo: Topology
    journal: Journal
    fleet: Fleet
    balancer: FakeBalancer
    executor: FakeExecutor
    checks: FakeChecks
    migrator: FakeMigrator
    clock: FakeClock
    notifier: FakeNotifier = field(default_factory=FakeNotifier)

    @classmethod
    def build(
        cls,
        tmp_path: Path,
        fills: frozenset[Counter] = frozenset(COUNTERS),
        **sections: dict[str, Any],
    ) -> Site:
        """`fills`: the counters the fake balancer keeps (see FakeBalancer)."""
        topo = topology(tmp_path, **sections)
        names = [m.name for _, m in topo.members()]
        fleet = Fleet(dict.fromkeys(names, "1.0"), set(names))
        site = cls(
            topo,
            Journal(tmp_path / "journal.sqlite"),
            fleet,
            FakeBalancer(topo, fleet, fills),
            FakeExecutor(fleet),
            FakeChecks(fleet),
            FakeMigrator(),
            FakeClock(),
        )
        site.checks.running = site.running_step
        return site

    def running_step(self) -> str | None:
        """The step of the newest release that the journal shows running."""
        row = self.journal.newest(self.topo.site.name)
        steps = self.journal.steps(row.id) if row else []
        return next((s.step_id for s in steps if s.state == STEP_RUNNING), None)

    def ports(self) -> Ports:
        return Ports(
            self.balancer,
            self.executor,
            self.checks,
            self.migrator,
            self.journal,
            self.clock,
            notifier=self.notifier,
        )

    def journal_opener(self) -> Journal:
        return self.journal

    def connect(self, journal: JournalStore) -> Ports:
        assert journal is self.journal
        return self.ports()


def journal_writes(journal: Journal, failing: str | None) -> None:
    """From now on every write to the real journal fails as SQLite fails on a
    read-only state directory ("read-only"), or works again (None): the
    operator fixed it. The connection is the journal's own, so its error
    mapping is what the engine meets."""
    db = journal._db  # the real file's own connection
    db.execute(f"PRAGMA query_only = {'ON' if failing else 'OFF'}")
