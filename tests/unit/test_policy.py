"""The engine's decisions (policy.py) as tables: inputs and the expected decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover.config import Topology, parse
from changeover.executors.base import CommandResult
from changeover.journal import (
    STEP_DONE,
    STEP_FAILED,
    STEP_PENDING,
    STEP_RUNNING,
    ReleaseRow,
    StepRow,
)
from changeover.model import AbortAsked, Admission, Approval, Ask, MemberState, PoolView, total
from changeover.plan import PlanRefused, make_plan
from changeover.policy import (
    CLOSE_GRACE,
    REPORT_EVERY,
    ChecksAhead,
    DoneWith,
    Drain,
    DrainWatch,
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
    rollback_plan,
    swap_refusal,
)
from changeover.steps import Bake, RunCommand, Smoke, Step, StepKind, WaitHealthy

LIVE, DRAIN, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


def members(*figures: tuple[int | None, ...]) -> tuple[MemberState, ...]:
    """(active, requests, sessions, tunnels) per member of cluster a; a figure
    left out or None is one the balancer does not count."""
    padded = [(*f, None, None, None, None)[:4] for f in figures]
    return tuple(
        MemberState(f"a{i}", "a", DRAIN, True, active=a, requests=r, sessions=s, tunnels=t)
        for i, (a, r, s, t) in enumerate(padded)
    )


W, Q, T = Drain.WAITING, Drain.QUIET, Drain.TIMED_OUT
# (watch before, members, now) -> (quiet_since after, verdict, the line says); idle 2 s,
# timeout 10 s
DRAIN_CASES = [
    # Counted sessions decide: none seen within session_idle and nothing open.
    # Sessions have their own clock: they do not restart the served count's quiet window.
    ("sessions left", DrainWatch(0, 0, 5), members((0, 5, 3, 0)), 3.0, 0, W, "3 session(s)"),
    ("no session left", DrainWatch(0, 0, 6), members((0, 6, 0, 0)), 2.0, 0, Q, "no session"),
    # A new session's first answer set its cookie: not counted yet, but served.
    ("no session, served", DrainWatch(0, 0, 5), members((0, 6, 0, 0)), 3.0, 3.0, W, "0 sess"),
    ("no session, not yet", DrainWatch(0, 0, 6), members((0, 6, 0, 0)), 1.9, 0, W, "0 sess"),
    ("sessions, no counts", DrainWatch(0, 0, None), members((None, None, 0)), 0.1, 0, Q, "no"),
    ("in flight", DrainWatch(0, 0, 5), members((1, 5, 0, 0)), 3.0, 3.0, W, "1 request(s)"),
    ("a tunnel open", DrainWatch(0, 0, 5), members((0, 5, 0, 1)), 3.0, 3.0, W, "1 tunnel(s)"),
    ("sessions on two", DrainWatch(0, 0, 5), members((0, 5, 1), (0, 2, 2)), 3, 3, W, "3 sess"),
    (
        "sessions at timeout",
        DrainWatch(0, 0, 5),
        members((0, 5, 2, 0)),
        10.0,
        0,
        T,
        "2 session(s), 0 request(s) in flight, 0 tunnel(s) still on the cluster",
    ),
    # Sessions not counted: the served count standing still for session_idle.
    ("first read, busy", DrainWatch(0, 0, None), members((1, 5)), 0.5, 0.5, W, "sessions not"),
    ("first read, idle", DrainWatch(0, 0, None), members((0, 5)), 0.5, 0.5, W, "0 request(s)"),
    ("in flight resets", DrainWatch(0, 0, 5), members((1, 5)), 3.0, 3.0, W, "7s left"),
    ("served resets", DrainWatch(0, 0, 5), members((0, 6)), 3.0, 3.0, W, "0 request(s)"),
    ("quiet long enough", DrainWatch(0, 1.0, 5), members((0, 5)), 3.0, 1.0, Q, "no request"),
    ("quiet, not yet", DrainWatch(0, 1.0, 5), members((0, 3), (0, 2)), 2.9, 1.0, W, "in flight"),
    ("timeout", DrainWatch(0, 0, 5), members((2, 9)), 10.0, 10.0, T, "cut when it goes out"),
    ("quiet wins at timeout", DrainWatch(0, 7.0, 5), members((0, 5)), 10.0, 7.0, Q, "no req"),
    # One member that does not count makes the cluster's sum unknown, not smaller.
    ("one uncounted", DrainWatch(0, 0, 5), members((0, 5, 0), (0, 0)), 0.5, 0, W, "not counted"),
    # Nothing counted: time alone, and it says so.
    ("blind, waiting", DrainWatch(0, 0, None), members(()), 9.0, 0.0, W, "counts nothing"),
    ("blind, at timeout", DrainWatch(0, 0, None), members(()), 10.0, 0.0, T, "by time alone"),
]


@pytest.mark.parametrize(
    ("case", "watch", "seen", "now", "quiet_since", "verdict", "says"),
    DRAIN_CASES,
    ids=[c[0] for c in DRAIN_CASES],
)
def test_drain_progress(
    case: str,
    watch: DrainWatch,
    seen: tuple[MemberState, ...],
    now: float,
    quiet_since: float,
    verdict: Drain,
    says: str,
) -> None:
    judged = drain_progress(watch, seen, now, idle=2.0, timeout=10.0)
    assert (judged.watch.quiet_since, judged.verdict) == (quiet_since, verdict)
    assert says in judged.line
    assert judged.watch.last_total == total(seen, "requests")
    assert judged.watch.started == watch.started


def test_a_drain_ends_as_its_last_session_does_not_one_session_idle_later() -> None:
    """The last request at t=0: its session is counted until t=2 (idle 2 s), and
    the served count stands still from t=0, so the drain ends at the first read
    that sees no session, not 2 s after it."""
    watch = DrainWatch(0, 0, 5)
    for now in (0.5, 1.0, 1.5):
        judged = drain_progress(watch, members((0, 5, 1, 0)), now, 2.0, 60.0)
        assert judged.verdict is W
        watch = judged.watch
    assert drain_progress(watch, members((0, 5, 0, 0)), 2.0, 2.0, 60.0).verdict is Q


@pytest.mark.parametrize(
    ("tunnels", "elapsed", "done", "cut", "says"),
    [
        (None, 0.0, True, False, ""),  # a balancer that counts no tunnel: nothing to wait for
        (0, 0.0, True, False, "every WebSocket closed within 0.0s"),
        (12, 0.0, False, False, "12 WebSocket(s) closing with 1001 over 4s"),
        (3, 4.0 + CLOSE_GRACE - 0.1, False, False, "3 WebSocket(s) closing"),
        (0, 3.2, True, False, "every WebSocket closed within 3.2s"),
        (3, 4.0 + CLOSE_GRACE, True, True, "3 WebSocket(s) still open 7s after it went out"),
    ],
)
def test_the_stop_after_out_waits_for_the_balancer_to_close_the_websockets(
    tunnels: int | None, elapsed: float, done: bool, cut: bool, says: str
) -> None:
    judged = closing_progress(tunnels, elapsed, spread=4.0)
    assert (judged.done, judged.cut) == (done, cut)
    assert judged.line.startswith(says)


def test_the_close_grace_covers_the_balancers_last_close_handshakes() -> None:
    from changeover.proxy.tunnel import CLOSE_WAIT

    assert CLOSE_GRACE > CLOSE_WAIT


def test_a_drain_reports_its_progress_every_few_seconds() -> None:
    """A line at the first read, then one per REPORT_EVERY seconds, not one per read."""
    watch = DrainWatch(0, 0)
    due = []
    for tick in range(41):  # 0.25 s apart, 10 s in all
        judged = drain_progress(watch, members((0, tick, 4, 0)), tick / 4, 2.0, 60.0)
        watch = judged.watch
        due.append(judged.report)
    assert [i / 4 for i, d in enumerate(due) if d] == [0.0, REPORT_EVERY, 2 * REPORT_EVERY]


def baked(requests: int | None, errors: int | None, healthy: bool = True) -> PoolView:
    return PoolView((MemberState("a1", "a", LIVE, healthy, 0, requests, errors),))


# (view, base requests, base errors) -> problem (a part of it) or None; max ratio 1%
BAKE_CASES = [
    ("clean", baked(120, 0), 20, 0, None),
    ("5xx over the ratio", baked(120, 5), 20, 0, "5 of 100 responses were 5xx"),
    ("too few to judge", baked(30, 5), 20, 0, None),
    ("unhealthy", baked(120, 0, healthy=False), 20, 0, "a1 unhealthy"),
    ("5xx not counted", baked(120, None), 20, None, None),
    ("requests not counted", PoolView((MemberState("a1", "a", LIVE, True),)), None, None, None),
]


@pytest.mark.parametrize(
    ("case", "view", "base_requests", "base_errors", "problem"),
    BAKE_CASES,
    ids=[c[0] for c in BAKE_CASES],
)
def test_bake_problem(
    case: str,
    view: PoolView,
    base_requests: int | None,
    base_errors: int | None,
    problem: str | None,
) -> None:
    got = bake_problem(view, "a", base_requests, base_errors, 0.01)
    assert got == problem if problem is None else problem in (got or "")


def test_a_bake_says_what_the_balancer_cannot_see() -> None:
    assert bake_summary(baked(120, 0), "a", 20, 4) == "a served 100 request(s) cleanly for 4s"
    assert "5xx not counted by the balancer: max_error_ratio not judged" in bake_summary(
        baked(120, None), "a", 20, 4
    )
    blind = bake_summary(PoolView((MemberState("a1", "a", LIVE, True),)), "a", None, 4)
    assert "counts no requests" in blind and "5xx not counted" in blind


def result(member: str, status: int | None, output: str = "boom") -> CommandResult:
    return CommandResult(member, ("ctl",), status, output, 0.1)


# (members, failed, skipped, max_failed) -> (over budget, summary, detail)
FAN_OUT_CASES = [
    ("all ok", 3, [], [], 0, False, None, "3/3 ok"),
    (
        "one within budget",
        3,
        [result("m2", 1, "a\nb")],
        [],
        1,
        False,
        "1 member(s) failed, first m2 (exit 1): a | b",
        "2/3 ok",
    ),
    (
        "one over budget",
        3,
        [result("m1", 2)],
        ["m3", "m2"],
        0,
        True,
        "1 member(s) failed, first m1 (exit 2): boom; not started on 2 member(s): m2, m3",
        "2/3 ok",
    ),
    (
        "unreachable",
        2,
        [result("m1", None, "ssh: no route"), result("m2", 1)],
        [],
        1,
        True,
        "2 member(s) failed, first m1 (timed out or unreachable): ssh: no route",
        "0/2 ok",
    ),
]


@pytest.mark.parametrize(
    ("case", "n", "failed", "skipped", "budget", "over", "summary", "detail"),
    FAN_OUT_CASES,
    ids=[c[0] for c in FAN_OUT_CASES],
)
def test_fan_out_outcome(
    case: str,
    n: int,
    failed: list[CommandResult],
    skipped: list[str],
    budget: int,
    over: bool,
    summary: str | None,
    detail: str,
) -> None:
    got = fan_out_outcome(n, failed, skipped, budget)
    assert (got.over_budget, got.summary, got.detail) == (over, summary, detail)


@pytest.mark.parametrize(
    ("failures", "max_failed", "starts"), [(0, 0, True), (1, 0, False), (1, 1, True), (2, 1, False)]
)
def test_a_member_starts_only_within_the_budget(
    failures: int, max_failed: int, starts: bool
) -> None:
    assert may_start(failures, max_failed) is starts


def topology(tmp_path: Path, **policy: object) -> Topology:
    return parse(
        {
            "site": {"name": "t", "state_dir": str(tmp_path)},
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 1}]},
                {"name": "b", "members": [{"name": "b1", "port": 2}]},
            ],
            "release": {"deploy": "ctl deploy {member}"},
            "policy": {"approval": "manual", **policy},
        },
        tmp_path / "changeover.toml",
    )


GATES_A = ("healthy-a", "version-a", "smoke-a", "approve-a")

# step states -> refusal of swapping `a` live
SWAP_CASES = [
    ("every check done", dict.fromkeys(GATES_A, STEP_DONE), None),
    (
        "smoke failed",
        dict.fromkeys(GATES_A, STEP_DONE) | {"smoke-a": STEP_FAILED},
        "refusing to put a live: check(s) not passed: ['smoke-a']",
    ),
    (
        "approval not reached",
        dict.fromkeys(GATES_A[:3], STEP_DONE) | {"approve-a": STEP_PENDING},
        "refusing to put a live: check(s) not passed: ['approve-a']",
    ),
    (
        "nothing ran",
        {},
        "refusing to put a live: check(s) not passed: "
        "['healthy-a', 'version-a', 'smoke-a', 'approve-a']",
    ),
]


@pytest.mark.parametrize(("case", "states", "refusal"), SWAP_CASES, ids=[c[0] for c in SWAP_CASES])
def test_swap_refusal(
    tmp_path: Path, case: str, states: dict[str, str], refusal: str | None
) -> None:
    plan = make_plan(topology(tmp_path), "2.0")
    assert swap_refusal(plan, states, "a") == refusal


def test_a_cluster_with_no_check_planned_is_never_swapped_live(tmp_path: Path) -> None:
    plan = [s for s in make_plan(topology(tmp_path), "2.0") if getattr(s, "cluster", "") != "a"]
    assert swap_refusal(plan, {}, "a") == (
        "refusing to put a live: check(s) not passed: none planned"
    )


def step_rows(*states: tuple[str, str]) -> list[StepRow]:
    return [StepRow(i, step, state, None, None, None) for i, (step, state) in enumerate(states)]


WAITING_A = step_rows(
    ("smoke-a", STEP_DONE), ("approve-a", STEP_RUNNING), ("approve-b", STEP_PENDING)
)
# what was asked of the gone holder, where the release stands -> what resume keeps
TAKE_OVER_CASES = [
    ("approval of the step it waits in", Approval("approve-a", "qa"), WAITING_A, True),
    ("approval of another step", Approval("approve-b", "qa"), WAITING_A, False),
    ("approval of a step done", Approval("smoke-a", "qa"), WAITING_A, False),
    ("an abort", AbortAsked("ops"), WAITING_A, False),
    ("nothing asked", None, WAITING_A, False),
    (
        "stopped before its approval step (Ctrl-C)",
        Approval("approve-a", "qa"),
        step_rows(("smoke-a", STEP_DONE), ("approve-a", STEP_PENDING)),
        True,
    ),
    (
        "a failed step before it runs again first",
        Approval("approve-a", "qa"),
        step_rows(("smoke-a", STEP_FAILED), ("approve-a", STEP_PENDING)),
        False,
    ),
    ("every step done", Approval("approve-a", "qa"), step_rows(("approve-a", STEP_DONE)), False),
]


@pytest.mark.parametrize(
    ("case", "ask", "steps", "kept"), TAKE_OVER_CASES, ids=[c[0] for c in TAKE_OVER_CASES]
)
def test_kept_at_take_over(case: str, ask: Ask | None, steps: list[StepRow], kept: bool) -> None:
    assert kept_at_take_over(ask, steps) == (ask if kept else None)


# --- what a command step's members are asked next, and when their connections close ---


def test_only_the_command_right_before_the_health_wait_checks_early(tmp_path: Path) -> None:
    plan = make_plan(topology(tmp_path), "2.0")  # deploy is the only command configured
    ahead = {s.id: checks_ahead(plan, i) for i, s in enumerate(plan)}
    early = {step: a for step, a in ahead.items() if a != ChecksAhead(False, False)}
    assert early == {"deploy-a": ChecksAhead(True, True), "deploy-b": ChecksAhead(True, True)}
    health_only: list[Step] = [
        RunCommand("start-a", "start a", "a", "start"),
        WaitHealthy("healthy-a", "wait until a is healthy", "a"),
        Smoke("smoke-a", "smoke a", "a"),
    ]
    assert checks_ahead(health_only, 0) == ChecksAhead(True, False)
    elsewhere: list[Step] = [
        health_only[0],
        WaitHealthy("healthy-b", "wait until b is healthy", "b"),
    ]
    assert checks_ahead(elsewhere, 0) == ChecksAhead(False, False)
    assert checks_ahead(health_only[:1], 0) == ChecksAhead(False, False)  # the plan's end


@pytest.mark.parametrize(
    ("first", "closes"),
    [
        # a's connections close while b drains; b's at once (no drain follows).
        (False, {"deploy-a": DoneWith("a", True), "deploy-b": DoneWith("b", False)}),
        # A first deploy drains nothing: each closes as its last command ends.
        (True, {"deploy-a": DoneWith("a", False), "deploy-b": DoneWith("b", False)}),
    ],
)
def test_a_clusters_connections_close_after_its_last_command_step(
    tmp_path: Path, first: bool, closes: dict[str, DoneWith]
) -> None:
    topo = topology(tmp_path)
    plan = make_plan(topo, "2.0", first=first)
    found = {s.id: d for i, s in enumerate(plan) if (d := done_with(plan, i)) is not None}
    assert found == closes


@pytest.mark.parametrize(
    ("auto", "admissions", "flip"),
    [
        (True, {"b": LIVE, "a": OUT}, {"b": LIVE, "a": OUT}),
        (False, {"b": LIVE, "a": OUT}, None),
        (True, {}, None),  # the last cluster: nothing left on the old release
    ],
)
def test_flip_back(
    tmp_path: Path, auto: bool, admissions: dict[str, Admission], flip: object
) -> None:
    assert flip_back(auto, Bake("bake-a", "bake: watch a", "a", admissions)) == flip


def row(
    topo: Topology, rid: int, version: str, previous: str | None, state: str = "done", **kw: object
) -> ReleaseRow:
    plan = [s.to_dict() for s in make_plan(topo, version)]
    fields: dict[str, object] = {
        "id": rid,
        "site": "t",
        "version": version,
        "previous_version": previous,
        "strategy": "rolling",
        "kind": "release",
        "state": state,
        "plan": plan,
        "started": 900.0,
        "finished": 1000.0,
        "user": "ops",
        "host": "h",
        "error": None,
        "request": None,
    }
    return ReleaseRow(**(fields | kw))  # type: ignore[arg-type]


def pool(a: Admission, b: Admission) -> PoolView:
    return PoolView((MemberState("a1", "a", a, True), MemberState("b1", "b", b, True)))


def test_rollback_targets(tmp_path: Path) -> None:
    topo = topology(tmp_path, approval="auto", keep_previous=600)
    last = row(topo, 1, "2.0", "1.0")
    failed = row(topo, 2, "3.0", "2.0", state="failed")
    # The newest release did not finish: it is the one undone.
    version, steps = rollback_plan(topo, failed, last, pool(LIVE, LIVE), now=1100.0)
    assert version == "2.0" and steps[-1].id == "live-b"
    # Otherwise back to what the last finished release replaced, by a release.
    version, steps = rollback_plan(topo, None, last, pool(LIVE, LIVE), now=1100.0)
    assert version == "1.0" and [s.kind for s in steps].count(StepKind.RUN) == 2
    with pytest.raises(PlanRefused, match="no finished release with a predecessor"):
        rollback_plan(topo, None, row(topo, 1, "1.0", None), pool(LIVE, LIVE), now=1100.0)
    with pytest.raises(PlanRefused, match="recorded no previous version"):
        rollback_plan(topo, row(topo, 3, "1.0", None, state="failed"), None, pool(LIVE, LIVE), 1.0)


def test_a_bluegreen_rollback_within_the_window_is_a_flip(tmp_path: Path) -> None:
    topo = topology(tmp_path, approval="auto", keep_previous=600, strategy="bluegreen")
    plan = [s.to_dict() for s in make_plan(topo, "2.0", pool(LIVE, OUT))]
    last = row(topo, 1, "2.0", "1.0", strategy="bluegreen", plan=plan)
    version, steps = rollback_plan(topo, None, last, pool(DRAIN, LIVE), now=1100.0)
    assert version == "1.0"
    assert [s.id for s in steps if s.kind == "admit"] == ["flip-b", "out-b"]
    assert "run" not in [s.kind for s in steps]  # nothing is redeployed
    # Past the window, or with the kept cluster taken out since: a release.
    for view, now in ((pool(DRAIN, LIVE), 1601.0), (pool(OUT, LIVE), 1100.0)):
        _, steps = rollback_plan(topo, None, last, view, now)
        assert "run" in [s.kind for s in steps]


@pytest.mark.parametrize(
    ("failing", "kept_out", "members", "max_failed", "excused"),
    [
        (0, 0, 2, 0, True),
        (1, 0, 2, 0, False),
        (1, 0, 18, 1, True),
        (1, 1, 18, 1, False),  # the budget is the release's, not the step's
        (2, 0, 2, 2, False),  # never the whole cluster
        (1, 1, 3, 2, True),
    ],
)
def test_excusable(
    failing: int, kept_out: int, members: int, max_failed: int, excused: bool
) -> None:
    assert excusable(failing, kept_out, members, max_failed) is excused
