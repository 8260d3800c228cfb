"""The balancer's admin API: token, pool document, atomic admission changes, bodies
that are not JSON and the interlock."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from changeover.config import Topology, parse
from changeover.model import Admission
from changeover.plan import admissions_refusal
from changeover.proxy.admin import build_app
from changeover.proxy.state import PoolState, SharedState
from tests.helpers import free_port
from tests.integration.proxy_fixtures import (
    TOKEN,
    auth,
    balancer_site,
    members,
    start_balancer,
    stop_process,
    topology_toml,
)

LAYOUT = {"a": ["a1"], "b": ["b1"]}


async def test_token_is_required_and_checked(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        for headers in ({}, auth("wrong"), {"Authorization": TOKEN}):
            async with client.get(f"{site.admin}/v1/pool", headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"] == "missing or wrong bearer token"
            body = {"admissions": {"a1": "out"}}
            async with client.post(f"{site.admin}/v1/admissions", json=body, headers=headers) as r:
                assert r.status == 401
        async with client.get(f"{site.admin}/v1/healthz") as r:  # liveness needs no token
            assert (r.status, await r.json()) == (200, {"ok": True})
        pool = await site.pool(client)
        assert [m["admission"] for m in pool.values()] == ["live", "live"]


async def test_pool_document_and_atomic_admissions(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        for _ in range(4):
            async with client.get(site.public + "/"):
                pass
        pool = await site.pool(client)
        assert list(pool) == ["a1", "b1"]
        assert set(pool["a1"]) == {
            "name", "cluster", "host", "port", "route", "admission", "healthy", "active",
            "requests", "errors", "tunnels", "sessions",
        }  # fmt: skip
        assert pool["a1"]["requests"] + pool["b1"]["requests"] == 4
        assert pool["a1"]["active"] == 0 and pool["a1"]["healthy"] is True

        url = f"{site.admin}/v1/admissions"
        for bad, named in (
            ({"admissions": {"a1": "out", "zz": "out"}}, "zz"),
            ({"admissions": {"a1": "out", "b1": "sideways"}}, "sideways"),
        ):
            async with client.post(url, json=bad, headers=auth()) as r:
                assert r.status == 400 and named in (await r.json())["error"]
        async with client.post(url, data=b"not json", headers=auth()) as r:
            assert r.status == 400
        assert [m["admission"] for m in (await site.pool(client)).values()] == ["live", "live"]

        body = await site.admit(client, a1="draining", b1="out", force=True)  # none left live
        assert [m["admission"] for m in body["members"]] == ["draining", "out"]
        assert "admissions changed (forced): a1: live -> draining, b1: live -> out" in (
            site.log_text()
        )


async def test_admissions_survive_a_restart_through_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "balancer-state.json"
    async with members(LAYOUT) as started:
        async with (
            balancer_site(tmp_path, started, balancer={"state_file": str(state)}) as site,
            aiohttp.ClientSession() as client,
        ):
            await site.admit(client, a1="out")
        assert json.loads(state.read_text())["admissions"] == {"a1": "out", "b1": "live"}
        async with (
            balancer_site(tmp_path, started, balancer={"state_file": str(state)}) as site,
            aiohttp.ClientSession() as client,
        ):
            assert (await site.pool(client))["a1"]["admission"] == "out"


async def test_refuses_to_start_without_an_admin_token(tmp_path: Path) -> None:
    config = tmp_path / "changeover.toml"
    async with members(LAYOUT) as started:
        text = topology_toml(started, free_port(), free_port())
        config.write_text(text.replace(f'admin_token = "{TOKEN}"\n', ""))
        try:
            process, log = await start_balancer(config)
        except AssertionError as exc:
            assert "exited with 2" in str(exc)
            assert "no admin token" in str(exc)
        else:
            await stop_process(process)
            raise AssertionError(f"started without a token: {log.read_text()}")


# --- the admin app in process (aiohttp's TestClient): bodies and the interlock ---------


def admin_topology(min_healthy: int = 1) -> Topology:
    return parse(
        {
            "clusters": [
                {
                    "name": "a",
                    "members": [{"name": "a1", "port": 9001}, {"name": "a2", "port": 9002}],
                },
                {"name": "b", "members": [{"name": "b1", "port": 9011}]},
            ],
            "policy": {"min_healthy": min_healthy},
        },
        "site.toml",
    )


@contextlib.asynccontextmanager
async def admin_client(pool: PoolState) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(build_app(pool, TOKEN))) as client:
        yield client


def new_pool(min_healthy: int = 1) -> PoolState:
    return PoolState(admin_topology(min_healthy), SharedState(3, 1), None)


def admissions_of(pool: PoolState) -> list[str]:
    return [m["admission"] for m in pool.view()["members"]]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"[" * 100_000, "application/json", "nested too deep"),
        (b'{"admissions": {"a1": ' + b"[" * 100_000 + b"}}", "application/json",
         "nested too deep"),
        (b'{"admissions": {"a1": "out"}}', "application/json; charset=nonsense",
         "unknown charset 'nonsense'"),
        (b'{"admissions": {"a1": "out"}}', "application/json; charset=rot13",  # not text
         "unknown charset 'rot13'"),
        (b'{"admissions": {"a1": "\xff"}}', "application/json", "not utf-8 text"),
        (b"not json", "application/json", "the body is not JSON"),
        (b'{"admissions": {"a1": ' + b"[" * 200 + b"]" * 200 + b"}}", "application/json",
         "bad admission [[[[[[[...]]]]]]] for 'a1'"),  # parsed, then quoted briefly
        (b'{"admissions": {"a1": "out"}, "force": "yes"}', "application/json",
         '"force" must be true or false'),
        (b'{"admissions": {}}', "application/json", '"force": true'),
    ],
)  # fmt: skip
async def test_a_body_that_is_no_admission_change_is_a_400_not_a_500(
    body: bytes, content_type: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = new_pool()
    caplog.set_level(logging.DEBUG)
    async with admin_client(pool) as client:
        headers = auth() | {"Content-Type": content_type}
        async with client.post("/v1/admissions", data=body, headers=headers) as r:
            assert r.status == 400, await r.text()
            assert r.content_type == "application/json"
            error = (await r.json())["error"]
        assert expected in error, error
        assert len(error) < 300
        async with client.get("/v1/healthz") as r:  # and the API still serves
            assert r.status == 200
    assert admissions_of(pool) == ["live", "live", "live"]
    assert tracebacks(caplog) == []


async def test_the_body_is_read_in_its_charset(caplog: pytest.LogCaptureFixture) -> None:
    pool = new_pool()
    async with admin_client(pool) as client:
        body = json.dumps({"admissions": {"a1": "draining"}}).encode("utf-16")
        headers = auth() | {"Content-Type": "application/json; charset=utf-16"}
        async with client.post("/v1/admissions", data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    assert admissions_of(pool) == ["draining", "live", "live"]


async def test_a_body_too_big_is_a_413_with_a_json_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_client(new_pool()) as client:
        body = b'{"admissions": {"a1": "' + b"x" * (2 * 1024**2) + b'"}}'
        async with client.post("/v1/admissions", data=body, headers=auth()) as r:
            assert r.status == 413
            assert "larger than" in (await r.json())["error"]
    assert tracebacks(caplog) == []


async def test_a_change_that_leaves_no_healthy_live_member_needs_force(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = new_pool()
    pool.set_healthy(2, False)  # b1 is down: a is the whole healthy live pool
    caplog.set_level(logging.INFO, logger="changeover.proxy")
    async with admin_client(pool) as client:
        for change in ({"a1": "out", "a2": "draining"}, {"a1": "out", "a2": "out", "b1": "out"}):
            async with client.post(
                "/v1/admissions", json={"admissions": change}, headers=auth()
            ) as r:
                assert r.status == 409
                error = (await r.json())["error"]
            # The engine's own interlock, word for word, and how to override it.
            assert error.startswith(admissions_refusal(pool.topology, pool.pool_view(), {
                name: Admission(value) for name, value in change.items()
            }) or "not refused by the engine")  # fmt: skip
            assert "would have 0 healthy member(s); policy.min_healthy is 1" in error
            assert '"force": true' in error
            assert admissions_of(pool) == ["live", "live", "live"]  # nothing changed
        # Taking one healthy member out is fine: a2 stays.
        async with client.post(
            "/v1/admissions", json={"admissions": {"a1": "out"}}, headers=auth()
        ) as r:
            assert r.status == 200
        async with client.post(
            "/v1/admissions", json={"admissions": {"a2": "out"}, "force": True}, headers=auth()
        ) as r:
            assert r.status == 200, await r.text()
            assert [m["admission"] for m in (await r.json())["members"]] == ["out", "out", "live"]
    assert "admissions changed (forced): a2: live -> out" in caplog.text


async def test_the_interlock_keeps_policy_min_healthy_like_the_engine() -> None:
    pool = new_pool(min_healthy=2)
    async with admin_client(pool) as client:
        async with client.post(
            "/v1/admissions", json={"admissions": {"a1": "draining"}}, headers=auth()
        ) as r:
            assert r.status == 200  # a2 and b1 stay: 2 healthy live members
        async with client.post(
            "/v1/admissions", json={"admissions": {"b1": "out"}}, headers=auth()
        ) as r:
            assert r.status == 409
            error = (await r.json())["error"]
            assert "live pool (a) would have 1 healthy member(s); policy.min_healthy is 2" in error
        # Bringing a1 back while taking b1 out keeps two: allowed.
        async with client.post(
            "/v1/admissions", json={"admissions": {"a1": "live", "b1": "out"}}, headers=auth()
        ) as r:
            assert r.status == 200
    assert admissions_of(pool) == ["live", "live", "out"]


async def test_the_release_lock_is_held_by_one_owner_at_a_time() -> None:
    async with admin_client(new_pool()) as client:

        async def lock(method: str, **body: object) -> tuple[int, dict[str, object]]:
            async with client.request(method, "/v1/lock", json=body, headers=auth()) as r:
                return r.status, await r.json()

        first = {"owner": "copy-1", "holder": "release #1 by ops@a", "ttl": 60}
        status, got = await lock("PUT", **first)
        assert status == 200 and got["holder"] == "release #1 by ops@a"
        status, got = await lock("PUT", owner="copy-2", holder="release #1 by ops@b", ttl=60)
        assert status == 409
        assert str(got["error"]).startswith(
            "the release lock of this balancer is held by release #1 by ops@a"
        )
        assert (await lock("DELETE", owner="copy-2"))[0] == 409  # not its lock
        assert (await lock("PUT", **first))[0] == 200  # its owner renews it
        assert await lock("DELETE", owner="copy-1") == (200, {"holder": None})
        assert (await lock("PUT", owner="copy-2", holder="b", ttl=60))[0] == 200
        for bad in ({"holder": "x", "ttl": 60}, {"owner": "o", "holder": "x", "ttl": 0},
                    {"owner": "o", "holder": "x", "ttl": "1"}):  # fmt: skip
            assert (await lock("PUT", **bad))[0] == 400
        async with client.get("/v1/lock") as r:
            assert r.status == 401  # behind the token like the rest


async def test_where_nothing_serves_yet_every_member_may_be_taken_out() -> None:
    """A first deploy: no member reported healthy, so taking all out loses nothing."""
    pool = new_pool()
    pool.expect_checks()  # a checker runs and has seen none healthy yet
    async with admin_client(pool) as client:
        everything_out = dict.fromkeys(("a1", "a2", "b1"), "out")
        async with client.post(
            "/v1/admissions", json={"admissions": everything_out}, headers=auth()
        ) as r:
            assert r.status == 200, await r.text()
    assert admissions_of(pool) == ["out", "out", "out"]


async def test_the_interlock_judges_members_on_checks_not_the_start_up_guess() -> None:
    """At start-up every member is routed to but none is reported healthy until a
    check has seen it: the interlock counts what the API reports."""
    pool = new_pool()
    pool.expect_checks()  # a checker runs, and has seen only a1 so far
    pool.checked(0)
    async with admin_client(pool) as client:
        async with client.post(
            "/v1/admissions", json={"admissions": {"a1": "out"}}, headers=auth()
        ) as r:
            assert r.status == 409, await r.text()
        async with client.post(
            "/v1/admissions", json={"admissions": {"a2": "out", "b1": "out"}}, headers=auth()
        ) as r:
            assert r.status == 200


METRICS_TOKEN = "scrape-only-token"


async def test_metrics_serve_each_members_counters_to_either_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/metrics takes the admin token or the read-only metrics token; the metrics
    token opens nothing else; the figures are the pool document's."""
    monkeypatch.setenv("CHANGEOVER_METRICS_TOKEN", METRICS_TOKEN)
    pool = new_pool()
    shared = pool.shared
    in_flight, requests, _ = shared.counters(0)
    requests[0], requests[2], in_flight[0] = 7, 3, 2  # a1, b1
    shared.errors(0)[0] = 5
    shared.tunnels(0)[2] = 1
    pool.set_admissions({"b1": "draining"})
    async with admin_client(pool) as client:
        for headers in ({}, auth("wrong")):
            r = await client.get("/metrics", headers=headers)
            assert r.status == 401
        r = await client.get("/v1/pool", headers=auth(METRICS_TOKEN))
        assert r.status == 401  # read-only: the pool (and every change) needs the admin token
        r = await client.post(
            "/v1/admissions", json={"admissions": {"a1": "out"}}, headers=auth(METRICS_TOKEN)
        )
        assert r.status == 401
        texts = []
        for token in (TOKEN, METRICS_TOKEN):
            r = await client.get("/metrics", headers=auth(token))
            assert r.status == 200 and r.content_type == "text/plain"
            texts.append(await r.text())
    text = texts[1]
    for line in (
        'changeover_balancer_requests_total{cluster="a",member="a1"} 7.0',
        'changeover_balancer_requests_total{cluster="b",member="b1"} 3.0',
        'changeover_balancer_responses_5xx_total{cluster="a",member="a1"} 5.0',
        'changeover_balancer_responses_5xx_total{cluster="b",member="b1"} 0.0',
        'changeover_balancer_in_flight{cluster="a",member="a1"} 2.0',
        'changeover_balancer_tunnels{cluster="b",member="b1"} 1.0',
        'changeover_balancer_sessions{cluster="a",member="a1"} 0.0',
        'changeover_balancer_admission{admission="draining",cluster="b",member="b1"} 1.0',
        'changeover_balancer_admission{admission="live",cluster="b",member="b1"} 0.0',
        'changeover_balancer_admission{admission="live",cluster="a",member="a1"} 1.0',
    ):
        assert line in text, (line, text)
    assert "# TYPE changeover_balancer_requests_total counter" in text
    assert text.count("changeover_balancer_healthy{") == 3  # every member, healthy or not
