"""The engine: runs a plan's steps one by one against the balancer, the executor
and the checks, journaling each step before and after it runs.

Every step is idempotent, so a release killed at any point is finished by
`resume`, which re-runs the step that was in progress. Waiting steps (drain,
health, approval) watch for Ctrl-C and `changeover abort` and stop at a safe
point: between balancer changes, never half-way through one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar, assert_never

from changeover import journal as J
from changeover.balancers.base import BalancerError
from changeover.config import Cluster, Member, Topology
from changeover.earlychecks import EarlyChecks
from changeover.executors.base import CommandResult, member_values, render_argv
from changeover.groupcommit import GroupCommit
from changeover.journal import JournalError
from changeover.migrations import Phase
from changeover.model import (
    AbortAsked,
    Admission,
    Approval,
    CheckResult,
    MemberState,
    PoolView,
    Sample,
    cluster_admission,
    decode_ask,
    total,
)
from changeover.plan import PlanRefused, admissions_refusal, make_plan, member_admissions
from changeover.policy import (
    Drain,
    DrainWatch,
    QueryWatch,
    analysis_read,
    analysis_start,
    analysis_summary,
    bake_problem,
    bake_summary,
    checks_ahead,
    closing_progress,
    done_with,
    drain_progress,
    excusable,
    fan_out_outcome,
    flip_back,
    kept_at_take_over,
    may_start,
    promql,
    rollback_plan,
    swap_refusal,
)
from changeover.ports import HookEvent, MetricsError, MigrationError, Ports
from changeover.steps import (
    Admit,
    Approve,
    Bake,
    CheckVersion,
    Migrate,
    Preflight,
    RunCommand,
    Smoke,
    Step,
    StoredPlanError,
    Upload,
    VerifyLive,
    WaitDrained,
    WaitHealthy,
    step_from_dict,
)

P = ParamSpec("P")
T = TypeVar("T")

ABORTED = (
    "aborted on request (`changeover abort`): `changeover resume` continues, "
    "`changeover rollback` goes back, a new `changeover release` replaces it"
)
APPLY_ATTEMPTS = 4  # a balancer that refuses or is unreachable is retried with backoff
APPLY_BACKOFF = 0.5


@dataclass(frozen=True, slots=True)
class Event:
    """What the engine tells the screen (and the journal)."""

    at: float
    kind: str  # step-start, step-done, step-failed, info, warn, state
    message: str
    step: Step | None = None
    index: int | None = None
    total: int | None = None


class StepFailed(Exception):
    """A step did not achieve its goal; the message says why."""


class RolledBack(Exception):
    """The bake found the new release bad and the engine flipped back."""


class Stopped(Exception):
    """The release stopped at a safe point (Ctrl-C or `changeover abort`)."""

    def __init__(self, state: str, why: str) -> None:
        super().__init__(why)
        self.state = state


class Engine:
    """Runs releases of one topology through the edges in `ports`."""

    def __init__(
        self,
        topo: Topology,
        ports: Ports,
        on_event: Callable[[Event], None] | None = None,
        poll: float = 0.1,
    ) -> None:
        self.topo = topo
        self.balancer = ports.balancer
        self.executor = ports.executor
        self.checks = ports.checks
        self.migrator = ports.migrator
        self.journal = ports.journal
        self.clock = ports.clock
        self.site_lock = ports.site_lock
        self.notifier = ports.notifier
        self.metrics = ports.metrics
        self.on_event = on_event or (lambda e: None)
        self.poll = poll
        self.site = topo.site.name
        self._interrupt = asyncio.Event()
        self._release_id = 0
        self._version = ""
        self._row: J.ReleaseRow | None = None  # the release running, for its hooks
        self._steps: list[Step] = []
        self._kept_out: set[str] = set()  # failed a step of this release within max_failed
        self._early: dict[str, EarlyChecks] = {}  # cluster -> checks begun by its start step
        self._done_with: list[str] = []  # clusters whose connections close at the next drain
        self._closing: list[asyncio.Task[None]] = []  # clusters' connections closing

    # --- plumbing ----------------------------------------------------------------

    async def _j(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _emit(
        self,
        kind: str,
        message: str,
        step: Step | None = None,
        index: int | None = None,
        total: int | None = None,
        journal: bool = True,
    ) -> None:
        self.on_event(Event(self.clock.time(), kind, message, step, index, total))
        if journal and self._release_id:
            await self._j(self.journal.add_event, self._release_id, kind, message)

    def _hook_event(self, event: str, cluster: str | None = None, message: str = "") -> HookEvent:
        row = self._row
        assert row is not None, "hooks run inside a release"
        return HookEvent(
            event,
            self.site,
            row.id,
            row.kind,
            row.version,
            row.previous_version,
            self.clock.time(),
            cluster=cluster,
            message=message,
        )

    def _notify(self, event: str, cluster: str | None = None, message: str = "") -> None:
        """Hand the `[[hooks]]` an event; their failures are journaled warnings."""
        release_id = self._release_id

        async def report(problem: str) -> None:
            self.on_event(Event(self.clock.time(), "warn", problem))
            await self._j(self.journal.add_event, release_id, "warn", problem)

        self.notifier.notify(self._hook_event(event, cluster, message), report)

    def interrupt(self) -> None:
        """Ctrl-C: stop at the next safe point."""
        self._interrupt.set()

    async def _check_stop(self, row: J.ReleaseRow | None = None) -> None:
        """Stop at Ctrl-C or an abort asked from another shell (in `row`, the
        release as just read; else read now)."""
        if self._interrupt.is_set():
            raise Stopped(J.INTERRUPTED, "interrupted (Ctrl-C); `changeover resume` continues")
        if row is None:
            row = await self._j(self.journal.release, self._release_id)
        if isinstance(decode_ask(row.request), AbortAsked):
            raise Stopped(J.ABORTED, ABORTED)

    async def _wait(self, seconds: float) -> None:
        """Sleep that wakes early for Ctrl-C."""
        await self.clock.sleep(seconds, self._interrupt)

    # --- starting and resuming ----------------------------------------------------

    async def begin(self, version: str, first: bool = False) -> int:
        """Take the lock, plan against the live pool, and journal the new release
        (`first`: the first deploy, see `plan.make_plan`); an aborted release is
        superseded by it (the plan starts from the pool as the abort left it)."""
        pending = await self._j(self.journal.unfinished, self.site)
        aborted = pending if pending is not None and pending.state == J.ABORTED else None
        return await self._create(
            lambda view, _last: (version, make_plan(self.topo, version, view, first=first)),
            kind="first-deploy" if first else "release",
            supersede=aborted,
        )

    async def begin_rollback(self) -> int:
        """Plan and journal a rollback (see `policy.rollback_plan`); a newest
        release that did not finish is superseded by it."""
        pending = await self._j(self.journal.newest, self.site)
        if pending is not None and pending.state not in (J.FAILED, J.INTERRUPTED, J.ABORTED):
            pending = None  # done, or still running (then _create refuses)
        now = self.clock.time()
        return await self._create(
            lambda view, last: rollback_plan(self.topo, pending, last, view, now),
            kind="rollback",
            supersede=pending,
        )

    async def _create(
        self,
        plan: Callable[[PoolView, J.ReleaseRow | None], tuple[str, list[Step]]],
        kind: str = "release",
        supersede: J.ReleaseRow | None = None,
    ) -> int:
        journal, site = self.journal, self.site
        await self._j(journal.acquire, site, None)
        reading: asyncio.Task[PoolView] | None = None
        try:
            await self._claim_site()
            reading = asyncio.create_task(self.balancer.read())  # meanwhile
            pending, last = await self._j(
                lambda: (journal.unfinished(site), journal.last_done(site))
            )
            if pending is not None and (supersede is None or pending.id != supersede.id):
                raise PlanRefused(
                    f"release #{pending.id} ({pending.version}) is {pending.state}: "
                    "`changeover resume` it, or `changeover abort` it first"
                )
            view = await reading
            version, steps = plan(view, last)
            if supersede is not None and kind == "rollback":  # undoes what that one began
                serving: str | None = supersede.version
            else:
                serving = last.version if last else await self.checks.served_version()
            release_id = await self._j(
                self.journal.create_release,
                self.site,
                version,
                serving,
                self.topo.policy.strategy,
                [s.to_dict() for s in steps],
                kind,
            )

            def name_release() -> J.LockInfo | None:  # and read the lock so named
                journal.set_lock_release(site, release_id)
                return journal.lock_holder(site)

            await self._claim_site(await self._j(name_release))  # renewed, naming the release
            if supersede is not None:  # keeps why it stopped
                why = f"{supersede.error}; " if supersede.error else ""
                await self._j(
                    self.journal.set_state,
                    supersede.id,
                    J.SUPERSEDED,
                    f"{why}superseded by {kind} #{release_id}",
                )
        except BaseException:
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
            await self.site_lock.release()
            await self._j(self.journal.release_lock, self.site)
            raise
        return release_id

    async def _claim_site(self, holder: J.LockInfo | None = None) -> None:
        """The balancer's release lock, beside the journal's (see `sitelock.py`),
        naming the journal's lock `holder` (read now when not given)."""
        if holder is None:
            holder = await self._j(self.journal.lock_holder, self.site)
        await self.site_lock.claim(
            f"{holder.describe() if holder else 'a release'} (site {self.site})"
        )

    async def take_over(self) -> int:
        """Lock the site for the unfinished release (the previous holder is gone).
        What was asked of that holder is cleared, but for an approval of the step
        the release resumes at (`policy.kept_at_take_over`)."""
        row = await self._j(self.journal.unfinished, self.site)
        if row is None:
            raise PlanRefused("no release to resume")
        stale = await self._j(self.journal.acquire, self.site, row.id)
        try:
            await self._claim_site()
        except BaseException:
            await self._j(self.journal.release_lock, self.site)
            raise
        if stale is not None:
            await self._j(
                self.journal.add_event,
                row.id,
                "warn",
                f"took over a stale lock left by {stale.describe()}",
            )
        # Read again under the lock: an approval given until now counts. What is
        # not kept is withdrawn only if it is still what was read: an approval
        # landing between the read and the withdrawal is judged in turn.
        steps = await self._j(self.journal.steps, row.id)
        while True:
            row = await self._j(self.journal.release, row.id)
            kept = kept_at_take_over(decode_ask(row.request), steps)
            if kept is not None:
                await self._j(
                    self.journal.add_event,
                    row.id,
                    "info",
                    f"kept the approval of {kept.step_id} by {kept.who}, "
                    "given before the take-over",
                )
                break
            if row.request is None or await self._j(self.journal.withdraw, row.id, row.request):
                break
        await self._j(self.journal.set_state, row.id, J.RUNNING)
        return row.id

    async def run(self, release_id: int) -> str:
        """Run the release's remaining steps; returns its final state."""
        self._release_id = release_id
        row = await self._j(self.journal.release, release_id)
        self._version = row.version
        self._row = row
        try:
            state = await self._run_steps(row)
        except JournalError as exc:
            # Nothing more can be recorded, so nothing more is done: the steps
            # already taken kept the live pool healthy, and the journal still shows
            # the step in progress, which `resume` runs again.
            state = J.INTERRUPTED
            await self._emit(
                "warn",
                f"stopped: {exc}; the site is serving; fix that, then `changeover resume`",
                journal=False,
            )
            self._notify(state, message=str(exc))
        finally:
            for early in self._early.values():
                await early.cancel()
            self._early.clear()
            self._done_with.clear()  # the executor's close closes them
            try:
                # Both locks let go of at once (each its own round trip).
                errors = await asyncio.gather(
                    self.checks.close(),
                    self.site_lock.release(),
                    self._release_journal_lock(),
                    return_exceptions=True,
                )
                for error in errors:
                    if isinstance(error, BaseException):
                        raise error
                # The hooks' last deliveries, each within its timeout and retries.
                with contextlib.suppress(JournalError):
                    await self.notifier.settle()
            finally:  # the connections closing meanwhile
                await asyncio.gather(*self._closing, return_exceptions=True)
                self._closing.clear()
        return state

    async def _release_journal_lock(self) -> None:
        with contextlib.suppress(JournalError):  # left behind, the lock is stale: resume
            await self._j(self.journal.release_lock, self.site)

    async def _run_steps(self, row: J.ReleaseRow) -> str:
        """The release's remaining steps, its final state journaled."""
        release_id = row.id
        state = J.DONE
        try:
            try:
                self._steps = steps = [step_from_dict(s) for s in row.plan]
            except StoredPlanError as exc:
                raise PlanRefused(
                    f"release #{release_id}: its stored plan cannot be read here ({exc}); "
                    "finish it with the version that began it, or `changeover abort` it"
                ) from None
            journal = self.journal
            journaled, events = await self._j(
                lambda: (journal.steps(release_id), journal.events(release_id))
            )
            done = {s.idx for s in journaled if s.state == J.STEP_DONE}
            self._kept_out = {e.message for e in events if e.kind == J.KEPT_OUT}
            await self._emit(
                "state",
                f"release #{release_id}: {row.version} on {self.site}"
                + (" (resumed)" if done else ""),
            )
            if not done:  # before anything changes: a pre-release hook may refuse
                refusal = await self.notifier.check(self._hook_event("pre-release"))
                if refusal:
                    raise StepFailed(f"refused before any change: {refusal}")
            self._notify("started", message="resumed" if done else "")
            between: J.ReleaseRow | None = None  # as the last step's end read it
            for idx, step in enumerate(steps):
                if idx in done:
                    continue
                await self._check_stop(between)
                between = await self._run_step(idx, step, len(steps))
            line = f"release #{release_id} done: {self.site} serves {row.version}"

            def finish() -> None:
                journal.set_state(release_id, J.DONE)
                journal.add_event(release_id, "state", line)

            await self._j(finish)
            await self._emit("state", line, journal=False)
            self._notify("done")
        except Stopped as stop:
            state = stop.state
            await self._j(self.journal.set_state, release_id, state, str(stop))
            await self._emit("warn", str(stop))
            self._notify(state, message=str(stop))
        except RolledBack as exc:
            state = J.ROLLED_BACK
            await self._j(self.journal.set_state, release_id, state, str(exc))
            await self._emit("state", f"release #{release_id} rolled back: {exc}")
            self._notify(state, message=str(exc))
        except StepFailed as exc:
            state = J.FAILED
            await self._j(self.journal.set_state, release_id, state, str(exc))
            await self._emit("state", f"release #{release_id} failed: {exc}")
            self._notify(state, message=str(exc))
        return state

    async def _run_step(self, idx: int, step: Step, total: int) -> J.ReleaseRow:
        """Run one step, journaled before and after; the release as its end read it."""
        failpoint(step.id, "before")
        await self._j(self.journal.step_started, self._release_id, idx)
        await self._emit("step-start", step.description, step, idx, total, journal=False)
        started = self.clock.monotonic()
        failpoint(step.id, "during")
        try:
            detail = await self._dispatch(idx, step)
        except (StepFailed, BalancerError, PlanRefused, MigrationError) as exc:
            failed = f"{step.description}: {exc}"
            await self._j(
                self.journal.step_finished,
                self._release_id,
                idx,
                False,
                str(exc),
                ("step-failed", failed),
            )
            await self._emit("step-failed", failed, step, idx, total, journal=False)
            raise StepFailed(failed) from exc
        except Stopped as stop:
            # Not done: resume runs this step again from the start.
            await self._j(self.journal.step_interrupted, self._release_id, idx, str(stop))
            raise
        except RolledBack as exc:
            # The bake failed: the step is finished (not done), the release rolled back.
            await self._j(self.journal.step_finished, self._release_id, idx, False, str(exc))
            raise
        done = done_with(self._steps, idx)
        if done is not None and done.at_next_drain:
            self._done_with.append(done.cluster)
        elif done is not None:  # closed while the release goes on (its end waits for it)
            self._close(done.cluster)
        took = self.clock.monotonic() - started
        message = f"{step.description} ({took:.1f}s){': ' + detail if detail else ''}"
        # One transaction: the step done, its event, and what was asked meanwhile.
        row = await self._j(
            self.journal.step_finished, self._release_id, idx, True, detail, ("step-done", message)
        )
        failpoint(step.id, "after")
        if isinstance(step, Smoke):  # deployed, healthy, on the version, smoke passed
            self._notify("qa-ready", step.cluster, detail)
        elif isinstance(step, Admit) and step.promote:
            self._notify("swapped", step.promote, detail)
        await self._emit("step-done", message, step, idx, total, journal=False)
        return row

    async def _dispatch(self, idx: int, step: Step) -> str:
        """One handler per step kind."""
        match step:
            case Preflight():
                return await self._preflight()
            case Admit():
                return await self._admit(step)
            case WaitDrained():
                return await self._wait_drained(step)
            case RunCommand():
                return await self._run_command(idx, step)
            case Upload():
                return await self._upload(idx, step)
            case WaitHealthy():
                return await self._wait_healthy(step)
            case CheckVersion():
                return await self._verify_version(step)
            case Smoke():
                return await self._smoke(step)
            case Approve():
                return await self._approve(step)
            case Bake():
                return await self._bake(step)
            case Migrate():
                return await self._migrate(step)
            case VerifyLive():
                return await self._verify_live()
            case _:
                assert_never(step)

    async def _until(
        self, ready: Callable[[], Awaitable[bool]], timeout: float, interval: float
    ) -> bool:
        """Await `ready()` every `interval` until true (True) or `timeout` passed
        (False), stopping at Ctrl-C or an abort in between."""
        deadline = self.clock.monotonic() + timeout
        while True:
            if await ready():
                return True
            if self.clock.monotonic() > deadline:
                return False
            await self._check_stop()
            await self._wait(interval)

    # --- balancer steps ------------------------------------------------------------

    async def _preflight(self) -> str:
        view = await self._read()
        known = {m.name for m in view.members}
        missing = [m.name for _, m in self.topo.members() if m.name not in known]
        if missing:
            raise StepFailed(
                f"the balancer does not know member(s) {missing}: render/reload its config first"
            )
        summary = ", ".join(
            f"{c.name}: {sum(m.healthy for m in view.in_cluster(c.name))}/{len(c.members)} healthy"
            for c in self.topo.clusters
        )
        return summary

    async def _admit(self, step: Admit) -> str:
        seen: PoolView | None = None
        if step.promote:
            steps = await self._j(self.journal.steps, self._release_id)
            refusal = swap_refusal(self._steps, {s.step_id: s.state for s in steps}, step.promote)
            if refusal:
                raise StepFailed(refusal)
            seen = await self._wait_balancer_healthy(step.promote)
        view = await self._change(step.admissions, "take the change", seen)
        summary = _admissions_summary(self.topo, view)
        gone = [c for c, admission in step.admissions.items() if admission is Admission.OUT]
        closed = await self._websockets_closed(gone, view) if gone else ""
        return f"{summary}; {closed}" if closed else summary

    async def _websockets_closed(self, clusters: Sequence[str], view: PoolView) -> str:
        """Wait while the balancer closes the WebSockets of `clusters` (just set
        OUT) spread over close_spread: the stop that follows must not end them
        all at once (policy.closing_progress)."""
        spread = self.topo.balancer.close_spread
        started = self.clock.monotonic()

        def tunnels(view: PoolView) -> int | None:
            return total(
                self._serving([m for c in clusters for m in view.in_cluster(c)]), "tunnels"
            )

        judged = closing_progress(tunnels(view), 0.0, spread)
        if not judged.done:
            await self._emit("info", f"{', '.join(clusters)} out: {judged.line}")
        while not judged.done:
            await self._check_stop()
            await self._wait(min(self.poll * 2, 0.25))
            judged = closing_progress(
                tunnels(await self._read()), self.clock.monotonic() - started, spread
            )
        if judged.cut:
            await self._emit("warn", f"{', '.join(clusters)} out: {judged.line}")
        return judged.line if tunnels(view) else ""

    async def _change(
        self, admissions: dict[str, Admission], verb: str, seen: PoolView | None = None
    ) -> PoolView:
        """Apply cluster admissions in one balancer change, each attempt checked
        against the interlock on a fresh read first (the first on `seen`, when
        the caller has just read the pool)."""
        desired = member_admissions(self.topo, admissions, self._kept_out)
        fresh = [seen] if seen is not None else []

        async def change() -> PoolView:
            view = fresh.pop() if fresh else await self.balancer.read()
            refusal = admissions_refusal(self.topo, view, desired)
            if refusal:
                raise PlanRefused(refusal)
            return await self.balancer.apply(desired)

        return await self._retrying(change, "change", verb)

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str, verb: str) -> T:
        """A balancer call, retried with backoff (0.5 s, 1 s, 2 s) while the balancer
        refuses or cannot be reached; then the step fails with the last error."""
        for attempt in range(APPLY_ATTEMPTS):
            try:
                return await call()
            except BalancerError as exc:
                if attempt + 1 == APPLY_ATTEMPTS:
                    raise StepFailed(
                        f"the balancer did not {verb} after {APPLY_ATTEMPTS} attempts: {exc}"
                    ) from exc
                delay = APPLY_BACKOFF * 2**attempt
                await self._emit("warn", f"balancer {what} failed ({exc}); retrying in {delay:g}s")
                await self._wait(delay)
                await self._check_stop()
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _read(self) -> PoolView:
        return await self._retrying(self.balancer.read, "read", "answer a read")

    async def _read_serving(self) -> PoolView:
        """The pool without the members kept out of this release."""
        return PoolView(tuple(self._serving((await self._read()).members)))

    async def _wait_balancer_healthy(self, cluster: str) -> PoolView:
        """Until the balancer sees the cluster healthy; the read that saw it."""
        sick: list[str] = []
        view = PoolView(())

        async def healthy() -> bool:
            nonlocal sick, view
            view = await self._read()
            sick = [m.name for m in self._serving(view.in_cluster(cluster)) if not m.healthy]
            return not sick

        if not await self._until(healthy, self.topo.policy.health_timeout, self.poll):
            raise StepFailed(f"the balancer still sees {sick} unhealthy")
        return view

    def _close(self, cluster: str) -> None:
        """Close the cluster's connections in the background."""
        closing = self.executor.close_cluster(self.topo.cluster(cluster))
        self._closing.append(asyncio.create_task(closing))

    async def _wait_drained(self, step: WaitDrained) -> str:
        # While the drain waits, the connections of the clusters done with close,
        # and the commands that follow it find theirs open.
        for cluster in self._done_with:
            self._close(cluster)
        self._done_with = []
        warming = asyncio.create_task(self.executor.warm(self.topo.cluster(step.cluster)))
        try:
            line = await self._drained(step)
        except BaseException:
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            raise
        await warming
        return line

    async def _drained(self, step: WaitDrained) -> str:
        policy = self.topo.policy
        now = self.clock.monotonic()
        watch = DrainWatch(now, now)
        while True:
            members = self._serving((await self._read()).in_cluster(step.cluster))
            judged = drain_progress(
                watch, members, self.clock.monotonic(), policy.session_idle, policy.drain_timeout
            )
            watch = judged.watch
            if judged.verdict is Drain.QUIET:
                return judged.line
            if judged.verdict is Drain.TIMED_OUT:
                await self._emit("warn", f"drain of {step.cluster}: {judged.line}")
                return judged.line
            if judged.report:
                await self._emit("info", f"draining {step.cluster}: {judged.line}")
            await self._check_stop()
            await self._wait(min(self.poll * 2, 0.25))

    # --- commands on members ---------------------------------------------------------

    def _members(self, cluster: Cluster) -> list[Member]:
        """The cluster's members this release still works on (not kept out)."""
        return [m for m in cluster.members if m.name not in self._kept_out]

    def _serving(self, members: Sequence[MemberState]) -> list[MemberState]:
        return [m for m in members if m.name not in self._kept_out]

    def _excusable(self, cluster: Cluster, failing: int) -> bool:
        kept = len(cluster.members) - len(self._members(cluster))
        return excusable(failing, kept, len(cluster.members), self.topo.executor.max_failed)

    async def _keep_out(self, names: Sequence[str], why: str) -> None:
        """Members that failed a step within the budget: out of the live pool and
        of the rest of this release (journaled, so a resume keeps them out)."""
        for name in names:
            self._kept_out.add(name)
            await self._j(self.journal.add_event, self._release_id, J.KEPT_OUT, name)
        await self._emit(
            "warn",
            f"kept {', '.join(names)} out of the live pool for the rest of this release: {why} "
            f"(within max_failed={self.topo.executor.max_failed}); a later release brings "
            f"{'them' if len(names) > 1 else 'it'} back",
        )

    async def _for_members(
        self,
        idx: int,
        cluster: Cluster,
        work: Callable[[Member], Awaitable[CommandResult]],
        succeeded: Callable[[Member], None] = lambda _: None,
    ) -> str:
        """Run `work` on every member not kept out, `executor.parallel` at a time;
        once the failures exceed what `max_failed` leaves, no further member
        starts. Failures within the budget keep their members out. `succeeded`
        hears of each member whose work succeeded, as it does."""
        cfg = self.topo.executor
        members = self._members(cluster)
        kept = len(cluster.members) - len(members)
        limit = asyncio.Semaphore(cfg.parallel or len(members))
        failed: list[CommandResult] = []
        skipped: list[str] = []
        outputs: GroupCommit[J.OutputRow] = GroupCommit(
            lambda rows: self._j(self.journal.add_outputs, self._release_id, rows)
        )

        async def one(member: Member) -> None:
            async with limit:
                if not may_start(len(failed) + kept, cfg.max_failed):
                    skipped.append(member.name)
                    return
                result = await work(member)
                if result.ok:
                    succeeded(member)
                await outputs.add(
                    J.OutputRow(
                        idx,
                        member.name,
                        list(result.argv),
                        result.exit_status,
                        result.seconds,
                        result.output,
                    )
                )
                if not result.ok:
                    failed.append(result)

        # Every member's command ends before anything is raised (a journal that
        # cannot be written, say): none is left running behind the stop.
        errors = await asyncio.gather(*(one(m) for m in members), return_exceptions=True)
        for error in errors:
            if isinstance(error, BaseException):
                raise error
        if self._interrupt.is_set() and any(r.exit_status == -signal.SIGINT for r in failed):
            # Ctrl-C reached a command being spawned (before it left our process
            # group): not a failure of the step, which runs again on resume.
            raise Stopped(J.INTERRUPTED, "interrupted (Ctrl-C); `changeover resume` continues")
        outcome = fan_out_outcome(len(members), failed, skipped, cfg.max_failed, kept)
        if outcome.over_budget:
            raise StepFailed(outcome.summary)
        if outcome.summary:
            await self._keep_out([r.member for r in failed], outcome.summary)
        return outcome.detail

    async def _run_command(self, idx: int, step: RunCommand) -> str:
        cluster = self.topo.cluster(step.cluster)
        template = getattr(self.topo.release, step.command)
        timeout = self.topo.executor.timeout

        async def work(member: Member) -> CommandResult:
            argv = render_argv(template, member_values(cluster, member, self._version))
            return await self.executor.run(cluster, member, argv, timeout)

        ahead = checks_ahead(self._steps, idx)
        if not ahead.health:
            return await self._for_members(idx, cluster, work)
        # The health wait (and version check) next: each member is asked as soon
        # as its own command succeeded, while the others' still run.
        await self._drop_early(cluster.name)
        early = EarlyChecks(self.checks, self._version if ahead.version else None)
        self._early[cluster.name] = early
        return await self._for_members(idx, cluster, work, early.start)

    async def _drop_early(self, cluster: str) -> None:
        early = self._early.pop(cluster, None)
        if early is not None:
            await early.cancel()

    async def _found_early(self, cluster: str) -> EarlyChecks | None:
        """The early checks of the cluster's start step, their answers all in."""
        early = self._early.get(cluster)
        if early is not None:
            await early.settle()
        return early

    async def _upload(self, idx: int, step: Upload) -> str:
        cluster = self.topo.cluster(step.cluster)
        timeout = self.topo.executor.timeout

        async def work(member: Member) -> CommandResult:
            values = member_values(cluster, member, self._version)
            result: CommandResult | None = None
            for up in self.topo.release.upload:
                src = self.topo.resolve_path(up.src.format_map(values))
                result = await self.executor.upload(
                    cluster, member, src, up.dest.format_map(values), timeout
                )
                if not result.ok:
                    break
            assert result is not None
            return result

        return await self._for_members(idx, cluster, work)

    # --- checks ----------------------------------------------------------------------

    async def _wait_healthy(self, step: WaitHealthy) -> str:
        cluster = self.topo.cluster(step.cluster)
        members = self._members(cluster)
        started = self.clock.monotonic()
        sick: list[CheckResult] = []
        early = await self._found_early(cluster.name)
        found = early.healthy if early is not None else set()
        asked = [m for m in members if m.name not in found]  # not yet seen healthy

        async def healthy() -> bool:
            nonlocal sick
            results = await asyncio.gather(*(self.checks.health(m) for m in asked))
            sick = [r for r in results if not r.ok]
            return not sick

        timeout = self.topo.policy.health_timeout
        if not await self._until(healthy, timeout, max(self.poll, 0.1)):
            problem = f"not healthy after {timeout:g}s: {_brief(sick)}"
            await self._excuse_or_fail(cluster, sick, problem)
        took = self.clock.monotonic() - started
        return f"{len(members) - len(sick)} member(s) healthy after {took:.1f}s"

    async def _excuse_or_fail(
        self, cluster: Cluster, failing: list[CheckResult], problem: str
    ) -> None:
        if not self._excusable(cluster, len(failing)):
            raise StepFailed(problem)
        await self._keep_out([r.target for r in failing], problem)

    async def _verify_version(self, step: CheckVersion) -> str:
        cluster = self.topo.cluster(step.cluster)
        members = self._members(cluster)
        early = await self._found_early(cluster.name)
        await self._drop_early(cluster.name)
        found = early.on_version if early is not None else set()
        asked = [m for m in members if m.name not in found]  # not yet seen on the version
        results = await asyncio.gather(*(self.checks.version(m, self._version) for m in asked))
        wrong = [r for r in results if not r.ok]
        if wrong:
            await self._excuse_or_fail(cluster, wrong, f"wrong version: {_brief(wrong)}")
        return f"{len(members) - len(wrong)} member(s) on {self._version}"

    async def _smoke(self, step: Smoke) -> str:
        cluster = self.topo.cluster(step.cluster)
        # The QA entry point goes through the balancer: it must see the cluster up.
        await self._wait_balancer_healthy(cluster.name)
        results = await self.checks.smoke(cluster, self._version)
        bad = [r for r in results if not r.ok]
        if bad:
            raise StepFailed(f"smoke check failed: {_brief(bad)}")
        return f"{len(results)} check(s) passed" if results else "no smoke checks configured"

    async def _bake(self, step: Bake) -> str:
        cluster = self.topo.cluster(step.cluster)
        policy = self.topo.policy
        first = await self._read_serving()
        base_requests = total(first.in_cluster(cluster.name), "requests")
        base_errors = total(first.in_cluster(cluster.name), "errors")
        deadline = self.clock.monotonic() + policy.bake
        watches = analysis_start(
            policy.analysis.queries if policy.analysis else (), self.clock.monotonic()
        )
        problem: str | None = None
        view = first
        while problem is None and self.clock.monotonic() < deadline:
            await self._check_stop()
            await self._wait(min(1.0, policy.bake / 5))
            view = await self._read_serving()
            problem = bake_problem(
                view, cluster.name, base_requests, base_errors, policy.max_error_ratio
            )
            smoke = await self.checks.live_smoke(self._version) if problem is None else None
            if smoke is not None and not smoke.ok:
                problem = f"smoke command against the live pool: {smoke.detail}"
            if problem is None:
                problem = await self._analyse(cluster, watches)
        if problem is None:
            summary = bake_summary(view, cluster.name, base_requests, policy.bake)
            if policy.analysis:
                summary += "; " + analysis_summary(policy.analysis.queries, watches)
            return summary
        await self._emit("warn", f"bake of {cluster.name} failed: {problem}")
        back = flip_back(policy.auto_rollback, step)
        if back is None:
            raise StepFailed(problem)
        # Flip back while the previous clusters still run the old release.
        try:
            await self._change(dict(back), "take the flip back")
        except PlanRefused as refusal:
            raise StepFailed(f"{problem}; automatic rollback refused: {refusal}") from refusal
        live = ", ".join(c for c, a in back.items() if a is Admission.LIVE)
        raise RolledBack(
            f"{problem}; flipped back: {live} live on the previous release, {cluster.name} out"
        )

    async def _analyse(self, cluster: Cluster, watches: dict[str, QueryWatch]) -> str | None:
        """Measure the `[policy.analysis]` queries that are due (updating `watches`);
        what the failing ones found, or None."""
        analysis = self.topo.policy.analysis
        now = self.clock.monotonic()
        due = [q for q in analysis.queries if watches[q.name].due <= now] if analysis else []
        if not due:
            return None
        if self.metrics is None:
            raise StepFailed("policy.analysis is configured but no metrics source was built")
        metrics = self.metrics

        async def one(text: str) -> list[Sample] | str:
            try:
                return await metrics.query(text)
            except MetricsError as exc:
                return str(exc)

        answers = await asyncio.gather(*(one(promql(q, cluster)) for q in due))
        problems = []
        for q, answer in zip(due, answers, strict=True):
            watches[q.name], problem = analysis_read(q, watches[q.name], answer, now)
            if problem is not None:
                problems.append(problem)
        return "; ".join(problems) or None

    async def _approve(self, step: Approve) -> str:
        # Approved already (before a resume took the release over): no wait.
        approval = await self._approval_of(step)
        if approval is None:
            await self._j(self.journal.set_state, self._release_id, J.AWAITING_APPROVAL)
            self._notify("awaiting-approval", step.cluster)
            await self._emit(
                "info",
                f"awaiting approval of {step.cluster}: "
                f"`changeover approve` (or `changeover abort`) from another shell",
            )
            try:
                while (approval := await self._approval_of(step)) is None:
                    await self._check_stop()
                    await self._wait(0.2)
            finally:
                await self._j(self.journal.set_state, self._release_id, J.RUNNING)
        await self._j(self.journal.request, self._release_id, None)
        return f"approved by {approval.who}"

    async def _approval_of(self, step: Approve) -> Approval | None:
        row = await self._j(self.journal.release, self._release_id)
        ask = decode_ask(row.request)
        return ask if isinstance(ask, Approval) and ask.step_id == step.id else None

    # --- the database ------------------------------------------------------------------

    async def _migrate(self, step: Migrate) -> str:
        phase: Phase = step.phase
        events = await self._j(self.journal.events, self._release_id)
        pins = [json.loads(e.message) for e in events if e.kind == J.MIGRATION_PINS]
        checked = pins[-1] if pins else {"files": None, "allow": []}
        return await self.migrator.migrate(
            phase,
            self._version,
            lambda note: self._emit("info", note),
            checked["files"],
            checked["allow"],
        )

    async def _verify_live(self) -> str:
        row = await self._j(self.journal.release, self._release_id)
        return await self.migrator.verify_live(self._version, row.previous_version)


def failpoint(step_id: str, where: str) -> None:
    """Crash on purpose where CHANGEOVER_FAILPOINT="<step id>:<before|during|after>"
    says, so tests can kill a release at every step boundary and inside every
    step (the same SIGKILL an operator's `kill -9` or a power cut delivers).
    `during` fires CHANGEOVER_FAILPOINT_DELAY seconds (default 0.2) into the step."""
    if os.environ.get("CHANGEOVER_FAILPOINT") != f"{step_id}:{where}":
        return
    if where == "during":
        delay = float(os.environ.get("CHANGEOVER_FAILPOINT_DELAY", "0.2"))
        asyncio.get_running_loop().call_later(delay, os.kill, os.getpid(), signal.SIGKILL)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _brief(results: list[CheckResult]) -> str:
    shown = "; ".join(f"{r.target}: {r.detail}" for r in results[:3])
    return shown + (f" (+{len(results) - 3} more)" if len(results) > 3 else "")


def _admissions_summary(topo: Topology, view: PoolView) -> str:
    parts = []
    for c in topo.clusters:
        adm = cluster_admission(view, c.name)
        parts.append(f"{c.name}={adm.value if adm else 'mixed'}")
    return " ".join(parts)
