"""Ansible inventories: read as ansible-core reads them, mapped to clusters.

The reference is ansible-core itself (a dev dependency): its InventoryManager
reads the same files and every group's hosts and every host's combined
variables must come out the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover import inventory
from changeover.config import ConfigError, parse

INI = """\
# a host before any section is ungrouped
lonely ansible_host=10.9.9.9

[web_a]
a[01:03].example.com ansible_user=deploy
a-special ansible_host=127.0.1.9 ansible_port=2201 changeover_port=9000 flags="['x', 1]"
c[1:6:2] # a comment

[web_b]
b[a:c]
127.0.2.7:2222 changeover_route=seven

[web_b:vars]
changeover_port=8081
ansible_user='quoted'

[prod:children]
web_a
web_b
canary

[canary]
a01.example.com changeover_port=8181

[prod:vars]
changeover_port=8080
ansible_user=ops
ansible_group_priority=5
answer=42

[all:vars]
ansible_user=root
region=eu
"""

YAML = """\
all:
  vars:
    ansible_user: root
    region: eu
  hosts:
    lonely:
      ansible_host: 10.9.9.9
  children:
    prod:
      vars: {changeover_port: 8080, ansible_user: ops, answer: 42}
      children:
        web_a:
          hosts:
            a[01:03].example.com: {ansible_user: deploy}
            a-special:
              ansible_host: 127.0.1.9
              ansible_port: "2201"
              changeover_port: 9000
        web_b:
          vars: {changeover_port: 8081}
          hosts:
            b[a:c]: {ansible_host: 10.0.2.1}
            127.0.2.7:2222:
            "[::1]:2223":
          children:
            canary:
              hosts:
                ba: {changeover_port: 8181}
    lb:
      hosts:
        lonely:
"""

MAGIC = {"inventory_file", "inventory_dir", "inventory_hostname"}
MAGIC |= {"inventory_hostname_short", "group_names"}


def ansible_view(path: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Each group's hosts and each host's variables, as ansible-core computes them."""
    from ansible.inventory.helpers import get_group_vars
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    manager = InventoryManager(loader=DataLoader(), sources=[str(path)])
    groups = {name: [h.name for h in g.get_hosts()] for name, g in manager.groups.items()}
    variables = {}
    for host in manager.get_hosts():
        combined = {**get_group_vars(host.get_groups()), **host.get_vars()}
        variables[host.name] = {k: v for k, v in combined.items() if k not in MAGIC}
    return groups, variables


