"""Balancer instances on other hosts: two HAProxy (or Apache, or nginx) instances, each
behind its own real sshd on its own loopback address, changed as one group
through SSH (config by SFTP, the check and the reload run there, the runtime
API through the connection), a whole release under two probes (one per
instance, as users behind DNS reach either); and one instance refusing half-way.

All "hosts" are this machine: every instance has its own run directory (config,
pid file, stats socket, logs), its own listeners on its own address
(`bind_host`) and, for nginx, its own flag directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from changeover import journal as J
from changeover.balancers.factory import DRIVERS, make_balancer
from changeover.balancers.group import BalancerGroup
from changeover.balancers.process import ConfiguredBalancer
from changeover.config import BalancerInstance, Topology
from changeover.engine import Event
from changeover.model import Admission, PoolView, cluster_admission
from changeover.probe import ProbeReport
from tests.helpers import wait_until
from tests.integration.realbalancers import (
    RealBalancer,
    finish_probe,
    instance_for,
    need,
    parse_site,
    probe_process,
    searchable_dir,
    start_balancer,
    stop_balancer,
    toml_document,
)
from tests.integration.sshd import SshdServer, running_sshd
from tests.integration.test_driver_release import (
    members_up,
    release_site,
    release_with,
    run_on_members,
    under_load,
    versions_served,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

ADDRESSES = ("127.0.31.1", "127.0.31.2")
RATE = 60.0  # per probe, one probe per instance
STICKY_USERS = 15


# lb2's check, on its host: while the file $1 exists it refuses, except that
# with "$1.once" there too it passes once more (the group's check before any
# change), then refuses (the check of the change itself); else the product's own.
REFUSING = (
    'if [ -e "$1" ]; then '
    'if [ -e "$1.once" ]; then rm -f -- "$1.once"; '
    'else echo "refused: $1 exists" >&2; exit 1; fi; '
    'fi; shift; exec "$@"'
)


# Every instance's check, on its host: the server address of the SSH connection
# it runs under (the third word of $SSH_CONNECTION; "none" outside SSH) appended
# to $1, then the product's own check.
WITNESSED = 'printf "%s\\n" "${SSH_CONNECTION:-none}" >> "$1"; shift; exec "$@"'
CHECKS_LOG = "checks.log"


def product_check(product: str, instance: dict[str, Any]) -> list[str]:
    """The check command `instance` of `product` would run: its own, else the driver's."""
    driver = DRIVERS[product]
    assert isinstance(driver, type) and issubclass(driver, ConfiguredBalancer), driver
    return list(instance.get("check_command") or driver.default_check)


def checked_on(run_dir: Path) -> list[str]:
    """The server address of each check the instance of `run_dir` ran, in order."""
    log = run_dir / CHECKS_LOG
    lines = log.read_text().splitlines() if log.exists() else []
    return [(line.split() + ["none"] * 3)[2] for line in lines]


@dataclass
class RemoteSite:
    data: dict[str, Any]
    topology: Topology
    servers: list[SshdServer]
    balancers: list[RealBalancer]
    sshd_stacks: list[contextlib.AsyncExitStack]
    root: Path

    def url(self, index: int) -> str:
        return f"http://{ADDRESSES[index]}:{self.topology.balancer.listen.port}"

    def site_file(self, index: int) -> Path:
        """A changeover.toml naming instance `index` only, for its probe's watcher.
        The watcher stands for an observer on that host: it reads the instance
        directly (every "host" is this machine), so its reads neither cost SSH
        crypto on this shared CPU nor stop when that instance's sshd does."""
        data = dict(self.data)
        data["balancer"] = dict(data["balancer"])
        instance = dict(data["balancer"]["instances"][index])
        for key in ("ssh_host", "ssh_port"):
            instance.pop(key)
        data["balancer"]["instances"] = [instance]
        path = self.root / f"probe-site-{index}.toml"
        path.write_text(toml_document(data))
        return path

    async def stop_sshd(self, index: int) -> None:
        await self.sshd_stacks[index].aclose()


