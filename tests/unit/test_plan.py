"""Planning and interlocks are pure functions over plain data."""

from __future__ import annotations

from typing import Any

import pytest

from changeover.config import Topology, parse
from changeover.model import Admission, MemberState, PoolView
from changeover.plan import PlanRefused, admit_refusal, make_plan
from changeover.steps import Admit, Approve, Bake, RunCommand, Step, StepKind, step_from_dict


def topo(clusters: int = 2, members: int = 2, **policy: Any) -> Topology:
    data: dict[str, Any] = {
        "clusters": [
            {
                "name": name,
                "members": [
                    {"name": f"{name}{i}", "port": 9000 + 10 * c + i} for i in range(members)
                ],
            }
            for c, name in enumerate("abcdef"[:clusters])
        ],
        "release": {"stop": "ctl stop", "deploy": "ctl deploy {version}", "start": "ctl start"},
        "policy": policy,
    }
    return parse(data, "t.toml")


def view(
    t: Topology,
    admissions: dict[str, Admission] | None = None,
    sick: frozenset[str] | set[str] = frozenset(),
) -> PoolView:
    admissions = admissions or {}
    return PoolView(
        tuple(
            MemberState(m.name, c.name, admissions.get(c.name, Admission.LIVE), m.name not in sick)
            for c, m in t.members()
        )
    )


def admits(steps: list[Step]) -> list[dict[str, Admission]]:
    return [s.admissions for s in steps if isinstance(s, Admit)]


def test_rolling_clusters_follows_the_seed_procedure() -> None:
    t = topo()
    steps = make_plan(t, "2.0", view(t))
    assert admits(steps) == [
        {"a": Admission.DRAINING},
        {"a": Admission.OUT},
        {"a": Admission.LIVE, "b": Admission.DRAINING},  # the swap is one change
        {"b": Admission.OUT},
        {"b": Admission.LIVE},
    ]
    kinds = [s.kind for s in steps]
    # a is stopped, deployed, started and checked before the swap
    a_steps = [s.id for s in steps][: [s.id for s in steps].index("drain-b")]
    for needed in ("stop-a", "deploy-a", "start-a", "healthy-a", "version-a", "smoke-a"):
        assert needed in a_steps
    assert kinds[0] is StepKind.PREFLIGHT
    swap, live = (next(s for s in steps if s.id == i) for i in ("drain-b", "live-b"))
    assert isinstance(swap, Admit) and swap.promote == "a"
    assert isinstance(live, Admit) and live.promote == "b" and steps[-1] is live


def test_three_clusters_swap_pairwise() -> None:
    t = topo(clusters=3)
    assert admits(make_plan(t, "2"))[2::2] == [
        {"a": Admission.LIVE, "b": Admission.DRAINING},
        {"b": Admission.LIVE, "c": Admission.DRAINING},
        {"c": Admission.LIVE},
    ]


def test_order_and_manual_approval() -> None:
    t = topo(order=["b", "a"], approval="manual")
    steps = make_plan(t, "2")
    assert admits(steps)[0] == {"b": Admission.DRAINING} and steps[1].id == "drain-b"
    assert [s.id for s in steps if isinstance(s, Approve)] == ["approve-b", "approve-a"]


def test_plan_round_trips_through_plain_data() -> None:
    steps = make_plan(topo(), "2")
    assert [step_from_dict(s.to_dict()) for s in steps] == steps


def test_plan_refuses_when_the_remaining_cluster_is_unhealthy() -> None:
    t = topo()
    with pytest.raises(PlanRefused, match="would have 0 healthy"):
        make_plan(t, "2", view(t, sick={"b0", "b1"}))


def test_plan_refuses_empty_version() -> None:
    with pytest.raises(PlanRefused, match="empty"):
        make_plan(topo(), "  ")


