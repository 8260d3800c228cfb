"""The balancer's admin API: token, pool document, atomic admission changes."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

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
            "name", "cluster", "host", "port", "route", "admission", "healthy", "active", "requests"
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

        body = await site.admit(client, a1="draining", b1="out")
        assert [m["admission"] for m in body["members"]] == ["draining", "out"]
        assert "admissions changed: a1: live -> draining, b1: live -> out" in site.log_text()


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