def instance_data(product: str, root: Path, index: int, server: SshdServer) -> dict[str, Any]:
    run_dir = root / f"lb{index + 1}"
    state_dir = searchable_dir("changeover-remote-state-") if product == "nginx" else None
    data = instance_for(product, run_dir, f"lb{index + 1}", state_dir=state_dir)
    witness = ["sh", "-c", WITNESSED, "witness", str(run_dir / CHECKS_LOG)]
    data["check_command"] = [*witness, *product_check(product, data)]
    return data | {
        # Its pid file, logs and runtime files (Apache's ServerRoot and shared
        # memory) on "its host", as the instance was started with.
        "run_dir": str(run_dir),
        "ssh_host": ADDRESSES[index],
        "ssh_port": server.port,
        "bind_host": ADDRESSES[index],
    }


@contextlib.asynccontextmanager
async def remote_site(
    product: str, root: Path, refuse: Path | None = None
) -> AsyncIterator[RemoteSite]:
    """Members, two sshd, two instances of `product` started and healthy.
    `refuse`: lb2's check refuses while that file exists (see REFUSING)."""
    need(product)
    stacks = [contextlib.AsyncExitStack(), contextlib.AsyncExitStack()]
    balancers: list[RealBalancer] = []
    topology: Topology | None = None
    try:
        first = await stacks[0].enter_async_context(running_sshd([ADDRESSES[0]]))
        second = await stacks[1].enter_async_context(
            running_sshd([ADDRESSES[1]], client_key=first.key_file)
        )
        servers = [first, second]
        known_hosts = root / "known_hosts"
        known_hosts.write_text("".join(s.known_hosts.read_text() for s in servers))
        key = root / "id_ed25519"
        shutil.copy(first.key_file, key)
        key.chmod(0o600)
        # Two balancers check the members, SSH handshakes and sessions (sshd and
        # the engine) come in bursts: members must not be starved into timeouts.
        data = under_load(release_site(product, root))
        listen = data["balancer"]["listen"].rsplit(":", 1)[1]
        admin = data["balancer"]["admin_listen"].rsplit(":", 1)[1]
        data["balancer"]["listen"] = f"{ADDRESSES[0]}:{listen}"
        data["balancer"]["admin_listen"] = f"{ADDRESSES[0]}:{admin}"
        instances = [instance_data(product, root, i, s) for i, s in enumerate(servers)]
        if refuse is not None:
            check = product_check(product, instances[1])
            instances[1]["check_command"] = ["sh", "-c", REFUSING, "check", str(refuse), *check]
        data["balancer"]["instances"] = instances
        data["executor"]["ssh"] = {
            "user": first.user,
            "key_file": str(key),
            "known_hosts": str(known_hosts),
        }
        topology = parse_site(data, root)
        await run_on_members(topology, "deploy", "1.0")
        await run_on_members(topology, "start")
        await wait_until(lambda: members_up(topology), timeout=60, what="members listening")
        for index in range(2):
            instance = BalancerInstance.model_validate(instances[index])
            run_dir = root / instance.name
            balancers.append(
                await start_balancer(product, topology, run_dir, instance=instance, timeout=30)
            )
        yield RemoteSite(data, topology, servers, balancers, stacks, root)
    finally:
        for real in balancers:
            await stop_balancer(real)
        if topology is not None:
            await run_on_members(topology, "stop")
        for stack in reversed(stacks):
            await stack.aclose()


