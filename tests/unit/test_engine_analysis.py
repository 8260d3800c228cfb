"""The bake's [policy.analysis] in the engine, on the in-memory fakes: a query
that fails flips back as the 5xx rule does; one that passes is in the bake's
detail; a source that cannot answer fails past error_limit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from changeover import journal as J
from changeover.engine import Engine
from changeover.model import Admission, Sample
from changeover.ports import MetricsError
from tests.unit.engine_fakes import Site

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


class FakeMetrics:
    """Answers every query with the error ratio of the world now: `bad` while
    cluster a runs 2.0 in the live pool; raises when `down`."""

    def __init__(self, site: Site, bad: float) -> None:
        self.site = site
        self.bad = bad
        self.down = False
        self.asked: list[tuple[float, str]] = []

    async def query(self, promql: str) -> list[Sample]:
        self.asked.append((self.site.clock.now, promql))
        if self.down:
            raise MetricsError("cannot query http://prometheus: refused")
        a_live = self.site.balancer.admissions["a1"] is LIVE
        on_new = self.site.fleet.version["a1"] == "2.0"
        return [Sample({"cluster": "a"}, self.bad if a_live and on_new else 0.0)]

    async def close(self) -> None:
        return None


def analysed(**query: Any) -> dict[str, Any]:
    q = {
        "name": "errors",
        "query": 'ratio{cluster="{{cluster}}"}',
        "succeed_if": "<",
        "threshold": 0.05,
        "interval": 2,
    }
    return {
        "bake": 20,
        "auto_rollback": True,
        "max_error_ratio": 1.0,  # the balancer's own rule never fires: the analysis does
        "analysis": {"prometheus": "http://prometheus:9090", "queries": [q | query]},
    }


async def run(site: Site, metrics: FakeMetrics) -> str:
    engine = Engine(site.topo, dataclasses.replace(site.ports(), metrics=metrics), poll=0.05)
    return await engine.run(await engine.begin("2.0"))


def bake_detail(site: Site) -> str | None:
    row = site.journal.newest("t")
    assert row is not None
    return next(s.detail for s in site.journal.steps(row.id) if s.step_id == "bake-a")


async def test_a_failing_query_flips_back_after_failure_limit(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy=analysed(failure_limit=1))
    metrics = FakeMetrics(site, bad=0.3)
    assert await run(site, metrics) == J.ROLLED_BACK
    assert site.balancer.cluster_changes()[-1] == {"b": LIVE, "a": OUT}
    row = site.journal.newest("t")
    assert row is not None and row.error is not None
    assert row.error.startswith(
        'analysis errors: {cluster="a"} 0.3, expected < 0.05 (2 failed measurement(s), '
        "failure_limit 1); flipped back: b live on the previous release, a out"
    )
    # Measured every interval from the bake's start, the promoted cluster filled in.
    times = [t for t, _ in metrics.asked]
    assert len(times) == 2 and times[1] - times[0] >= 2
    assert {q for _, q in metrics.asked} == {'ratio{cluster="a"}'}


async def test_a_passing_analysis_is_in_the_bake_detail(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy=analysed(initial_delay=5))
    metrics = FakeMetrics(site, bad=0.01)
    assert await run(site, metrics) == J.DONE
    detail = bake_detail(site)
    assert detail is not None and "analysis errors: " in detail and ", 0 failed" in detail
    assert len(metrics.asked) >= 7  # every 2 s of the 20 s bake after the 5 s delay


async def test_a_source_that_cannot_answer_fails_past_error_limit(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy=analysed(error_limit=2))
    metrics = FakeMetrics(site, bad=0.0)
    metrics.down = True
    assert await run(site, metrics) == J.ROLLED_BACK
    row = site.journal.newest("t")
    assert row is not None and row.error is not None
    assert "analysis errors: 3 measurement(s) in a row without a value (error_limit 2)" in (
        row.error
    )
    assert "refused" in row.error
