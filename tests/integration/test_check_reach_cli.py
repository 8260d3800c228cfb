"""`changeover check --reach` end to end: the CLI, a topology file, a real sshd."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from changeover.demo.scenario import DemoOptions, write_topology
from tests.integration.sshd import SshdServer, cluster_hosts, running_sshd

pytestmark = pytest.mark.real

A_HOSTS = cluster_hosts(1, 3)
B_HOSTS = cluster_hosts(2, 3)
NOWHERE = "127.0.2.9"  # sshd does not listen there


async def check_reach(config: Path) -> tuple[int, dict[str, list[str]]]:
    """Exit code and the reachability table's cells, by member name."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", "check", "--reach", "-c", str(config),
        env=os.environ | {"COLUMNS": "250"},  # one table row per line
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    raw, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = raw.decode()
    assert "reachability" in text, text
    table = text.split("reachability", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] not in ("", "member"):
            rows[cells[0]] = cells
    assert proc.returncode is not None
    return proc.returncode, rows


def topology(root: Path, server: SshdServer, b_hosts: list[str]) -> Path:
    root.mkdir()
    opts = DemoOptions(
        members_per_cluster=3, member_hosts=(A_HOSTS, b_hosts), ssh=server.settings()
    )
    return write_topology(root, opts)


async def test_check_reach_prints_each_member_and_exits_1_on_an_unreachable_one(
    tmp_path: Path,
) -> None:
    node = os.uname().nodename
    async with running_sshd(A_HOSTS + B_HOSTS) as server:
        code_up, rows_up = await check_reach(topology(tmp_path / "up", server, B_HOSTS))
        down = [*B_HOSTS[:2], NOWHERE]
        code_down, rows = await check_reach(topology(tmp_path / "down", server, down))

    assert code_up == 0
    assert [r[3] for r in rows_up.values()] == ["yes"] * 6
    assert code_down == 1
    assert list(rows) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    for name, host in zip(["a1", "a2", "a3", "b1", "b2"], [*A_HOSTS, *B_HOSTS[:2]], strict=True):
        member, shown_host, shown_node, reachable, seconds, detail = rows[name]
        assert (member, shown_host, shown_node, reachable, detail) == (name, host, node, "yes", "")
        assert 0 < float(seconds) < 10
    _, host, shown_node, reachable, _, detail = rows["b3"]
    assert (host, shown_node, reachable) == (NOWHERE, "-", "no")
    assert NOWHERE in detail and "Connection refused" in detail


async def test_an_inventory_gives_each_member_its_ssh_port_and_user(tmp_path: Path) -> None:
    """Members from an Ansible inventory: `ansible_host`, `ansible_port` and
    `ansible_user` reach them, though [executor.ssh] names another port and user."""
    async with running_sshd(A_HOSTS + B_HOSTS) as server:
        (tmp_path / "hosts.ini").write_text(
            "[web_a]\n"
            + "".join(f"a{i} ansible_host={h}\n" for i, h in enumerate(A_HOSTS, 1))
            + "[web_b]\n"
            + "".join(f"b{i} ansible_host={h}\n" for i, h in enumerate(B_HOSTS, 1))
            + f"[site:children]\nweb_a\nweb_b\n[site:vars]\nansible_port={server.port}\n"
            + f"ansible_user={server.user}\n"
        )
        config = tmp_path / "changeover.toml"
        config.write_text(
            '[site]\ninventory = "hosts.ini"\n'
            '[executor]\nkind = "ssh"\n'
            f'[executor.ssh]\nuser = "nobody-here"\nport = 1\nkey_file = "{server.key_file}"\n'
            f'known_hosts = "{server.known_hosts}"\n'
            '[[clusters]]\nname = "a"\ngroup = "web_a"\nmember_port = 9000\n'
            '[[clusters]]\nname = "b"\ngroup = "web_b"\nmember_port = 9000\n'
        )
        code, rows = await check_reach(config)
        accepted = {h: server.accepted(h) for h in A_HOSTS + B_HOSTS}

    assert code == 0, rows
    assert list(rows) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert [r[1] for r in rows.values()] == A_HOSTS + B_HOSTS
    assert [r[3] for r in rows.values()] == ["yes"] * 6
    assert accepted == dict.fromkeys(A_HOSTS + B_HOSTS, 1)