async def release_under_probes(
    site: RemoteSite,
    version: str,
    during: Callable[[list[Event]], Coroutine[Any, Any, None]] | None = None,
) -> tuple[str, list[J.StepRow], list[Event], list[ProbeReport]]:
    """The engine releases `version` through the group while a probe runs against
    each instance; `during(events)` runs beside the release."""
    events: list[Event] = []
    async with contextlib.AsyncExitStack() as stack:
        probes = [
            await stack.enter_async_context(
                probe_process(
                    site.site_file(i),
                    site.url(i),
                    rate=RATE,
                    sticky_users=STICKY_USERS,
                    log=site.root / f"probe-{i}.log",
                )
            )
            for i in range(2)
        ]
        await asyncio.sleep(1.0)  # sticky sessions form before the release
        balancer = make_balancer(site.topology)
        assert isinstance(balancer, BalancerGroup)
        side = during(events) if during else None
        state, steps, _ = await release_with(site.topology, balancer, version, events, side)
        await asyncio.sleep(1.0)  # traffic after the release counts too
        reports = [await finish_probe(p) for p in probes]
    return state, steps, events, reports


def assert_no_user_noticed(reports: list[ProbeReport]) -> None:
    for report in reports:
        assert report.failed == 0, (report.failure_examples, report.failure_log)
        assert report.session_breaks == 0
        assert report.sessions_cut == 0
        assert report.version_flaps == 0


def why(events: list[Event]) -> str:
    return "\n".join(f"{e.kind}: {e.message}" for e in events)


async def step_started(events: list[Event], step_id: str) -> None:
    def started() -> bool:
        return any(e.kind == "step-start" and e.step and e.step.id == step_id for e in events)

    await wait_until(started, timeout=120, what=f"step {step_id}")


@pytest.mark.parametrize("product", ["haproxy", "apache", "nginx"])
async def test_release_through_two_instances_on_other_hosts(product: str, tmp_path: Path) -> None:
    run_dirs = [tmp_path / f"lb{i + 1}" for i in range(2)]
    async with remote_site(product, tmp_path) as site:
        before = [s.accepted() for s in site.servers]
        checks_before = [len(checked_on(d)) for d in run_dirs]
        state, steps, events, reports = await release_under_probes(site, "2.0")
        assert state == J.DONE, why(events)
        views = [await real.driver.read() for real in site.balancers]
        served = await versions_served(site.topology)
        accepted = [s.accepted() - b for s, b in zip(site.servers, before, strict=True)]
        configs = [(d / f"{product}.conf").read_text() for d in run_dirs]
    assert all(s.state == J.STEP_DONE for s in steps)
    # Every check ran on the instance's own host, under its own sshd; HAProxy's
    # and Apache's files carry every admission, so each change was checked there
    # and installed there (renamed over the file: no temporary left beside it).
    # nginx changes whole clusters by its flag files, without a new config.
    for index, run_dir in enumerate(run_dirs):
        seen = checked_on(run_dir)
        assert seen and set(seen) == {ADDRESSES[index]}, seen
        assert not list(run_dir.glob(f".{product}.conf.changeover-*"))
        if product != "nginx":
            assert len(seen) > checks_before[index], seen
            admissions = dict.fromkeys((m.name for _, m in site.topology.members()), "live")
            assert f"Admissions: {json.dumps(admissions, separators=(',', ':'))}" in configs[index]
    assert_no_user_noticed(reports)
    for report in reports:  # each instance served both versions: the release went through it
        assert set(report.versions_seen) == {"1.0", "2.0"}
    assert served == {"2.0"}
    for view in views:
        assert {m.admission for m in view.members} == {Admission.LIVE}
    # Every instance was reached over its own sshd, on one connection for the release.
    assert accepted == [1, 1], accepted


def refusal_at_the_swap(
    refuse: Path, *, once: bool
) -> Callable[[list[Event]], Coroutine[Any, Any, None]]:
    """From the swap on (once cluster a is checked), lb2's check refuses;
    `once`: it passes the group's check first, then refuses the change itself."""

    async def refuse_there(events: list[Event]) -> None:
        await step_started(events, "healthy-a")
        if once:
            await asyncio.to_thread(Path(f"{refuse}.once").touch)
        await asyncio.to_thread(refuse.touch)

    return refuse_there


