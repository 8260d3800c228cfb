"""A whole release, v1 -> v2 on 2 clusters x 3 members, through each real
balancer, under the probe at 300 requests/s with sticky users."""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import trustme

from changeover import journal as J
from changeover.balancers.base import Balancer
from changeover.balancers.factory import DRIVERS
from changeover.balancers.process import ConfiguredBalancer
from changeover.checks import Checker
from changeover.config import BalancerInstance, Topology
from changeover.database import SiteDatabase
from changeover.engine import Engine, Event
from changeover.executors.base import member_values, render_argv
from changeover.model import Admission
from changeover.ports import Ports, SystemClock
from changeover.runtime import make_executor, open_journal
from tests.certs import Pair, ca_file, client_context, issue
from tests.helpers import wait_until
from tests.integration.realbalancers import (
    HOST,
    PRODUCTS,
    finish_probe,
    instance_for,
    need,
    parse_site,
    probe_process,
    running_balancer,
    site_data,
    write_probe_site,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

RATE = 300.0
T = TypeVar("T")


def release_site(product: str, root: Path) -> dict[str, Any]:
    data = site_data(product)
    # Members and their release commands run at this test's priority: below it,
    # any other busy session on the box (stress-ng, another job) starves them and
    # the probe's requests to them time out though the release did nothing wrong.
    appctl = shlex.join([sys.executable, "-m", "changeover.demo.appctl"])
    common = (
        shlex.join(["--root", str(root / "apps")])
        + " --member {member} --host {host} --port {port} --route {route}"
    )
    data["site"]["state_dir"] = "state"
    data["balancer"]["instances"] = [instance_for(product, root / "lb1")]
    data["executor"] = {"kind": "local", "timeout": "30s"}
    data["release"] = {
        "stop": f"{appctl} stop {common}",
        "deploy": f"{appctl} deploy {common} --version {{version}}",
        "start": f"{appctl} start {common} --startup-delay 0.3",
    }
    data["checks"] = {"smoke": [{"path": "/", "status": 200, "body_contains": "{version}"}]}
    # To hold on a loaded 2-core box: a member takes 3 slow health checks in a
    # row (2 s each) to be counted down, not one (the probe would see 503s the
    # release did not cause), and may take 30 s to boot.
    data["balancer"]["health"] |= {"timeout": "2s", "fall": 3}
    # Long enough for the probe's users (1.5 s at most): none is cut, even on nginx,
    # which counts nothing and so waits the whole drain_timeout.
    data["policy"] = {
        "drain_timeout": "5s",
        "session_idle": "1s",
        "health_timeout": "30s",
        "min_healthy": 1,
    }
    return data


def under_load(data: dict[str, Any]) -> dict[str, Any]:
    """`release_site`'s `data` for releases beside SSH bursts: members may take
    90 s to boot."""
    data["policy"]["health_timeout"] = "90s"
    return data


async def run_on_members(topology: Topology, action: str, version: str = "") -> None:
    async def one(argv: list[str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode(errors="replace")

    template = getattr(topology.release, action)
    await asyncio.gather(
        *(one(render_argv(template, member_values(c, m, version))) for c, m in topology.members())
    )


async def release_with(
    topology: Topology,
    balancer: Balancer,
    version: str,
    events: list[Event],
    during: Coroutine[Any, Any, T] | None = None,
) -> tuple[str, list[J.StepRow], T | None]:
    """The engine releases `version` through `balancer` (closed after) with the
    real executor, checks and journal; `during` runs beside it, its result returned."""
    journal = open_journal(topology)
    executor = make_executor(topology)
    try:
        checker = Checker(topology)
        database = SiteDatabase(topology, checker)
        ports = Ports(balancer, executor, checker, database, journal, SystemClock())
        engine = Engine(topology, ports, on_event=events.append)
        release_id = await engine.begin(version)
        side = asyncio.create_task(during) if during is not None else None
        state = await engine.run(release_id)
        result = await side if side is not None else None
        return state, journal.steps(release_id), result
    finally:
        await balancer.close()
        await executor.close()
        journal.close()


async def members_up(topology: Topology) -> bool:
    async with aiohttp.ClientSession() as http:
        for _, member in topology.members():
            try:
                async with http.get(member.base_url + "/health") as resp:
                    if resp.status != 200:
                        return False
            except aiohttp.ClientError:
                return False
    return True


async def versions_served(topology: Topology) -> set[str]:
    async with aiohttp.ClientSession() as http:
        seen = set()
        for _, member in topology.members():
            async with http.get(member.base_url + "/version") as resp:
                seen.add((await resp.text()).strip())
        return seen


async def renew_mid_release(
    driver: ConfiguredBalancer, events: list[Event], ca: trustme.CA, pair: Pair
) -> Pair:
    """Once cluster a is being started: a new certificate in place, and the driver's
    reload() (which keeps the admissions of the moment; on nginx loading
    certificates per handshake it installs the pair and reloads nothing)."""

    def starting_a() -> bool:
        return any(e.kind == "step-start" and e.step and e.step.id == "start-a" for e in events)

    await wait_until(starting_a, timeout=60, what="step start-a")
    renewed = issue(ca, pair.cert.parent / "renewed", "site", HOST)
    pair.cert.write_bytes(renewed.cert.read_bytes())
    pair.key.write_bytes(renewed.key.read_bytes())
    await driver.reload()
    return renewed


async def served_certificate(topology: Topology, ca: trustme.CA) -> bytes:
    listen = topology.balancer.listen
    _, writer = await asyncio.open_connection(listen.host, listen.port, ssl=client_context(ca))
    try:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("product", "https"), [*((p, False) for p in PRODUCTS), *((p, True) for p in PRODUCTS)],
    ids=[*PRODUCTS, *(f"{p}-https" for p in PRODUCTS)],
)  # fmt: skip
async def test_full_release_under_probe_has_zero_downtime(
    product: str, https: bool, tmp_path: Path
) -> None:
    """Over HTTPS the certificate is also renewed mid-release through the driver
    where that costs no connection: HAProxy's seamless reload, and nginx loading
    its certificates at every handshake (tls_load = "handshake": installed
    without a reload, its workers the same before and after the release). Apache
    renews a certificate only by a graceful restart, which closes idle keep-alive
    connections under a client that may be sending at that instant
    (docs/drivers.md): not done mid-release here."""
    renew = https and product in ("haproxy", "nginx")
    need(product)
    data = release_site(product, tmp_path)
    ca = trustme.CA()
    pair = issue(ca, tmp_path / "certs", "site", HOST)
    if https:
        data["balancer"] |= {"tls_cert": str(pair.cert), "tls_key": str(pair.key)}
        if product == "nginx":
            data["balancer"]["tls_load"] = "handshake"
    topology = parse_site(data, tmp_path)
    instance = BalancerInstance.model_validate(data["balancer"]["instances"][0])
    events: list[Event] = []
    await run_on_members(topology, "deploy", "1.0")
    await run_on_members(topology, "start")
    await wait_until(lambda: members_up(topology), timeout=20, what="members listening")
    try:
        async with running_balancer(product, topology, tmp_path / "lb1", instance=instance) as real:
            site_file = write_probe_site(tmp_path / "probe-site.toml", real, data)
            trusted = ca_file(ca, tmp_path) if https else None
            async with probe_process(
                site_file, real.url, rate=RATE, sticky_users=40, log=tmp_path / "probe.log",
                ca=trusted,
            ) as probe:  # fmt: skip
                await asyncio.sleep(1.0)  # sticky sessions form before the release
                workers = real.workers()
                driver = DRIVERS[product](topology, instance, run_dir=tmp_path / "lb1")
                assert isinstance(driver, ConfiguredBalancer)
                renewal = renew_mid_release(driver, events, ca, pair) if renew else None
                state, steps, renewed = await release_with(topology, driver, "2.0", events, renewal)
                await asyncio.sleep(1.0)  # traffic after the release counts too
                report = await finish_probe(probe)
            final = await real.driver.read()
            served = await versions_served(topology)
            if renew:
                assert renewed is not None
                assert await served_certificate(topology, ca) == renewed.der
            if product == "nginx":  # the flips are flag files, the renewal a rename
                assert real.workers() == workers, "nginx was reloaded"
    finally:
        await run_on_members(topology, "stop")
    assert state == J.DONE, "\n".join(f"{e.kind}: {e.message}" for e in events)
    assert all(s.state == J.STEP_DONE for s in steps)
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set(report.versions_seen) == {"1.0", "2.0"}  # the release ran under traffic
    assert served == {"2.0"}
    assert {m.admission for m in final.members} == {Admission.LIVE}
