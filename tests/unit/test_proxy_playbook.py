"""protocol.py driven without sockets: exact bytes in and out of each end.

Each test feeds chunks to a real `Client` and `Upstream` on in-memory
transports (tests/unit/proxy_playbook.py) and asserts what the balancer wrote
to the member and to the client, byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from changeover.proxy.responses import ERRORS
from tests.unit.proxy_playbook import Playbook

UP = b"X-Forwarded-Host: x\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\r\n"
COOKIE = b"Set-Cookie: CHANGEOVER_ROUTE=a1; Path=/; HttpOnly\r\n"
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
async def pb() -> AsyncIterator[Playbook]:
    playbook = Playbook()
    yield playbook
    playbook.close()


async def test_a_plain_exchange_and_its_repeat_on_a_pooled_connection(pb: Playbook) -> None:
    client = pb.client()
    client.feed(GET)
    member = await pb.upstream()
    assert member.take() == b"GET / HTTP/1.1\r\nHost: x\r\n" + UP
    member.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + COOKIE + b"\r\nhi"
    # The same request again (the repeat shortcuts) on the same upstream connection.
    client.feed(GET)
    assert pb.opened() == 0
    assert member.take() == b"GET / HTTP/1.1\r\nHost: x\r\n" + UP
    member.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + COOKIE + b"\r\nhi"
    assert not client.closed and not member.closed


async def test_every_5xx_is_counted_also_when_it_repeats_on_a_pooled_connection(
    pb: Playbook,
) -> None:
    """A repeated response takes the shortcuts (head only, or head and body in
    one read): its 5xx is the member's all the same (the bake's figure)."""
    error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\nno"
    client = pb.client()
    client.feed(GET)
    member = await pb.upstream()  # one upstream connection for every request below
    for n in range(1, 5):
        if n > 1:
            client.feed(GET)
        assert member.take().startswith(b"GET / ")
        if n == 3:  # the head and the body in two reads: the head-only shortcut
            member.feed(error[:-2])
            member.feed(error[-2:])
        else:  # whole, as the first time: the whole-response shortcut
            member.feed(error)
        assert client.take().startswith(b"HTTP/1.1 500 ")
        assert pb.shared.error_totals() == [n, 0]
    client.feed(GET)
    assert pb.opened() == 0
    member.take()
    member.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert client.take().startswith(b"HTTP/1.1 200 ")
    assert pb.shared.error_totals() == [4, 0]


# (response bytes from the member, what the client receives) for a keep-alive
# HTTP/1.1 GET; each is also delivered split at every byte boundary.
EXCHANGES = {
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + COOKIE + b"\r\n2\r\nhi\r\n0\r\n\r\n",
    ),
    "continue-then-final": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
        + COOKIE
        + b"\r\nx",
    ),
    "hop-by-hop-removed": (
        b"HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\nContent-Length: 1\r\nConnection: X-A\r\nX-A: 1"
        b"\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n" + COOKIE + b"\r\nx",
    ),
    "app-session-cookie-wins": (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID=s.a1\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID=s.a1\r\nContent-Length: 1\r\n\r\nx",
    ),
    "no-content": (
        b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nDate: x\r\n" + COOKIE + b"\r\n",
    ),
}


def splits(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:k], data[k:]] for k in range(1, len(data))]


@pytest.mark.parametrize("name", list(EXCHANGES))
async def test_responses_are_written_the_same_however_they_are_split(name: str) -> None:
    response, expected = EXCHANGES[name]
    for chunks in splits(response):
        pb = Playbook()
        try:
            client = pb.client()
            client.feed(GET)
            member = await pb.upstream()
            member.take()
            member.feed(*chunks)
            assert client.take() == expected, chunks
            # The exchange is over: the next request reuses the connection.
            client.feed(GET)
            assert member.take().startswith(b"GET / HTTP/1.1\r\n"), chunks
            assert not client.closed
        finally:
            pb.close()


async def test_close_framed_body_goes_to_a_1_1_client_in_chunks(pb: Playbook) -> None:
    client = pb.client()
    client.feed(GET)
    member = await pb.upstream()
    member.take()
    member.feed(b"HTTP/1.0 200 OK\r\n\r\nab", b"cd")
    member.hang_up()
    await pb.settle()
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        + COOKIE
        + b"\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
    )
    assert not client.closed  # the client keeps its connection


async def test_a_1_0_client_gets_a_chunked_body_plain_and_a_close(pb: Playbook) -> None:
    client = pb.client()
    client.feed(b"GET / HTTP/1.0\r\n\r\n")
    member = await pb.upstream()
    assert member.take().startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    member.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    await pb.settle()
    assert client.take() == b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + COOKIE + b"\r\nhi"
    assert client.closed


async def test_connection_close_is_honoured_and_what_follows_dropped(pb: Playbook) -> None:
    client = pb.client()
    client.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /hidden HTTP/1.1\r\n")
    member = await pb.upstream()
    assert member.take() == b"GET / HTTP/1.1\r\nHost: x\r\n" + UP
    member.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await pb.settle()
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n" + COOKIE + b"\r\n"
    )
    assert client.closed and pb.opened() == 0


async def test_a_head_response_ends_at_its_head(pb: Playbook) -> None:
    client = pb.client()
    client.feed(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    member = await pb.upstream()
    member.take()
    member.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + COOKIE + b"\r\n"
    client.feed(GET)  # the connection is ready for the next request
    assert member.take() == b"GET / HTTP/1.1\r\nHost: x\r\n" + UP


async def test_bytes_after_a_response_end_that_upstream_connection(pb: Playbook) -> None:
    client = pb.client()
    client.feed(GET)
    member = await pb.upstream()
    member.take()
    answered = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: 1\r\n\r\n"
    member.feed(answered + b"HTTP/1.1 200 OK\r\n\r\n")
    await pb.settle()
    assert client.take() == answered[:-2] + COOKIE + b"\r\n"  # the answer asked for, only
    assert member.closed and not client.closed
    client.feed(GET)  # the next request goes on a new connection
    fresh = await pb.upstream()
    assert fresh.take() == b"GET / HTTP/1.1\r\nHost: x\r\n" + UP


async def test_refused_requests_are_answered_without_an_upstream(pb: Playbook) -> None:
    client = pb.client()
    client.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\n\r\n")
    await pb.settle()
    assert client.take() == ERRORS[400]
    assert client.closed and pb.opened() == 0


async def test_no_member_is_a_503(pb: Playbook) -> None:
    pb.shared.publish([2, 2], [True, True])  # every member out
    client = pb.client()
    client.feed(GET)
    await pb.settle()
    assert client.take() == ERRORS[503]
    assert client.closed


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


async def test_a_websocket_handshake_becomes_a_tunnel(pb: Playbook) -> None:
    client = pb.client()
    client.feed(HANDSHAKE + b"\x81\x85early")  # frame bytes before the 101 wait for it
    member = await pb.upstream()
    assert member.take() == (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + UP[:-2]
        + b"Connection: Upgrade\r\n\r\n"
    )
    member.feed(SWITCHED + b"\x81\x02hi")
    assert client.take() == SWITCHED + b"\x81\x02hi"
    assert member.take() == b"\x81\x85early"
    client.feed(b"GET / HTTP/1.1\r\n\r\n")  # no longer HTTP: relayed as it is
    assert member.take() == b"GET / HTTP/1.1\r\n\r\n"
    assert pb.shared.tunnels(0)[0] == 1 and pb.shared.counters(0)[0][0] == 0
    member.hang_up()
    await pb.settle()
    assert client.closed and pb.shared.tunnels(0)[0] == 0


async def test_a_handshake_answered_otherwise_closes(pb: Playbook) -> None:
    client = pb.client()
    client.feed(HANDSHAKE)
    member = await pb.upstream()
    member.take()
    member.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    await pb.settle()
    assert client.take() == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n" + COOKIE + b"\r\n"
    )
    assert client.closed and pb.shared.tunnels(0)[0] == 0


@pytest.mark.parametrize(
    ("request_head", "response"),
    [
        (GET, SWITCHED),  # a 101 nobody asked for
        (HANDSHAKE, SWITCHED.replace(b"websocket", b"h2c")),  # to another protocol
    ],
)
async def test_an_unasked_switch_is_a_502(
    pb: Playbook, request_head: bytes, response: bytes
) -> None:
    client = pb.client()
    client.feed(request_head)
    member = await pb.upstream()
    member.take()
    member.feed(response)
    await pb.settle()
    assert client.take() == ERRORS[502]
    assert pb.shared.tunnels(0)[0] == 0
