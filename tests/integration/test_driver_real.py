"""Each driver against its real balancer (HAProxy, Apache httpd, nginx) and the
sample app on loopback: QA routing, drain with sticky sessions, a rejected
config, a group whose second instance fails, apply/read round trips."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from changeover.balancers.base import BalancerError
from changeover.balancers.group import BalancerGroup
from changeover.balancers.render import RenderOptions
from changeover.config import BalancerInstance
from changeover.model import Admission
from tests.integration.realbalancers import (
    PRODUCTS,
    Members,
    RealBalancer,
    broken_templates,
    configured_driver,
    instance_for,
    need,
    parse_site,
    running_balancer,
    running_members,
    served_by,
    site_data,
    start_balancer,
    stop_balancer,
)

pytestmark = pytest.mark.real

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


def cluster(admission: Admission, name: str) -> dict[str, Admission]:
    return {n: admission for n in (f"{name}1", f"{name}2", f"{name}3")}


@pytest.fixture(params=PRODUCTS)
def product(request: pytest.FixtureRequest) -> str:
    need(request.param)
    return str(request.param)


@pytest.fixture
async def members(product: str, tmp_path: Path) -> AsyncIterator[tuple[dict[str, Any], Members]]:
    data = site_data(product)
    # Routes with a dot in them (cookies `<id>.rack.a1`): the route is what follows
    # the first dot on every balancer, so each sticky test below also proves that.
    for c in data["clusters"]:
        for m in c["members"]:
            m["route"] = f"rack.{m['name']}"
    async with running_members(parse_site(data, tmp_path), logs=tmp_path) as procs:
        yield data, procs


@pytest.fixture
async def real(
    product: str, tmp_path: Path, members: tuple[dict[str, Any], Members]
) -> AsyncIterator[RealBalancer]:
    data, _ = members
    async with running_balancer(product, parse_site(data, tmp_path), tmp_path / "lb1") as lb:
        yield lb


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def members_seen(
    http: aiohttp.ClientSession, url: str, n: int = 24, host: str | None = None
) -> set[str]:
    return {(await served_by(http, url, host=host))[0] for _ in range(n)}


async def test_qa_entry_points_reach_only_their_cluster(
    real: RealBalancer, http: aiohttp.ClientSession
) -> None:
    for a_admission in (OUT, LIVE):
        await real.driver.apply(cluster(a_admission, "a"))
        for name in ("a", "b"):
            by_port = await members_seen(http, real.qa_url(name))
            by_host = await members_seen(http, real.url, host=f"prod-{name}.example.com")
            assert by_port == by_host == {f"{name}1", f"{name}2", f"{name}3"}, a_admission
        live = await members_seen(http, real.url, n=36)
        assert {m[0] for m in live} == ({"b"} if a_admission is OUT else {"a", "b"})


async def test_drain_keeps_sticky_users_and_sends_new_ones_elsewhere(
    real: RealBalancer, http: aiohttp.ClientSession
) -> None:
    # A user bound to a1: its session cookie names route a1.
    cookie = None
    for _ in range(60):
        member, cookie, _ = await served_by(http, real.url)
        if member == "a1":
            break
    assert cookie and cookie.endswith(".rack.a1") and cookie.count(".") == 2

    view = await real.driver.apply(cluster(DRAINING, "a"))
    assert view.admissions() == cluster(DRAINING, "a") | cluster(LIVE, "b")
    counts = []
    for _ in range(15):
        member, new_cookie, body = await served_by(http, real.url, cookie=cookie)
        assert member == "a1" and new_cookie is None  # same member, same session
        counts.append(body["count"])
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    # New users never land on a draining member.
    assert await members_seen(http, real.url, n=36) <= {"b1", "b2", "b3"}

    await real.driver.apply(cluster(OUT, "a"))
    member, _, _ = await served_by(http, real.url, cookie=cookie)
    assert member.startswith("b")  # OUT: the sticky user moves to the live pool


async def test_rejected_config_leaves_the_running_balancer_untouched(
    product: str, real: RealBalancer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    before_text = real.config_text()
    before = await real.driver.read()
    # A second driver for the same running instance, with one template value broken.
    broken = configured_driver(
        product,
        real.topology,
        real.driver.instance,
        real.run_dir,
        broken_templates(product, tmp_path / "broken"),
    )
    try:
        with pytest.raises(BalancerError, match=f"{product} rejected the new config") as info:
            await broken.apply(cluster(OUT, "a"))
        with pytest.raises(BalancerError, match="rejected"):
            await broken.reload()
    finally:
        await broken.close()
    # The product's own message is in the error.
    assert {"haproxy": "balanse", "apache": "ProxySett", "nginx": "keepalive"}[product] in str(
        info.value
    )
    assert real.alive()
    assert real.config_text() == before_text
    assert (await real.driver.read()).admissions() == before.admissions()
    assert {m[0] for m in await members_seen(http, real.url, n=36)} == {"a", "b"}


async def test_group_of_two_stays_consistent_when_the_second_fails(
    product: str,
    members: tuple[dict[str, Any], Members],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    data, _ = members
    topo1 = parse_site(data, tmp_path)
    # The second LB box of the tier: same ports, another loopback address.
    balancer2 = topo1.balancer.model_copy(
        update={
            "listen": topo1.balancer.listen.model_copy(update={"host": "127.0.0.2"}),
            "admin_listen": topo1.balancer.admin_listen.model_copy(update={"host": "127.0.0.2"}),
        }
    )
    topo2 = topo1.model_copy(update={"balancer": balancer2})
    lb1 = await start_balancer(product, topo1, tmp_path / "lb1")
    try:
        lb2 = await start_balancer(product, topo2, tmp_path / "lb2")
        try:
            text1 = lb1.config_text()
            # lb2's next config is broken: its checker refuses the change.
            lb2.driver.options = RenderOptions(
                instance=lb2.driver.instance,
                run_dir=lb2.run_dir,
                template_dir=broken_templates(product, tmp_path / "broken"),
            )
            group = BalancerGroup([lb1.driver, lb2.driver], name="tier")
            with pytest.raises(BalancerError) as info:
                await group.apply(cluster(OUT, "a"))
            message = str(info.value)
            # Every instance checks the change first: lb2's refusal changes none.
            assert "refused by 1 of 2 balancers before any changed" in message, message
            assert "no instance was changed" in message and "rejected the new config" in message
            everyone_live = cluster(LIVE, "a") | cluster(LIVE, "b")
            assert (await lb1.driver.read()).admissions() == everyone_live
            assert (await lb2.driver.read()).admissions() == everyone_live
            assert (await group.read()).admissions() == everyone_live
            assert lb1.config_text() == text1
            for lb in (lb1, lb2):
                assert {m[0] for m in await members_seen(http, lb.url, n=36)} == {"a", "b"}
        finally:
            await stop_balancer(lb2)
    finally:
        await stop_balancer(lb1)


async def test_apply_read_round_trip_and_reload_keeps_admissions(
    real: RealBalancer, http: aiohttp.ClientSession
) -> None:
    steps = [
        cluster(DRAINING, "a"),
        cluster(OUT, "a"),
        cluster(LIVE, "a") | cluster(DRAINING, "b"),
        {"b1": OUT, "b2": LIVE},
        cluster(LIVE, "b"),
    ]
    expected = cluster(LIVE, "a") | cluster(LIVE, "b")
    for desired in steps:
        expected |= desired
        view = await real.driver.apply(desired)
        assert view.admissions() == expected
        assert (await real.driver.read()).admissions() == expected
    await real.driver.apply({"a2": DRAINING, "b3": OUT})
    expected |= {"a2": DRAINING, "b3": OUT}
    # A reload (what a topology change does) keeps the admissions.
    assert (await real.driver.reload()).admissions() == expected
    assert real.alive()
    assert "b3" not in await members_seen(http, real.url, n=36)
    with pytest.raises(BalancerError, match="no such member"):
        await real.driver.apply({"zz9": OUT})


@pytest.fixture
def nginx() -> str:
    need("nginx")
    return "nginx"


async def test_nginx_flips_clusters_without_closing_client_connections(
    nginx: str, tmp_path: Path
) -> None:
    """A reload closes idle keep-alive connections (a request sent at that instant
    is reset); cluster flips must not reload, so one client connection lives on."""
    data = site_data(nginx)
    topology = parse_site(data, tmp_path)
    opened: list[object] = []

    async def on_open(*_: object) -> None:
        opened.append(_)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_open)
    async with (
        running_members(topology, logs=tmp_path),
        running_balancer(nginx, topology, tmp_path / "lb1") as real,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]
        ) as client,
    ):
        for a_admission, clusters in ((OUT, {"b"}), (LIVE, {"a", "b"}), (DRAINING, {"b"})):
            await real.driver.apply(cluster(a_admission, "a"))
            assert {m[0] for m in await members_seen(client, real.url, n=24)} == clusters
        assert (await real.driver.read()).admissions() == cluster(DRAINING, "a") | cluster(
            LIVE, "b"
        )
        state_dir = str(real.driver.instance.state_dir)
        assert await asyncio.to_thread(os.listdir, state_dir) == ["a.no-new"]
    assert len(opened) == 1


async def test_nginx_admission_files_it_cannot_see_are_an_error_and_undone(
    nginx: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = site_data(nginx)
    topology = parse_site(data, tmp_path)
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o000)  # nginx's workers cannot search it
    settings = instance_for(nginx, tmp_path / "lb1", state_dir=hidden / "state")
    instance = BalancerInstance.model_validate(settings)
    try:
        async with (
            running_members(topology, logs=tmp_path),
            running_balancer(nginx, topology, tmp_path / "lb1", instance=instance) as real,
        ):
            with pytest.raises(BalancerError, match="admission files") as info:
                await real.driver.apply(cluster(OUT, "a"))
            assert str(hidden / "state") in str(info.value)
            hidden.chmod(0o755)
            # Nothing left behind to take effect once nginx can see the directory.
            assert list((hidden / "state").glob("*")) == []
            assert {m[0] for m in await members_seen(http, real.url, n=36)} == {"a", "b"}
    finally:
        hidden.chmod(0o755)
