"""The embedded balancer routes like the design says: sticky, drain, QA."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp

from tests.helpers import wait_until
from tests.integration.proxy_fixtures import (
    ConnectionCount,
    auth,
    balancer_site,
    get_json,
    members,
)

LAYOUT = {"a": ["a1", "a2"], "b": ["b1", "b2"]}


def fresh() -> aiohttp.ClientSession:
    """A client with its own cookie jar: one user."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_new_users_spread_and_sticky_users_stay(tmp_path: Path) -> None:
    async with members(LAYOUT) as started, balancer_site(tmp_path, started) as site:
        first: Counter[str] = Counter()
        for _ in range(8):
            async with fresh() as user:
                _, body = await get_json(user, site.public + "/")
                first[body["member"]] += 1
                for _ in range(5):  # the session cookie's route keeps the user on its member
                    status, again = await get_json(user, site.public + "/")
                    assert (status, again["member"]) == (200, body["member"])
        assert first == {"a1": 2, "a2": 2, "b1": 2, "b2": 2}


async def test_route_cookie_is_inserted_for_apps_that_set_none(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        fresh() as user,
    ):
        async with user.get(site.public + "/plain") as r:
            member = (await r.json())["member"]
            assert r.cookies["CHANGEOVER_ROUTE"].value == member
            assert "HttpOnly" in r.headers["Set-Cookie"]
        for _ in range(5):
            async with user.get(site.public + "/plain") as r:
                assert (await r.json())["member"] == member
                assert "Set-Cookie" not in r.headers  # a valid route needs no new cookie
        async with user.get(site.public + "/") as r:  # the app sets its own sticky cookie
            assert "CHANGEOVER_ROUTE" not in r.headers.get("Set-Cookie", "")


async def test_a_repeated_request_head_is_still_routed_request_by_request(
    tmp_path: Path,
) -> None:
    """A client that sends the same head again and again on one connection (the
    balancer reuses what it read from the first) still takes a round-robin turn
    per request, gets the route cookie of the member that served each one, and
    its route cookie still holds it to that member."""
    connections = ConnectionCount()
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[connections.trace],
        ) as client,
    ):
        served: Counter[str] = Counter()
        for _ in range(8):
            async with client.get(site.public + "/plain") as r:
                member = (await r.json())["member"]
                assert r.cookies["CHANGEOVER_ROUTE"].value == member
                served[member] += 1
        assert served == {"a1": 2, "a2": 2, "b1": 2, "b2": 2}
        for _ in range(4):
            async with client.get(
                site.public + "/plain", headers={"Cookie": "CHANGEOVER_ROUTE=b2"}
            ) as r:
                assert (await r.json())["member"] == "b2"
                assert "Set-Cookie" not in r.headers
        assert connections.opened == 1  # every head after the first was a repeat on that connection


async def test_drain_keeps_sticky_users_and_sends_new_users_elsewhere(tmp_path: Path) -> None:
    async with members(LAYOUT) as started, balancer_site(tmp_path, started) as site:
        users = [fresh() for _ in range(8)]
        try:
            homes = {}
            for user in users:
                homes[user] = (await get_json(user, site.public + "/"))[1]["member"]
            async with aiohttp.ClientSession() as admin:
                await site.admit(admin, a1="draining", a2="draining")
            for user, home in homes.items():  # sticky users on a stay on a
                assert (await get_json(user, site.public + "/"))[1]["member"] == home
            for _ in range(10):  # new users never land on a draining member
                async with fresh() as newcomer:
                    _, body = await get_json(newcomer, site.public + "/")
                    assert body["cluster"] == "b"
            async with aiohttp.ClientSession() as admin:
                await site.admit(admin, a1="out", a2="out")
            for user in homes:  # OUT: sticky users of a are re-routed to b
                assert (await get_json(user, site.public + "/"))[1]["cluster"] == "b"
        finally:
            for user in users:
                await user.close()


async def test_draining_members_serve_new_users_when_no_live_member_is_left(
    tmp_path: Path,
) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as admin,
    ):
        # No member left LIVE: the admin API's interlock needs "force".
        await site.admit(admin, a1="draining", a2="draining", b1="out", b2="out", force=True)
        _, body = await get_json(admin, site.public + "/")
        assert body["cluster"] == "a"
        await site.admit(admin, a1="out", a2="out", force=True)
        async with admin.get(site.public + "/") as r:
            assert r.status == 503


