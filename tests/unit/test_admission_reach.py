"""The one admission encoding (model.REACH) and what the drivers derive from it."""

from __future__ import annotations

import pytest

from changeover.balancers.apache import manager_form
from changeover.balancers.process import ordered_changes
from changeover.model import REACH, Admission, Reach, admission_reaching

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


@pytest.mark.parametrize(
    ("admission", "new", "sticky", "width"),
    [(LIVE, True, True, 2), (DRAINING, False, True, 1), (OUT, False, False, 0)],
)
def test_each_admission_has_one_reach_and_back(
    admission: Admission, new: bool, sticky: bool, width: int
) -> None:
    assert REACH[admission] == Reach(new=new, sticky=sticky)
    assert REACH[admission].width == width
    assert admission_reaching(new=new, sticky=sticky) is admission


def test_new_sessions_without_their_sticky_requests_are_no_admission() -> None:
    assert admission_reaching(new=True, sticky=False) is None


def test_changes_go_widest_first_in_the_given_order_within_one_admission() -> None:
    current = {"a1": LIVE, "a2": LIVE, "b1": OUT, "b2": DRAINING, "c1": LIVE}
    target = {"a1": OUT, "a2": DRAINING, "b1": LIVE, "b2": LIVE, "c1": LIVE}
    assert ordered_changes(current, target) == [
        ("b1", LIVE),
        ("b2", LIVE),
        ("a2", DRAINING),
        ("a1", OUT),
    ]


# docs/drivers.md, the Apache table: the balancer-manager POST per admission.
@pytest.mark.parametrize(
    ("admission", "form"),
    [
        (LIVE, {"w_status_N": "0", "w_status_D": "0", "w_status_S": "0"}),
        (DRAINING, {"w_status_N": "1", "w_status_D": "0", "w_status_S": "0"}),
        (OUT, {"w_status_N": "0", "w_status_D": "1"}),
    ],
)
def test_apache_manager_form_is_the_documented_one(
    admission: Admission, form: dict[str, str]
) -> None:
    assert manager_form(admission) == form
