"""The probe against real sample apps on loopback: rate, failures, moves, breaks, flaps;
its WebSocket users through the real balancer and against servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import WSCloseCode, WSMsgType, web

from changeover.demo.app import STATE, AppState, build_app
from changeover.model import Admission, MemberState, PoolView
from changeover.probe import AdmissionWatcher, ProbeReport, SessionLengths, run_probe
from tests.certs import ca_file, client_context, issue, server_context
from tests.helpers import free_port, wait_until
from tests.integration.proxy_fixtures import FakeMember, balancer_site, members
from tests.integration.test_sample_app import running_app

HOST = "127.0.0.1"


async def test_holds_1000_requests_per_second_on_schedule() -> None:
    async with running_app() as app:
        report = await run_probe(app.url + "/", rate=1000, duration=5, sticky_users=100)
    assert report.failures == {}, report.failure_examples
    assert report.sent == report.completed == report.ok == 5000
    assert abs(report.achieved_rate - 1000) < 30
    assert report.max_schedule_lag_ms < 100
    assert report.versions_seen == {"v1": 5000}
    assert report.session_moves == 0 and report.passed


@contextlib.asynccontextmanager
async def in_process_app(port: int, member: str, version: str) -> AsyncIterator[AppState]:
    """The sample app in the test's own loop, so a test can await what it has served;
    leaving stops it the way SIGTERM does (listener closed, requests in flight finished)."""
    app = build_app(member, member, version)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield app[STATE]
    finally:
        await runner.cleanup()


def served(state: AppState) -> int:
    return sum(state.sessions.values())


async def test_an_app_stopped_mid_run_shows_as_connect_failures() -> None:
    port = free_port()
    url = f"http://{HOST}:{port}/"
    async with in_process_app(port, "a1", "v1") as state:
        probe = asyncio.create_task(run_probe(url, rate=200, duration=2, sticky_users=10))
        await wait_until(lambda: served(state) >= 100, what="100 requests served")
    report = await probe  # the app stopped after about 0.5 s of the 2 s run
    assert report.sent == 400
    assert 100 <= report.ok < 400
    assert report.failures.get("connect", 0) >= 200, report.failures
    assert report.sent == report.completed + sum(report.failures.values())
    assert not report.passed
    # The first failures, each with when it was due and whose session it carried.
    assert len(report.failure_log) == 20
    first = float(report.failure_log[0].split("s:")[0].removeprefix("at "))
    assert 0.4 < first < 2.0, report.failure_log[0]
    assert "connect" in report.failure_log[0] and " of a1" in report.failure_log[0]


class FakePool:
    """A balancer whose admissions the test sets by hand."""

    def __init__(self, **admissions: Admission) -> None:
        self.admissions = admissions

    async def read(self) -> PoolView:
        return PoolView(
            tuple(MemberState(n, n[0], a, healthy=True) for n, a in self.admissions.items())
        )


async def test_moves_off_a_member_taken_out_are_cut_and_others_broken() -> None:
    """Swap the member behind one port: a1 (v1) -> b1 (v2) after a1 left the pool
    (20 sessions cut: not excused), then back to a1 (v1) while b1 is still
    admitted: 20 broken and 20 flaps."""
    port = free_port()
    url = f"http://{HOST}:{port}/"
    pool = FakePool(a1=Admission.LIVE, b1=Admission.OUT)
    stop = asyncio.Event()
    async with AdmissionWatcher(pool, interval=0.02) as watcher:
        probe = asyncio.create_task(
            run_probe(url, rate=200, duration=30, sticky_users=20, stop=stop, watcher=watcher)
        )
        async with in_process_app(port, "a1", "v1") as a1:
            await wait_until(lambda: served(a1) >= 100, what="every user on a1")
            pool.admissions = {"a1": Admission.OUT, "b1": Admission.LIVE}
            await wait_until(lambda: _seen(watcher, "a1", Admission.OUT), what="a1 out")
        async with in_process_app(port, "b1", "v2") as b1:
            await wait_until(lambda: served(b1) >= 100, what="every user moved to b1")
        async with in_process_app(port, "a1", "v1") as a1_again:  # b1 still LIVE: breaks
            await wait_until(lambda: served(a1_again) >= 100, what="every user back on a1")
            stop.set()
            report = await probe
    assert report.session_moves == 40
    assert report.session_breaks == 20
    assert report.sessions_cut == 20
    assert report.version_flaps == 20
    assert set(report.versions_seen) == {"v1", "v2"}
    assert set(report.members_seen) == {"a1", "b1"}
    assert report.watched and report.admission_reads > 0
    assert not report.passed


async def test_users_leave_after_their_session_and_new_ones_arrive() -> None:
    """10 users at 100 req/s think 0.1 s; each stays 0.3 s on average, 0.6 s at
    most: over 3 s some 100 users come and go, and a newcomer's first request
    (no cookie, a new session) is neither a move nor a flap."""
    port = free_port()
    async with in_process_app(port, "a1", "v1") as state:
        report = await run_probe(
            f"http://{HOST}:{port}/",
            rate=100,
            duration=3,
            sticky_users=10,
            sessions=SessionLengths(0.3, 0.6),
            seed=1,
        )
    assert report.failures == {}, report.failure_examples
    assert 60 <= report.users_arrived <= 200, report.users_arrived
    # Each user took its session along when it left: the app saw one per user (a
    # reply still in flight when its user left may make one more or less).
    assert abs(len(state.sessions) - report.users_arrived) <= 2
    # Every answer is in the totals, those to users who had left included.
    assert sum(report.versions_seen.values()) == report.completed == report.sent
    assert report.think_time == 0.1
    assert (report.session_mean, report.session_max) == (0.3, 0.6)
    assert report.session_moves == 0 and report.version_flaps == 0 and report.passed


def _seen(watcher: AdmissionWatcher, member: str, admission: Admission) -> bool:
    """Whether the watcher's latest read shows `member` with `admission`."""
    last = watcher.timeline.last_read
    view = watcher.timeline.at_or_before(last) if last is not None else None
    return view is not None and view.get(member) == admission


