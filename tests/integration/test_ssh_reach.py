"""reach() over real SSH: every member answers, or says why not."""

from __future__ import annotations

import os

import pytest

from changeover.config import Topology, parse
from changeover.executors.reach import reach
from changeover.executors.ssh import SshExecutor
from tests.integration.sshd import cluster_hosts, running_sshd

pytestmark = pytest.mark.real


def _topology(a_hosts: list[str], b_hosts: list[str]) -> Topology:
    def members(prefix: str, hosts: list[str]) -> list[dict[str, object]]:
        return [{"name": f"{prefix}{i}", "host": h, "port": 8080} for i, h in enumerate(hosts, 1)]

    return parse(
        {
            "clusters": [
                {"name": "A", "members": members("a", a_hosts)},
                {"name": "B", "members": members("b", b_hosts)},
            ]
        }
    )


async def test_reach_reports_each_member_and_the_unreachable_one() -> None:
    a_hosts, b_hosts = cluster_hosts(1, 3), cluster_hosts(2, 2)
    async with running_sshd(a_hosts + b_hosts) as sshd:
        topology = _topology(a_hosts, [*b_hosts, "127.0.2.9"])  # nothing listens on .2.9
        executor = SshExecutor(sshd.settings())
        try:
            results = await reach(topology, executor, concurrency=2, timeout=10)
        finally:
            await executor.close()

    assert [(r.cluster, r.member, r.host) for r in results] == [
        ("A", "a1", "127.0.1.1"),
        ("A", "a2", "127.0.1.2"),
        ("A", "a3", "127.0.1.3"),
        ("B", "b1", "127.0.2.1"),
        ("B", "b2", "127.0.2.2"),
        ("B", "b3", "127.0.2.9"),
    ]
    *reachable, unreachable = results
    for r in reachable:
        assert r.ok and r.error is None, r
        assert r.node == os.uname().nodename
        assert 0 < r.seconds < 10
    assert not unreachable.ok and unreachable.node is None
    assert unreachable.error is not None
    assert "127.0.2.9" in unreachable.error and "Connection refused" in unreachable.error
