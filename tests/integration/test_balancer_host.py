"""SshHost, what the drivers use to reach a balancer instance on another host,
against a real OpenSSH server on its own loopback address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from changeover.balancers.base import BalancerError
from changeover.balancers.sshhost import SshHost
from changeover.executors.ssh import SshExecutor
from tests.helpers import free_port
from tests.integration.sshd import SshdServer, running_sshd

pytestmark = pytest.mark.real

ADDRESS = "127.0.32.1"


@pytest.fixture
async def sshd() -> AsyncIterator[SshdServer]:
    async with running_sshd([ADDRESS]) as server:
        yield server


@pytest.fixture
async def host(sshd: SshdServer) -> AsyncIterator[SshHost]:
    remote = SshHost(SshExecutor(sshd.settings()), ADDRESS, sshd.port, sshd.user)
    try:
        yield remote
    finally:
        await remote.close()


async def test_replace_is_a_rename_of_a_complete_file_beside_it(
    host: SshHost, tmp_path: Path
) -> None:
    target = tmp_path / "etc" / "lb.cfg"
    assert await host.read_text(str(target)) is None
    await host.replace(str(target), "first\n")
    await host.replace(str(target), "second\n")
    assert await host.read_text(str(target)) == "second\n"
    assert await asyncio.to_thread(target.read_text) == "second\n"
    leftovers = await asyncio.to_thread(lambda: sorted(p.name for p in target.parent.iterdir()))
    assert leftovers == ["lb.cfg"]  # no temporary file stays behind
    await host.remove(str(target))
    await host.remove(str(target))  # already gone: nothing to do
    assert await host.read_text(str(target)) is None


async def test_commands_are_argument_lists_every_word_literal(
    host: SshHost, tmp_path: Path
) -> None:
    marker = tmp_path / "injected"
    words = ["a b", "it's", f"$(touch {marker})", "; touch x", "*"]
    done = await host.run(["printf", "%s\\n", *words], timeout=30)
    assert done.ok and done.stdout.splitlines() == words
    assert not await asyncio.to_thread(marker.exists)
    failed = await host.run(["sh", "-c", "echo nope >&2; exit 3"], timeout=30)
    assert (failed.returncode, failed.message()) == (3, "nope")


async def test_a_unix_socket_on_the_host_is_reached_through_the_connection(
    host: SshHost, tmp_path: Path
) -> None:
    path = tmp_path / "admin.sock"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"you said " + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, str(path))
    try:
        reader, writer = await host.open_unix(str(path))
        writer.write(b"show info\n")
        await writer.drain()
        assert await reader.read() == b"you said show info\n"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_url_on_the_host_is_reached_through_a_port_forward(host: SshHost) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/state", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(ADDRESS)
    await web.TCPSite(runner, ADDRESS, port).start()
    try:
        url = await host.reachable_url(f"http://{ADDRESS}:{port}/state")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/state")
        assert url == await host.reachable_url(f"http://{ADDRESS}:{port}/state")  # one forward
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            assert await resp.text() == "hello"
    finally:
        await runner.cleanup()


async def test_a_host_whose_sshd_stopped_is_a_balancer_error_naming_it() -> None:
    async with running_sshd([ADDRESS]) as server:
        remote = SshHost(SshExecutor(server.settings()), ADDRESS, server.port, server.user)
        assert (await remote.run(["true"], timeout=30)).ok
    try:  # sshd and its sessions are gone now: the pooled connection with them
        with pytest.raises(BalancerError, match=rf"{ADDRESS}:{server.port}"):
            await remote.run(["true"], timeout=30)
    finally:
        await remote.close()
