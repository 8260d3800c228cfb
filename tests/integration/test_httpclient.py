"""The orchestrator's HTTP client (`changeover.httpclient`) against real servers
on loopback: aiohttp's web server for what HTTP allows (chunks, charsets, HEAD,
JSON and forms, Host, TLS), and a small h11 server that closes connections
where a client must cope with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h11
import pytest
import trustme
from aiohttp import web

from changeover.httpclient import Client, HttpError, HttpTimeout
from tests.certs import issue, server_context
from tests.helpers import free_port


@contextlib.asynccontextmanager
async def aiohttp_server(
    routes: list[web.RouteDef], tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "host": request.headers.get("Host"),
            "auth": request.headers.get("Authorization"),
            "type": request.headers.get("Content-Type"),
            "body": (await request.read()).decode(),
        }
    )


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=latin-1"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for part in ("caf", "\xe9 ", "cr\xe8me"):
        await resp.write(part.encode("latin-1"))
    await resp.write_eof()
    return resp


async def test_requests_answers_and_one_connection_for_all_of_them() -> None:
    peers: set[tuple[str, int]] = set()

    async def seen(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return await echo(request)

    routes = [web.route("*", "/echo", seen), web.get("/chunked", chunked)]
    async with aiohttp_server(routes) as base:
        client = Client(timeout=5, headers={"Authorization": "Bearer t"})
        try:
            got = (await client.request("GET", base + "/echo?x=1")).json()
            assert got["path"] == "/echo?x=1" and got["auth"] == "Bearer t"
            assert got["host"] == base.removeprefix("http://")
            posted = await client.request("POST", base + "/echo", json={"a": [1]})
            assert (
                posted.status == 200
                and posted.header("Content-Type") == "application/json; charset=utf-8"
            )
            assert json.loads(posted.json()["body"]) == {"a": [1]}
            assert posted.json()["type"] == "application/json"
            form = (await client.request("POST", base + "/echo", form={"q": "up{a=b}"})).json()
            assert form["body"] == "q=up%7Ba%3Db%7D"
            assert form["type"] == "application/x-www-form-urlencoded"
            named = await client.request("GET", base + "/echo", headers={"Host": "qa.example"})
            assert named.json()["host"] == "qa.example"
            head = await client.request("HEAD", base + "/echo")
            assert head.status == 200 and head.body == b""
            text = await client.request("GET", base + "/chunked")
            assert text.text() == "caf\xe9 cr\xe8me"
            missing = await client.request("GET", base + "/nothing")
            assert missing.status == 404
        finally:
            await client.close()
    assert len(peers) == 1  # kept alive from the first request to the last


async def test_no_keep_alive_opens_a_connection_per_request() -> None:
    peers: set[tuple[str, int]] = set()

    async def seen(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    async with aiohttp_server([web.get("/", seen)]) as base:
        client = Client(timeout=5, keep_alive=False)
        for _ in range(3):
            assert (await client.request("GET", base + "/")).text() == "ok"
        await client.close()
    assert len(peers) == 3


async def test_https_with_the_context_it_is_given(tmp_path: Path) -> None:
    ca = trustme.CA()
    pair = issue(ca, tmp_path, "server", "127.0.0.1")

    def trusting() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    async with aiohttp_server([web.get("/", echo)], tls=server_context(pair)) as base:
        trusted = Client(timeout=5, tls=trusting)
        assert (await trusted.request("GET", base + "/")).json()["method"] == "GET"
        await trusted.close()
        stranger = Client(timeout=5)  # the system's trust store knows no such CA
        with pytest.raises(HttpError, match="CERTIFICATE_VERIFY_FAILED"):
            await stranger.request("GET", base + "/")
        await stranger.close()


async def test_nothing_listening_and_a_server_too_slow() -> None:
    client = Client(timeout=0.3)
    port = free_port()
    with pytest.raises(HttpError, match=f"cannot connect to 127.0.0.1:{port}"):
        await client.request("GET", f"http://127.0.0.1:{port}/")
    answer = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text="late")

    async with aiohttp_server([web.get("/", slow)]) as base:
        with pytest.raises(HttpTimeout, match=r"within 0\.3s"):
            await client.request("GET", base + "/")
        answer.set()
    await client.close()
    with pytest.raises(HttpError, match="not an http"):
        await client.request("GET", "ftp://127.0.0.1/")


Behaviour = Callable[[int, int], bool]  # (connection, request on it) -> answer it?


@contextlib.asynccontextmanager
async def h11_server(answer: Behaviour) -> AsyncIterator[tuple[str, list[tuple[int, str]]]]:
    """A server that answers a request when `answer(connection, request)` says
    so and otherwise closes the connection unanswered; yields its URL and the
    (connection, target) of every request it read."""
    seen: list[tuple[int, str]] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number, served = connections, 0
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    seen.append((number, event.target.decode()))
                    served += 1
                    if not answer(number, served):
                        return
                elif isinstance(event, h11.EndOfMessage):
                    body = b"answer %d.%d" % (number, served)
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=200, headers=[("Content-Length", str(len(body)))]
                            )
                        )
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    await writer.drain()
                    conn.start_next_cycle()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_kept_connection_the_server_dropped_is_replaced_once() -> None:
    # The first connection answers one request and drops the next unanswered, as
    # a server closing an idle keep-alive connection just as a request arrives.
    async with h11_server(lambda conn, n: conn > 1 or n == 1) as (base, seen):
        client = Client(timeout=5)
        assert (await client.request("GET", base + "/one")).text() == "answer 1.1"
        assert (await client.request("GET", base + "/two")).text() == "answer 2.1"
        await client.close()
    assert seen == [(1, "/one"), (1, "/two"), (2, "/two")]


async def test_a_connection_closed_unanswered_is_an_error_after_one_retry_of_a_get() -> None:
    # aiohttp sends an idempotent request once more (it cannot tell a kept
    # connection's end from a new one's), a POST never: it may have been acted on.
    async with h11_server(lambda conn, n: False) as (base, seen):
        client = Client(timeout=5)
        with pytest.raises(HttpError, match="closed before an answer"):
            await client.request("GET", base + "/once")
        with pytest.raises(HttpError, match="closed before an answer"):
            await client.request("POST", base + "/never-twice", body=b"x")
        await client.close()
    assert seen == [(1, "/once"), (2, "/once"), (3, "/never-twice")]


def test_a_client_outlives_the_loop_that_opened_its_connections() -> None:
    # The CLI runs one event loop after another (`plan`: the migration gate,
    # then the balancer); a client kept across them, asking the same server
    # (one in a thread, alive across both loops), opens a new connection.
    peers: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_GET(self) -> None:
            peers.append(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    client = Client(timeout=5)
    try:
        for _ in range(2):  # the first loop's connection is kept when it ends
            assert asyncio.run(client.request("GET", url)).text() == "ok"
        asyncio.run(client.close())
    finally:
        server.shutdown()
        server.server_close()
    assert len(set(peers)) == 2
