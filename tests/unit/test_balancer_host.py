"""Where a balancer instance runs: the host a driver is given, from the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from changeover.balancers.host import LocalHost, host_for
from changeover.balancers.nginx import NginxBalancer
from changeover.balancers.render import RenderOptions, render
from changeover.balancers.sshhost import SshHost
from changeover.config import ConfigError, parse


def site(**instance: Any) -> dict[str, Any]:
    return {
        "site": {"name": "s"},
        "clusters": [
            {"name": c, "members": [{"name": f"{c}1", "host": "127.0.0.1", "port": port}]}
            for c, port in (("a", 9001), ("b", 9002))
        ],
        "balancer": {"driver": "haproxy", "instances": [{"name": "lb1", **instance}]},
        "executor": {"ssh": {"user": "ops", "known_hosts": "kh", "key_file": "key"}},
    }


def test_ssh_host_is_built_from_the_executor_settings(tmp_path: Path) -> None:
    """A remote instance's host: its ssh_host and ssh_port, [executor.ssh]'s user,
    known_hosts and key, relative paths taken from the config file's folder."""
    topology = parse(site(ssh_host="10.0.0.7", ssh_port=2222), tmp_path / "changeover.toml")
    host = SshHost.for_instance(topology, topology.balancer.instances[0])
    assert host.label == "ops@10.0.0.7:2222"
    assert host._executor.known_hosts_path == tmp_path / "kh"
    assert host._executor.key_path == tmp_path / "key"


def test_an_instance_without_ssh_host_runs_here(tmp_path: Path) -> None:
    topology = parse(site(), tmp_path / "changeover.toml")
    assert isinstance(host_for(topology, topology.balancer.instances[0]), LocalHost)


@pytest.mark.parametrize(
    ("instance", "driver", "message"),
    [
        (
            {"ssh_host": "10.0.0.7", "config_path": "haproxy.cfg"},
            "haproxy",
            "site.toml: balancer.instances[0].config_path: must be an absolute path on 10.0.0.7",
        ),
        (
            {"ssh_host": "10.0.0.7", "run_dir": "lb1"},
            "nginx",
            "site.toml: balancer.instances[0].run_dir: must be an absolute path",
        ),
        (
            {"ssh_port": 2222},
            "haproxy",
            "site.toml: balancer.instances[0].ssh_port: needs ssh_host",
        ),
        (
            {"ssh_host": "10.0.0.7"},
            "builtin",
            "site.toml: balancer.instances[0].ssh_host: is for the haproxy, apache and nginx",
        ),
        (
            {"ssh_host": "bad..host"},
            "haproxy",
            "site.toml: balancer.instances[0].ssh_host: expected a host name or an IP address",
        ),
    ],
)
def test_remote_instance_keys_are_checked_naming_file_and_key(
    instance: dict[str, Any], driver: str, message: str
) -> None:
    data = site(**instance)
    data["balancer"]["driver"] = driver
    with pytest.raises(ConfigError) as info:
        parse(data, "site.toml")
    assert str(info.value).startswith(message), str(info.value)


def test_bind_host_puts_the_instances_listeners_on_its_own_address(tmp_path: Path) -> None:
    data = site(bind_host="10.0.0.8")
    data["balancer"] |= {"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:8089"}
    data["clusters"][0]["qa_port"] = 8081
    topology = parse(data, tmp_path / "changeover.toml")
    instance = topology.balancer.instances[0]
    text = render(topology, "nginx", options=RenderOptions(instance=instance, run_dir=tmp_path))
    assert "listen 10.0.0.8:8080" in text
    assert "listen 10.0.0.8:8081" in text
    assert "listen 10.0.0.8:8089" in text
    assert "127.0.0.1:80" not in text
    driver = NginxBalancer(topology, instance, run_dir=tmp_path)
    assert driver.control_url == "http://10.0.0.8:8089"
