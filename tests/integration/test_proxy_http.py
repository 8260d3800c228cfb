"""HTTP/1.1 behaviour of the embedded balancer: keep-alive, framing, headers, bad input."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.integration.proxy_fixtures import (
    ConnectionCount,
    FakeMember,
    Site,
    balancer_site,
    members,
)

LAYOUT = {"a": ["a1"], "b": ["b1"]}


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def exchange(url: str, data: bytes, timeout: float = 15) -> bytes:
    """Send raw bytes on a new connection; everything read until the balancer closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def site_of(
    tmp_path: Path, **options: object
) -> AsyncIterator[tuple[Site, list[FakeMember]]]:
    async with members(LAYOUT) as started, balancer_site(tmp_path, started, **options) as site:  # type: ignore[arg-type]
        yield site, started


async def test_client_keep_alive_and_pooled_upstream_connections(tmp_path: Path) -> None:
    connections = ConnectionCount()
    connector = aiohttp.TCPConnector(limit=1)
    async with (
        site_of(tmp_path) as (site, started),
        aiohttp.ClientSession(connector=connector, trace_configs=[connections.trace]) as client,
    ):
        for _ in range(100):
            async with client.get(site.public + "/plain") as r:
                assert r.status == 200
                await r.read()
        assert connections.opened == 1  # one client connection for 100 requests
        served = sum(m.served for m in started)
        upstream_connections = sum(len(m.peers) for m in started)
        assert served == 100
        assert upstream_connections <= 4, upstream_connections  # one or two per member


async def test_forwarded_headers_added_and_hop_by_hop_removed(tmp_path: Path) -> None:
    async with site_of(tmp_path) as (site, _), aiohttp.ClientSession() as client:
        headers = {
            "Host": "shop.example.com",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "spoofed",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "X-End-To-End": "kept",
            "Forwarded": "for=203.0.113.9",
            "X-Real-IP": "203.0.113.9",
        }
        async with client.get(site.public + "/headers", headers=headers) as r:
            seen = {k.lower(): v for k, v in (await r.json())["headers"].items()}
            assert "connection" not in {k.lower() for k in r.headers}
        assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "shop.example.com"
        assert seen["host"] == "shop.example.com"
        assert seen["x-end-to-end"] == "kept"
        for hop in (
            "x-private",
            "keep-alive",
            "proxy-authorization",
            "te",
            "forwarded",
            "x-real-ip",
        ):
            assert hop not in seen, hop


async def test_chunked_request_and_response_bodies(tmp_path: Path) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 100_000

    async with site_of(tmp_path) as (site, _), aiohttp.ClientSession() as client:
        async with client.post(site.public + "/upload", data=body()) as r:  # chunked upload
            assert (await r.json())["received"] == 1_000_000
        async with client.get(site.public + "/download?size=3000000&chunked=1") as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert len(await r.read()) == 3_000_000
        async with client.head(site.public + "/download?size=5000") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "5000"
        async with client.get(site.public + "/plain") as r:  # same connection after HEAD
            assert r.status == 200


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with site_of(tmp_path) as (site, _):
        request = b"GET /plain HTTP/1.1\r\nHost: x\r\nCookie: JSESSIONID=s.%s\r\n\r\n"
        last = b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        last += b"Cookie: JSESSIONID=s.b1\r\n\r\n"
        answer = await exchange(
            site.public, request % b"a1" + request % b"b1" + request % b"a1" + last
        )
        members_in_order = [part.split(b'"')[0] for part in answer.split(b'"member": "')[1:]]
        assert members_in_order == [b"a1", b"b1", b"a1", b"b1"]
        assert answer.count(b"HTTP/1.1 200 OK") == 4


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 4\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Content-Length: 4\r\n\r\nabcd",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Content-Length: 5\r\n\r\nabcd",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"z" * 40_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1234567890\r\n" * 3000 + b"\r\n", 431),
        (b"GET /" + b"u" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        # A framing header listed in Connection would be removed while its body
        # is relayed: the member would read the body as a second request.
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\n"
            b"Content-Length: 27\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, transfer-encoding\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Host\r\n\r\n", 400),
        # Upgrade is not tunnelled: llhttp would skip the body, then parse it.
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 27\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
        # RFC 9112 3.2: Host is required in 1.1, and must be a host[:port].
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: evil.example/path\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: user@shop.example.com\r\n\r\n", 400),
        # llhttp takes any digit.digit version; only 1.0 and 1.1 are spoken here.
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    ],
    ids=[
        "cl-then-te",
        "te-then-cl",
        "duplicate-cl",
        "conflicting-cl",
        "te-not-only-chunked",
        "te-identity",
        "duplicate-host",
        "huge-header",
        "many-headers",
        "huge-url",
        "binary-garbage",
        "bad-header-name",
        "bad-version",
        "connection-lists-cl",
        "connection-lists-te",
        "connection-lists-host",
        "upgrade-with-cl-body",
        "cl-body-then-upgrade",
        "upgrade-with-chunked-body",
        "te-chunked-tab",
        "connect",
        "http11-without-host",
        "http11-without-host-unusual-head",
        "host-with-space",
        "host-with-path",
        "host-with-userinfo",
        "http2-request-line",
        "http09-request-line",
    ],
)
async def test_bad_requests_are_refused_without_harming_others(
    tmp_path: Path, request_bytes: bytes, status: int
) -> None:
    async with site_of(tmp_path) as (site, started), aiohttp.ClientSession() as client:
        async with client.get(site.public + "/plain") as r:  # a keep-alive neighbour
            assert r.status == 200
        answer = await exchange(site.public, request_bytes)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
        assert b"Connection: close" in answer
        assert sum(m.served for m in started) == 1  # nothing bad reached a member
        async with client.get(site.public + "/plain") as r:  # the neighbour is unharmed
            assert r.status == 200


