"""The release workflow as one service: begin (behind the migration gate),
approve, abort, resume, rollback, unlock, and the journal's record of them.

The CLI parses arguments, calls a method here, prints what it returns and maps
its exceptions to exit codes; the demo and the tests call the same methods.
Requests are typed (`Begin`, `Approval`, `AbortAsked`), never strings to parse.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import socket
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from changeover import journal as J
from changeover.balancers.base import BalancerError
from changeover.checks import qa_entry
from changeover.config import ConfigError, Topology
from changeover.journal import LockInfo, ReleaseRow, StepRow
from changeover.migrations import Finding
from changeover.model import AbortAsked, Admission, Approval, PoolView, decode_ask, encode_ask
from changeover.policy import kept_clusters
from changeover.ports import JournalStore, Migrator, Ports, Review

if TYPE_CHECKING:
    from changeover.engine import Engine, Event

T = TypeVar("T")

ASKED = "asked"  # the journal event of an approve, abort or rollback: who, and when


class BadRequest(Exception):
    """The request cannot be carried out as asked (exit 2): nothing changed."""


class GateRefused(Exception):
    """The migration check found what would break the release still serving."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__(
            f"refused: {len(findings)} migration finding(s) would break the release still "
            'serving or lock a table; fix them, or accept a rule with --allow RULE --reason "..."'
        )
        self.findings = findings


@dataclass(frozen=True, slots=True)
class Begin:
    """Release `version`, accepting the migration findings of the `allow` rules
    for the stated `reason`; `first` deploys a site that serves nothing yet."""

    version: str
    allow: tuple[str, ...] = ()
    reason: str | None = None
    first: bool = False  # the first deploy of a site that serves nothing yet


@dataclass(frozen=True, slots=True)
class SiteStatus:
    view: PoolView | None
    balancer_error: str | None
    release: dict[str, Any] | None  # the release in progress, as `describe` gives it
    lock: LockInfo | None
    kept_out: list[str] = field(default_factory=list)  # failed a step of the newest release
    kept_by: int | None = None  # that release
    warning: str | None = None  # capacity left out of the live pool (`idle_capacity`)
    versions: Mapping[str, str | None] = field(default_factory=dict)  # member -> reported
    awaiting: Awaiting | None = None  # the cluster a release waits to have approved
    kept: Kept | None = None  # after bluegreen: what `rollback` flips back to instantly


@dataclass(frozen=True, slots=True)
class Awaiting:
    cluster: str
    qa_url: str | None  # its QA entry point (None: it has none)
    qa_host: str | None  # the Host header that reaches it there


@dataclass(frozen=True, slots=True)
class Kept:
    clusters: list[str]  # draining on `version`, ready for an instant flip back
    version: str | None
    seconds_left: float  # of policy.keep_previous


def awaiting_approval(topo: Topology, row: ReleaseRow, steps: list[StepRow]) -> Awaiting | None:
    """The cluster whose approval step `row` is running, with its QA entry point."""
    if row.state != J.AWAITING_APPROVAL:
        return None
    running = [s.idx for s in steps if s.state == J.STEP_RUNNING]
    cluster = row.plan[running[0]].get("cluster") if running else None
    if not isinstance(cluster, str):
        return None
    try:
        url, host = qa_entry(topo, topo.cluster(cluster))
    except (KeyError, ValueError):  # no such cluster any more, or no QA entry point
        return Awaiting(cluster, None, None)
    return Awaiting(cluster, url, host)


def idle_capacity(view: PoolView, running: bool, pending: int | None) -> str | None:
    """A warning when members that are healthy are out of the live pool while no
    release is running (an aborted, failed or crashed one, or a hand-made
    change): the site serves on less than it could."""
    if running:
        return None
    idle: dict[str, list[str]] = {}
    for m in view.members:
        if m.admission is Admission.OUT and m.healthy:
            idle.setdefault(m.cluster, []).append(m.name)
    if not idle:
        return None
    where = "; ".join(f"{c}: {', '.join(names)}" for c, names in sorted(idle.items()))
    then = (
        f"`changeover resume` continues release #{pending}, `changeover rollback` goes back"
        if pending is not None
        else "a release (or the balancer's admin) puts them back"
    )
    return f"healthy members are out of the live pool and no release is running ({where}): {then}"