def our_view(path: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    inv = inventory.read(path)
    groups = {name: inv.hosts_of(name) for name in inv.groups}
    return groups, {host: inv.variables(host) for host in inv.host_vars}


def same_hosts(view: tuple[dict[str, list[str]], Any]) -> dict[str, list[str]]:
    """The hosts of each group in order; below the first level of children
    Ansible walks sets (an order that changes with the run's string hashing),
    so only their membership is compared."""
    return {name: sorted(hosts) for name, hosts in view[0].items()}


@pytest.mark.parametrize(("name", "text"), [("hosts.ini", INI), ("hosts.yml", YAML)])
def test_reads_like_ansible_core(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    ours, reference = our_view(path), ansible_view(path)
    assert same_hosts(ours) == same_hosts(reference)
    assert ours[0]["web_a"] == reference[0]["web_a"]  # its own hosts and its children's
    assert ours[1] == reference[1]
    assert ours[0]["web_a"][:3] == ["a01.example.com", "a02.example.com", "a03.example.com"]


def test_the_precedence_ansible_uses(tmp_path: Path) -> None:
    path = tmp_path / "hosts"  # no suffix: INI, as Ansible reads it
    path.write_text(INI)
    inv = inventory.read(path)
    assert inv.hosts_of("web_a") == [
        *(f"a0{i}.example.com" for i in (1, 2, 3)), "a-special", "c1", "c3", "c5"
    ]  # fmt: skip
    assert inv.hosts_of("web_b") == ["ba", "bb", "bc", "127.0.2.7"]
    assert inv.hosts_of("ungrouped") == ["lonely"]
    # A deeper group wins over its parent, a host's own variable over every group.
    assert inv.variables("bb")["ansible_user"] == "quoted"
    assert inv.variables("bb")["changeover_port"] == 8081
    assert inv.variables("c1")["ansible_user"] == "ops"
    assert inv.variables("a01.example.com")["ansible_user"] == "deploy"
    assert inv.variables("a01.example.com")["changeover_port"] == 8181
    lonely = {"ansible_host": "10.9.9.9", "ansible_user": "root", "region": "eu"}
    assert inv.variables("lonely") == lonely
    assert inv.variables("127.0.2.7")["ansible_port"] == 2222
    assert inv.variables("a-special")["flags"] == ["x", 1]  # a Python literal on a host line


# --- generated inventories against ansible-core --------------------------------------

_names = st.sampled_from(["g1", "g2", "g3", "g4"])
_hosts = st.sampled_from(["h1", "h2", "h3", "w[1:3]", "x[a:b]:2200", "h9:2201"])
_keys = st.sampled_from(["ansible_user", "ansible_port", "changeover_port", "k"])
_values = st.sampled_from(["1", "u1", "'q'", "[1, 2]", "2200"])


@st.composite
def ini_inventories(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(1, 7))):
        group, kind = draw(_names), draw(st.sampled_from(["", ":vars", ":children"]))
        lines.append(f"[{group}{kind}]")
        for _ in range(draw(st.integers(0, 3))):
            if kind == ":vars":
                lines.append(f"{draw(_keys)}={draw(_values)}")
            elif kind == ":children":
                child = draw(_names)
                if child != group:
                    lines.append(child)
            else:
                pairs = draw(st.lists(st.tuples(_keys, _values), max_size=2))
                lines.append(" ".join([draw(_hosts), *(f"{k}={v}" for k, v in pairs)]))
    return "\n".join(lines) + "\n"


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=ini_inventories())
def test_generated_ini_inventories_read_like_ansible_core(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gen.ini"
    path.write_text(text)
    try:
        ours = our_view(path)
    except inventory.InventoryError:
        # Ansible refuses the same files (a loop of children, an undefined child):
        # it then reads nothing from them.
        assert ansible_view(path)[1] == {}, text
        return
    reference = ansible_view(path)
    assert same_hosts(ours) == same_hosts(reference), text
    assert ours[1] == reference[1], text


# --- clusters from groups -----------------------------------------------------------


def site(tmp_path: Path, text: str, name: str = "hosts.ini", **cluster: Any) -> dict[str, Any]:
    (tmp_path / name).write_text(text)
    return {
        "site": {"inventory": name},
        "executor": {"kind": "ssh", "ssh": {"user": "nobody", "port": 22}},
        "clusters": [
            {"name": "a", "group": "web_a", "member_port": 8000, **cluster},
            {"name": "b", "group": "web_b"},
        ],
    }


def test_groups_become_clusters_with_host_port_and_user(tmp_path: Path) -> None:
    topo = parse(site(tmp_path, INI), tmp_path / "site.toml")
    a, b = topo.clusters
    assert (a.group, b.group) == ("web_a", "web_b")
    special = next(m for m in a.members if m.name == "a-special")
    assert (special.host, special.port, special.ssh_port, special.ssh_user) == (
        "127.0.1.9", 9000, 2201, "ops"
    )  # fmt: skip
    first = a.members[0]
    assert (first.name, first.host, first.port, first.ssh_user) == (
        "a01.example.com", "a01.example.com", 8181, "deploy"
    )  # fmt: skip
    seven = b.members[-1]
    assert (seven.host, seven.port, seven.ssh_port, seven.route_id) == (
        "127.0.2.7", 8081, 2222, "seven"
    )  # fmt: skip
    assert [m.name for m in b.members[:3]] == ["ba", "bb", "bc"]


def error_of(data: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, tmp_path / "site.toml")
    return str(info.value)


def test_an_unknown_group_names_the_file_and_key(tmp_path: Path) -> None:
    data = site(tmp_path, INI)
    data["clusters"][1]["group"] = "web_z"
    message = error_of(data, tmp_path)
    assert message.startswith(f"{tmp_path / 'site.toml'}: clusters[1].group: no group 'web_z' in ")
    assert "hosts.ini (its groups: all, canary, prod, ungrouped, web_a, web_b)" in message


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ("[web_a]\na[1:]\n[web_b]\nb\n", "site.inventory",
         "hosts.ini:2: host range must specify end"),
        ("[web_a]\na[01:9]\n[web_b]\nb\n", "site.inventory", "equal-length begin and end"),
        ("[web_a]\na\n[web_b:children]\nnope\n", "site.inventory",
         "hosts.ini:4: section [web_b:children] includes an undefined group 'nope'"),
        ("[web_a]\na\n[x:vars]\nk=1\n", "site.inventory", "[x:vars] is for an undefined group"),
        ("[web_a]\na\n[web_b:weird]\n", "site.inventory", "[web_b:weird] has an unknown type"),
        ("[web_a]\na k\n", "site.inventory", "hosts.ini:2: expected key=value, got 'k'"),
        ("[web_a]\na ansible_host='{{ x }}'\n[web_b]\nb\n", "clusters[0].group",
         "ansible_host = '{{ x }}' is a Jinja2 template"),
        ("[web_a]\na ansible_port=ssh\n[web_b]\nb\n", "clusters[0].group",
         "ansible_port must be a port number"),
        ("[web_a]\n[web_b]\nb\n", "clusters[0].group", "group 'web_a' in "),
        ("[a:children]\nb\n[b:children]\na\n", "site.inventory", "makes a loop of children"),
    ],
)  # fmt: skip
def test_bad_inventories_fail_with_one_line(
    tmp_path: Path, text: str, key: str, needle: str
) -> None:
    message = error_of(site(tmp_path, text), tmp_path)
    assert message.startswith(f"{tmp_path / 'site.toml'}: {key}: "), message
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("web_a: [1, 2]\n", "group web_a: expected a mapping"),
        ("web_a:\n  hostz: {}\n", "unknown key 'hostz' (expected hosts, children, vars)"),
        ("web_a:\n  hosts:\n    1: {}\n", "host 1 must be a string"),
        ("web_a: {hosts: {a: [1]}}\n", "host a: expected a mapping of variables"),
        ("web_a: {hosts: [\n", "hosts.yml:2: not valid YAML"),
        ("- a\n", "expected a mapping of groups"),
    ],
)
def test_bad_yaml_inventories(tmp_path: Path, text: str, needle: str) -> None:
    message = error_of(site(tmp_path, text, "hosts.yml"), tmp_path)
    assert message.startswith(f"{tmp_path / 'site.toml'}: site.inventory: "), message
    assert needle in message


