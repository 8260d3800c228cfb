"""Several worker processes share one admission state; shutdown is graceful."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from pathlib import Path

import aiohttp
import psutil

from tests.helpers import wait_until
from tests.integration.proxy_fixtures import Site, balancer_site, get_json, members

LAYOUT = {"a": ["a1", "a2"], "b": ["b1", "b2"]}


def worker_of_port(site: Site) -> dict[int, int]:
    """Local port of every upstream connection -> pid of the worker that owns it."""
    owners = {}
    for pid in site.worker_pids():
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr:
                owners[conn.laddr.port] = pid
    return owners


async def spread(site: Site, requests: int) -> dict[int, set[str]]:
    """Clusters each worker served, over `requests` new client connections."""
    served: list[tuple[str, int]] = []
    for _ in range(requests):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            _, body = await get_json(client, site.public + "/plain")
            served.append((body["cluster"], body["peer"]))
    owners = worker_of_port(site)
    by_worker: dict[int, set[str]] = defaultdict(set)
    for cluster, port in served:
        by_worker[owners[port]].add(cluster)
    return by_worker


async def test_two_workers_see_one_admission_state(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started, "--workers", "2") as site,
        aiohttp.ClientSession() as admin,
    ):
        assert len(site.worker_pids()) == 2
        before = await spread(site, 40)
        assert len(before) == 2, "the kernel should spread 40 connections over both workers"
        assert all(clusters == {"a", "b"} for clusters in before.values())

        await site.admit(admin, a1="out", a2="out")
        after = await spread(site, 40)
        assert len(after) == 2
        assert all(clusters == {"b"} for clusters in after.values()), after

        pool = await site.pool(admin)
        assert sum(m["requests"] for m in pool.values()) == 80  # summed over both workers


async def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        slow = asyncio.create_task(get_json(client, site.public + "/slow?delay=1"))

        async def in_flight() -> bool:
            active: int = sum(m["active"] for m in (await site.pool(client)).values())
            return active == 1

        await wait_until(in_flight, what="the slow request to be in flight")
        site.process.send_signal(signal.SIGTERM)
        status, body = await slow
        assert status == 200 and body["cluster"] in ("a", "b")
        assert await asyncio.wait_for(site.process.wait(), 20) == 0
        log = site.log_text()
        assert "balancer stopping" in log and "balancer stopped" in log


async def test_a_killed_worker_is_restarted_and_its_requests_are_not_counted(
    tmp_path: Path,
) -> None:
    """The lone worker dies (SIGKILL) with a request in flight: the master forks a
    new one that serves, the dead worker's request no longer counts as active (a
    drain would wait for it forever), and shutdown is still graceful."""
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        [old] = site.worker_pids()
        # A raw connection: aiohttp would retry the GET on a new connection, which the
        # listener (held by the master) queues for the restarted worker.
        port = int(site.public.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow?delay=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        slow = asyncio.create_task(reader.read())

        async def active() -> int:
            return sum(m["active"] for m in (await site.pool(client)).values())

        async def in_flight() -> bool:
            return await active() == 1

        await wait_until(in_flight, what="the slow request to be in flight")
        psutil.Process(old).kill()
        try:
            answer = await slow
        except ConnectionError:
            answer = b""
        writer.close()
        assert answer == b"", "the request in flight should have been cut with its worker"

        def restarted() -> bool:
            pids = site.worker_pids()
            return len(pids) == 1 and pids[0] != old

        await wait_until(restarted, what="a new worker")
        async with aiohttp.ClientSession() as user:  # a new connection to the new worker

            async def serves() -> bool:
                try:
                    return (await get_json(user, site.public + "/plain"))[0] == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(serves, what="the new worker to serve")

        async def none_in_flight() -> bool:
            # The new worker counts its request done just after the client has
            # the answer (seen beside stress-ng: 1 at once); the dead worker's
            # request must never count again.
            return await active() == 0

        await wait_until(none_in_flight, what="no request counted in flight")
        assert "balancer worker 0 restarted" in site.log_text()
        site.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(site.process.wait(), 20) == 0


async def test_least_conn_counts_the_requests_in_flight_of_every_worker(
    tmp_path: Path,
) -> None:
    """A slow request holds a1 through one worker; new users arriving through
    either worker go to the idle members, never to a1."""
    async with (
        members(LAYOUT) as started,
        balancer_site(
            tmp_path, started, "--workers", "2", balancer={"algorithm": "least-conn"}
        ) as site,
        aiohttp.ClientSession() as client,
    ):
        slow = asyncio.create_task(
            get_json(client, site.public + "/slow?delay=5", cookies={"CHANGEOVER_ROUTE": "a1"})
        )

        async def a1_busy() -> bool:
            return bool((await site.pool(client))["a1"]["active"] == 1)

        await wait_until(a1_busy, what="the slow request to hold a1")
        by_worker = await spread(site, 30)
        assert len(by_worker) == 2, "the kernel should spread 30 connections over both workers"
        served = [m.served for m in started if m.name == "a1"]
        assert served == [1], "only the slow request reached a1"
        status, body = await slow
        assert (status, body["member"]) == (200, "a1")
