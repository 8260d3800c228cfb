"""The balancer's own endpoints: listen, admin_listen and every qa_port each have
an address of their own, no member sits on one of them, and a member host is a
host name or an IP address. The same endpoint spelled two ways (localhost and
127.0.0.1, or a wildcard that covers every address of the port) is one endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from changeover.cli import app
from changeover.config import ConfigError, check_host, load, parse


def site(
    balancer: dict[str, Any] | None = None,
    qa_ports: tuple[int | None, int | None] = (None, None),
    b1: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "clusters": [
            {"name": "a", "members": [{"name": "a1", "port": 9001}, {"name": "a2", "port": 9002}]},
            {"name": "b", "members": [{"name": "b1", "port": 9011, **(b1 or {})}]},
        ],
        "balancer": {"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:8089"}
        | (balancer or {}),
    }
    for cluster, port in zip(data["clusters"], qa_ports, strict=True):
        if port is not None:
            cluster["qa_port"] = port
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, "site.toml")
    message = str(info.value)
    assert "\n" not in message  # one line, like every other config error
    return message


# --- listeners on one endpoint ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        (site(qa_ports=(8080, None)), "clusters[0].qa_port",
         "port 8080 is taken by balancer.listen (127.0.0.1:8080): expected a port of its own"),
        (site(qa_ports=(9100, 9100)), "clusters[1].qa_port",
         "port 9100 is taken by clusters[0].qa_port (127.0.0.1:9100): expected a port of its own"),
        (site({"admin_listen": "127.0.0.1:8080"}), "balancer.admin_listen",
         "127.0.0.1:8080 is taken by balancer.listen (127.0.0.1:8080): "
         "expected an address of its own"),
        (site({"admin_listen": "127.0.0.1:9101"}, qa_ports=(9100, 9101)), "balancer.admin_listen",
         "127.0.0.1:9101 is taken by clusters[1].qa_port (127.0.0.1:9101)"),
        # the same endpoint spelled two ways
        (site({"admin_listen": "localhost:8080"}), "balancer.admin_listen",
         "taken by balancer.listen (127.0.0.1:8080; localhost and 127.0.0.1 are the same host)"),
        (site({"listen": "0.0.0.0:8080", "admin_listen": "127.0.0.1:8080"}),
         "balancer.admin_listen", "0.0.0.0 listens on every address of the port"),
        (site({"listen": "127.0.0.1:8080", "admin_listen": "0.0.0.0:8080"}),
         "balancer.admin_listen", "0.0.0.0 listens on every address of the port"),
        (site({"listen": "[::]:8080", "admin_listen": "10.0.0.5:8080"}),
         "balancer.admin_listen", ":: listens on every address of the port"),
        (site({"listen": "localhost:8080", "admin_listen": "[::1]:8080"}),
         "balancer.admin_listen", "taken by balancer.listen"),
        (site({"listen": "127.0.0.1:8080", "admin_listen": "[::ffff:127.0.0.1]:8080"}),
         "balancer.admin_listen", "taken by balancer.listen"),
        # a qa_port listens on the public host: a wildcard listen covers admin_listen
        (site({"listen": "0.0.0.0:8080", "admin_listen": "localhost:9100"}, qa_ports=(9100, None)),
         "balancer.admin_listen", "taken by clusters[0].qa_port (0.0.0.0:9100; 0.0.0.0 listens"),
    ],
)  # fmt: skip
def test_listeners_on_one_endpoint_are_refused(
    data: dict[str, Any], key: str, expected: str
) -> None:
    message = error_of(data)
    assert message.startswith(f"site.toml: {key}: "), message
    assert expected in message


@pytest.mark.parametrize(
    ("balancer", "qa_ports"),
    [
        ({"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.2:8080"}, (None, None)),
        ({"listen": "0.0.0.0:8080", "admin_listen": "[::1]:8080"}, (None, None)),  # v4 wildcard
        ({"listen": "0.0.0.0:80", "admin_listen": "127.0.0.1:8089"}, (9100, 9101)),
        ({"listen": "10.0.0.1:8080", "admin_listen": "10.0.0.2:8080"}, (None, None)),
    ],
)
def test_distinct_endpoints_are_accepted(
    balancer: dict[str, Any], qa_ports: tuple[int | None, int | None]
) -> None:
    parse(site(balancer, qa_ports), "site.toml")


def test_haproxy_has_no_listener_on_admin_listen() -> None:
    """HAProxy's control channel is its stats socket: admin_listen is not bound,
    so it may coincide with anything; the public and QA listeners may not."""
    parse(site({"driver": "haproxy", "admin_listen": "127.0.0.1:8080"}), "site.toml")
    parse(site({"driver": "haproxy"}, b1={"port": 8089}), "site.toml")
    assert "clusters[0].qa_port" in error_of(site({"driver": "haproxy"}, qa_ports=(8080, None)))
    for driver in ("builtin", "apache", "nginx"):
        message = error_of(site({"driver": driver, "admin_listen": "127.0.0.1:8080"}))
        assert "site.toml: balancer.admin_listen: " in message


# --- members on the balancer's own endpoints -------------------------------------------


@pytest.mark.parametrize(
    ("balancer", "qa_ports", "b1", "named"),
    [
        ({}, (None, None), {"port": 8080}, "balancer.listen (127.0.0.1:8080)"),
        ({}, (None, None), {"port": 8089}, "balancer.admin_listen (127.0.0.1:8089)"),
        ({}, (None, 9100), {"port": 9100}, "clusters[1].qa_port (127.0.0.1:9100)"),
        ({}, (None, None), {"host": "localhost", "port": 8080},
         "(127.0.0.1:8080; localhost and 127.0.0.1 are the same host)"),
        ({"listen": "0.0.0.0:8080"}, (None, None), {"port": 8080},
         "0.0.0.0 listens on every address of the port"),
        ({"listen": "0.0.0.0:8080"}, (None, None), {"host": "127.0.0.53", "port": 8080},
         "balancer.listen"),
        ({"listen": "0.0.0.0:8080"}, (None, None), {"host": "0.0.0.0", "port": 8080},
         "balancer.listen"),
        ({"listen": "[::]:8080"}, (None, None), {"host": "::1", "port": 8080}, "balancer.listen"),
        ({"listen": "10.0.0.5:8080"}, (None, None), {"host": "10.0.0.5", "port": 8080},
         "balancer.listen"),
        ({"listen": "lb.example.com:8080"}, (None, None),
         {"host": "LB.example.com", "port": 8080}, "balancer.listen"),
    ],
)  # fmt: skip
def test_a_member_on_the_balancers_own_endpoint_is_refused(
    balancer: dict[str, Any],
    qa_ports: tuple[int | None, int | None],
    b1: dict[str, Any],
    named: str,
) -> None:
    message = error_of(site(balancer, qa_ports, b1))
    assert message.startswith("site.toml: clusters[1].members[0]: member 'b1' at "), message
    assert "is the balancer's own" in message and named in message
    assert "expected the address of an application server" in message


@pytest.mark.parametrize("driver", ["haproxy", "apache", "nginx"])
def test_other_drivers_refuse_a_member_on_their_listener(driver: str) -> None:
    message = error_of(site({"driver": driver}, b1={"port": 8080}))
    assert "site.toml: clusters[1].members[0]: " in message and "balancer.listen" in message


@pytest.mark.parametrize(
    ("listen", "b1"),
    [
        ("0.0.0.0:8080", {"host": "10.0.2.11", "port": 8080}),  # another machine, same port
        ("0.0.0.0:8080", {"host": "app.example.com", "port": 8080}),
        ("127.0.0.1:8080", {"host": "127.0.0.2", "port": 8080}),
        ("127.0.0.1:8080", {"host": "::1", "port": 8080}),
    ],
)
def test_members_elsewhere_on_the_same_port_are_accepted(listen: str, b1: dict[str, Any]) -> None:
    parse(site({"listen": listen}, b1=b1), "site.toml")


# --- member hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["a..b", "", " 10.0.0.1", "10.0.0.1:8080", "[::1]", "a b", "-app.example", "x" * 64 + ".io",
     "10.0.1.256", "app_.example.com/", "a.b..", "é" * 70],
)  # fmt: skip
def test_a_member_host_that_is_no_name_or_address_is_refused(host: str) -> None:
    message = error_of(site(b1={"host": host}))
    assert message.startswith("site.toml: clusters[1].members[0].host: "), message
    assert f"expected a host name or an IP address, got {host!r}" in message


@pytest.mark.parametrize(
    "host",
    ["10.0.2.11", "::1", "fe80::1%eth0", "app.example.com", "app.example.com.", "localhost",
     "my_app", "APP-1.Example.COM", "bücher.example"],
)  # fmt: skip
def test_member_hosts_that_resolve_are_accepted(host: str) -> None:
    assert check_host(host) == host
    assert parse(site(b1={"host": host}), "site.toml").cluster("b").members[0].host == host


# --- both entry points load through the same check ----------------------------------


def write(tmp_path: Path) -> Path:
    path = tmp_path / "changeover.toml"
    path.write_text(
        '[balancer]\nlisten = "127.0.0.1:8080"\nadmin_token = "t"\n'
        '[[clusters]]\nname = "a"\nqa_port = 8080\nmembers = [{name = "a1", port = 9001}]\n'
        '[[clusters]]\nname = "b"\nmembers = [{name = "b1", host = "a..b", port = 9011}]\n'
    )
    return path


def test_check_and_serve_refuse_the_file(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(ConfigError, match=r"changeover\.toml: clusters\[1\]\.members\[0\]\.host"):
        load(path)
    for argv in (["check", "-c", str(path)], ["balancer", "serve", "-c", str(path)]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert "clusters[1].members[0].host" in result.output and "'a..b'" in result.output
        assert "Traceback" not in result.output
    path.write_text(path.read_text().replace('"a..b"', '"127.0.0.1"'))
    result = CliRunner().invoke(app, ["balancer", "serve", "-c", str(path)])
    assert result.exit_code == 2
    assert "clusters[0].qa_port: port 8080 is taken by balancer.listen" in result.output


def test_python_m_changeover_proxy_refuses_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from changeover.proxy.__main__ import main

    assert main(["-c", str(write(tmp_path))]) == 2
    assert "clusters[1].members[0].host: expected a host name" in capsys.readouterr().err