def test_what_changeover_does_not_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "group_vars").mkdir()
    assert "group_vars is not read by changeover" in error_of(site(tmp_path, INI), tmp_path)
    (tmp_path / "group_vars").rmdir()
    script = site(tmp_path, "#!/bin/sh\necho '{}'\n", "hosts.sh")
    assert "a script (dynamic inventory) is not read" in error_of(script, tmp_path)
    fifo = site(tmp_path, INI)
    os.mkfifo(tmp_path / "fifo.ini")
    fifo["site"]["inventory"] = "fifo.ini"
    assert "fifo.ini: not a regular file" in error_of(fifo, tmp_path)  # never blocks
    missing = site(tmp_path, INI)
    missing["site"]["inventory"] = "nowhere.ini"
    assert "site.inventory: " in error_of(missing, tmp_path)
    assert "nowhere.ini: no such file" in error_of(missing, tmp_path)


def test_group_and_members_are_checked_together(tmp_path: Path) -> None:
    both = site(tmp_path, INI, members=[{"name": "x", "port": 1}])
    assert "clusters[0].members: give either members or group" in error_of(both, tmp_path)
    no_inventory = site(tmp_path, INI)
    del no_inventory["site"]
    assert "clusters[0].group: needs [site] inventory" in error_of(no_inventory, tmp_path)
    no_port = site(tmp_path, "[web_a]\na\n[web_b]\nb changeover_port=1\n", member_port=None)
    del no_port["clusters"][0]["member_port"]
    assert "host a has no changeover_port variable" in error_of(no_port, tmp_path)
    bad_port = site(tmp_path, INI, member_port="http")
    assert "clusters[0].member_port: expected a port number" in error_of(bad_port, tmp_path)


def test_ipv6_host_patterns() -> None:
    assert inventory.expand_pattern("[::1]:2222", "x") == (["::1"], 2222)
    assert inventory.expand_pattern("fe80::1", "x") == (["fe80::1"], None)
    assert inventory.expand_pattern("web[1:2]:22", "x") == (["web1", "web2"], 22)


def test_check_prints_the_topology_the_inventory_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from changeover import cli
    from changeover.commands import output

    monkeypatch.setattr(output.out, "width", 200)  # one table row per line

    (tmp_path / "hosts.yml").write_text(YAML)
    (tmp_path / "site.toml").write_text(
        '[site]\ninventory = "hosts.yml"\n[executor]\nkind = "ssh"\n'
        '[executor.ssh]\nuser = "nobody"\n'
        '[[clusters]]\nname = "a"\ngroup = "web_a"\n'
        '[[clusters]]\nname = "b"\ngroup = "canary"\nqa_port = 8090\n'
    )
    result = CliRunner().invoke(cli.app, ["check", "-c", str(tmp_path / "site.toml")])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()]
    rows = [r for r in rows if r and r[0] in ("a", "b")]
    assert rows[0] == [
        "a", "a01.example.com", "a01.example.com:8080", "a01.example.com", "-",
        "deploy@a01.example.com:22",
    ]  # fmt: skip
    assert rows[3] == ["a", "a-special", "127.0.1.9:9000", "a-special", "-", "ops@127.0.1.9:2201"]
    assert rows[4] == ["b", "ba", "10.0.2.1:8181", "ba", "port 8090", "ops@10.0.2.1:22"]
    assert "members from inventory hosts.yml: a <- web_a (4), b <- canary (1)" in result.output


def test_a_dumped_topology_without_an_inventory_loads_again(tmp_path: Path) -> None:
    topo = parse(site(tmp_path, INI), tmp_path / "site.toml")
    data = topo.model_dump(mode="json")
    data["site"]["inventory"] = None
    for cluster in data["clusters"]:
        cluster["group"] = None
    again = parse(data, tmp_path / "site.toml")
    assert [c.members for c in again.clusters] == [c.members for c in topo.clusters]
