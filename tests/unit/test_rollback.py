"""Which rollback is possible: an instant flip only while the kept cluster is there."""

from __future__ import annotations

from changeover import journal as J
from changeover.model import Admission
from changeover.plan import make_plan
from changeover.policy import kept_clusters
from tests.unit.test_plan import topo, view


def done_release(strategy: str, plan: list[dict[str, object]], finished: float) -> J.ReleaseRow:
    return J.ReleaseRow(
        id=1, site="s", version="2", previous_version="1", strategy=strategy, kind="release",
        state=J.DONE, plan=plan, started=finished - 60, finished=finished, user="u", host="h",
        error=None, request=None,
    )  # fmt: skip


def test_kept_cluster_allows_an_instant_flip_within_the_window() -> None:
    t = topo(strategy="bluegreen", keep_previous="10m")
    plan = [s.to_dict() for s in make_plan(t, "2", view(t))]
    last = done_release("bluegreen", plan, finished=1000.0)
    now_pool = view(t, {"a": Admission.LIVE, "b": Admission.DRAINING})
    assert kept_clusters(t, last, now_pool, now=1000.0 + 599) == ("a", ["b"])
    assert kept_clusters(t, last, now_pool, now=1000.0 + 601) is None  # window over
    gone = view(t, {"a": Admission.LIVE, "b": Admission.OUT})
    assert kept_clusters(t, last, gone, now=1001.0) is None  # b was taken out since


def test_rolling_release_never_flips_back() -> None:
    t = topo()
    plan = [s.to_dict() for s in make_plan(t, "2", view(t))]
    last = done_release("rolling-clusters", plan, finished=1000.0)
    assert kept_clusters(t, last, view(t), now=1001.0) is None
