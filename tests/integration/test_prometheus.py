"""The Metrics port on a real Prometheus (prometheus.py): instant vectors and
scalars read as Samples; a bad query, a range vector, a server that is not
there are each a MetricsError with one line, never an exception of another kind."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from changeover.config import Analysis
from changeover.model import Sample
from changeover.ports import MetricsError
from changeover.prometheus import PrometheusMetrics
from tests.helpers import free_port
from tests.prometheus import running_prometheus

pytestmark = pytest.mark.real

QUERIES = [{"name": "q", "query": "vector(1)", "succeed_if": "<", "threshold": 1}]


def metrics(url: str) -> PrometheusMetrics:
    return PrometheusMetrics(Analysis.model_validate({"prometheus": url, "queries": QUERIES}))


async def test_answers_and_refusals_of_a_real_prometheus(tmp_path: Path) -> None:
    async with running_prometheus(tmp_path / "prometheus", []) as server:
        source = metrics(server.url)
        try:
            labelled = 'label_replace(vector(0.25), "member", "a1", "", "")'
            assert await source.query(labelled) == [Sample({"member": "a1"}, 0.25)]
            assert await source.query("scalar(vector(2))") == [Sample({}, 2.0)]
            assert await source.query('up{job="nothing-scrapes-this"}') == []
            (nan,) = await source.query("vector(0) / vector(0)")
            assert math.isnan(nan.value)
            for bad, said in (
                ("sum(", "Prometheus answered bad_data"),
                ("vector(1)[1m:]", "gives a matrix, expected an instant vector or a scalar"),
            ):
                with pytest.raises(MetricsError) as caught:
                    await source.query(bad)
                assert said in str(caught.value) and "\n" not in str(caught.value)
        finally:
            await source.close()


async def test_a_server_that_is_not_there_is_a_metrics_error() -> None:
    source = metrics(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(MetricsError) as caught:
            await source.query("vector(1)")
        assert "cannot query http://127.0.0.1:" in str(caught.value)
    finally:
        await source.close()
