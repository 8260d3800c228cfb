"""`changeover check --reach`: can every member be reached and run a command?"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from changeover.config import Cluster, Member, Topology
from changeover.executors.base import Executor

REACH_ARGV = ["uname", "-n"]  # trivial everywhere, and names the host that answered
DEFAULT_CONCURRENCY = 32
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ReachResult:
    cluster: str
    member: str
    host: str
    ok: bool
    seconds: float  # connect (if not pooled yet) plus the command
    node: str | None  # what `uname -n` printed, when ok
    error: str | None  # why not, when not ok


async def reach(
    topology: Topology,
    executor: Executor,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[ReachResult]:
    """Run `uname -n` on every member, at most `concurrency` at once, in topology order.

    Never raises for a member that fails: that member's result says why.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(cluster: Cluster, member: Member) -> ReachResult:
        async with gate:
            result = await executor.run(cluster, member, list(REACH_ARGV), timeout)
        output = result.output.strip()
        if result.ok:
            return ReachResult(
                cluster.name, member.name, member.host, True, result.seconds, output, None
            )
        why = output or f"`{' '.join(REACH_ARGV)}` exited {result.exit_status}"
        return ReachResult(cluster.name, member.name, member.host, False, result.seconds, None, why)

    return list(await asyncio.gather(*(one(c, m) for c, m in topology.members())))
