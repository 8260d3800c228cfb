"""Bad input against the embedded balancer: fuzzing, slow clients, the admin token.

The fuzz test feeds random bytes and mutated requests (sent whole or in
pieces, so heads and bodies also arrive split across reads) to the public
listener of a real balancer with two workers, while a probe keeps sending
normal requests on keep-alive connections. After every input the balancer must
still answer a normal request, no worker may have died, and the probe must
not have seen a single failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover.config import parse
from changeover.proxy import admin
from changeover.proxy.state import PoolState, SharedState
from tests.integration.proxy_fixtures import TOKEN, Site, auth, balancer_site, members

LAYOUT = {"a": ["a1"], "b": ["b1"]}

# Requests the mutations start from: every framing and the headers the balancer reads.
TEMPLATES = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /plain?q=1 HTTP/1.1\r\nHost: shop.example.com\r\nCookie: JSESSIONID=s.a1\r\n"
    b"Connection: keep-alive\r\nUser-Agent: fuzz\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
    b"Connection: close, X-Private\r\nX-Private: 1\r\nTE: trailers\r\n\r\n",
    b"HEAD /download?size=10 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /plain HTTP/1.0\r\n\r\n",
]
PIECES = [b"\r\n", b"\n", b"\r", b" ", b":", b"\x00", b"\xff", b"0", b"chunked", b"Host: y\r\n"]
PIECES += [b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n", b"HTTP/1.1"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A template (maybe two, pipelined) with bytes inserted, replaced or cut out."""
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    if draw(st.booleans()):
        data += draw(st.sampled_from(TEMPLATES))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "replace", "cut"]))
        piece = draw(st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=8)))
        if kind == "insert":
            data[at:at] = piece
        elif kind == "replace":
            data[at : at + len(piece)] = piece
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


inputs = st.tuples(
    st.one_of(st.binary(max_size=512), mutated()),
    st.lists(st.integers(1, 64), max_size=4),  # split points: the input arrives in pieces
)


def over_the_network(examples: int) -> Any:
    """Hypothesis settings for examples that each talk to a real balancer."""
    return settings(
        max_examples=examples,
        deadline=None,  # a round trip under load is slow, not wrong
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def send(address: tuple[str, int], data: bytes, splits: list[int]) -> bytes:
    """Send `data` in pieces, half-close, and read until the balancer closes."""
    with socket.create_connection(address, timeout=10) as sock:
        # The balancer may close on us at any byte: stop sending then, and read.
        with contextlib.suppress(OSError):
            at = 0
            for size in splits:
                if at >= len(data):
                    break
                sock.sendall(data[at : at + size])
                at += size
                time.sleep(0.002)  # let the balancer read the piece on its own
            sock.sendall(data[at:])
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


@dataclass
class Probe:
    """Normal requests on keep-alive connections, alongside the fuzzing."""

    url: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not stop.is_set():
                self.sent += 1
                try:
                    async with session.get(self.url + "/plain") as r:
                        await r.read()
                        if r.status != 200:
                            self.failures.append(f"status {r.status}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(repr(exc))
                await asyncio.sleep(0.01)


def fuzz(site: Site, workers: list[int], examples: int) -> None:
    address = host_port(site.public)
    neighbour = http.client.HTTPConnection(*address, timeout=10)  # one keep-alive connection

    @over_the_network(examples)
    @given(inputs)
    def one(case: tuple[bytes, list[int]]) -> None:
        data, splits = case
        answer = send(address, data, splits)
        # Whatever it answered is HTTP/1.1 (a response of its own or a member's).
        assert not answer or answer.startswith(b"HTTP/1.1 "), answer[:200]
        neighbour.request("GET", "/plain")
        response = neighbour.getresponse()
        response.read()
        assert response.status == 200
        assert site.process.returncode is None, site.log_text()
        assert site.worker_pids() == workers, "a worker died"

    try:
        one()
    finally:
        neighbour.close()


async def test_random_and_mutated_requests_leave_the_balancer_serving(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started, "--workers", "2") as site,
    ):
        workers = site.worker_pids()
        assert len(workers) == 2
        probe = Probe(site.public)
        stop = asyncio.Event()
        probing = asyncio.get_running_loop().create_task(probe.run(stop))
        try:
            # Blocking sockets in a thread: this loop serves the members meanwhile.
            await asyncio.to_thread(fuzz, site, workers, 200)
        finally:
            stop.set()
            await probing
        assert probe.sent > 50
        assert probe.failures == []
        rss = sum(p.memory_info().rss for p in map(psutil.Process, workers))
        assert rss < 400 * 1024 * 1024


@contextlib.contextmanager
def connection(site: Site) -> Iterator[socket.socket]:
    with socket.create_connection(host_port(site.public), timeout=30) as sock:
        yield sock


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


async def test_a_client_that_half_closes_mid_body_is_let_go(tmp_path: Path) -> None:
    """A body that can never complete does not hold the connection (or its upstream)."""
    async with members(LAYOUT) as started, balancer_site(tmp_path, started) as site:

        def half_close() -> tuple[bytes, float]:
            with connection(site) as sock:
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
                started = time.monotonic()
                sock.shutdown(socket.SHUT_WR)
                return read_all(sock), time.monotonic() - started

        answer, took = await asyncio.to_thread(half_close)
        assert took < 5, took
        assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # The head may have gone upstream (requests are relayed as they arrive),
        # but no member was handed a whole body.
        assert [m.uploads for m in started] == [[], []]


async def test_wrong_admin_tokens_cost_one_constant_time_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every wrong token, empty, short, nearly right or huge, is refused (401)
    after one hmac.compare_digest of two fixed-size digests: how long the check
    takes does not depend on how much of the token was right, nor on its length.
    (Timing itself is too noisy on a shared machine to assert.)"""
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # what admin.py calls
    topology = parse(
        {
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 9001}]},
                {"name": "b", "members": [{"name": "b1", "port": 9002}]},
            ]
        }
    )
    pool = PoolState(topology, SharedState(2, 1), None)
    wrong = ["", "t", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "x" * 4_000]
    async with TestClient(TestServer(admin.build_app(pool, TOKEN))) as client:
        for token in wrong:
            r = await client.get("/v1/pool", headers=auth(token))
            assert r.status == 401, token
        r = await client.get("/v1/pool", headers=auth())
        assert r.status == 200
    assert compared == [(32, 32)] * (len(wrong) + 1)