def test_min_healthy_counts_members_left_live() -> None:
    t = topo(min_healthy=2)
    assert admit_refusal(t, view(t), {"a": Admission.DRAINING}) is None
    refusal = admit_refusal(t, view(t, sick={"b1"}), {"a": Admission.DRAINING})
    assert refusal is not None and "1 healthy member(s); policy.min_healthy is 2" in refusal


def test_last_live_cluster_is_never_taken_out() -> None:
    t = topo()
    v = view(t, {"a": Admission.OUT})
    assert admit_refusal(t, v, {"b": Admission.DRAINING}) is not None
    assert admit_refusal(t, v, {"a": Admission.LIVE, "b": Admission.DRAINING}) is None


def test_bluegreen_releases_the_first_cluster_when_all_are_live() -> None:
    t = topo(strategy="bluegreen")
    steps = make_plan(t, "2", view(t))
    assert admits(steps) == [
        {"a": Admission.DRAINING},
        {"a": Admission.OUT},
        {"a": Admission.LIVE, "b": Admission.DRAINING},  # b kept draining on the old release
    ]
    assert not any(isinstance(s, RunCommand) and s.cluster == "b" for s in steps)


def test_bluegreen_releases_the_idle_cluster() -> None:
    t = topo(strategy="bluegreen")
    steps = make_plan(t, "3", view(t, {"a": Admission.LIVE, "b": Admission.DRAINING}))
    assert [s.id for s in steps[:3]] == ["preflight", "drained-b", "out-b"]
    assert admits(steps)[-1] == {"b": Admission.LIVE, "a": Admission.DRAINING}
    steps = make_plan(t, "3", view(t, {"a": Admission.LIVE, "b": Admission.OUT}))
    assert steps[1].id == "stop-b"


def test_bake_follows_each_swap_with_a_flip_back_while_the_old_release_runs() -> None:
    t = topo(bake=30)
    steps = make_plan(t, "2")
    ids = [s.id for s in steps]
    assert ids.index("bake-a") == ids.index("drain-b") + 1
    assert ids.index("bake-a") < ids.index("drained-b") < ids.index("stop-b")
    bake_a, bake_b = steps[ids.index("bake-a")], steps[-1]
    assert isinstance(bake_a, Bake) and isinstance(bake_b, Bake)
    assert bake_a.admissions == {"b": Admission.LIVE, "a": Admission.OUT}
    assert bake_b.id == "bake-b" and bake_b.admissions == {}  # nothing old left running


def test_flip_back_checks_the_kept_cluster_then_swaps_in_one_change() -> None:
    from changeover.plan import flip_back_plan

    steps = flip_back_plan(topo(), "a", ["b"])
    kinds = [s.kind for s in steps]
    assert StepKind.RUN not in kinds  # no stop, deploy or start: an instant flip
    assert [s.id for s in steps[1:4]] == ["healthy-b", "version-b", "smoke-b"]
    assert admits(steps) == [{"b": Admission.LIVE, "a": Admission.DRAINING}, {"a": Admission.OUT}]


def test_bake_problem_from_the_balancers_figures() -> None:
    from dataclasses import replace

    from changeover.policy import bake_problem

    t = topo()
    base = view(t)
    assert bake_problem(base, "a", 0, 0, 0.01) is None
    busy = PoolView(tuple(replace(m, requests=100, errors=5) for m in base.members))
    problem = bake_problem(busy, "a", 0, 0, 0.01)
    assert problem is not None and "10 of 200 responses were 5xx" in problem
    assert bake_problem(busy, "a", 0, 0, 0.1) is None
    few = PoolView(tuple(replace(m, requests=5, errors=5) for m in base.members))
    assert bake_problem(few, "a", 0, 0, 0.01) is None  # too few requests to judge
    sick = view(t, sick={"a1"})
    assert "a1 unhealthy" in (bake_problem(sick, "a", 0, 0, 0.01) or "")


