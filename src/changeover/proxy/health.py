"""Active health checks of every member, run by the master process.

Each member is probed every `interval` with GET `path` (2xx and 3xx are good),
whatever its admission: a member that is OUT must be seen healthy before it
goes back in. Connect failures the workers met since the last probe count as
one failed probe (passive checks). Results reach the workers through
`PoolState.set_healthy`. A member starts healthy (a restarted balancer serves
at once), but the admin API reports it healthy only once a probe has agreed
with its state: a member down from the start is reported unhealthy at once,
and marked down after `fall` failed probes as usual.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from changeover.config import HealthCheck, Member, Topology
from changeover.proxy.state import PoolState
from changeover.tls import member_ca, member_context

log = logging.getLogger("changeover.proxy")


def next_health(healthy: bool, streak: int, ok: bool, rise: int, fall: int) -> tuple[bool, int]:
    """(healthy, streak) after one probe; the streak counts probes that disagree
    with the current state, so `fall` failures take a member down and `rise`
    successes bring it back."""
    if ok == healthy:
        return healthy, 0
    streak += 1
    if streak >= (rise if ok else fall):
        return ok, 0
    return healthy, streak


class HealthChecker:
    def __init__(self, topology: Topology, pool: PoolState, fresh: set[int] | None = None) -> None:
        """`fresh`: the members without a verdict yet (default all; after a
        reload, the members it added)."""
        self.check: HealthCheck = topology.balancer.health
        self.pool = pool
        self.members: list[Member] = [m for _, m in topology.members()]
        self.urls = [topology.member_url(m) + self.check.path for m in self.members]
        balancer = topology.balancer
        # Checked over TLS like the requests: a member whose certificate does not
        # verify is down.
        self.tls = member_context(balancer, member_ca(topology))
        self.names = [balancer.member_tls_name or m.host for m in self.members]
        self.streaks = [0] * len(self.members)
        self.failures_seen = [0] * len(self.members)
        pool.expect_checks(fresh)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.check.timeout)
        # A fresh connection per probe, as HAProxy does: a pooled one could hide a
        # member that no longer accepts connections.
        connector = aiohttp.TCPConnector(force_close=True, ssl=self.tls or True)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._watch(session, i) for i in range(len(self.members))))

    async def _watch(self, session: aiohttp.ClientSession, index: int) -> None:
        url = self.urls[index]
        name = self.names[index] if self.tls is not None else None
        while True:
            failures = self.pool.shared.failures(index)
            if failures > self.failures_seen[index]:
                self.failures_seen[index] = failures
                self._observe(index, False, "connect failures seen by the workers")
            ok, why = await self._probe(session, url, name)
            self._observe(index, ok, why)
            await asyncio.sleep(self.check.interval)

    async def _probe(
        self, session: aiohttp.ClientSession, url: str, name: str | None
    ) -> tuple[bool, str]:
        try:
            async with session.get(url, allow_redirects=False, server_hostname=name) as response:
                await response.read()
                return response.status < 400, f"status {response.status}"
        except TimeoutError:
            return False, f"no answer within {self.check.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, str(exc) or type(exc).__name__

    def _observe(self, index: int, ok: bool, why: str) -> None:
        was = self.pool.healthy[index]
        healthy, self.streaks[index] = next_health(
            was, self.streaks[index], ok, self.check.rise, self.check.fall
        )
        if healthy != was:
            self.pool.set_healthy(index, healthy)
            state = "up" if healthy else "down"
            log.info("member %s is %s (%s)", self.members[index].name, state, why)
        if ok == healthy:  # a probe agrees with the state: it is no start-up guess
            self.pool.checked(index)