async def refused_release(
    refuse: Path, *, once: bool
) -> tuple[str, list[J.StepRow], list[Event], list[ProbeReport], PoolView]:
    """A release through two HAProxy instances whose lb2 refuses from the swap on
    (`refusal_at_the_swap`), under the probes; and the group's view after it."""
    async with remote_site("haproxy", refuse.parent, refuse=refuse) as site:
        during = refusal_at_the_swap(refuse, once=once)
        state, steps, events, reports = await release_under_probes(site, "2.0", during)
        return state, steps, events, reports, await group_view(site)


async def group_view(site: RemoteSite) -> PoolView:
    group = make_balancer(site.topology)
    try:
        return await group.read()  # refuses if the instances disagree
    finally:
        await group.close()


def swap_failure(steps: list[J.StepRow]) -> str:
    failed = {s.step_id: s.detail or "" for s in steps if s.state == J.STEP_FAILED}
    assert list(failed) == ["drain-b"], failed
    return failed["drain-b"]


def still_b_live(view: PoolView) -> bool:
    clusters = {c: cluster_admission(view, c) for c in ("a", "b")}
    return clusters == {"a": Admission.OUT, "b": Admission.LIVE}


async def test_an_instance_whose_check_refuses_changes_no_instance(tmp_path: Path) -> None:
    """lb2's check refuses the swap: the group's check before any change finds
    it, so lb1 never changes either; both agree (b live, a out), nobody noticed."""
    refuse = tmp_path / "refuse-lb2"
    state, steps, events, reports, view = await refused_release(refuse, once=False)
    assert state == J.FAILED, why(events)
    detail = swap_failure(steps)
    assert "refused by 1 of 2 balancers before any changed" in detail, detail
    assert "no instance was changed" in detail, detail
    assert f"haproxy on root@{ADDRESSES[1]}:" in detail and "rejected the new config" in detail
    assert f"refused: {refuse} exists" in detail, detail
    assert still_b_live(view)
    assert_no_user_noticed(reports)


async def test_an_instance_refusing_mid_apply_is_undone_on_the_others(tmp_path: Path) -> None:
    """lb2 passes the group's check, then refuses the change itself: lb1, changed
    already, is put back; both agree (b live, a out) and no request failed. The
    users who began a session on a in that moment are moved back to b (cut)."""
    refuse = tmp_path / "refuse-lb2"
    state, steps, events, reports, view = await refused_release(refuse, once=True)
    assert state == J.FAILED, why(events)
    swap_failure(steps)
    # The first attempt changed lb1 and was undone; the engine's retries were then
    # refused by the group's check, before any change.
    first = next(e.message for e in events if e.kind == "warn" and "balancer change" in e.message)
    assert "the change failed on 1 of 2 balancers (lb2: " in first, first
    assert f"refused: {refuse} exists" in first, first
    assert "every instance was put back as it was" in first, first
    assert still_b_live(view)
    for report in reports:
        assert report.failed == 0, (report.failure_examples, report.failure_log)
        assert report.session_breaks == 0


async def test_an_instance_whose_sshd_stops_fails_the_change_and_the_site_serves_on(
    tmp_path: Path,
) -> None:
    """lb2's sshd stops while cluster a is checked: the next step that reads or
    changes the group cannot reach lb2 and fails, naming it; no swap happens,
    lb1 stays as it was (b live, a out), and both nginx instances keep serving."""
    stopped = asyncio.Event()

    async def stop_lb2_sshd(events: list[Event]) -> None:
        await step_started(events, "healthy-a")
        await site.stop_sshd(1)
        stopped.set()

    async with remote_site("nginx", tmp_path) as site:
        state, steps, events, reports = await release_under_probes(site, "2.0", stop_lb2_sshd)
        lb1 = await site.balancers[0].driver.read()
        assert stopped.is_set()
    assert state == J.FAILED, why(events)
    states = {s.step_id: s.state for s in steps}
    failed = [s.detail or "" for s in steps if s.state == J.STEP_FAILED]
    assert len(failed) == 1 and states["drain-b"] != J.STEP_DONE, states
    assert f"lb2: cannot connect to root@{ADDRESSES[1]}:" in failed[0], failed
    assert still_b_live(lb1)
    assert_no_user_noticed(reports)