class Outcome(NamedTuple):
    release_id: int
    state: str


def operator() -> str:
    """Who is asking, as the journal records it."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


ABORTED_IDLE = (
    "aborted while not running; the pool was left as it is (see `changeover status`): "
    "`changeover resume` continues, `changeover rollback` goes back"
)
MAX_VERSION_LENGTH = 200


def version_problem(version: str, pattern: str | None) -> str | None:
    """Why `version` cannot be released, or None. A version is data that reaches
    argv, URLs, the journal and the screen: it must not read as an option or
    carry control characters, and must match `release.version_pattern` if set."""
    if not version.strip():
        return "the version is empty"
    if version.startswith("-"):
        return f"the version {version!r} starts with '-' (it would read as an option)"
    control = next((c for c in version if unicodedata.category(c) in _CONTROL), None)
    if control is not None:
        return f"the version {version!r} holds a control character ({control!r})"
    if len(version) > MAX_VERSION_LENGTH:
        return f"the version is longer than {MAX_VERSION_LENGTH} characters"
    if pattern is not None and re.fullmatch(pattern, version) is None:
        return f"the version {version!r} does not match release.version_pattern {pattern!r}"
    return None


_CONTROL = {"Cc", "Cf", "Zl", "Zp"}  # control and format characters, line separators


async def review_gate(topo: Topology, migrator: Migrator, begin: Begin) -> Review | None:
    """The migrations `begin` would apply, with the findings it accepts; raises
    BadRequest for a version that cannot be released and GateRefused for a
    finding of a rule not allowed. Touches nothing."""
    problem = version_problem(begin.version, topo.release.version_pattern)
    if problem:
        raise BadRequest(problem)
    if begin.allow:
        from changeover.migrations.analysis import allow_refusal  # the analyser's rules

        refusal = allow_refusal(begin.allow)
        if refusal:
            raise BadRequest(refusal)
    if begin.allow and not (begin.reason or "").strip():
        raise BadRequest('--allow needs --reason "why this is safe here" (for the journal)')
    if topo.database is None:
        if begin.allow:
            raise BadRequest("--allow accepts migration findings, but there is no [database]")
        return None
    found = await migrator.review(begin.version)
    blocking = found.blocking(begin.allow)
    if blocking:
        raise GateRefused(blocking)
    return found


class Releases:
    """The workflow for one site. `connect` builds the engine's ports on first
    need, so reading the journal, approving, aborting or checking migrations
    never reaches the balancer."""

    def __init__(
        self,
        topo: Topology,
        open_journal: Callable[[], JournalStore],
        migrator: Migrator,
        connect: Callable[[JournalStore], Ports],
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.topo = topo
        self.migrator = migrator
        self.site = topo.site.name
        self.on_event = on_event or (lambda e: None)
        self._open_journal = open_journal
        self._journal: JournalStore | None = None
        self._connect = connect
        self._ports: Ports | None = None
        self._engine: Engine | None = None
        self._interrupted = False

    async def _record(self, use: Callable[[JournalStore], T]) -> T:
        """`use` the journal in a worker thread, opening it on first need (a
        request refused before that leaves no journal behind)."""

        def run() -> T:
            if self._journal is None:
                self._journal = self._open_journal()
            return use(self._journal)

        return await asyncio.to_thread(run)

    async def _connected(self) -> Ports:
        """The engine's ports, built once (reading the pool needs no engine)."""
        if self._ports is None:
            journal = await self._record(lambda j: j)
            self._ports = self._connect(journal)
        return self._ports

    async def _started(self) -> Engine:
        if self._engine is None:
            from changeover.engine import Engine  # not for reading: `status` needs none

            self._engine = Engine(self.topo, await self._connected(), on_event=self.on_event)
            if self._interrupted:
                self._engine.interrupt()
        return self._engine

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: the running release stops at its next safe point."""
        self._interrupted = True
        if self._engine is not None:
            self._engine.interrupt()

    # --- the migration gate ------------------------------------------------------

    async def review(self, begin: Begin) -> Review | None:
        """The migration gate of `begin` (see `review_gate`)."""
        return await review_gate(self.topo, self.migrator, begin)

    @staticmethod
    def allowance(found: Review | None, begin: Begin) -> str | None:
        """The journal's record of what --allow accepted, and why."""
        if found is None or not begin.allow:
            return None
        # Past the gate, every finding is of an allowed rule.
        accepted = "; ".join(f"{f.rule} at {f.path}:{f.line}" for f in found.findings)
        return (
            f"migration check: --allow {', '.join(begin.allow)} --reason {begin.reason!r}; "
            f"accepted {accepted or 'no finding (nothing matched)'}"
        )

    # --- running -------------------------------------------------------------------

    async def release(self, begin: Begin) -> Outcome:
        """Check the migrations, plan, journal and run a release of `begin.version`."""
        found = await self.review(begin)
        note = self.allowance(found, begin)
        try:
            pins = await asyncio.to_thread(self.migrator.pins) if found is not None else None
        except (ConfigError, OSError) as exc:
            raise BadRequest(f"database.migrations_dir: {exc}") from None
        engine = await self._started()
        release_id = await engine.begin(begin.version, first=begin.first)
        if pins is not None:  # files edited before a resume are checked again
            message = json.dumps({"files": pins, "allow": sorted(begin.allow)}, sort_keys=True)
            await self._record(lambda j: j.add_event(release_id, J.MIGRATION_PINS, message))
        if note:
            from changeover.engine import Event

            await self._record(lambda j: j.add_event(release_id, "allow", note))
            self.on_event(Event(engine.clock.time(), "info", note))
        return Outcome(release_id, await engine.run(release_id))

    async def rollback(self) -> Outcome:
        """Back to the previous version (see `policy.rollback_plan`)."""
        return await self.run(await self.begin_rollback())

    async def begin_rollback(self, who: str | None = None) -> int:
        """Plan and journal a rollback (refused as `rollback` is), run by `run`."""
        release_id = await (await self._started()).begin_rollback()
        if who:
            await self._record(lambda j: j.add_event(release_id, ASKED, f"rollback by {who}"))
        return release_id

    async def run(self, release_id: int) -> Outcome:
        """Run a journaled release to its end (or its next stop)."""
        return Outcome(release_id, await (await self._started()).run(release_id))

    async def resume(self) -> Outcome:
        """Continue the unfinished release from the step it was in."""
        engine = await self._started()
        release_id = await engine.take_over()
        return Outcome(release_id, await engine.run(release_id))

    # --- asking a running release ----------------------------------------------------

    async def approve(self, who: str) -> str:
        """Approve the cluster that a release with approval = "manual" waits for."""
        row = await self._record(lambda j: j.unfinished(self.site))
        if row is None or row.state != J.AWAITING_APPROVAL:
            raise BadRequest("no release is awaiting approval")
        running = [
            s for s in await self._record(lambda j: j.steps(row.id)) if s.state == J.STEP_RUNNING
        ]
        if not running:
            raise BadRequest("no step is awaiting approval")
        step_id = running[0].step_id
        asked = decode_ask(row.request)
        if isinstance(asked, Approval) and asked.step_id == step_id:
            raise BadRequest(f"{step_id} of release #{row.id} is already approved by {asked.who}")
        await self._record(lambda j: j.request(row.id, encode_ask(Approval(step_id, who))))
        await self._record(lambda j: j.add_event(row.id, ASKED, f"approve {step_id} by {who}"))
        return f"approved {step_id} of release #{row.id}"

    async def abort(self, who: str) -> str:
        """Stop the release in progress at its next safe point; one nobody runs
        any more is marked aborted at once, the pool left as it is. Either way it
        stays resumable (`resume`), and `rollback` or a new release supersedes it;
        an approval given before the abort and not yet acted on is withdrawn."""
        row = await self._record(lambda j: j.unfinished(self.site))
        if row is None:
            raise BadRequest("no release in progress")
        holder = await self._record(lambda j: j.lock_holder(self.site))
        if holder is None or holder.is_stale():
            if row.state != J.ABORTED:
                await self._record(lambda j: j.set_state(row.id, J.ABORTED, ABORTED_IDLE))
            # The later word: an approval not yet acted on does not outlive it.
            await self._record(lambda j: j.request(row.id, None))
            if holder is not None:
                await self._record(lambda j: j.force_unlock(self.site))
            return f"release #{row.id} aborted; {ABORTED_IDLE}"
        await self._record(lambda j: j.request(row.id, encode_ask(AbortAsked(who))))
        await self._record(lambda j: j.add_event(row.id, ASKED, f"abort by {who}"))
        return f"asked release #{row.id} ({holder.describe()}) to stop at its next safe point"

    async def lock_holder(self) -> LockInfo | None:
        return await self._record(lambda j: j.lock_holder(self.site))

    async def unlock(self) -> LockInfo | None:
        """Break the site's lock; the holder it had, if any."""
        return await self._record(lambda j: j.force_unlock(self.site))

    async def status(self) -> SiteStatus:
        """The pool as the balancer sees it (or why it could not be read), the
        release in progress and the lock."""
        ports = await self._connected()
        try:
            view: PoolView | None = await ports.balancer.read()
            error = None
        except BalancerError as exc:
            view, error = None, str(exc)
        pending = await self.pending()
        newest = await self._record(lambda j: j.newest(self.site))
        kept_out: list[str] = []
        if newest is not None:
            events = await self._record(lambda j: j.events(newest.id))
            kept_out = [e.message for e in events if e.kind == J.KEPT_OUT]
        lock = await self.lock_holder()
        running = lock is not None and not lock.is_stale()
        steps = await self._record(lambda j: j.steps(pending.id)) if pending else []
        kept = None
        last = await self._record(lambda j: j.last_done(self.site))
        if view is not None and last is not None:
            now = ports.clock.time()
            found = kept_clusters(self.topo, last, view, now)
            if found is not None and last.finished is not None:
                left = last.finished + self.topo.policy.keep_previous - now
                kept = Kept(found[1], last.previous_version, left)
        return SiteStatus(
            view,
            error,
            await self.describe(pending.id) if pending else None,
            lock,
            kept_out=kept_out,
            kept_by=newest.id if newest and kept_out else None,
            warning=idle_capacity(view, running, pending.id if pending else None) if view else None,
            versions=await ports.checks.versions(),
            awaiting=awaiting_approval(self.topo, pending, steps) if pending else None,
            kept=kept,
        )

    # --- the record ---------------------------------------------------------------------

    async def pending(self) -> ReleaseRow | None:
        return await self._record(lambda j: j.unfinished(self.site))

    async def history(self, limit: int) -> list[ReleaseRow]:
        return await self._record(lambda j: j.releases(self.site, limit))

    async def describe(self, release_id: int, detail: bool = False) -> dict[str, Any]:
        """One release as plain data: its plan with each step's state and times;
        with `detail`, the commands' outputs and the events too. KeyError when
        there is no such release."""
        return await self._record(lambda j: describe_release(j, release_id, detail))


def describe_release(journal: JournalStore, release_id: int, detail: bool) -> dict[str, Any]:
    row = journal.release(release_id)
    steps = {s.idx: s for s in journal.steps(release_id)}
    data: dict[str, Any] = {
        "id": row.id,
        "site": row.site,
        "version": row.version,
        "previous_version": row.previous_version,
        "strategy": row.strategy,
        "kind": row.kind,
        "state": row.state,
        "error": row.error,
        "started": row.started,
        "finished": row.finished,
        "user": row.user,
        "host": row.host,
        "steps": [
            {
                "id": s["id"],
                "description": s["description"],
                "state": steps[i].state,
                "started": steps[i].started,
                "finished": steps[i].finished,
                "detail": steps[i].detail,
            }
            for i, s in enumerate(row.plan)
        ],
    }
    if detail:
        # The rows are slotted dataclasses: they have no __dict__.
        data["outputs"] = [asdict(o) for o in journal.outputs(release_id)]
        data["events"] = [asdict(e) for e in journal.events(release_id)]
    return data