async def test_a_well_formed_host_with_a_port_or_an_ip_literal_is_relayed(tmp_path: Path) -> None:
    async with site_of(tmp_path) as (site, _):
        for host in (b"shop.example.com:8443", b"[::1]:80", b"127.0.0.1"):
            answer = await exchange(
                site.public,
                b"GET /headers HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host,
            )
            assert answer.startswith(b"HTTP/1.1 200 "), (host, answer[:200])
            assert b'"Host": "%s"' % host in answer, (host, answer)


@pytest.mark.parametrize(
    "first",
    [
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /plain HTTP/1.0\r\n\r\n",
    ],
    ids=["connection-close", "http10"],
)
async def test_bytes_after_a_last_request_in_the_same_read_are_not_read(
    tmp_path: Path, first: bytes
) -> None:
    """The last request is answered and the connection closed; what follows it
    in the same packet is neither relayed nor allowed to cut that answer."""
    async with site_of(tmp_path) as (site, started):
        answer = await exchange(site.public, first + b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert sum(m.served for m in started) == 1


async def test_stale_pooled_connection_is_retried_not_502(tmp_path: Path) -> None:
    """An upstream that closes keep-alive connections when the next request arrives."""
    answered = 0

    async def one_answer_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal answered
        first = True
        while await reader.readuntil(b"\r\n\r\n"):
            if not first:  # pretend the keep-alive timer fired as the request came in
                break
            first = False
            answered += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: JSESSIONID=s.a1\r\n\r\nok"
            )
        writer.close()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    stale_port = server.sockets[0].getsockname()[1]
    async with server, members({"b": ["b1"]}) as started:
        stale = FakeMember(name="a1", cluster="a", route="a1", port=stale_port)
        async with (
            balancer_site(tmp_path, [stale, *started], qa=True) as site,
            aiohttp.ClientSession() as client,
        ):
            for _ in range(10):
                async with client.get(site.qa["a"] + "/") as r:
                    assert (r.status, await r.text()) == (200, "ok")
            assert answered >= 10


async def test_upstream_dying_mid_response_closes_the_client(tmp_path: Path) -> None:
    async def dies_after_headers(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):
            # Healthy to the balancer's checks: only the request under test dies.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(dies_after_headers, "127.0.0.1", 0)
    async with server, members({"b": ["b1"]}) as started:
        dying = FakeMember(
            name="a1", cluster="a", route="a1", port=server.sockets[0].getsockname()[1]
        )
        async with balancer_site(tmp_path, [dying, *started], qa=True) as site:
            answer = await exchange(site.qa["a"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"partial")


async def test_http10_client_gets_a_body_it_can_read(tmp_path: Path) -> None:
    async with site_of(tmp_path) as (site, _):
        answer = await exchange(site.public, b"GET /download?size=1000&chunked=1 HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"chunked" not in head.lower()
        assert body == b"x" * 1000


async def test_slow_request_head_is_timed_out(tmp_path: Path) -> None:
    async with site_of(tmp_path, balancer={"timeouts.header": "2s"}) as (site, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await exchange(site.public, b"GET / HTTP/1.1\r\nHost: slow", timeout=20)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 1 <= loop.time() - started <= 5  # checked once a second


async def test_a_member_that_does_not_answer_gets_504_and_others_still_serve(
    tmp_path: Path,
) -> None:
    timeouts = {"timeouts.response": "2s"}
    async with site_of(tmp_path, balancer=timeouts) as (site, _), aiohttp.ClientSession() as user:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with user.get(site.public + "/slow?delay=5", cookies={"CHANGEOVER_ROUTE": "a1"}) as r:
            assert r.status == 504
        assert 1 <= loop.time() - began <= 5
        async with user.get(site.public + "/plain") as r:  # a new request is served
            assert r.status == 200
        # A response that takes its time to stream is not cut: the head came in time.
        async with user.get(site.public + "/download?size=1000000") as r:
            assert r.status == 200 and len(await r.read()) == 1_000_000
        pool = await site.pool(user)
        assert pool["a1"]["active"] == 0  # the abandoned request is not counted
