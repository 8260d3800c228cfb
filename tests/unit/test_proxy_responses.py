"""The response-head decisions of the embedded balancer, byte for byte.

Each case is data: the head a member sent (as llhttp accepted it), what the
client asked, and the exact head the client receives and how the body ends.
"""

from __future__ import annotations

import pytest

from changeover.proxy.responses import (
    CHUNK_FRAMED,
    CLOSE_FRAMED,
    ERRORS,
    LENGTH_FRAMED,
    Asked,
    answer,
    plain_length,
)

COOKIE = b"Set-Cookie: CHANGEOVER_ROUTE=a1; Path=/; HttpOnly\r\n"
KEEP = Asked(False, False, True, False, None, b"JSESSIONID=")
KEEP_COOKIE = Asked(False, False, True, False, COOKIE, b"JSESSIONID=")
CLOSING = Asked(False, False, False, False, None, b"JSESSIONID=")
HTTP10 = Asked(False, True, True, False, None, b"JSESSIONID=")
HEAD = Asked(True, False, True, False, None, b"JSESSIONID=")
STOPPING = Asked(False, False, True, True, None, b"JSESSIONID=")

# name: (head from the member, status, asked, head the client gets, framing, left, close)
CASES = {
    "plain-relayed-as-received": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        200,
        KEEP,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        LENGTH_FRAMED,
        2,
        False,
    ),
    "route-cookie-inserted-before-the-blank-line": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        200,
        KEEP_COOKIE,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + COOKIE + b"\r\n",
        LENGTH_FRAMED,
        2,
        False,
    ),
    "no-route-cookie-when-the-app-sets-its-session": (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID=x.a1\r\nContent-Length: 0\r\n\r\n",
        200,
        KEEP_COOKIE,
        b"HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID=x.a1\r\nContent-Length: 0\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "cookie-names-are-case-sensitive": (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: jsessionid=x\r\nContent-Length: 0\r\n\r\n",
        200,
        KEEP_COOKIE,
        b"HTTP/1.1 200 OK\r\nSet-Cookie: jsessionid=x\r\nContent-Length: 0\r\n" + COOKIE + b"\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "hop-by-hop-and-connection-listed-removed": (
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: X-Secret\r\nX-Secret: 1\r\n"
        b"Upgrade: h2c\r\nContent-Length: 0\r\nX-Kept: 1\r\n\r\n",
        200,
        KEEP,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Kept: 1\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "a-lone-keep-alive-stays": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        200,
        KEEP,
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        CHUNK_FRAMED,
        0,
        False,
    ),
    "client-close-is-said": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
        200,
        CLOSING,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
        LENGTH_FRAMED,
        1,
        True,
    ),
    "stopping-closes": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
        200,
        STOPPING,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
        LENGTH_FRAMED,
        1,
        True,
    ),
    "close-framed-goes-chunked-to-1.1": (
        b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\n",
        200,
        KEEP,
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        CLOSE_FRAMED,
        0,
        False,
    ),
    "close-framed-goes-plain-to-1.0-and-closes": (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n",
        200,
        HTTP10,
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\n\r\n",
        CLOSE_FRAMED,
        0,
        True,
    ),
    "chunked-goes-plain-to-1.0-and-closes": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
        200,
        HTTP10,
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\n\r\n",
        CHUNK_FRAMED,
        0,
        True,
    ),
    "1.0-keep-alive-client-is-told": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        200,
        HTTP10,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "head-has-no-body-whatever-its-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        200,
        HEAD,
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "204-has-no-body": (
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        204,
        KEEP,
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "304-has-no-body": (
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        304,
        KEEP,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        LENGTH_FRAMED,
        0,
        False,
    ),
    "unknown-coding-is-close-framed": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        200,
        KEEP,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n",
        CLOSE_FRAMED,
        0,
        True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_final_heads(name: str) -> None:
    head, status, asked, written, framing, left, close = CASES[name]
    decided = answer(head, status, asked)
    assert decided.written(head) == written
    assert (decided.framing, decided.left, decided.close) == (framing, left, close)
    assert not decided.interim


def test_nothing_is_copied_when_nothing_changes() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    decided = answer(head, 200, KEEP)
    assert (decided.prefix, decided.relay_from) == (b"", 0)
    # An insertion leaves the blank line to travel with the body bytes.
    decided = answer(head, 200, KEEP_COOKIE)
    assert decided.relay_from == len(head) - 2


def test_interim_heads_lose_hop_by_hop_lines_and_the_final_one_follows() -> None:
    head = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nKeep-Alive: 5\r\n\r\n"
    decided = answer(head, 103, KEEP_COOKIE)
    assert decided.interim
    assert decided.written(head) == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    head = b"HTTP/1.0 100 Continue\r\n\r\n"
    assert answer(head, 100, KEEP).written(head) == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize(
    ("block", "length"),
    [
        (b"\r\ncontent-length: 12\r\ndate: x", 12),
        (b"\r\nconnection: keep-alive\r\ncontent-length: 0", 0),
        (b"\r\ncontent-length: 1\r\nset-cookie: a=b", -1),
        (b"\r\ncontent-length: 1\r\nconnection: close", -1),
        (b"\r\ntransfer-encoding: chunked", -1),
        (b"\r\ndate: x", -1),
    ],
)
def test_plain_length(block: bytes, length: int) -> None:
    assert plain_length(block) == length


def test_error_responses_are_whole_and_close() -> None:
    assert ERRORS[502] == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n"
        b"Connection: close\r\n\r\n502 Bad Gateway\n"
    )
