"""The one driver table: every driver a config may name, the embedded balancer's
included, is built by `make_balancer` the same way."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from changeover.balancers.base import BalancerError
from changeover.balancers.builtin import BuiltinBalancer
from changeover.balancers.factory import DRIVERS, make_balancer
from changeover.balancers.group import BalancerGroup
from changeover.balancers.haproxy import HAProxyBalancer
from changeover.config import Balancer as BalancerSettings
from changeover.config import Topology, parse


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
    with pytest.raises(BalancerError, match="needs a token"):
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