async def test_probe_process_stops_on_sigterm_and_prints_its_json_report() -> None:
    """`python -m changeover.probe` as the demo runs it, watching a fake admin API."""
    token = "s3cret"
    reads: list[str] = []

    async def pool(request: web.Request) -> web.Response:
        reads.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401)
        doc = {"members": [{"name": "a1", "cluster": "a", "admission": "live", "healthy": True}]}
        return web.json_response(doc)

    admin = web.Application()
    admin.router.add_get("/v1/pool", pool)
    admin_runner = web.AppRunner(admin)
    await admin_runner.setup()
    admin_port = free_port()
    await web.TCPSite(admin_runner, HOST, admin_port).start()
    port = free_port()
    try:
        async with in_process_app(port, "a1", "v1") as state:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "changeover.probe",
                f"http://{HOST}:{port}/",
                "--rate=100",
                "--duration=60",
                "--sticky-users=10",
                "--json",
                f"--watch-admin=http://{HOST}:{admin_port}",
                "--token-env=PROBE_TEST_TOKEN",
                "--ws-users=5",
                "--ws-interval=0.1",
                env={**os.environ, "PROBE_TEST_TOKEN": token},
                stdout=asyncio.subprocess.PIPE,
            )

            def talking() -> bool:
                return served(state) >= 50 and len(reads) >= 3 and len(state.sockets) == 5

            await wait_until(talking, what="traffic and 5 WebSockets")
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
    finally:
        await admin_runner.cleanup()
    assert proc.returncode == 0
    report = ProbeReport.from_dict(json.loads(out))
    assert report.passed and report.duration < 30
    assert report.sent == report.ok >= 50
    assert report.watched and report.admission_reads >= 3
    assert report.admission_read_failures == 0
    assert set(reads) == {f"Bearer {token}"}
    # The sample app's /ws echoed; the probe closed its WebSockets itself at the end.
    assert (report.ws_users, report.ws_opened, report.ws_interval) == (5, 5, 0.1)
    assert report.ws_echoed >= 5 and report.ws_abnormal_closes == {}
    assert report.ws_normal_closes == {} and report.ws_reconnects == 0


async def test_the_probe_command_trusts_a_private_ca_only_when_told(tmp_path: Path) -> None:
    """`changeover probe --ca-file`: HTTPS behind a private CA verifies; without
    the file every request fails certificate verification (exit 1)."""
    ca = trustme.CA()
    pair = issue(ca, tmp_path, "app", "127.0.0.1")
    app = build_app("a1", "a1", "v1")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port, ssl_context=server_context(pair)).start()
    url = f"https://{HOST}:{port}/"
    base = ("-m", "changeover.cli", "probe", url, "--rate", "50", "--duration", "1", "--json")
    try:
        runs = {}
        for trusted in (True, False):
            extra = ("--ca-file", str(ca_file(ca, tmp_path))) if trusted else ()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *base, *extra, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            runs[trusted] = (proc.returncode, ProbeReport.from_dict(json.loads(out)))
    finally:
        await runner.cleanup()
    code, report = runs[True]
    assert code == 0 and report.ok == report.sent == 50, report.failures
    code, report = runs[False]
    assert code == 1 and report.ok == 0 and report.sent == 50, report.failures


# --- WebSocket users -------------------------------------------------------------------


