"""Topology validation: every bad file gets one clear error naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from changeover.cli import app
from changeover.config import ConfigError, load, parse, parse_duration
from changeover.starter import STARTER


def two_clusters(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "clusters": [
            {"name": "a", "members": [{"name": "a1", "port": 9001}, {"name": "a2", "port": 9002}]},
            {"name": "b", "members": [{"name": "b1", "port": 9011}]},
        ]
    }
    data.update(extra)
    return data


PER = {"tls_load": "handshake"}  # nginx loads its certificates at every handshake


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, "site.toml")
    return str(info.value)


def test_valid_topology_has_defaults() -> None:
    topo = parse(two_clusters(), "site.toml")
    assert topo.cluster_order() == ["a", "b"]
    assert topo.balancer.driver == "builtin"
    assert topo.cluster("a").members[0].route_id == "a1"


def test_session_idle_defaults_and_reads_its_earlier_name() -> None:
    policy = parse(two_clusters(), "site.toml").policy
    assert (policy.session_idle, policy.drain_timeout) == (30.0, 300.0)
    assert parse(two_clusters(policy={"drain_idle": "4s"}), "site.toml").policy.session_idle == 4
    assert "policy.session_idle" in error_of(two_clusters(policy={"session_idle": 0}))


def test_fewer_than_two_clusters_is_refused() -> None:
    data = two_clusters()
    data["clusters"] = data["clusters"][:1]
    assert "site.toml: clusters: expected at least two clusters" in error_of(data)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["clusters"][1]["members"].append({"name": "a1", "port": 9099}),
         "member name 'a1' appears in clusters 'a' and 'b'"),
        (lambda d: d["clusters"][1]["members"].append({"name": "x", "port": 9001}),
         "member address 127.0.0.1:9001 appears in clusters 'a' and 'b'"),
        (lambda d: d["clusters"][1]["members"].append({"name": "x", "port": 9050, "route": "a2"}),
         "route 'a2' appears in clusters 'a' and 'b'"),
        (lambda d: d["clusters"][0]["members"].append({"name": "a3", "port": 9002}),
         "appears twice in cluster 'a'"),
    ],
)  # fmt: skip
def test_clusters_must_be_completely_separate(mutate: Any, needle: str) -> None:
    data = two_clusters()
    mutate(data)
    message = error_of(data)
    assert needle in message
    assert message.startswith("site.toml:")


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        (two_clusters(policy={"drain_timeout": "soon"}), "policy.drain_timeout", "duration"),
        (two_clusters(policy={"approval": "maybe"}), "policy.approval", "'auto' or 'manual'"),
        (two_clusters(balancer={"driver": "f5"}), "balancer.driver", "'builtin'"),
        (two_clusters(balancer={"listen": "nowhere"}), "balancer.listen", "HOST:PORT"),
        (two_clusters(executor={"parallel": -1}), "executor.parallel", "greater than or equal"),
        (two_clusters(balancer={"tls_cert": "c.pem"}), "balancer", "tls_cert and tls_key"),
        (
            two_clusters(balancer={"driver": "haproxy", "tls_cert": "c", "tls_key": "k"} | PER),
            "balancer.tls_load",
            '"handshake" is for the nginx driver, not haproxy',
        ),
        (
            two_clusters(balancer={"driver": "nginx"} | PER),
            "balancer.tls_load",
            "needs TLS on the listeners",
        ),
        (two_clusters(balancer={"tls_load": "later"}), "balancer.tls_load", "'handshake'"),
        (two_clusters(typo={"x": 1}), "typo", "not a known key"),
        (two_clusters(policy={"order": ["a"]}), "(top level)", "policy.order must list every"),
    ],
)
def test_errors_name_key_and_expectation(data: dict[str, Any], key: str, expected: str) -> None:
    message = error_of(data)
    assert f"site.toml: {key}" in message
    assert expected in message


def test_member_port_error_names_nested_key() -> None:
    data = two_clusters()
    data["clusters"][0]["members"][1]["port"] = 70000
    assert "site.toml: clusters[0].members[1].port" in error_of(data)


def test_load_reports_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nname = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30.0), ("30s", 30.0), ("10m", 600.0), ("250ms", 0.25), ("1h", 3600.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "-1", True, "5 weeks"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_starter_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "changeover.toml"
    path.write_text(STARTER)
    topo = load(path)
    assert [c.name for c in topo.clusters] == ["a", "b"]
    assert topo.cluster("a").qa_host == "prod-a.example.com"


def test_cli_check_prints_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    path = tmp_path / "changeover.toml"
    path.write_text('[[clusters]]\nname = "a"\nmembers = [{name = "a1", port = "http"}]\n')
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert "clusters[0].members[0].port" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("0.0.0.0:80", "http://127.0.0.1:80"),
        ("[::]:8090", "http://127.0.0.1:8090"),  # not on admin_listen's port 8089
        ("10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("[::1]:8443", "http://[::1]:8443"),
    ],
)
def test_listen_url_reaches_a_wildcard_listener_on_loopback(listen: str, url: str) -> None:
    data = two_clusters(balancer={"listen": listen})
    assert parse(data, "t.toml").balancer.listen.url() == url
