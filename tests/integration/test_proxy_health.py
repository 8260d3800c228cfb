"""Active and passive health checks of the embedded balancer."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.helpers import free_port, wait_until
from tests.integration.proxy_fixtures import (
    FakeMember,
    balancer_site,
    get_json,
    members,
)


async def test_unhealthy_member_is_ejected_and_returns(tmp_path: Path) -> None:
    async with (
        members({"a": ["a1"], "b": ["b1"]}) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        a1 = started[0]
        a1.healthy = False

        async def a1_down() -> bool:
            return (await site.pool(client))["a1"]["healthy"] is False

        await wait_until(a1_down, what="a1 to be marked down")
        assert "member a1 is down (status 503)" in site.log_text()
        for _ in range(6):
            assert (await get_json(client, site.public + "/"))[1]["member"] == "b1"

        a1.healthy = True

        async def a1_up() -> bool:
            return (await site.pool(client))["a1"]["healthy"] is True

        await wait_until(a1_up, what="a1 to come back")
        seen = {(await get_json(client, site.public + "/"))[1]["member"] for _ in range(4)}
        assert seen == {"a1", "b1"}


async def test_connect_failure_is_retried_on_another_member(tmp_path: Path) -> None:
    dead = FakeMember(name="a2", cluster="a", route="a2", port=free_port())  # nothing listens
    async with members({"a": ["a1"], "b": ["b1"]}) as started:
        layout = [started[0], dead, started[1]]
        async with (
            balancer_site(tmp_path, layout) as site,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
        ):
            # Sticky to the dead member, before any health check can have run.
            for _ in range(6):
                status, body = await get_json(
                    client, site.public + "/", headers={"Cookie": "JSESSIONID=x.a2"}
                )
                assert status == 200 and body["member"] in ("a1", "b1")

            async def a2_down() -> bool:
                return (await site.pool(client))["a2"]["healthy"] is False

            await wait_until(a2_down, what="a2 to be marked down")
