"""The engine's decisions (policy.py) as tables: inputs and the expected decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover.config import Topology, parse
from changeover.executors.base import CommandResult
from changeover.journal import STEP_DONE, STEP_FAILED, STEP_PENDING, ReleaseRow
from changeover.model import Admission, MemberState, PoolView
from changeover.plan import PlanRefused, make_plan
from changeover.policy import (
    Drain,
    DrainWatch,
    drain_progress,
    excusable,
    fan_out_outcome,
    flip_back,
    may_start,
    rollback_plan,
    swap_refusal,
)
from changeover.steps import Bake, StepKind

LIVE, DRAIN, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


def members(*figures: tuple[int, int]) -> tuple[MemberState, ...]:
    """(active, requests) per member of cluster a."""
    return tuple(
        MemberState(f"a{i}", "a", DRAIN, True, active, requests)
        for i, (active, requests) in enumerate(figures)
    )


# (watch before, members, now) -> (quiet_since after, verdict); idle 2 s, timeout 10 s
DRAIN_CASES = [
    ("first read, busy", DrainWatch(0, 0, None), members((1, 5)), 0.5, 0.5, Drain.WAITING),
    ("first read, idle", DrainWatch(0, 0, None), members((0, 5)), 0.5, 0.5, Drain.WAITING),
    ("in flight resets", DrainWatch(0, 0, 5), members((1, 5)), 3.0, 3.0, Drain.WAITING),
    ("served resets", DrainWatch(0, 0, 5), members((0, 6)), 3.0, 3.0, Drain.WAITING),
    ("quiet long enough", DrainWatch(0, 1.0, 5), members((0, 5)), 3.0, 1.0, Drain.QUIET),
    ("quiet, not yet", DrainWatch(0, 1.0, 5), members((0, 3), (0, 2)), 2.9, 1.0, Drain.WAITING),
    ("timeout", DrainWatch(0, 0, 5), members((2, 9)), 10.0, 10.0, Drain.TIMED_OUT),
    ("quiet wins at timeout", DrainWatch(0, 7.0, 5), members((0, 5)), 10.0, 7.0, Drain.QUIET),
]


@pytest.mark.parametrize(
    ("case", "watch", "seen", "now", "quiet_since", "verdict"),
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
) -> None:
    after, got = drain_progress(watch, seen, now, idle=2.0, timeout=10.0)
    assert (after.quiet_since, got) == (quiet_since, verdict)
    assert after.last_total == sum(m.requests for m in seen)
    assert after.started == watch.started


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
