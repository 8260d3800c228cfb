"""The engine driven step by step against in-memory ports (tests/unit/engine_fakes.py):
each case asserts the exact balancer changes, commands and journal records.
No socket, no subprocess, no real sleep: the fake clock jumps."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from changeover import journal as J
from changeover.commands.looking import status_notes as _status_notes
from changeover.config import Cluster, Member
from changeover.engine import Engine, Event
from changeover.executors.base import CommandResult
from changeover.journal import LockHeld
from changeover.model import AbortAsked, Admission, Approval, Counter, PoolView, encode_ask
from changeover.plan import PlanRefused
from changeover.policy import CLOSE_GRACE
from changeover.releases import Awaiting, BadRequest, Begin, Releases
from changeover.steps import StepKind
from tests.helpers import wait_until
from tests.unit.engine_fakes import FakeExecutor, Site, journal_writes

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT

ROLLING_CHANGES = [
    {"a": DRAINING},
    {"a": OUT},
    {"a": LIVE, "b": DRAINING},
    {"b": OUT},
    {"b": LIVE},
]


def commands(site: Site) -> list[str]:
    return [" ".join(c[1:3]) for c in site.executor.calls]


def step_states(site: Site, release_id: int) -> dict[str, str]:
    return {s.step_id: s.state for s in site.journal.steps(release_id)}


async def release(site: Site, version: str = "2.0", events: list[Event] | None = None) -> str:
    on_event = events.append if events is not None else None
    engine = Engine(site.topo, site.ports(), on_event=on_event, poll=0.05)
    return await engine.run(await engine.begin(version))


def approve_when_asked(site: Site, who: str = "qa@desk") -> list[str]:
    """A person who approves whatever cluster the release waits for; the list
    of the steps they were asked to approve, in order, fills as they are."""
    asked: list[str] = []

    def look() -> None:
        row = site.journal.unfinished(site.topo.site.name)
        if row is None or row.state != J.AWAITING_APPROVAL:
            return
        waiting = [s for s in site.journal.steps(row.id) if s.state == J.STEP_RUNNING]
        site.journal.request(row.id, encode_ask(Approval(waiting[0].step_id, who)))
        if asked[-1:] != [waiting[0].step_id]:
            asked.append(waiting[0].step_id)

    site.clock.on_sleep.append(look)
    return asked


# --- a release that works -------------------------------------------------------------


async def test_a_rolling_release_changes_the_pool_and_runs_commands_in_order(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    state = await release(site)

    assert state == J.DONE
    assert site.balancer.cluster_changes() == ROLLING_CHANGES
    per_cluster = ["stop", "stop", "deploy", "deploy", "start", "start"]
    assert [c[1] for c in site.executor.calls] == per_cluster * 2
    assert [c[2] for c in site.executor.calls[:6]] == ["a1", "a2"] * 3
    assert set(site.fleet.version.values()) == {"2.0"}
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    assert set(step_states(site, release_id).values()) == {J.STEP_DONE}
    outputs = site.journal.outputs(release_id)
    assert len(outputs) == 12 and all(o.exit_status == 0 for o in outputs)
    assert site.journal.release(release_id).previous_version == "1.0"
    assert site.journal.lock_holder("t") is None


async def test_every_step_kind_runs_through_the_service(tmp_path: Path) -> None:
    site = Site.build(
        tmp_path,
        policy={"bake": 4, "approval": "manual", "session_idle": 1, "health_timeout": 5},
        database={"url": "sqlite:///db.sqlite", "migrations_dir": "migrations"},
        release={"upload": [{"src": "app-{version}.tar", "dest": "/srv/app.tar"}]},
    )
    (tmp_path / "migrations").mkdir()
    approve_when_asked(site)
    outcome = await Releases(site.topo, site.journal_opener, site.migrator, site.connect).release(
        Begin("2.0")
    )

    assert outcome.state == J.DONE
    plan = [s["kind"] for s in site.journal.release(outcome.release_id).plan]
    assert set(plan) == {k.value for k in StepKind}  # the case covers every kind
    assert site.migrator.applied == [("expand", "2.0"), ("contract", "2.0")]
    assert ("upload", "a1", str(tmp_path / "app-2.0.tar"), "/srv/app.tar") in site.executor.calls
    details = {s.step_id: s.detail for s in site.journal.steps(outcome.release_id)}
    assert details["approve-a"] == "approved by qa@desk"
    events = site.journal.events(outcome.release_id)
    pins = [e.message for e in events if e.kind == J.MIGRATION_PINS]
    assert pins == ['{"allow": [], "files": {"0001_expand.sql": "' + "0" * 64 + '"}}']


# --- each gate stops the release before its cluster goes live --------------------------


@pytest.mark.parametrize(
    ("breakage", "failed_step", "why"),
    [
        ("never_healthy", "healthy-a", "not healthy after 5s: a2: connection refused"),
        ("broken_deploy", "version-a", "wrong version: a2: reports 0.0-broken"),
        ("smoke", "smoke-a", "smoke check failed: qa-a/: HTTP 500"),
        ("deploy_exit", "deploy-a", "1 member(s) failed, first a2 (exit 3)"),
    ],
)
async def test_a_failed_gate_leaves_the_cluster_out_and_the_other_live(
    tmp_path: Path, breakage: str, failed_step: str, why: str
) -> None:
    site = Site.build(tmp_path)
    match breakage:
        case "never_healthy":
            site.fleet.never_healthy.add("a2")
        case "broken_deploy":
            site.fleet.broken_deploy.add("a2")
        case "smoke":
            site.checks.smoke_fails.add("a")
        case "deploy_exit":
            site.executor.fail[("deploy", "a2")] = 3

    state = await release(site)

    assert state == J.FAILED
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    states = step_states(site, release_id)
    assert states[failed_step] == J.STEP_FAILED
    assert states["drain-b"] == J.STEP_PENDING  # nothing after the failed gate ran
    detail = {s.step_id: s.detail for s in site.journal.steps(release_id)}[failed_step]
    assert why in (detail or "")
    assert site.balancer.cluster_changes() == ROLLING_CHANGES[:2]  # a out, b live
    assert {site.balancer.admissions[m] for m in ("b1", "b2")} == {Admission.LIVE}


# --- the failure budget ---------------------------------------------------------------------


async def test_a_member_failing_within_max_failed_is_kept_out_and_the_release_goes_on(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, executor={"max_failed": 1})
    site.executor.fail[("stop", "a2")] = 1
    events: list[Event] = []

    assert await release(site, events=events) == J.DONE
    warnings = [e.message for e in events if e.kind == "warn"]
    assert warnings == [
        "kept a2 out of the live pool for the rest of this release: 1 member(s) failed, "
        "first a2 (exit 1): stop said 1 (within max_failed=1); a later release brings it back"
    ]
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    details = {s.step_id: s.detail for s in site.journal.steps(release_id)}
    assert (details["stop-a"], details["healthy-a"]) == ("1/2 ok", "1 member(s) healthy after 0.0s")
    assert [c for c in site.executor.calls if c[2] == "a2"] == [("ctl", "stop", "a2", "2.0")]
    # The swap puts a live without a2; the last change leaves it out.
    swap = site.balancer.changes[2]
    assert swap == {"a1": LIVE, "a2": OUT, "b1": DRAINING, "b2": DRAINING}
    assert site.balancer.admissions == {"a1": LIVE, "a2": OUT, "b1": LIVE, "b2": LIVE}
    kept = [e.message for e in site.journal.events(release_id) if e.kind == J.KEPT_OUT]
    assert kept == ["a2"]

    # A later release, the host repaired, brings it back.
    site.executor.fail.clear()
    assert await release(site, "3.0") == J.DONE
    assert set(site.balancer.admissions.values()) == {Admission.LIVE}
    assert set(site.fleet.version.values()) == {"3.0"}


@pytest.mark.parametrize(
    ("breakage", "max_failed", "state", "kept"),
    [
        ("a2 never healthy", 1, J.DONE, ["a2"]),
        ("a2 wrong version", 1, J.DONE, ["a2"]),
        ("a2 fails stop, a1 never healthy", 1, J.FAILED, ["a2"]),  # the budget is spent
        ("both fail start", 2, J.FAILED, []),  # never the whole cluster
        ("a2 fails stop, a1 never healthy", 2, J.FAILED, ["a2"]),  # nor by instalments
    ],
)
async def test_the_budget_is_carried_through_the_gates(
    tmp_path: Path, breakage: str, max_failed: int, state: str, kept: list[str]
) -> None:
    site = Site.build(tmp_path, executor={"max_failed": max_failed})
    match breakage:
        case "a2 never healthy":
            site.fleet.never_healthy.add("a2")
        case "a2 wrong version":
            site.fleet.broken_deploy.add("a2")
        case "a2 fails stop, a1 never healthy":
            site.executor.fail[("stop", "a2")] = 1
            site.fleet.never_healthy.add("a1")
        case "both fail start":
            site.executor.fail[("start", "a1")] = site.executor.fail[("start", "a2")] = 1

    assert await release(site) == state
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    assert [e.message for e in site.journal.events(release_id) if e.kind == J.KEPT_OUT] == kept
    if state == J.DONE:
        assert site.balancer.admissions["a2"] is Admission.OUT
        assert {site.balancer.admissions[m] for m in ("a1", "b1", "b2")} == {Admission.LIVE}
    else:  # b still serves, a never went live
        assert {site.balancer.admissions[m] for m in ("b1", "b2")} == {Admission.LIVE}
        assert {site.balancer.admissions[m] for m in ("a1", "a2")} == {Admission.OUT}


async def test_a_member_kept_out_stays_out_across_a_resume(tmp_path: Path) -> None:
    site = Site.build(tmp_path, executor={"max_failed": 1})
    site.executor.fail[("stop", "a2")] = 1

    def crash(event: Event) -> None:
        if event.kind == "step-start" and event.step and event.step.id == "deploy-a":
            site.executor.fail.clear()  # even were a2 to work now, it is out of this release
            raise Crash

    engine = Engine(site.topo, site.ports(), on_event=crash, poll=0.05)
    release_id = await engine.begin("2.0")
    with pytest.raises(Crash):
        await engine.run(release_id)
    resumed = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    assert await resumed.resume() == (release_id, J.DONE)
    assert ("ctl", "deploy", "a2", "2.0") not in site.executor.calls
    assert site.balancer.admissions["a2"] is Admission.OUT


async def test_one_failure_more_than_max_failed_fails_and_starts_no_further_member(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, executor={"max_failed": 0, "parallel": 1})
    site.executor.fail[("stop", "a1")] = 1

    assert await release(site) == J.FAILED
    assert commands(site) == ["stop a1"]  # a2 never started
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    detail = {s.step_id: s.detail for s in site.journal.steps(release_id)}["stop-a"]
    assert (
        detail
        == "1 member(s) failed, first a1 (exit 1): stop said 1; not started on 1 member(s): a2"
    )
    assert [o.member for o in site.journal.outputs(release_id)] == ["a1"]


async def test_a_balancer_that_refuses_is_retried_then_takes_the_change(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    site.balancer.refusals = 2
    events: list[Event] = []

    assert await release(site, events=events) == J.DONE
    retries = [e.message for e in events if e.kind == "warn"]
    assert retries == [
        "balancer change failed (connection refused); retrying in 0.5s",
        "balancer change failed (connection refused); retrying in 1s",
    ]
    assert site.balancer.cluster_changes() == ROLLING_CHANGES


# --- the drain ------------------------------------------------------------------------------


def when_out(site: Site, member: str) -> list[float]:
    """Fills with the fake clock's time when `member` is first taken OUT."""
    at: list[float] = []
    apply = site.balancer.apply

    async def noting(desired: Mapping[str, Admission]) -> PoolView:
        if desired.get(member) is Admission.OUT and not at:
            at.append(site.clock.now)
        return await apply(desired)

    site.balancer.apply = noting  # type: ignore[method-assign]
    return at