async def test_qa_port_reaches_its_cluster_whatever_the_admission(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started, qa=True) as site,
        aiohttp.ClientSession() as client,
    ):
        await site.admit(client, a1="out", a2="out")
        for _ in range(6):
            assert (await get_json(client, site.qa["a"] + "/"))[1]["cluster"] == "a"
            assert (await get_json(client, site.qa["b"] + "/"))[1]["cluster"] == "b"
            assert (await get_json(client, site.public + "/"))[1]["cluster"] == "b"


async def test_qa_host_on_the_public_listener_reaches_its_cluster(tmp_path: Path) -> None:
    hosts = {"a": "prod-a.example.com", "b": "prod-b.example.com"}
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started, qa_hosts=hosts) as site,
        aiohttp.ClientSession() as client,
    ):
        await site.admit(client, b1="out", b2="out")
        for _ in range(6):
            qa_b = {"Host": "PROD-B.example.com:8080"}
            assert (await get_json(client, site.public + "/", headers=qa_b))[1]["cluster"] == "b"
            www = {"Host": "www.example"}
            assert (await get_json(client, site.public + "/", headers=www))[1]["cluster"] == "a"


async def test_a_route_with_a_dot_is_what_follows_the_first_dot(tmp_path: Path) -> None:
    """Members routed `rack.1` and `rack.2` (cookies `<id>.rack.1`): the route is
    everything after the first dot, so each user keeps its member."""
    layout = {"a": ["rack.1", "rack.2"], "b": ["b1"]}
    async with members(layout) as started, balancer_site(tmp_path, started) as site:
        homes: Counter[str] = Counter()
        for _ in range(6):
            async with fresh() as user:
                _, body = await get_json(user, site.public + "/")
                for _ in range(4):
                    assert (await get_json(user, site.public + "/"))[1]["member"] == body["member"]
                homes[body["member"]] += 1
        assert homes == {"rack.1": 2, "rack.2": 2, "b1": 2}


async def test_sessions_are_counted_per_member_within_session_idle(tmp_path: Path) -> None:
    """The admin API counts each sticky session once, on the member it reaches,
    over the `session_idle` the caller asks for; users who left stop counting."""
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started, balancer={"workers": 2}) as site,
        aiohttp.ClientSession() as admin,
    ):
        users = [fresh() for _ in range(8)]
        homes: Counter[str] = Counter()
        try:
            for user in users:  # a session cookie, then requests carrying it
                for _ in range(3):
                    close = {"Connection": "close"}
                    _, body = await get_json(user, site.public + "/", headers=close)
                homes[body["member"]] += 1  # each worker picks in turn on its own
        finally:
            for user in users:
                await user.close()
        pool = await site.pool(admin)
        counted = {name: m["sessions"] for name, m in pool.items()}
        assert counted == {name: homes[name] for name in pool}, homes
        url = f"{site.admin}/v1/pool?session_idle=0.3"

        async def forgotten() -> bool:
            async with admin.get(url, headers=auth()) as r:
                return all(m["sessions"] == 0 for m in (await r.json())["members"])

        await wait_until(forgotten, timeout=5, what="sessions idle for 0.3 s to stop counting")
        assert sum(m["sessions"] for m in (await site.pool(admin)).values()) == 8  # default 30 s
        # A change answers the pool document counted the same way (the driver's read-back).
        same = {"admissions": {"a1": (await site.pool(admin))["a1"]["admission"]}}
        for query, sessions in (("?session_idle=0.3", 0), ("", 8)):
            async with admin.post(
                f"{site.admin}/v1/admissions{query}", json=same, headers=auth()
            ) as r:
                assert r.status == 200, await r.text()
                assert sum(m["sessions"] for m in (await r.json())["members"]) == sessions
        for bad in ("0", "-1", "nan", "soon"):
            async with admin.get(f"{site.admin}/v1/pool?session_idle={bad}", headers=auth()) as r:
                assert r.status == 400, bad
            url = f"{site.admin}/v1/admissions?session_idle={bad}"
            async with admin.post(url, json=same, headers=auth()) as r:
                assert r.status == 400, bad
