"""The contract every driver keeps, run the same way against each real balancer
(HAProxy, Apache httpd, nginx, and the embedded balancer) in front of the sample
app: apply each admission and read it back with the others untouched; a counter
the driver declares it fills (`fills`) moves after real requests; a counter it
does not declare reads None (not counted), never 0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from changeover.balancers.base import COUNTERS, Balancer, fills_of
from changeover.balancers.factory import make_balancer
from changeover.model import Admission, Counter, PoolView, total
from tests.helpers import wait_until
from tests.integration.proxy_fixtures import TOKEN, start_balancer, stop_process
from tests.integration.realbalancers import (
    PRODUCTS,
    need,
    parse_site,
    running_balancer,
    running_members,
    served_by,
    site_data,
    toml_document,
)

pytestmark = pytest.mark.real

DRIVERS = ("builtin", *PRODUCTS)


@contextlib.asynccontextmanager
async def running(driver: str, tmp_path: Path) -> AsyncIterator[tuple[Balancer, str]]:
    """The sample app's members and `driver`'s balancer in front of them, every
    member seen healthy: (the driver, the public URL)."""
    data = site_data(driver)
    if driver == "builtin":
        data["balancer"]["admin_token"] = TOKEN
    config = tmp_path / "changeover.toml"
    config.write_text(toml_document(data))
    topology = parse_site(data, tmp_path)
    listen = topology.balancer.listen
    async with running_members(topology, logs=tmp_path):
        if driver != "builtin":
            need(driver)
            async with running_balancer(driver, topology, tmp_path / "lb1") as real:
                yield real.driver, real.url
            return
        process, _ = await start_balancer(config)
        balancer = make_balancer(topology)
        try:

            async def all_healthy() -> bool:
                with contextlib.suppress(Exception):
                    return all(m.healthy for m in (await balancer.read()).members)
                return False

            await wait_until(all_healthy, timeout=20, what="every member healthy")
            yield balancer, f"http://{listen.host}:{listen.port}"
        finally:
            await balancer.close()
            await stop_process(process)


@pytest.fixture(params=DRIVERS)
async def site(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Balancer, str]]:
    async with running(str(request.param), tmp_path) as started:
        yield started


def counted(view: PoolView, counter: Counter) -> int:
    figure = total(view.members, counter)
    assert figure is not None, f"{counter} is declared but not counted"
    return figure


async def test_each_admission_reads_back_with_the_others_untouched(
    site: tuple[Balancer, str],
) -> None:
    balancer, _ = site
    before = (await balancer.read()).admissions()
    assert set(before.values()) == {Admission.LIVE}
    # One member alone, then a whole cluster (nginx: a reload, then its flag files).
    for names in (["a1"], ["b1", "b2", "b3"]):
        for admission in (Admission.DRAINING, Admission.OUT, Admission.LIVE):
            desired = dict.fromkeys(names, admission)
            expected = before | desired
            assert (await balancer.apply(desired)).admissions() == expected, desired
            assert (await balancer.read()).admissions() == expected, desired


async def test_declared_counters_move_and_the_others_read_none(
    site: tuple[Balancer, str],
) -> None:
    balancer, url = site
    fills = fills_of(balancer)
    undeclared = [c for c in COUNTERS if c not in fills]
    before = await balancer.read()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        served = [await served_by(http, url) for _ in range(30)]
        assert len({member for member, _, _ in served}) > 1
        # A user who comes back with its session cookie is a sticky session of its member.
        home, cookie, _ = served[0]
        assert cookie is not None
        for _ in range(2):
            assert (await served_by(http, url, cookie=cookie))[0] == home
        if "sessions" in fills:
            seen = (await balancer.read()).member(home).sessions
            assert seen is not None and seen >= 1, seen
        # A response whose body comes later is in flight once its headers are in.
        async with http.get(url + "/slow?ms=4000") as slow:
            assert slow.status == 200
            if "active" in fills:

                async def in_flight() -> bool:
                    return counted(await balancer.read(), "active") >= 1

                await wait_until(in_flight, timeout=3, what="the slow request counted active")
            during = await balancer.read()
            await slow.read()
        for _ in range(5):
            async with http.get(url + "/fail") as failed:
                assert failed.status == 500
    after = await balancer.read()
    if "requests" in fills:
        assert counted(after, "requests") - counted(before, "requests") >= 30
    if "errors" in fills:
        assert counted(after, "errors") - counted(before, "errors") == 5
    for counter in undeclared:
        for view in (during, after):
            assert [getattr(m, counter) for m in view.members] == [None] * len(view.members), (
                counter
            )