def test_a_cluster_left_out_by_a_failed_release_goes_first_without_draining() -> None:
    t = topo()
    steps = make_plan(t, "1", view(t, {"a": Admission.LIVE, "b": Admission.OUT}))
    assert [s.id for s in steps[:3]] == ["preflight", "out-b", "stop-b"]
    assert admits(steps)[1] == {"b": Admission.LIVE, "a": Admission.DRAINING}


def test_a_plan_journaled_before_the_steps_were_typed_still_loads() -> None:
    """The one-shape format: every key on every step, None where unused."""
    old: list[dict[str, Any]] = [
        {"id": "preflight", "kind": "preflight", "description": "check", "cluster": None,
         "admissions": {}, "promote": None, "command": None, "phase": None},
        {"id": "drain-b", "kind": "admit", "description": "swap", "cluster": None,
         "admissions": {"a": "live", "b": "draining"}, "promote": "a", "command": None,
         "phase": None},
        {"id": "stop-b", "kind": "run", "description": "stop b", "cluster": "b",
         "admissions": {}, "promote": None, "command": "stop", "phase": None},
        {"id": "migrate-expand", "kind": "migrate", "description": "expand", "cluster": None,
         "admissions": {}, "promote": None, "command": None, "phase": "expand"},
    ]  # fmt: skip
    steps = [step_from_dict(s) for s in old]
    assert steps[1] == Admit(
        "drain-b", "swap", {"a": Admission.LIVE, "b": Admission.DRAINING}, promote="a"
    )
    assert steps[2] == RunCommand("stop-b", "stop b", "b", "stop")
    assert [s.kind for s in steps] == [
        StepKind.PREFLIGHT,
        StepKind.ADMIT,
        StepKind.RUN,
        StepKind.MIGRATE,
    ]


@pytest.mark.parametrize(
    ("stored", "why"),
    [
        ({"id": "x", "kind": "teleport", "description": "?"}, "unknown kind 'teleport'"),
        ({"id": "stop-a", "kind": "run", "description": "stop a", "cluster": "a"}, "command"),
    ],
)
def test_a_stored_step_this_version_cannot_read_is_a_clear_error(
    stored: dict[str, Any], why: str
) -> None:
    from changeover.steps import StoredPlanError

    with pytest.raises(StoredPlanError, match=why):
        step_from_dict(stored)


@pytest.mark.parametrize(
    ("sick", "change", "refused"),
    [
        (
            {"a0", "a1", "b0", "b1"},
            {"a": Admission.OUT, "b": Admission.OUT},
            False,
        ),  # nothing serves
        ({"a0", "a1", "b0"}, {"a": Admission.OUT, "b": Admission.OUT}, True),  # b1 serves
        ({"b0", "b1"}, {"b": Admission.OUT}, False),  # b serves nothing: a keeps 2
        ({"a1", "b0", "b1"}, {"a": Admission.DRAINING}, True),  # a0 is the last one serving
    ],
)
def test_a_change_that_takes_nothing_healthy_out_of_service_passes(
    sick: set[str], change: dict[str, Admission], refused: bool
) -> None:
    t = topo()
    assert (admit_refusal(t, view(t, sick=sick), change) is not None) is refused


def test_a_first_deploy_takes_everything_out_deploys_each_then_puts_each_live() -> None:
    t = topo(approval="manual")
    steps = make_plan(t, "1.0", view(t, sick={"a0", "a1", "b0", "b1"}), first=True)
    assert admits(steps) == [
        {"a": Admission.OUT, "b": Admission.OUT},
        {"a": Admission.LIVE},
        {"b": Admission.LIVE},
    ]
    ids = [s.id for s in steps]
    assert ids.index("approve-b") < ids.index("live-a")  # every cluster checked before any live
    assert [s.promote for s in steps if isinstance(s, Admit)] == [None, "a", "b"]


def test_a_first_deploy_is_refused_where_the_site_serves_already() -> None:
    t = topo()
    with pytest.raises(PlanRefused, match=r"serves already \(b0 healthy .*without --first"):
        make_plan(t, "1.0", view(t, sick={"a0", "a1", "b1"}), first=True)