def drain_detail(site: Site) -> str:
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    return {s.step_id: s.detail for s in site.journal.steps(release_id)}["drained-a"] or ""


async def test_each_clusters_connections_are_opened_while_it_drains_closed_when_done(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    assert await release(site) == J.DONE
    # a before any command, b once a's six commands ran and before its own.
    assert site.executor.warmed == [("a", 0), ("b", 6)]
    # a's close while b drains (b's warm too, after a's six commands); b's once its
    # own last command ran: nothing runs on either after that.
    assert site.executor.closed == [("a", 6), ("b", 12)]


# --- health and version as soon as each member started ------------------------------------


def asked(site: Site, member: str) -> list[tuple[str, str | None]]:
    """What the checks asked `member` (health or version), and in which step."""
    return [(what, step) for what, name, step in site.checks.asked if name == member]


async def test_each_member_is_checked_as_soon_as_its_start_succeeded(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    assert await release(site) == J.DONE
    # Asked once each, while the start step ran; the steps after took the answers.
    for member in ("a1", "a2", "b1", "b2"):
        start = f"start-{member[0]}"
        assert asked(site, member) == [("health", start), ("version", start)], member
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    details = {s.step_id: s.detail for s in site.journal.steps(release_id)}
    assert details["healthy-a"] == "2 member(s) healthy after 0.0s"
    assert details["version-a"] == "2 member(s) on 2.0"


async def test_a_member_not_up_as_its_start_ended_is_asked_again_by_the_steps(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    site.fleet.slow_up.add("a2")  # refuses the first health check after its start
    assert await release(site) == J.DONE
    assert asked(site, "a1") == [("health", "start-a"), ("version", "start-a")]
    assert asked(site, "a2") == [
        ("health", "start-a"),  # refused: not kept, the health wait asks again
        ("health", "healthy-a"),
        ("version", "version-a"),
    ]


async def test_a_wrong_version_found_early_is_asked_again_and_fails_the_step(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    site.fleet.broken_deploy.add("a2")
    assert await release(site) == J.FAILED
    assert asked(site, "a2") == [
        ("health", "start-a"),
        ("version", "start-a"),  # wrong: not kept
        ("version", "version-a"),  # the step's own check fails it
    ]
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    assert step_states(site, release_id)["version-a"] == J.STEP_FAILED


async def test_a_drain_waits_for_the_last_session_and_reports_every_few_seconds(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    site.balancer.sessions |= {"a1": 2, "a2": 1}
    draining_since: list[float] = []
    went_out = when_out(site, "a1")

    def users_leave() -> None:
        """a's users leave 12 s into the drain, one tunnel closes at 14 s."""
        if site.balancer.admissions["a1"] is Admission.DRAINING:
            draining_since[:] = draining_since or [site.clock.now]
            elapsed = site.clock.now - draining_since[0]
            if elapsed >= 12:
                site.balancer.sessions |= {"a1": 0, "a2": 0}
                site.balancer.tunnels["a1"] = 1 if elapsed < 14 else 0

    site.clock.on_sleep.append(users_leave)
    events: list[Event] = []
    assert await release(site, events=events) == J.DONE

    assert (
        14 <= went_out[0] - draining_since[0] < 15
    )  # not before the tunnel closed, promptly after
    progress = [e for e in events if e.message.startswith("draining a:")]
    assert [e.message for e in progress[:3]] == [
        "draining a: 3 session(s), 0 request(s) in flight, 0 tunnel(s); 30s left",
        "draining a: 3 session(s), 0 request(s) in flight, 0 tunnel(s); 25s left",
        "draining a: 3 session(s), 0 request(s) in flight, 0 tunnel(s); 20s left",
    ]
    assert len(progress) == 3  # every 5 s, not one per read
    assert drain_detail(site) == "no session seen and no request for 1s, nothing in flight"


async def test_a_drain_timeout_with_sessions_left_warns_that_they_are_cut(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"drain_timeout": 8})
    site.balancer.sessions["a2"] = 4  # users who never leave
    events: list[Event] = []
    assert await release(site, events=events) == J.DONE
    warnings = [e.message for e in events if e.kind == "warn"]
    assert warnings[0].startswith("drain of a: drain timeout (8s) with 4 session(s)")
    assert "cut when it goes out" in drain_detail(site)


def websockets_on_a(
    site: Site, closes: Callable[[float], dict[str, int]]
) -> tuple[list[float], list[float]]:
    """a1 and a2 hold WebSockets; once a is OUT, `closes(seconds since)` says how
    many each still holds (the balancer closing them). Fills (when a went out,
    when a1's stop ran)."""
    site.balancer.tunnels |= {"a1": 3, "a2": 2}
    went_out = when_out(site, "a1")
    stopped: list[float] = []

    def closing() -> None:
        if went_out and site.balancer.admissions["a1"] is Admission.OUT:
            site.balancer.tunnels |= closes(site.clock.now - went_out[0])

    def stop_seen(argv: Sequence[str]) -> None:
        if argv[1] == "stop" and argv[2] == "a1":
            stopped.append(site.clock.now)

    site.clock.on_sleep.append(closing)
    site.executor.during = stop_seen
    return went_out, stopped


async def test_out_waits_while_the_balancer_closes_the_websockets_then_the_stop_runs(
    tmp_path: Path,
) -> None:
    """The WebSockets still on a when it goes out are closed by the balancer
    over close_spread (4 s); a's stop waits until the last is closed (3 s
    here), not longer: stopping earlier would end the rest all at once."""
    site = Site.build(tmp_path, policy={"drain_timeout": 2}, balancer={"close_spread": "4s"})
    out, stop = websockets_on_a(site, lambda t: {"a1": 1 if t < 3 else 0, "a2": 0 if t >= 1 else 2})
    events: list[Event] = []
    assert await release(site, events=events) == J.DONE
    assert 3 <= stop[0] - out[0] < 3.5
    assert "a out: 5 WebSocket(s) closing with 1001 over 4s" in [e.message for e in events]
    newest = site.journal.newest("t")
    assert newest is not None
    steps = {s.step_id: s.detail for s in site.journal.steps(newest.id)}
    assert steps["out-a"] == "a=out b=live; every WebSocket closed within 3.0s"
    assert not [e for e in events if e.kind == "warn" and "WebSocket" in e.message]


async def test_websockets_that_outlast_the_spread_are_left_to_the_stop_with_a_warning(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"drain_timeout": 2}, balancer={"close_spread": "4s"})
    out, stop = websockets_on_a(site, lambda t: {"a1": 1, "a2": 0})  # one never closes
    events: list[Event] = []
    assert await release(site, events=events) == J.DONE
    assert 4 + CLOSE_GRACE <= stop[0] - out[0] < 4 + CLOSE_GRACE + 0.5
    warned = [e.message for e in events if e.kind == "warn" and "WebSocket" in e.message]
    assert warned == ["a out: 1 WebSocket(s) still open 7s after it went out "
                      "(close_spread 4s): the stop ends them"]  # fmt: skip


@pytest.mark.parametrize(
    ("fills", "detail"),
    [
        (frozenset({"active", "requests"}), "no request for 1s (sessions not counted)"),
        (frozenset(), "waited drain_timeout (6s) by time alone"),
    ],
)
async def test_a_drain_without_session_counts_says_how_it_decided(
    tmp_path: Path, fills: frozenset[Counter], detail: str
) -> None:
    site = Site.build(tmp_path, fills=fills, policy={"drain_timeout": 6})
    site.balancer.sessions["a1"] = 5  # there, but this balancer cannot see them
    start = site.clock.now
    drained_at = when_out(site, "a1")
    assert await release(site) == J.DONE
    assert detail in drain_detail(site)
    assert (drained_at[0] - start >= 6) == (not fills)  # blind: the whole timeout


# --- the bake ------------------------------------------------------------------------------


async def test_a_bake_that_goes_bad_flips_back_while_the_old_release_still_runs(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"bake": 10, "max_error_ratio": 0.05, "auto_rollback": True})
    # Once `a` is live on 2.0 it answers 30 % 5xx.
    site.clock.on_sleep.append(
        lambda: (
            site.balancer.serve("a", 10, 3)
            if site.balancer.admissions["a1"] is Admission.LIVE
            else None
        )
    )

    assert await release(site) == J.ROLLED_BACK
    assert site.balancer.cluster_changes() == [*ROLLING_CHANGES[:3], {"b": LIVE, "a": OUT}]
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    row = site.journal.release(release_id)
    assert row.error is not None and "flipped back: b live on the previous release" in row.error
    assert [c for c in commands(site) if c.endswith("b1")] == []  # b never touched


@pytest.mark.parametrize("auto_rollback", [True, False])
async def test_a_bad_bake_without_a_flip_back_fails(tmp_path: Path, auto_rollback: bool) -> None:
    """On the last cluster nothing is left on the old release to flip back to;
    without auto_rollback the engine never flips on its own."""
    site = Site.build(tmp_path, policy={"bake": 10, "auto_rollback": auto_rollback})
    if not auto_rollback:
        site.clock.on_sleep.append(
            lambda: (
                site.balancer.serve("a", 10, 5)
                if site.balancer.admissions["a1"] is Admission.LIVE
                else None
            )
        )
    site.clock.on_sleep.append(
        lambda: (
            site.balancer.serve("b", 10, 5)
            if site.balancer.admissions["b1"] is Admission.LIVE
            and site.fleet.version["b1"] == "2.0"
            else None
        )
    )

    assert await release(site) == J.FAILED
    changes = ROLLING_CHANGES if auto_rollback else ROLLING_CHANGES[:3]
    assert site.balancer.cluster_changes() == changes


# --- stopping and resuming -------------------------------------------------------------------


async def test_an_abort_stops_at_a_safe_point_and_resume_finishes(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    site.balancer.sessions["a1"] = 1  # a user still on a1: the drain waits
    asked = False

    def abort_during_drain() -> None:
        nonlocal asked
        if not asked and site.balancer.admissions["a1"] is Admission.DRAINING:
            row = site.journal.unfinished("t")
            assert row is not None
            site.journal.request(row.id, encode_ask(AbortAsked("ops@desk")))
            asked = True

    site.clock.on_sleep.append(abort_during_drain)
    assert await release(site) == J.ABORTED
    release_id = site.journal.newest("t").id  # type: ignore[union-attr]
    assert step_states(site, release_id)["drained-a"] == J.STEP_PENDING  # runs again
    assert site.balancer.cluster_changes() == ROLLING_CHANGES[:1]
    assert site.executor.calls == []

    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    assert await service.resume() == (release_id, J.DONE)
    assert site.balancer.cluster_changes() == ROLLING_CHANGES  # a drained again, then on
    assert set(site.fleet.version.values()) == {"2.0"}


async def aborted_while_awaiting_approval(site: Site) -> int:
    """A release of 2.0 aborted while a (out, on 2.0, healthy) waits for approval."""

    def abort_when_waiting() -> None:
        row = site.journal.unfinished("t")
        if row is not None and row.state == J.AWAITING_APPROVAL and row.request is None:
            site.journal.request(row.id, encode_ask(AbortAsked("ops@desk")))

    site.clock.on_sleep.append(abort_when_waiting)
    assert await release(site) == J.ABORTED
    site.clock.on_sleep.remove(abort_when_waiting)
    return site.journal.newest("t").id  # type: ignore[union-attr]


async def test_after_an_abort_status_warns_of_the_cluster_left_out_and_resume_finishes(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    release_id = await aborted_while_awaiting_approval(site)
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)

    now = await service.status()
    assert now.release is not None and now.release["state"] == J.ABORTED
    assert now.warning == (
        "healthy members are out of the live pool and no release is running (a: a1, a2): "
        f"`changeover resume` continues release #{release_id}, `changeover rollback` goes back"
    )
    approve_when_asked(site)
    assert await service.resume() == (release_id, J.DONE)
    assert set(site.balancer.admissions.values()) == {Admission.LIVE}
    assert set(site.fleet.version.values()) == {"2.0"}
    assert (await service.status()).warning is None


async def test_an_abort_of_a_release_nobody_runs_keeps_it_resumable(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    release_id = await aborted_while_awaiting_approval(site)
    site.journal.set_state(release_id, J.FAILED, "crashed")  # as a crash would leave it
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)

    said = await service.abort("ops@desk")

    assert said.startswith(f"release #{release_id} aborted; aborted while not running")
    assert site.journal.unfinished("t").id == release_id  # type: ignore[union-attr]
    approve_when_asked(site)
    assert await service.resume() == (release_id, J.DONE)


async def test_a_new_release_supersedes_an_aborted_one(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    aborted = await aborted_while_awaiting_approval(site)
    approve_when_asked(site)

    assert await release(site, "2.1") == J.DONE

    old = site.journal.release(aborted)
    assert old.state == J.SUPERSEDED
    assert old.error is not None and old.error.endswith(f"superseded by release #{aborted + 1}")
    assert site.journal.release(aborted + 1).previous_version == "1.0"  # what served before
    assert set(site.fleet.version.values()) == {"2.1"}


async def test_approval_waits_for_its_own_step_and_names_who(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    with pytest.raises(BadRequest, match="no release is awaiting approval"):
        await service.approve("early@desk")
    # An approval of another step is not this one's.
    stale = False

    def approve_wrong_step_first() -> None:
        nonlocal stale
        row = site.journal.unfinished("t")
        if row and row.state == J.AWAITING_APPROVAL and not stale:
            site.journal.request(row.id, encode_ask(Approval("approve-b", "hasty@desk")))
            stale = True

    site.clock.on_sleep.append(approve_wrong_step_first)
    approve_when_asked(site, "qa@desk")
    done = await service.release(Begin("2.0"))
    assert done.state == J.DONE
    details = {s.step_id: s.detail for s in site.journal.steps(done.release_id)}
    assert details["approve-a"] == "approved by qa@desk"


class Crash(BaseException):
    """The tool dying mid-step (as SIGKILL would), raised where nothing catches it."""


def _full_plan_site(tmp_path: Path) -> Site:
    return Site.build(
        tmp_path,
        policy={"bake": 2, "approval": "manual", "session_idle": 1},
        database={"url": "sqlite:///db.sqlite", "migrations_dir": "migrations"},
    )


PLAN_LENGTH = 27  # the full plan of _full_plan_site, every step kind in it


@pytest.mark.parametrize("crash_at", range(PLAN_LENGTH))
async def test_a_crash_at_any_step_resumes_from_that_step(tmp_path: Path, crash_at: int) -> None:
    site = _full_plan_site(tmp_path)
    approve_when_asked(site)
    started: list[int] = []
    crashed = False

    def crash(event: Event) -> None:
        nonlocal crashed
        if event.kind == "step-start":
            started.append(event.index or 0)
            if event.index == crash_at and not crashed:
                crashed = True
                raise Crash

    engine = Engine(site.topo, site.ports(), on_event=crash, poll=0.05)
    release_id = await engine.begin("2.0")
    assert len(site.journal.release(release_id).plan) == PLAN_LENGTH
    with pytest.raises(Crash):
        await engine.run(release_id)
    assert step_states(site, release_id)[site.journal.steps(release_id)[crash_at].step_id] == (
        J.STEP_RUNNING
    )

    started.clear()
    resumed = Releases(site.topo, site.journal_opener, site.migrator, site.connect, on_event=crash)
    outcome = await resumed.resume()

    assert outcome == (release_id, J.DONE)
    assert started == list(range(crash_at, PLAN_LENGTH))  # no step before it again
    assert set(site.fleet.version.values()) == {"2.0"}
    assert {a for a in site.balancer.admissions.values()} == {Admission.LIVE}
    assert site.migrator.applied.count(("expand", "2.0")) >= 1


async def killed_while_awaiting_approval(tmp_path: Path) -> tuple[Site, int, Releases]:
    """A site with approval = "manual", the release of 2.0 whose process died while
    a waited for approval (left as SIGKILL leaves it: awaiting approval, approve-a
    running, nobody running it), and the service another shell calls."""
    site = Site.build(tmp_path, policy={"approval": "manual"})

    def die_when_waiting() -> None:
        row = site.journal.unfinished("t")
        if row is not None and row.state == J.AWAITING_APPROVAL:
            raise Crash

    site.clock.on_sleep.append(die_when_waiting)
    engine = Engine(site.topo, site.ports(), poll=0.05)
    release_id = await engine.begin("2.0")
    with pytest.raises(Crash):
        await engine.run(release_id)
    site.clock.on_sleep.remove(die_when_waiting)
    site.journal.set_state(release_id, J.AWAITING_APPROVAL)  # no `finally` runs under SIGKILL
    assert step_states(site, release_id)["approve-a"] == J.STEP_RUNNING
    assert site.journal.lock_holder("t") is None
    return site, release_id, Releases(site.topo, site.journal_opener, site.migrator, site.connect)


def approved_by(site: Site, release_id: int) -> dict[str, str | None]:
    return {s.step_id: s.detail for s in site.journal.steps(release_id) if "approve" in s.step_id}


async def test_an_approval_given_while_no_process_runs_survives_the_resume(
    tmp_path: Path,
) -> None:
    site, release_id, service = await killed_while_awaiting_approval(tmp_path)

    said = await service.approve("qa@desk")
    assert said == f"approved approve-a of release #{release_id}"
    asked = approve_when_asked(site, "later@desk")
    site.notifier.events.clear()
    assert await service.resume() == (release_id, J.DONE)

    assert asked == ["approve-b"]  # a was not asked again
    assert approved_by(site, release_id) == {
        "approve-a": "approved by qa@desk",
        "approve-b": "approved by later@desk",
    }
    messages = [e.message for e in site.journal.events(release_id)]
    kept = "kept the approval of approve-a by qa@desk, given before the take-over"
    after = messages[messages.index(kept) :]
    assert not [m for m in after if m.startswith("awaiting approval of a")], after
    waits = [cluster for event, cluster in site.notifier.names() if event == "awaiting-approval"]
    assert waits == ["b"], site.notifier.names()  # no hook told QA a waits again
    assert set(site.fleet.version.values()) == {"2.0"}


async def test_an_approval_landing_while_resume_withdraws_a_stale_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resume reads what was asked (a stale approval of b), and QA approves a
    before resume withdraws it: the withdrawal does not erase that approval."""
    site, release_id, service = await killed_while_awaiting_approval(tmp_path)
    site.journal.request(release_id, encode_ask(Approval("approve-b", "hasty@desk")))
    withdraw = site.journal.withdraw

    def qa_approves_first(rid: int, seen: str) -> bool:
        site.journal.request(rid, encode_ask(Approval("approve-a", "qa@desk")))
        return withdraw(rid, seen)

    monkeypatch.setattr(site.journal, "withdraw", qa_approves_first)
    asked = approve_when_asked(site, "later@desk")
    assert await service.resume() == (release_id, J.DONE)

    assert asked == ["approve-b"]  # a's approval came in time and was kept
    assert approved_by(site, release_id) == {
        "approve-a": "approved by qa@desk",
        "approve-b": "approved by later@desk",
    }


async def test_an_approval_of_another_step_does_not_apply_after_a_resume(tmp_path: Path) -> None:
    site, release_id, service = await killed_while_awaiting_approval(tmp_path)
    site.journal.request(release_id, encode_ask(Approval("approve-b", "hasty@desk")))

    asked = approve_when_asked(site, "qa@desk")
    assert await service.resume() == (release_id, J.DONE)

    assert asked == ["approve-a", "approve-b"]  # neither taken from the stale one
    assert set(approved_by(site, release_id).values()) == {"approved by qa@desk"}
    assert not any("kept the approval" in e.message for e in site.journal.events(release_id))


async def test_an_abort_withdraws_an_approval_given_while_no_process_runs(tmp_path: Path) -> None:
    site, release_id, service = await killed_while_awaiting_approval(tmp_path)
    await service.approve("qa@desk")

    said = await service.abort("ops@desk")
    assert said.startswith(f"release #{release_id} aborted; aborted while not running")
    asked = approve_when_asked(site, "again@desk")
    assert await service.resume() == (release_id, J.DONE)

    assert asked == ["approve-a", "approve-b"]  # the abort came after the approval
    assert set(approved_by(site, release_id).values()) == {"approved by again@desk"}


# --- Ctrl-C ------------------------------------------------------------------------------------


class CtrlCDuringStop(FakeExecutor):
    """`stop` on a1 is killed by the SIGINT that Ctrl-C also sends the engine."""

    engine: Engine | None = None
    pressed = True

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        if argv[1] == "stop" and member.name == "a1":
            self.calls.append(tuple(argv))
            if self.pressed:
                assert self.engine is not None
                self.engine.interrupt()
            # the command was still in our process group when the signal came:
            return CommandResult(member.name, tuple(argv), -signal.SIGINT, "", 0.01)
        return await super().run(cluster, member, argv, timeout)


@pytest.mark.parametrize("pressed", [True, False])
async def test_a_command_killed_by_ctrl_c_interrupts_and_one_killed_alone_fails(
    tmp_path: Path, pressed: bool
) -> None:
    site = Site.build(tmp_path)
    site.executor = executor = CtrlCDuringStop(site.fleet)
    executor.pressed = pressed
    engine = Engine(site.topo, site.ports(), poll=0.05)
    executor.engine = engine

    release_id = await engine.begin("2.0")
    state = await engine.run(release_id)

    steps = step_states(site, release_id)
    if pressed:
        assert state == J.INTERRUPTED  # resumable, like any Ctrl-C; not "failed"
        assert steps["stop-a"] == J.STEP_PENDING  # runs again on resume
    else:
        assert state == J.FAILED  # no Ctrl-C was pressed: a killed command is a failure
        assert steps["stop-a"] == J.STEP_FAILED
    assert "start a1" not in commands(site)  # nothing ran after the stop


async def test_a_stored_plan_it_cannot_read_is_refused_naming_the_release(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    release_id = site.journal.create_release(
        "t", "2.0", "1.0", "rolling-clusters", [{"id": "x", "kind": "teleport"}]
    )
    site.journal.acquire("t", release_id)
    engine = Engine(site.topo, site.ports(), poll=0.05)
    with pytest.raises(PlanRefused, match=rf"release #{release_id}: .*unknown kind 'teleport'"):
        await engine.run(release_id)
    assert site.balancer.changes == [] and site.executor.calls == []
    assert site.journal.lock_holder("t") is None  # refused, and the lock let go


# --- a journal that stops taking writes ----------------------------------------------------


@pytest.mark.parametrize("when", ["before-the-first-step", "inside-deploy-a", "draining-b"])
async def test_a_journal_that_cannot_be_written_stops_with_the_site_serving(
    tmp_path: Path, when: str
) -> None:
    site = Site.build(tmp_path)
    events: list[Event] = []
    engine = Engine(site.topo, site.ports(), on_event=events.append, poll=0.05)
    release_id = await engine.begin("2.0")
    if when == "before-the-first-step":
        journal_writes(site.journal, "read-only")
    elif when == "inside-deploy-a":
        site.executor.during = lambda argv: (
            journal_writes(site.journal, "read-only") if argv[1:3] == ["deploy", "a2"] else None
        )
    else:
        site.clock.on_sleep.append(
            lambda: (
                journal_writes(site.journal, "read-only")
                if site.balancer.admissions["b1"] is Admission.DRAINING
                else None
            )
        )

    assert await engine.run(release_id) == J.INTERRUPTED

    said = [e.message for e in events if e.kind == "warn"]
    assert said == [
        f"stopped: {site.journal.path}: cannot use the journal: the state directory or the "
        "journal is read-only (attempt to write a readonly database); the site is serving; "
        "fix that, then `changeover resume`"
    ]
    view = await site.balancer.read()
    serving = [m.name for m in view.members if m.admission is Admission.LIVE and m.healthy]
    assert len(serving) >= site.topo.policy.min_healthy, view
    assert site.journal.release(release_id).state == J.RUNNING  # as it was: resumable
    if when == "inside-deploy-a":
        assert "start a1" not in commands(site)  # nothing after the step that met it

    site.executor.during = None
    site.clock.on_sleep.clear()
    journal_writes(site.journal, None)  # the operator freed the disk
    resumed = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    assert await resumed.resume() == (release_id, J.DONE)
    assert set(site.fleet.version.values()) == {"2.0"}
    assert set(site.balancer.admissions.values()) == {Admission.LIVE}


# --- the first deploy -----------------------------------------------------------------------


async def test_a_fresh_site_is_deployed_out_of_service_checked_then_put_live(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    site.fleet.running.clear()  # nothing serves yet: no member answers
    site.fleet.version = dict.fromkeys(site.fleet.version, "none")
    site.checks.served = None
    approve_when_asked(site)
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)

    outcome = await service.release(Begin("1.0", first=True))

    assert outcome.state == J.DONE
    assert site.balancer.cluster_changes() == [
        {"a": OUT, "b": OUT},
        {"a": LIVE},
        {"b": LIVE},
    ]
    starts = [i for i, c in enumerate(commands(site)) if c.startswith("start")]
    assert len(starts) == 4 and commands(site)[-1] == "start b2"  # b deployed before a went live
    assert set(site.fleet.version.values()) == {"1.0"}
    row = site.journal.release(outcome.release_id)
    assert (row.kind, row.previous_version) == ("first-deploy", None)


async def test_a_first_deploy_is_refused_on_a_site_that_serves(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    with pytest.raises(PlanRefused, match="serves already"):
        await service.release(Begin("2.0", first=True))
    assert site.balancer.changes == [] and site.executor.calls == []


# --- what status shows ------------------------------------------------------------------------


async def test_status_names_the_cluster_awaiting_approval_with_its_qa_url_and_versions(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual"})
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    waiting = asyncio.Event()

    def look() -> None:
        row = site.journal.unfinished("t")
        if row is not None and row.state == J.AWAITING_APPROVAL:
            waiting.set()

    site.clock.on_sleep.append(look)
    running = asyncio.create_task(service.release(Begin("2.0")))
    await asyncio.wait_for(waiting.wait(), 30)

    looking = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    now = await looking.status()

    assert now.awaiting == Awaiting("a", "http://127.0.0.1:8081", None)
    assert dict(now.versions) == {"a1": "2.0", "a2": "2.0", "b1": "1.0", "b2": "1.0"}
    assert _status_notes(now) == [
        "awaiting approval of a: QA at http://127.0.0.1:8081; "
        "`changeover approve` (or `changeover abort`)"
    ]
    approve_when_asked(site)
    assert (await running).state == J.DONE
    assert (await looking.status()).awaiting is None


async def test_status_after_bluegreen_names_the_kept_cluster_and_the_time_left(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path, policy={"strategy": "bluegreen", "keep_previous": 600})
    service = Releases(site.topo, site.journal_opener, site.migrator, site.connect)
    done = await service.release(Begin("2.0"))
    assert done.state == J.DONE
    finished = site.journal.release(done.release_id).finished
    assert finished is not None
    site.clock.now += 60  # a minute after (the kept window runs on the journal's times)

    now = await service.status()

    assert now.kept is not None
    assert (now.kept.clusters, now.kept.version) == (["b"], "1.0")
    assert now.kept.seconds_left == pytest.approx(finished + 600 - site.clock.time())
    assert now.versions["b1"] == "1.0" and now.versions["a1"] == "2.0"
    site.balancer.admissions |= {"b1": Admission.OUT, "b2": Admission.OUT}  # b taken out
    assert (await service.status()).kept is None  # nothing to flip back to


async def test_a_second_release_in_one_process_is_refused_and_the_first_keeps_its_lock(
    tmp_path: Path,
) -> None:
    """The desk runs releases in its own process: a second one begun there while
    the first waits must be refused without letting go of the first's lock."""
    site = Site.build(tmp_path, policy={"approval": "manual"})
    first = Engine(site.topo, site.ports(), poll=0.05)
    release_id = await first.begin("2.0")
    running = asyncio.create_task(first.run(release_id))
    await wait_until(
        lambda: site.journal.release(release_id).state == J.AWAITING_APPROVAL,
        what="the first release waiting for approval",
    )
    with pytest.raises(LockHeld):
        await Engine(site.topo, site.ports(), poll=0.05).begin("3.0")
    holder = site.journal.lock_holder("t")
    assert holder is not None and holder.release_id == release_id
    approve_when_asked(site)
    assert await running == J.DONE
    assert [r.version for r in site.journal.releases("t")] == ["2.0"]
