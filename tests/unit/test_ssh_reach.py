"""reach() with a fake executor: bounded concurrency, order, failure reasons."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from changeover.config import Cluster, Member, Topology, parse
from changeover.executors.base import CommandResult
from changeover.executors.reach import reach


class CountingExecutor:
    """Answers after a short sleep and records how many commands overlapped."""

    def __init__(self, failing: dict[str, tuple[int | None, str]]) -> None:
        self.failing = failing
        self.running = 0
        self.peak = 0

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        status, output = self.failing.get(member.name, (0, f"node-{member.name}\n"))
        return CommandResult(member.name, tuple(argv), status, output, 0.01)

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        raise NotImplementedError

    async def warm(self, cluster: Cluster) -> None:
        raise NotImplementedError

    async def close_cluster(self, cluster: Cluster) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def _topology(per_cluster: int) -> Topology:
    return parse(
        {
            "clusters": [
                {
                    "name": name,
                    "members": [
                        {"name": f"{name.lower()}{i}", "host": f"10.0.{c}.{i}", "port": 8080}
                        for i in range(1, per_cluster + 1)
                    ],
                }
                for c, name in enumerate(["A", "B"], 1)
            ]
        }
    )


async def test_reach_never_exceeds_its_concurrency_and_keeps_topology_order() -> None:
    executor = CountingExecutor(failing={})
    results = await reach(_topology(18), executor, concurrency=5)
    assert executor.peak == 5
    assert [r.member for r in results] == [f"a{i}" for i in range(1, 19)] + [
        f"b{i}" for i in range(1, 19)
    ]
    assert all(r.ok and r.node == f"node-{r.member}" for r in results)


async def test_reach_explains_failures() -> None:
    executor = CountingExecutor(failing={"a2": (None, "cannot connect: refused"), "b1": (1, "")})
    by_member = {r.member: r for r in await reach(_topology(2), executor)}
    assert by_member["a2"].error == "cannot connect: refused" and not by_member["a2"].ok
    assert by_member["b1"].error == "`uname -n` exited 1"
    assert by_member["a1"].ok and by_member["a1"].error is None


async def test_reach_rejects_a_zero_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await reach(_topology(1), CountingExecutor(failing={}), concurrency=0)
