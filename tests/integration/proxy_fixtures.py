"""Harness for the embedded balancer's integration tests.

Small aiohttp upstream apps on ephemeral loopback ports (one per member) that
say which member served, set JSESSIONID=<id>.<route>, stream big bodies and can
be made unhealthy; and the real balancer started as a subprocess
(`python -m changeover.proxy -c FILE`) in front of them. Both are async context
managers that always stop what they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from tests.helpers import free_port, toml_value, wait_until

TOKEN = "test-admin-token"
CHUNK = 256 * 1024


@dataclass
class FakeMember:
    """One upstream app server; the test flips `healthy` to fail its health check."""

    name: str
    cluster: str
    route: str
    port: int = 0
    healthy: bool = True
    served: int = 0
    streamed: int = 0  # download bytes written so far (backpressure shows as a stall)
    peers: set[tuple[str, int]] = field(default_factory=set)  # distinct client connections
    headers: list[dict[str, str]] = field(default_factory=list)
    uploads: list[int] = field(default_factory=list)  # sizes of the bodies read to their end
    runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/", self.hello)
        app.router.add_get("/plain", self.plain)
        app.router.add_get("/headers", self.echo_headers)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/download", self.download)
        app.router.add_get("/slow", self.slow)
        return app

    def _seen(self, request: web.Request) -> None:
        self.served += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add((str(peer[0]), int(peer[1])))

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(
            text="ok" if self.healthy else "sick", status=200 if self.healthy else 503
        )

    async def hello(self, request: web.Request) -> web.Response:
        """Like a Java app server: a session cookie whose suffix is the route."""
        self._seen(request)
        response = web.json_response({"member": self.name, "cluster": self.cluster})
        session = request.cookies.get("JSESSIONID", "")
        if not session.endswith(f".{self.route}"):
            response.set_cookie("JSESSIONID", f"{uuid.uuid4().hex}.{self.route}", path="/")
        return response

    async def plain(self, request: web.Request) -> web.Response:
        """An app that sets no cookie (the balancer inserts its route cookie); it
        names the balancer's source port, which tells which worker sent it."""
        self._seen(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = peer[1] if peer else 0
        return web.json_response({"member": self.name, "cluster": self.cluster, "peer": port})

    async def echo_headers(self, request: web.Request) -> web.Response:
        self._seen(request)
        self.headers.append(dict(request.headers))
        return web.json_response({"member": self.name, "headers": dict(request.headers)})

    async def upload(self, request: web.Request) -> web.Response:
        self._seen(request)
        total = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            total += len(chunk)
        self.uploads.append(total)
        return web.json_response({"member": self.name, "received": total})

    async def download(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        size = int(request.query["size"])
        response = web.StreamResponse()
        if request.query.get("chunked") != "1":
            response.content_length = size
        await response.prepare(request)
        block = b"x" * CHUNK
        left = size
        while left > 0:
            await response.write(block[: min(left, CHUNK)])
            self.streamed += min(left, CHUNK)
            left -= CHUNK
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.json_response({"member": self.name, "cluster": self.cluster})


@contextlib.asynccontextmanager
async def members(
    layout: dict[str, list[str]],
    extra_routes: Callable[[FakeMember, web.Application], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[list[FakeMember]]:
    """Start one app per member: {"a": ["a1", "a2"], "b": [...]} (route = member name);
    `extra_routes` adds a test's own handlers to each member's app; with
    `ssl_context` the members speak HTTPS only."""
    started: list[FakeMember] = []
    try:
        for cluster, names in layout.items():
            for name in names:
                member = FakeMember(name=name, cluster=cluster, route=name)
                app = member.app()
                if extra_routes is not None:
                    extra_routes(member, app)
                member.runner = web.AppRunner(app, access_log=None)
                await member.runner.setup()
                site = web.TCPSite(member.runner, "127.0.0.1", 0, ssl_context=ssl_context)
                await site.start()
                member.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                started.append(member)
        yield started
    finally:
        for member in started:
            if member.runner is not None:
                await member.runner.cleanup()


@dataclass
class Site:
    """The balancer subprocess and its addresses."""

    process: asyncio.subprocess.Process
    config: Path
    log: Path
    public: str
    admin: str
    qa: dict[str, str]  # cluster -> QA listener URL

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        """Resident memory of the master and its workers, in bytes."""
        parent = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children()])

    def worker_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.process.pid).children()]

    async def pool(self, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        async with session.get(f"{self.admin}/v1/pool", headers=auth()) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        return {m["name"]: m for m in body["members"]}

    async def admit(
        self, session: aiohttp.ClientSession, *, force: bool = False, **admissions: str
    ) -> dict[str, Any]:
        """Change admissions; `force` past the interlock (e.g. to take everything out)."""
        body: dict[str, Any] = {"admissions": admissions} | ({"force": True} if force else {})
        async with session.post(f"{self.admin}/v1/admissions", json=body, headers=auth()) as r:
            answer: dict[str, Any] = await r.json()
            assert r.status == 200, answer
            return answer


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def topology_toml(
    started: list[FakeMember],
    public_port: int,
    admin_port: int,
    qa_ports: dict[str, int] | None = None,
    qa_hosts: dict[str, str] | None = None,
    balancer: dict[str, Any] | None = None,
) -> str:
    """A changeover.toml for these members (health checks every 0.1s)."""
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{public_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "admin_token": TOKEN,
        **(balancer or {}),
    }
    lines = ["[site]", 'name = "proxy-test"', "", "[balancer]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    lines += [
        "",
        "[balancer.health]",
        'interval = "100ms"',
        'timeout = "1s"',
        "rise = 2",
        "fall = 2",
    ]
    for cluster in dict.fromkeys(m.cluster for m in started):
        lines += ["", "[[clusters]]", f'name = "{cluster}"']
        if qa_ports and cluster in qa_ports:
            lines.append(f"qa_port = {qa_ports[cluster]}")
        if qa_hosts and cluster in qa_hosts:
            lines.append(f'qa_host = "{qa_hosts[cluster]}"')
        for m in started:
            if m.cluster == cluster:
                lines += [
                    "[[clusters.members]]",
                    f'name = "{m.name}"',
                    'host = "127.0.0.1"',
                    f"port = {m.port}",
                ]
    return "\n".join(lines) + "\n"


async def start_balancer(
    config: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, Path]:
    """Start `python -m changeover.proxy -c config` and wait until it says it started."""
    log = config.with_suffix(".log")
    child_env = {k: v for k, v in os.environ.items() if k != "CHANGEOVER_ADMIN_TOKEN"}
    child_env.update(env or {})
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "changeover.proxy",
            "-c",
            str(config),
            *extra,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env,
        )

    def started() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"balancer exited with {process.returncode}: {log.read_text()}")
        return "balancer started" in log.read_text()

    try:
        await wait_until(started, timeout=20, what="the balancer to start")
    except BaseException:
        await stop_process(process)
        raise
    return process, log


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL (the whole family) if it does not exit in time."""
    if process.returncode is None:
        family: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            for child in family:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            process.kill()
            await process.wait()
    return await process.wait()


@contextlib.asynccontextmanager
async def balancer_site(
    tmp_path: Path,
    started: list[FakeMember],
    *extra: str,
    qa: bool = False,
    qa_hosts: dict[str, str] | None = None,
    balancer: dict[str, Any] | None = None,
) -> AsyncIterator[Site]:
    """The balancer in front of `started`, with a QA port per cluster when `qa`."""
    clusters = list(dict.fromkeys(m.cluster for m in started))
    qa_ports = {c: free_port() for c in clusters} if qa else {}
    public, admin = free_port(), free_port()
    config = tmp_path / "changeover.toml"
    config.write_text(topology_toml(started, public, admin, qa_ports, qa_hosts, balancer))
    process, log = await start_balancer(config, *extra)
    site = Site(
        process,
        config,
        log,
        f"http://127.0.0.1:{public}",
        f"http://127.0.0.1:{admin}",
        {c: f"http://127.0.0.1:{port}" for c, port in qa_ports.items()},
    )
    try:
        yield site
    finally:
        await stop_process(site.process)


class ConnectionCount:
    """Counts the connections an aiohttp session opens: `trace_configs=[c.trace]`."""

    def __init__(self) -> None:
        self.opened = 0
        self.trace = aiohttp.TraceConfig()
        self.trace.on_connection_create_end.append(self._opened)

    async def _opened(self, *_: object) -> None:
        self.opened += 1


async def get_json(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with session.get(url, **kwargs) as r:
        return r.status, await r.json(content_type=None)
