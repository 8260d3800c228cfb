"""nginx's reload sequence as data: from what nginx serves now (rendered
admissions, cluster flags) and the target, the renderings and flag changes in
order. Each case is inputs and the expected steps; every case also checks that
after each step nginx serves exactly the old admissions or exactly the new ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from changeover.balancers.nginx import NginxState, Render, SetFlags, Step, steps
from changeover.model import Admission

L, D, X = Admission.LIVE, Admission.DRAINING, Admission.OUT  # X: out
CLUSTER_OF = {"a1": "a", "a2": "a", "b1": "b"}


def members(a1: Admission, a2: Admission, b1: Admission) -> dict[str, Admission]:
    return {"a1": a1, "a2": a2, "b1": b1}


def flags(a: Admission, b: Admission) -> dict[str, Admission]:
    return {"a": a, "b": b}


@dataclass(frozen=True)
class Case:
    name: str
    rendered: dict[str, Admission]
    flags: dict[str, Admission]
    target: dict[str, Admission]
    expected: list[Step]


CASES = [
    Case("nothing to do", members(L, L, L), flags(L, L), members(L, L, L), []),
    Case(
        "a whole cluster out: one flag change",
        members(L, L, L),
        flags(L, L),
        members(X, X, L),
        [SetFlags(flags(L, L), flags(X, L))],
    ),
    Case(
        "a whole cluster back: one flag change",
        members(L, L, L),
        flags(D, L),
        members(L, L, L),
        [SetFlags(flags(D, L), flags(L, L))],
    ),
    Case(
        "flags narrow a rendered exception further",
        members(D, L, L),
        flags(L, L),
        members(X, X, X),
        [SetFlags(flags(L, L), flags(X, X))],
    ),
    Case(
        "one member drained alone: one rendering",
        members(L, L, L),
        flags(L, L),
        members(D, L, L),
        [Render(members(D, L, L))],
    ),
    Case(
        "a rendered exception lifted: one rendering",
        members(D, L, L),
        flags(L, L),
        members(L, L, L),
        [Render(members(L, L, L))],
    ),
    Case(
        "a flagged cluster split: the flags rendered first, then lifted",
        members(L, L, L),
        flags(X, L),
        members(L, D, L),
        [
            Render(members(X, X, L)),
            SetFlags(flags(X, L), flags(L, L)),
            Render(members(L, D, L)),
        ],
    ),
    Case(
        "every step: the whole-cluster part moved back into the flags at the end",
        members(L, L, L),
        flags(L, D),
        members(D, L, D),
        [
            Render(members(L, L, D)),
            SetFlags(flags(L, D), flags(L, L)),
            Render(members(D, L, D)),
            SetFlags(flags(L, L), flags(L, D)),
            Render(members(D, L, L)),
        ],
    ),
]


def served(
    rendered: Mapping[str, Admission], cluster_flags: Mapping[str, Admission]
) -> dict[str, Admission]:
    return NginxState(dict(rendered), dict(cluster_flags)).admissions(CLUSTER_OF)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_steps(case: Case) -> None:
    plan = steps(NginxState(case.rendered, case.flags), case.target, CLUSTER_OF)
    assert plan == case.expected
    old = served(case.rendered, case.flags)
    rendered, now = case.rendered, case.flags
    for step in plan:
        if isinstance(step, Render):
            rendered = dict(step.admissions)
        else:
            assert step.before == now  # each flag change starts from what is there
            now = dict(step.after)
        assert served(rendered, now) in (old, case.target), step
    assert served(rendered, now) == case.target
