"""Reload (SIGHUP, POST /v1/reload, `changeover balancer reload`) and binary
upgrade (`--take-over`) of the embedded balancer under the probe: the
listening sockets are never closed, so nothing fails, and admissions,
sessions and the release lock carry over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import WSMsgType, web

from changeover.balancers.factory import make_balancer
from changeover.config import load
from changeover.demo.app import build_app
from changeover.probe import AdmissionWatcher, ProbeReport, SessionLengths, run_probe
from tests.helpers import free_port, wait_until
from tests.integration.proxy_fixtures import (
    FakeMember,
    Site,
    auth,
    balancer_site,
    start_balancer,
    stop_process,
    topology_toml,
)
from tests.integration.proxy_fixtures import members as fake_members
from tests.integration.test_proxy_websocket import add_echo

Layout = dict[str, list[str]]


@contextlib.asynccontextmanager
async def apps(names: Layout) -> AsyncIterator[dict[str, FakeMember]]:
    """The sample app (member and version headers, a sticky JSESSIONID ending in
    the route, a streaming /slow) for every member, in this loop."""
    runners: list[web.AppRunner] = []
    found: dict[str, FakeMember] = {}
    try:
        for cluster, members in names.items():
            for name in members:
                runner = web.AppRunner(build_app(name, name, "v1"), access_log=None)
                runners.append(runner)
                await runner.setup()
                port = free_port()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                found[name] = FakeMember(name=name, cluster=cluster, route=name, port=port)
        yield found
    finally:
        for runner in runners:
            await runner.cleanup()


def write_config(site: Site, members: dict[str, FakeMember], layout: Layout) -> None:
    """The site's topology file with the clusters and members of `layout`."""
    chosen = [members[name] for names in layout.values() for name in names]
    public = int(site.public.rsplit(":", 1)[1])
    admin = int(site.admin.rsplit(":", 1)[1])
    site.config.write_text(topology_toml(chosen, public, admin, balancer=BALANCER))


BALANCER = {"reload_grace": "5s"}


@contextlib.asynccontextmanager
async def site_of(
    tmp_path: Path, members: dict[str, FakeMember], layout: Layout, *extra: str
) -> AsyncIterator[Site]:
    chosen = [members[name] for names in layout.values() for name in names]
    async with balancer_site(tmp_path, chosen, *extra, balancer=BALANCER) as site:
        yield site


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url, headers=auth()) as response:
        return response.status, await response.json(content_type=None)


async def reloads(site: Site) -> dict[str, Any]:
    async with aiohttp.ClientSession() as admin:
        status, body = await get(admin, site.admin + "/v1/reload")
    assert status == 200, body
    return dict(body)


async def reload_by_signal(site: Site) -> dict[str, Any]:
    """SIGHUP, then wait until the admin API reports the reload done (or refused)."""
    before = await reloads(site)
    site.process.send_signal(signal.SIGHUP)

    async def reported() -> bool:
        now = await reloads(site)
        return bool(now["attempts"] > before["attempts"])  # done or refused

    await wait_until(reported, timeout=30, what="the reload to be reported")
    return await reloads(site)


