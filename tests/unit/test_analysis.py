"""[policy.analysis]: its config errors, the pure decisions on each measurement
(policy.py), the Prometheus answer read (prometheus.samples), and `check`'s
refusal of max_error_ratio where a driver counts no 5xx."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from changeover.balancers.base import fills_of
from changeover.balancers.factory import COUNTS, make_balancer
from changeover.cli import app
from changeover.config import AnalysisQuery, ConfigError, Topology, parse
from changeover.model import Sample
from changeover.policy import (
    Measured,
    QueryWatch,
    analysis_read,
    analysis_start,
    analysis_summary,
    error_ratio_refusal,
    measure,
    promql,
)
from changeover.ports import MetricsError
from changeover.prometheus import samples

QUERY = {
    "name": "error-ratio",
    "query": 'sum(rate(x_5xx{cluster="{{cluster}}"}[30s]))'
    ' / sum(rate(x{server=~"{{members}}"}[30s]))',
    "succeed_if": "<",
    "threshold": 0.05,
}


def site(policy: dict[str, Any] | None = None, **balancer: Any) -> dict[str, Any]:
    return {
        "clusters": [
            {
                "name": "a",
                "members": [
                    {"name": "a.1", "host": "127.0.0.1", "port": 9001},
                    {"name": "a2", "host": "127.0.0.1", "port": 9002},
                ],
            },
            {"name": "b", "members": [{"name": "b1", "host": "127.0.0.1", "port": 9011}]},
        ],
        "balancer": {"admin_token": "t", **balancer},
        "policy": policy or {},
    }


def analysed(**query: Any) -> dict[str, Any]:
    return {
        "bake": "30s",
        "auto_rollback": True,
        "analysis": {"prometheus": "http://127.0.0.1:9090/", "queries": [QUERY | query]},
    }


def topo(policy: dict[str, Any] | None = None, **balancer: Any) -> Topology:
    return parse(site(policy, **balancer), "site.toml")


def query(**changes: Any) -> AnalysisQuery:
    return AnalysisQuery.model_validate(QUERY | changes)


# --- the config ----------------------------------------------------------------------


def test_analysis_reads_with_argo_like_defaults() -> None:
    analysis = topo(analysed()).policy.analysis
    assert analysis is not None
    assert analysis.prometheus == "http://127.0.0.1:9090"  # the trailing slash dropped
    (q,) = analysis.queries
    assert (q.interval, q.initial_delay, q.failure_limit, q.error_limit) == (5.0, 0.0, 0, 4)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (analysed() | {"bake": 0}, "site.toml: policy.analysis: is judged during the bake"),
        (
            analysed(query='up{job="{{job}}"}'),
            "site.toml: policy.analysis.queries[0].query: unknown placeholder {{job}}",
        ),
        (analysed(query="  "), "policy.analysis.queries[0].query: expected a PromQL query"),
        (analysed(succeed_if="=>"), "policy.analysis.queries[0].succeed_if: Input should be"),
        (analysed(threshold=math.inf), "queries[0].threshold: expected a finite number"),
        (analysed(interval="0s"), "policy.analysis.queries[0].interval: "),
        (analysed(failure_limit=-1), "policy.analysis.queries[0].failure_limit: "),
        (
            analysed(initial_delay="30s"),
            "policy.analysis.queries[0].initial_delay: 30s is not shorter than policy.bake",
        ),
        (analysed(nme="x"), "policy.analysis.queries[0].nme: is not a known key"),
        (
            analysed() | {"analysis": {"prometheus": "localhost:9090", "queries": [QUERY]}},
            "policy.analysis.prometheus: expected an http:// or https:// URL",
        ),
        (
            analysed() | {"analysis": {"prometheus": "http://p", "queries": [QUERY, QUERY]}},
            "policy.analysis.queries[1].name: 'error-ratio' names two queries",
        ),
        (
            analysed() | {"analysis": {"prometheus": "http://p", "queries": []}},
            "policy.analysis.queries: List should have at least 1 item",
        ),
    ],
)
def test_analysis_config_errors_name_the_file_and_key(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        topo(policy)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --- the decisions ---------------------------------------------------------------------


def test_placeholders_are_the_promoted_cluster_and_its_members_as_a_regex() -> None:
    cluster = topo(analysed()).cluster("a")
    assert promql(query(), cluster) == (
        'sum(rate(x_5xx{cluster="a"}[30s])) / sum(rate(x{server=~"a\\\\.1|a2"}[30s]))'
    )
    assert promql(query(query="up{c='{{ cluster }}'}"), cluster) == "up{c='a'}"


def s(value: float, **labels: str) -> Sample:
    return Sample(labels, value)


@pytest.mark.parametrize(
    ("op", "threshold", "result", "outcome", "detail"),
    [
        ("<", 0.05, [s(0.01)], Measured.PASSED, "0.01 < 0.05"),
        ("<", 0.05, [s(0.05)], Measured.FAILED, "0.05, expected < 0.05"),
        ("<=", 0.05, [s(0.05)], Measured.PASSED, "0.05 <= 0.05"),
        (">", 0.99, [s(1.0), s(0.5, member="a2")], Measured.FAILED, '{member="a2"} 0.5'),
        (">=", 1, [s(1.0)], Measured.PASSED, "1 >= 1"),
        ("==", 0, [s(0.0), s(0.0)], Measured.PASSED, "0, 0 == 0"),
        ("!=", 0, [s(0.0, job="lb")], Measured.FAILED, '{job="lb"} 0, expected != 0'),
        ("<", 1, [], Measured.NO_VALUE, "no series in the answer"),
        ("<", 1, [s(math.nan)], Measured.NO_VALUE, "no value (NaN)"),
        ("<", 1, "cannot query http://p: refused", Measured.NO_VALUE, "query failed: cannot"),
        ("<", 1, [s(math.inf)], Measured.FAILED, "inf, expected < 1"),
    ],
)
def test_one_measurement(
    op: str, threshold: float, result: list[Sample] | str, outcome: Measured, detail: str
) -> None:
    got, text = measure(query(succeed_if=op, threshold=threshold), result)
    assert got is outcome
    assert detail in text


def test_every_failing_series_is_named_up_to_three() -> None:
    result = [s(float(i), member=f"a{i}") for i in range(1, 6)]
    _, text = measure(query(succeed_if="<", threshold=1), result)
    assert text == '{member="a1"} 1, {member="a2"} 2, {member="a3"} 3 (+2 more), expected < 1'


def test_failure_limit_failed_measurements_are_tolerated_then_the_bake_fails() -> None:
    q = query(failure_limit=1, interval=2)
    watch = analysis_start([q], now=10.0)[q.name]
    assert watch == QueryWatch(due=10.0)
    watch, problem = analysis_read(q, watch, [s(0.5)], 10.0)
    assert problem is None and (watch.failed, watch.due) == (1, 12.0)
    watch, problem = analysis_read(q, watch, [s(0.0)], 12.0)  # a pass does not forgive
    assert problem is None and watch.failed == 1
    watch, problem = analysis_read(q, watch, [s(0.5)], 14.0)
    assert problem == (
        "analysis error-ratio: 0.5, expected < 0.05 (2 failed measurement(s), failure_limit 1)"
    )


def test_measurements_without_a_value_fail_past_error_limit_in_a_row() -> None:
    q = query(error_limit=1)
    watch = analysis_start([q], now=0.0)[q.name]
    watch, problem = analysis_read(q, watch, [], 0.0)
    assert problem is None and watch.no_value_in_a_row == 1
    watch, problem = analysis_read(q, watch, [s(0.0)], 5.0)  # a value resets the run
    assert problem is None and watch.no_value_in_a_row == 0
    watch, problem = analysis_read(q, watch, "unreachable", 10.0)
    assert problem is None
    watch, problem = analysis_read(q, watch, [s(math.nan)], 15.0)
    assert problem is not None and "2 measurement(s) in a row without a value" in problem
    assert "error_limit 1" in problem and "NaN" in problem
    assert watch.failed == 0  # no value is not a failed value


def test_initial_delay_and_summary() -> None:
    q = query(initial_delay=3)
    watches = analysis_start([q], now=100.0)
    assert watches[q.name].due == 103.0
    watches[q.name], _ = analysis_read(q, watches[q.name], [s(0.01)], 103.0)
    assert analysis_summary([q], watches) == (
        "analysis error-ratio: 1 measurement(s), 0 failed, last 0.01 < 0.05"
    )


# --- the answer Prometheus gives ----------------------------------------------------------


def test_samples_of_a_vector_and_a_scalar() -> None:
    vector = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"member": "a1"}, "value": [1.5, "0.25"]},
                {"metric": {}, "value": [1.5, "NaN"]},
            ],
        },
    }
    first, second = samples(vector)
    assert first == Sample({"member": "a1"}, 0.25)
    assert second.labels == {} and math.isnan(second.value)
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1.5, "+Inf"]}}
    assert samples(scalar) == [Sample({}, math.inf)]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"},
            "Prometheus answered bad_data: parse error at char 3",
        ),
        (
            {"status": "success", "data": {"resultType": "matrix", "result": []}},
            "gives a matrix, expected an instant vector or a scalar",
        ),
        ({"status": "success", "data": {"resultType": "vector"}}, "unexpected answer"),
        ({"status": "success", "data": None}, "unexpected answer"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_answers_that_are_no_measurement(document: Any, message: str) -> None:
    with pytest.raises(MetricsError) as caught:
        samples(document)
    assert message in str(caught.value)


# --- check: max_error_ratio where the driver counts no 5xx -----------------------------------


@pytest.mark.parametrize("driver", sorted(COUNTS))
def test_counts_table_is_what_each_built_driver_fills(driver: str, tmp_path: Path) -> None:
    data = site(driver=driver)
    if driver != "builtin":
        data["balancer"]["instances"] = [{"name": "lb1", "config_path": str(tmp_path / "x.cfg")}]
    built = make_balancer(parse(data, tmp_path / "site.toml"))
    assert fills_of(built) == COUNTS[driver]


@pytest.mark.parametrize(
    ("driver", "refused"),
    [("builtin", False), ("haproxy", False), ("apache", True), ("nginx", True)],
)
def test_max_error_ratio_is_refused_only_where_the_driver_counts_no_5xx(
    driver: str, refused: bool
) -> None:
    set_ratio = {"bake": 30, "max_error_ratio": 0.02}
    refusal = error_ratio_refusal(topo(set_ratio, driver=driver), COUNTS[driver])
    if not refused:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.startswith(f"policy.max_error_ratio: the {driver} driver counts no 5xx")
    assert "[policy.analysis]" in refusal
    # Not refused when left at its default, or when an analysis measures errors instead.
    assert error_ratio_refusal(topo({"bake": 30}, driver=driver), COUNTS[driver]) is None
    with_analysis = topo(analysed() | {"max_error_ratio": 0.02}, driver=driver)
    assert error_ratio_refusal(with_analysis, COUNTS[driver]) is None


@pytest.mark.parametrize("driver", ["apache", "nginx"])
def test_check_exits_2_naming_the_file_and_key(driver: str, tmp_path: Path) -> None:
    config = tmp_path / "changeover.toml"
    lines = [
        "[[clusters]]", 'name = "a"', 'members = [{ name = "a1", host = "::1", port = 9001 }]',
        "[[clusters]]", 'name = "b"', 'members = [{ name = "b1", host = "::1", port = 9002 }]',
        "[balancer]", f'driver = "{driver}"',
        "[policy]", "bake = 30", "max_error_ratio = 0.02",
    ]  # fmt: skip
    config.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["check", "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert f"{config}: policy.max_error_ratio: the {driver} driver counts no 5xx" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output
    with config.open("a") as more:
        more.write(
            '[policy.analysis]\nprometheus = "http://127.0.0.1:9090"\n'
            "[[policy.analysis.queries]]\n"
            'name = "errors"\nquery = "sum(rate(x[1m]))"\nsucceed_if = "<"\nthreshold = 1\n'
        )
    result = CliRunner().invoke(app, ["check", "-c", str(config)])
    assert result.exit_code == 0, result.output


def test_the_documented_example_reads() -> None:
    """docs/configuration.md's [policy.analysis] example, as a site would write it."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    section = text.split("### [policy.analysis]", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(example)
    policy = topo(data["policy"]).policy
    assert policy.analysis is not None and policy.bake == 120
    (q,) = policy.analysis.queries
    assert (q.name, q.succeed_if, q.threshold, q.interval, q.failure_limit) == (
        "error-ratio", "<", 0.01, 10.0, 1,
    )  # fmt: skip
    assert promql(q, topo(data["policy"]).cluster("b")).count('cluster="b"') == 2
