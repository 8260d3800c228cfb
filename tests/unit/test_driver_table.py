"""The one driver table: every driver a config may name, the embedded balancer's
included, is built by `make_balancer` the same way."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from changeover.balancers.apache import ApacheBalancer
from changeover.balancers.base import COUNTERS, BalancerError, fills_of
from changeover.balancers.builtin import BuiltinBalancer
from changeover.balancers.factory import DRIVERS, make_balancer
from changeover.balancers.group import BalancerGroup
from changeover.balancers.haproxy import HAProxyBalancer
from changeover.balancers.nginx import NginxBalancer
from changeover.balancers.process import ConfiguredBalancer
from changeover.config import Balancer as BalancerSettings
from changeover.config import ConfigError, Topology, parse
from changeover.model import MemberState


def topology(tmp_path: Path, **balancer: Any) -> Topology:
    data = {
        "site": {"name": "table"},
        "clusters": [
            {"name": "a", "members": [{"name": "a1", "host": "127.0.0.1", "port": 9001}]},
            {"name": "b", "members": [{"name": "b1", "host": "127.0.0.1", "port": 9002}]},
        ],
        "balancer": {"admin_token": "t0ken", **balancer},
    }
    return parse(data, tmp_path / "changeover.toml")


def test_the_table_has_every_driver_a_config_may_name() -> None:
    named = typing.get_args(BalancerSettings.model_fields["driver"].annotation)
    assert sorted(DRIVERS) == sorted(named)


def test_builtin_without_instances_is_the_topologys_admin_listener(tmp_path: Path) -> None:
    driver = make_balancer(topology(tmp_path, admin_listen="127.0.0.1:7001"))
    assert isinstance(driver, BuiltinBalancer)
    assert (driver.name, driver.url) == ("builtin", "http://127.0.0.1:7001")


def test_builtin_instances_are_grouped_by_name(tmp_path: Path) -> None:
    instances = [
        {"name": "lb1", "admin_url": "http://127.0.0.1:7001/"},
        {"name": "lb2", "admin_url": "http://127.0.0.2:7001"},
    ]
    group = make_balancer(topology(tmp_path, instances=instances))
    assert isinstance(group, BalancerGroup)
    assert [(b.name, getattr(b, "url", None)) for b in group.instances] == [
        ("lb1", "http://127.0.0.1:7001"),
        ("lb2", "http://127.0.0.2:7001"),
    ]


def test_builtin_refuses_an_instance_without_admin_url_or_a_missing_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BalancerError, match="'lb2': the builtin driver needs admin_url"):
        make_balancer(
            topology(
                tmp_path, instances=[{"name": "lb1", "admin_url": "http://h:1"}, {"name": "lb2"}]
            )
        )
    monkeypatch.delenv("CHANGEOVER_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs a token"):
        make_balancer(topology(tmp_path, admin_token=None))


def test_config_driven_instances_get_their_own_run_dir(tmp_path: Path) -> None:
    group = make_balancer(
        topology(tmp_path, driver="haproxy", instances=[{"name": "lb1"}, {"name": "lb2"}]),
        run_dir=tmp_path / "run",
    )
    assert isinstance(group, BalancerGroup)
    assert all(isinstance(b, HAProxyBalancer) for b in group.instances)
    assert [b.options.run_dir for b in group.instances if isinstance(b, HAProxyBalancer)] == [
        tmp_path / "run" / "lb1",
        tmp_path / "run" / "lb2",
    ]


CLASSES: dict[str, type[BuiltinBalancer] | type[ConfiguredBalancer]] = {
    "builtin": BuiltinBalancer,
    "haproxy": HAProxyBalancer,
    "apache": ApacheBalancer,
    "nginx": NginxBalancer,
}


def documented_fills() -> dict[str, frozenset[str]]:
    """docs/drivers.md's "What each driver counts" table: driver -> counters marked yes."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "drivers.md").read_text()
    section = text.split("## What each driver counts", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    header, table = rows[0], rows[2:]
    counters = [cell.split("`")[1] for cell in header[1:]]
    marked = {row[0].strip(): zip(counters, row[1:], strict=True) for row in table}
    return {
        name: frozenset(c for c, cell in cells if cell.strip().startswith("yes"))
        for name, cells in marked.items()
    }


def test_every_driver_declares_what_it_fills_as_documented() -> None:
    assert sorted(CLASSES) == sorted(DRIVERS)
    assert set(COUNTERS) <= {f.name for f in dataclasses.fields(MemberState)}
    declared = {name: cls.fills for name, cls in CLASSES.items()}
    assert all(fills <= set(COUNTERS) for fills in declared.values())
    assert documented_fills() == declared


def test_a_group_fills_what_every_instance_fills(tmp_path: Path) -> None:
    group = BalancerGroup([HAProxyBalancer(topology(tmp_path)), NginxBalancer(topology(tmp_path))])
    assert fills_of(group) == frozenset()
    group = BalancerGroup([ApacheBalancer(topology(tmp_path)), HAProxyBalancer(topology(tmp_path))])
    assert fills_of(group) == {"active", "requests"}