async def balancer_cli(site: Site, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHANGEOVER_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", "balancer", *args, "-c", str(site.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, " ".join(out.decode(errors="replace").split())


@contextlib.asynccontextmanager
async def probed(site: Site) -> AsyncIterator[list[ProbeReport]]:
    """The probe at 150 req/s with users coming and going, watching the admin
    API (a move off an OUT member is no break); its report once the block ends."""
    topology = load(site.config)
    balancer = make_balancer(topology)
    stop = asyncio.Event()
    report: list[ProbeReport] = []
    try:
        async with AdmissionWatcher(balancer, interval=0.05) as watcher:
            probe = asyncio.create_task(
                run_probe(
                    site.public + "/",
                    rate=150,
                    duration=120,
                    sticky_users=30,
                    stop=stop,
                    watcher=watcher,
                    sessions=SessionLengths(1.0, 3.0),
                    seed=11,
                )
            )
            try:
                await wait_until(
                    lambda: watcher.reads > 3, timeout=20, what="the watcher to read the pool"
                )
                yield report
            finally:
                stop.set()
                report.append(await probe)
    finally:
        await balancer.close()


async def pool(site: Site) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as admin:
        return await site.pool(admin)


async def requests_of(site: Site, member: str) -> int:
    return int((await pool(site)).get(member, {}).get("requests", 0))


async def traffic_reaches(site: Site, member: str, more: int = 20) -> None:
    start = await requests_of(site, member)

    async def grown() -> bool:
        return await requests_of(site, member) >= start + more

    await wait_until(grown, timeout=30, what=f"probe traffic through {member}")


def assert_clean(report: ProbeReport) -> None:
    assert report.failures == {}, report.failure_log or report.failure_examples
    assert report.session_breaks == 0 and report.sessions_cut == 0, report
    assert report.version_flaps == 0 and report.passed, report


def workers(site: Site) -> set[int]:
    return {p.pid for p in psutil.Process(site.process.pid).children()}


def listening(port: int) -> set[int]:
    """Inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            found.add(int(fields[9]))
    return found


def sockets_of(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def public_port(site: Site) -> int:
    return int(site.public.rsplit(":", 1)[1])


def old_gone(site: Site, old: set[int]) -> bool:
    """The workers before the reload have exited; as many new ones serve."""
    now = workers(site)
    return now.isdisjoint(old) and len(now) == len(old)


async def admit(site: Site, **admissions: str) -> None:
    body = {"admissions": admissions}
    async with (
        aiohttp.ClientSession() as admin,
        admin.post(site.admin + "/v1/admissions", json=body, headers=auth()) as response,
    ):
        assert response.status == 200, await response.text()


def admin_connections(pid: int, site: Site) -> list[Any]:
    """The admin API connections process `pid` holds open."""
    port = int(site.admin.rsplit(":", 1)[1])
    return [
        c
        for c in psutil.Process(pid).net_connections("tcp")
        if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


async def test_a_reload_that_adds_a_member_under_the_probe_loses_nothing(tmp_path: Path) -> None:
    before: Layout = {"a": ["a1", "a2"], "b": ["b1"]}
    after: Layout = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    async with (
        apps(after) as members,
        site_of(tmp_path, members, before, "--workers", "2") as site,
    ):
        await admit(site, a1="out")  # an admission set before the reload
        old_workers = workers(site)
        sockets = listening(public_port(site))
        assert len(sockets) == 2  # one per worker, held by the master
        async with probed(site) as report:
            await traffic_reaches(site, "b1")
            write_config(site, members, after)
            status = await reload_by_signal(site)
            assert status["ok"] is True and status["members"] == ["+b2"], status
            # The watcher's keep-alive admin connection was open in the master when
            # it forked the new workers: they hold no copy of it.
            assert admin_connections(site.process.pid, site)
            assert not [c for pid in workers(site) for c in admin_connections(pid, site)]
            await traffic_reaches(site, "b2")  # new users reach the new member
            await wait_until(lambda: old_gone(site, old_workers), timeout=30, what="old workers")
            await traffic_reaches(site, "a2")  # the users carry on with the new workers
        assert_clean(report[0])
        view = await pool(site)
        assert list(view) == ["a1", "a2", "b1", "b2"]
        assert view["a1"]["admission"] == "out" and view["a1"]["requests"] == 0
        assert view["b2"]["admission"] == "live" and view["b2"]["healthy"]
        log = site.log_text()
        assert "reloaded " in log and "members +b2" in log
        assert "the workers replaced by reload 1 have exited" in log
        assert listening(public_port(site)) == sockets  # the very same sockets, never closed


async def test_a_reload_that_removes_a_member_under_the_probe_loses_nothing(
    tmp_path: Path,
) -> None:
    before: Layout = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    after: Layout = {"a": ["a1", "a2"], "b": ["b1"]}
    async with (
        apps(before) as members,
        site_of(tmp_path, members, before, "--workers", "2") as site,
    ):
        await admit(site, b2="out")  # drained first, as an operator would
        old_workers = workers(site)
        async with probed(site) as report:
            await traffic_reaches(site, "b1")
            write_config(site, members, after)
            code, output = await balancer_cli(site, "reload")
            assert (code, output) == (0, "reloaded: -b2"), output
            await wait_until(lambda: old_gone(site, old_workers), timeout=30, what="old workers")
            await traffic_reaches(site, "a1")
            await traffic_reaches(site, "b1")
        assert_clean(report[0])
        view = await pool(site)
        assert list(view) == ["a1", "a2", "b1"]


async def test_admissions_sessions_and_a_long_response_survive_a_reload(tmp_path: Path) -> None:
    """a1 OUT and a2 DRAINING stay so; the sessions counted stay counted; a slow
    streaming response that began on an old worker ends complete."""
    before: Layout = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    after: Layout = {"a": ["a1", "a2"], "b": ["b1", "b2"], "c": ["c1"]}
    async with apps(after) as members, site_of(tmp_path, members, before) as site:
        for _ in range(8):  # eight users: each comes back with its session cookie
            jar = aiohttp.CookieJar(unsafe=True)  # cookies from 127.0.0.1
            async with aiohttp.ClientSession(cookie_jar=jar) as user:
                for _ in range(2):
                    async with user.get(site.public + "/") as response:
                        assert response.status == 200
        counted = {name: m["sessions"] for name, m in (await pool(site)).items()}
        assert sum(counted.values()) == 8, counted
        await admit(site, a1="out", a2="draining")

        async with (
            aiohttp.ClientSession() as slow_user,
            slow_user.get(site.public + "/slow?ms=3000") as slow,
        ):
            assert slow.status == 200  # the head is here, the body comes in 3 s
            write_config(site, members, after)
            status = await reload_by_signal(site)
            assert status["ok"] is True and status["members"] == ["+c1"]
            body = json.loads(await slow.read())
        assert body["slept_ms"] == 3000

        view = await pool(site)
        assert view["a1"]["admission"] == "out" and view["a2"]["admission"] == "draining"
        assert {n: view[n]["sessions"] for n in counted} == counted
        assert view["c1"]["admission"] == "live"


async def test_an_invalid_topology_keeps_the_old_one_serving(tmp_path: Path) -> None:
    layout: Layout = {"a": ["a1"], "b": ["b1"]}
    async with apps(layout) as members, site_of(tmp_path, members, layout) as site:
        good = site.config.read_text()
        old_workers = workers(site)
        site.config.write_text(good.replace("[[clusters]]", "[[clusters]]\nname = 3", 1))
        status = await reload_by_signal(site)
        assert status["ok"] is False and str(site.config) in status["error"]
        failed = [line for line in site.log_text().splitlines() if "reload failed" in line]
        assert len(failed) == 1 and "the old topology still serves" in failed[0], failed
        assert workers(site) == old_workers

        async with (
            aiohttp.ClientSession() as admin,
            admin.post(site.admin + "/v1/reload", headers=auth()) as response,
        ):
            assert response.status == 400
            refused = await response.json()
        assert str(site.config) in refused["error"] and refused["reload"]["ok"] is False
        code, output = await balancer_cli(site, "reload")  # refused before it is sent
        assert code == 2 and str(site.config) in output, output

        # A file that loads but cannot be served (a QA port someone else listens
        # on): the balancer refuses it, the command says so.
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            site.config.write_text(good.replace('name = "b"', f'name = "b"\nqa_port = {port}'))
            code, output = await balancer_cli(site, "reload")
        assert code == 1 and "reload failed, the old topology still serves" in output, output
        assert f"cannot listen on 127.0.0.1:{port}" in output, output
        assert workers(site) == old_workers

        async with aiohttp.ClientSession() as user:
            for _ in range(10):
                async with user.get(site.public + "/") as response:
                    assert response.status == 200
        assert list(await pool(site)) == ["a1", "b1"]

        moved = good.replace(site.admin.removeprefix("http://"), f"127.0.0.1:{free_port()}")
        site.config.write_text(moved)
        status = await reload_by_signal(site)
        assert status["ok"] is False and "admin_listen changed" in status["error"], status

        site.config.write_text(good)  # fixed: the next reload goes through
        code, output = await balancer_cli(site, "reload")
        assert (code, output) == (0, "reloaded: the same members"), output
        assert (await reloads(site))["ok"] is True


async def test_a_binary_upgrade_under_the_probe_loses_nothing(tmp_path: Path) -> None:
    """A second master takes the sockets, admissions, sessions and the release
    lock over (`--take-over`); the first finishes its requests and exits 0."""
    layout: Layout = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    async with (
        apps(layout) as members,
        site_of(tmp_path, members, layout, "--workers", "2") as site,
    ):
        await admit(site, a1="out")
        lock = {"owner": "test", "holder": "release #1 by the test", "ttl": 600}
        async with (
            aiohttp.ClientSession() as admin,
            admin.put(site.admin + "/v1/lock", json=lock, headers=auth()) as r,
        ):
            assert r.status == 200
        new_config = site.config.with_name("upgraded.toml")
        new_config.write_text(site.config.read_text())
        new: asyncio.subprocess.Process | None = None
        try:
            async with (
                probed(site) as report,
                aiohttp.ClientSession() as slow_user,
                slow_user.get(site.public + "/slow?ms=3000") as slow,
            ):
                await traffic_reaches(site, "b1")
                sessions = sum(m["sessions"] for m in (await pool(site)).values())
                sockets = listening(public_port(site))
                new, log = await start_balancer(new_config, "--workers", "2", "--take-over")
                assert sockets <= sockets_of(new.pid)  # passed over, not bound again
                assert await asyncio.wait_for(site.process.wait(), 60) == 0
                assert json.loads(await slow.read())["slept_ms"] == 3000
                await traffic_reaches(site, "a2")  # served by the new master now
            assert_clean(report[0])
            assert listening(public_port(site)) == sockets
            old_log = site.log_text()
            assert "balancer handed over" in old_log and "balancer stopped" in old_log
            assert "took the listeners and the pool state over" in log.read_text()
            view = await pool(site)
            assert view["a1"]["admission"] == "out" and view["a1"]["requests"] == 0
            assert sum(m["sessions"] for m in view.values()) >= sessions
            async with aiohttp.ClientSession() as admin:
                _, held = await get(admin, site.admin + "/v1/lock")
            assert held["holder"] == "release #1 by the test", held
        finally:
            if new is not None:
                await stop_process(new)


async def test_the_new_master_counts_the_old_workers_until_they_exit(tmp_path: Path) -> None:
    """After a take-over, the new master's GET /v1/pool counts what the old
    master's workers still carry (a WebSocket, a request in flight) from their
    shared memory, and their requests once each: those served before the
    take-over from the handed totals, those ending after it (a request counts
    when its response ends) from that memory; once the old master has exited,
    the figures are final."""
    layout: Layout = {"a": ["a1"], "b": ["b1"]}
    async with (
        apps(layout) as members,
        balancer_site(
            tmp_path, [members["a1"], members["b1"]], balancer={"reload_grace": "30s"}
        ) as site,
        aiohttp.ClientSession() as user,
    ):
        await admit(site, b1="out")  # everything on a1
        for _ in range(3):
            async with user.get(site.public + "/") as response:
                assert response.status == 200
        new: asyncio.subprocess.Process | None = None
        try:
            async with (
                user.ws_connect(site.public + "/ws") as ws,
                user.get(site.public + "/slow?ms=4000") as slow,
            ):
                served = await requests_of(site, "a1")  # /slow is not done: not yet counted
                new_config = site.config.with_name("upgraded.toml")
                new_config.write_text(site.config.read_text())
                new, log = await start_balancer(new_config, "--take-over")
                assert "took the listeners and the pool state over" in log.read_text()
                view = (await pool(site))["a1"]  # the new master answers now
                assert (view["tunnels"], view["active"]) == (1, 1), view
                assert view["requests"] == served  # counted once, not again from memory
                await ws.send_str("after the take-over")  # the old worker relays it
                assert await ws.receive_str(timeout=5) == "after the take-over"
                assert json.loads(await slow.read())["slept_ms"] == 4000

                async def settled(tunnels: int) -> bool:
                    view = (await pool(site))["a1"]
                    return (view["tunnels"], view["active"]) == (tunnels, 0)

                await wait_until(lambda: settled(1), what="the old worker's request done")
                assert await requests_of(site, "a1") == served + 1  # /slow, by the old worker
            await wait_until(lambda: settled(0), what="the old worker's tunnel closed")
            assert await asyncio.wait_for(site.process.wait(), 60) == 0
            await wait_until(
                lambda: "taken over from have exited" in log.read_text(),
                what="the new master to see the old workers gone",
            )
            assert await requests_of(site, "a1") == served + 1  # folded in, not lost
            async with user.get(site.public + "/") as response:
                assert response.status == 200
            assert await requests_of(site, "a1") == served + 2
        finally:
            if new is not None:
                await stop_process(new)


async def test_a_second_take_over_waits_until_the_first_ones_old_workers_are_gone(
    tmp_path: Path,
) -> None:
    """Only the master that took over learns when its predecessor's workers
    exit: while a request of theirs is in flight it refuses to hand over again
    (a third master would stop counting them), saying why, and serves on; once
    they are gone, the next take-over works."""
    layout: Layout = {"a": ["a1"], "b": ["b1"]}
    async with (
        apps(layout) as members,
        balancer_site(
            tmp_path, [members["a1"], members["b1"]], balancer={"reload_grace": "30s"}
        ) as site,
        aiohttp.ClientSession() as user,
    ):
        second = refused = third = None
        try:
            async with user.get(site.public + "/slow?ms=4000") as slow:
                copy = site.config.with_name("second.toml")
                copy.write_text(site.config.read_text())
                second, log = await start_balancer(copy, "--take-over")
                refused = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "changeover.proxy", "-c", str(copy), "--take-over",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                _, err = await asyncio.wait_for(refused.communicate(), 60)
                assert refused.returncode == 2, err
                assert "refused to hand over: the workers of the balancer it took over" in (
                    err.decode()
                )
                view = await pool(site)  # the second master still counts the first's request
                assert sum(view[m]["active"] for m in ("a1", "b1")) == 1, view
                assert json.loads(await slow.read())["slept_ms"] == 4000
            assert await asyncio.wait_for(site.process.wait(), 60) == 0
            await wait_until(
                lambda: "taken over from have exited" in log.read_text(),
                what="the second master to see the first one's workers gone",
            )
            again = site.config.with_name("third.toml")
            again.write_text(site.config.read_text())
            third, _ = await start_balancer(again, "--take-over")
            assert await asyncio.wait_for(second.wait(), 60) == 0
            async with user.get(site.public + "/") as response:
                assert response.status == 200
        finally:
            for process in (second, refused, third):
                if process is not None:
                    await stop_process(process)


async def test_a_take_over_that_fails_leaves_the_old_master_serving(tmp_path: Path) -> None:
    """The new master gets the sockets but cannot start (a QA port of its config
    is taken): the old one takes its admin API back and serves on."""
    layout: Layout = {"a": ["a1"], "b": ["b1"]}
    async with apps(layout) as members, site_of(tmp_path, members, layout) as site:
        await admit(site, b1="draining")
        new_config = site.config.with_name("upgraded.toml")
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            new_config.write_text(
                site.config.read_text().replace('name = "b"', f'name = "b"\nqa_port = {port}')
            )
            new = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "changeover.proxy", "-c", str(new_config), "--take-over",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                _, err = await asyncio.wait_for(new.communicate(), 60)
            finally:
                await stop_process(new)
        assert new.returncode == 2 and f"127.0.0.1:{port}" in err.decode(), err
        await wait_until(
            lambda: "did not take over: this one serves on" in site.log_text(),
            what="the old master to serve on",
        )
        assert site.process.returncode is None
        assert (await pool(site))["b1"]["admission"] == "draining"
        async with aiohttp.ClientSession() as user, user.get(site.public + "/") as response:
            assert response.status == 200
        # and a take-over that works still can
        good = site.config.with_name("good.toml")
        good.write_text(site.config.read_text())
        again, _ = await start_balancer(good, "--take-over")
        try:
            assert await asyncio.wait_for(site.process.wait(), 60) == 0
            assert (await pool(site))["b1"]["admission"] == "draining"
        finally:
            await stop_process(again)


async def test_a_websocket_open_across_a_reload_runs_on_until_the_grace_ends(
    tmp_path: Path,
) -> None:
    """The old worker keeps relaying the tunnel (still counted by the admin API)
    after the reload, and closes it with 1001 only once reload_grace is over."""
    async with (
        fake_members({"a": ["a1"], "b": ["b1"]}, extra_routes=add_echo) as started,
        balancer_site(tmp_path, started, balancer={"reload_grace": "3s"}) as site,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{site.public}/ws") as ws,
    ):
        old_workers = workers(site)
        status = await reload_by_signal(site)
        assert status["ok"] is True
        reloaded = asyncio.get_running_loop().time()
        await ws.send_str("after the reload")
        member, said = (await ws.receive_str(timeout=5)).split(":", 1)
        assert said == "after the reload"
        assert (await pool(site))[member]["tunnels"] == 1  # the old worker's, still counted
        message = await ws.receive(timeout=30)
        assert message.type is WSMsgType.CLOSE and ws.close_code == 1001, message
        assert asyncio.get_running_loop().time() - reloaded >= 2.5  # not before the grace
        await wait_until(lambda: old_gone(site, old_workers), timeout=30, what="old worker")
        assert (await pool(site))[member]["tunnels"] == 0