def add_exact_echo(member: FakeMember, app: web.Application) -> None:
    """GET /ws on a fake member: echoes as it came, its 101 naming the member."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        ws.headers["X-Changeover-Member"] = member.name
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    app.router.add_get("/ws", echo)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_websocket_users_closed_1001_at_out_reconnect_through_the_balancer(
    tmp_path: Path, tls: bool
) -> None:
    """20 WebSocket users on a1 behind the real balancer (wss: on its TLS
    listener); a1 drains (they stay), then goes out: each is closed with 1001,
    spread over close_spread, and reconnects through the balancer to b1. No
    abnormal close, and no second holds more than the share the spread allows."""
    users, spread = 20, 2.0
    stop = asyncio.Event()
    settings: dict[str, str] = {"close_spread": f"{spread:g}s"}
    verify: bool | ssl.SSLContext = True
    if tls:
        ca = trustme.CA()
        pair = issue(ca, tmp_path / "certs", "site", "127.0.0.1")
        settings |= {"tls_cert": str(pair.cert), "tls_key": str(pair.key)}
        verify = client_context(ca)
    async with (
        members({"a": ["a1"], "b": ["b1"]}, extra_routes=add_exact_echo) as started,
        balancer_site(tmp_path, started, balancer=settings) as site,
        aiohttp.ClientSession() as admin,
    ):
        await site.admit(admin, b1="out")
        scheme = "https://" if tls else "http://"
        probe = asyncio.create_task(
            run_probe(
                site.public.replace("http://", scheme) + "/",
                rate=50,
                duration=60,
                sticky_users=5,
                stop=stop,
                ws_users=users,
                ws_interval=0.2,
                verify_tls=verify,
            )
        )

        async def tunnels(**expected: int) -> bool:
            pool = await site.pool(admin)
            return all(pool[name]["tunnels"] == n for name, n in expected.items())

        await wait_until(lambda: tunnels(a1=users), timeout=20, what="every user on a1")
        await site.admit(admin, a1="draining", b1="live")
        await wait_until(lambda: tunnels(a1=users, b1=0), what="a1's tunnels kept while it drains")
        await site.admit(admin, a1="out")
        await wait_until(lambda: tunnels(a1=0, b1=users), timeout=20, what="all moved to b1")
        stop.set()
        report = await probe
    assert report.ws_abnormal_closes == {}, report.failure_examples
    assert report.ws_normal_closes == {"a1": users}
    assert report.ws_reconnects == users and report.ws_waiting_to_reconnect == 0
    assert report.ws_opened == 2 * users
    assert report.ws_echoed > users
    # Closes at i * spread / users: ceil(users / spread) in a second; the 0.25 s
    # margin covers when the balancer's timers and the probe's loop get to run
    # on a busy box (tests/e2e/test_release_websockets.py says more).
    assert report.ws_max_reconnects_per_second <= math.ceil(users * 1.25 / spread)
    assert report.failed == 0 and report.passed


class Misbehaving:
    """A WebSocket server that ends its connections the way `how` says, after
    answering the first message properly."""

    def __init__(self, how: str) -> None:
        self.how = how

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.how == "refuse":
            return web.Response(status=403, text="no")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive()
        await ws.send_str(first.data)
        second = await ws.receive()
        if self.how == "mismatch":
            await ws.send_str(f"not {second.data}")
        elif self.how == "drop" and request.transport is not None:
            request.transport.abort()  # no close frame
        elif self.how == "close-1011":
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)
        elif self.how == "going-away":
            await ws.close(code=WSCloseCode.GOING_AWAY)
        # "silent": no answer to the second message
        async for _ in ws:
            pass
        return ws


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        ("refuse", "handshake"),
        ("mismatch", "echo_mismatch"),
        ("silent", "echo_timeout"),
        ("drop", "no_close_frame"),
        ("close-1011", "close_code"),
        ("going-away", None),  # the one normal end: closed with 1001, then a reconnect
    ],
)
async def test_every_end_of_a_websocket_but_1001_is_abnormal(how: str, kind: str | None) -> None:
    server = Misbehaving(how)
    app = web.Application()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    app.router.add_get("/ws", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        report = await run_probe(
            f"http://{HOST}:{port}/",
            rate=20,
            duration=2,
            sticky_users=2,
            timeout=0.3,
            ws_users=2,
            ws_interval=0.1,
        )
    finally:
        await runner.cleanup()
    assert report.failed == 0  # the HTTP users saw nothing wrong
    if kind is None:
        assert report.ws_abnormal_closes == {}, report.failure_examples
        assert report.ws_normal_closes["?"] >= 2  # no member header on this server
        assert report.ws_reconnects >= 2 and report.passed
        return
    assert set(report.ws_abnormal_closes) == {kind}, report.failure_examples
    assert report.ws_abnormal_closes[kind] >= 2  # each user, and again on each retry
    assert report.ws_reconnects == 0 and not report.passed
    assert any(e.startswith(f"ws {kind}: ") for e in report.failure_examples)
    assert any(f"ws {kind} (" in line for line in report.failure_log)
