"""WebSockets through the real embedded balancer on loopback.

The members are aiohttp WebSocket servers that echo; the clients are aiohttp's
WebSocket client. A handshake is tunnelled (101 relayed, frames both ways),
open tunnels are counted per member in the admin API, a DRAINING member keeps
its tunnels, and a member set OUT has them closed with code 1001, spread over
`balancer.close_spread`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

from changeover.balancers.builtin import BuiltinBalancer
from tests.helpers import wait_until
from tests.integration.proxy_fixtures import TOKEN, FakeMember, Site, balancer_site, members


def add_echo(member: FakeMember, app: web.Application) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"{member.name}:{message.data}")
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app.router.add_get("/ws", echo)


@contextlib.asynccontextmanager
async def ws_site(
    tmp_path: Path, **balancer: object
) -> AsyncIterator[tuple[Site, list[FakeMember]]]:
    async with (
        members({"a": ["a1"], "b": ["b1"]}, extra_routes=add_echo) as started,
        balancer_site(tmp_path, started, balancer=dict(balancer)) as site,
    ):
        yield site, started


async def tunnels(site: Site, session: aiohttp.ClientSession) -> dict[str, int]:
    return {name: m["tunnels"] for name, m in (await site.pool(session)).items()}


async def test_a_websocket_is_tunnelled_and_counted(tmp_path: Path) -> None:
    async with ws_site(tmp_path) as (site, _), aiohttp.ClientSession() as session:
        await site.admit(session, b1="out")
        async with session.ws_connect(f"{site.public}/ws") as ws:
            assert ws._response.status == 101
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "a1:hello"
            big = bytes(range(256)) * 1024  # a frame far larger than one read
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=5) == big
            assert await tunnels(site, session) == {"a1": 1, "b1": 0}
            pool = await site.pool(session)
            assert pool["a1"]["active"] == 0  # a tunnel is not a request in flight
            driver = BuiltinBalancer(site.admin, TOKEN)  # what a drain reads
            try:
                seen = (await driver.read()).member("a1")
            finally:
                await driver.close()
            assert (seen.tunnels, seen.active) == (1, 0)

        async def closed() -> bool:
            return await tunnels(site, session) == {"a1": 0, "b1": 0}

        await wait_until(closed, timeout=5, what="the tunnel count to drop")
        # Plain HTTP still works on the same listener.
        async with session.get(f"{site.public}/") as r:
            assert r.status == 200


async def test_draining_keeps_tunnels_and_out_closes_them_spread_with_1001(
    tmp_path: Path,
) -> None:
    count, spread = 20, 2.0  # at most 10 closes in any second
    async with (
        ws_site(tmp_path, close_spread=f"{spread}s") as (site, _),
        aiohttp.ClientSession() as session,
    ):
        await site.admit(session, b1="out")
        sockets = [await session.ws_connect(f"{site.public}/ws") for _ in range(count)]
        await site.admit(session, a1="draining", b1="live")
        for i, ws in enumerate(sockets):  # still open, still echoing
            await ws.send_str(f"m{i}")
            assert await ws.receive_str(timeout=5) == f"a1:m{i}"
        assert (await tunnels(site, session))["a1"] == count

        loop = asyncio.get_running_loop()

        async def close_seen(ws: aiohttp.ClientWebSocketResponse) -> tuple[float, int | None]:
            message = await ws.receive(timeout=spread + 10)
            assert message.type is WSMsgType.CLOSE, message
            return loop.time(), ws.close_code

        waits = [asyncio.create_task(close_seen(ws)) for ws in sockets]
        started = loop.time()
        await site.admit(session, a1="out")
        seen = await asyncio.gather(*waits)
        assert {code for _, code in seen} == {1001}
        times = sorted(t - started for t, _ in seen)
        share = count / spread
        # No second holds more than the configured share (timers are
        # precise to a few milliseconds; a window a little under 1 s).
        for i, t in enumerate(times):
            in_window = sum(1 for u in times[i:] if u - t < 0.98)
            assert in_window <= share, times
        assert times[-1] - times[0] >= spread * (count - 1) / count - 0.2, times

        async def none_left() -> bool:
            return (await tunnels(site, session))["a1"] == 0

        await wait_until(none_left, timeout=5, what="the tunnels to be counted closed")
        for ws in sockets:
            await ws.close()
