"""The request-head decisions of the embedded balancer, byte for byte.

Each case is data: the head a client sent (as llhttp accepted it) and either
the exact head that goes upstream or the status the request is refused with.
"""

from __future__ import annotations

import pytest

from changeover.proxy.heads import Peer, Refused, check_method, checked_host, rewrite

PEER = Peer(b"203.0.113.7", b"https", b"Host: 127.0.0.1:8080\r\n")
XF = b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"

RELAYED = {
    "http10-gets-the-listener-host-and-speaks-1.1": (
        b"GET /a HTTP/1.0\r\nAccept: */*\r\n\r\n",
        b"GET /a HTTP/1.1\r\nAccept: */*\r\nHost: 127.0.0.1:8080\r\n" + XF + b"\r\n",
    ),
    "http10-keeps-its-host": (
        b"GET /a HTTP/1.0\r\nHost: Shop.Example.com\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: Shop.Example.com\r\nX-Forwarded-Host: shop.example.com\r\n"
        + XF
        + b"\r\n",
    ),
    "hop-by-hop-and-chosen-forwarding-headers-removed": (
        b"GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\n"
        b"Forwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nProxy-Authorization: Basic x\r\n"
        b"X-Kept: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Kept: 1\r\nX-Forwarded-Host: x\r\n" + XF + b"\r\n",
    ),
    "connection-listed-headers-removed": (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\nX-Private: 1\r\n"
        b"x-private: 2\r\nX-Privateer: kept\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Privateer: kept\r\nX-Forwarded-Host: x\r\n" + XF + b"\r\n",
    ),
    "x-forwarded-for-gets-the-client-appended": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-For: 10.0.0.2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: x\r\n"
        b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
    ),
    "chunked-body-is-reframed": (
        b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-Forwarded-Host: x\r\n"
        + XF
        + b"Transfer-Encoding: chunked\r\n\r\n",
    ),
    "content-length-is-relayed-as-sent": (
        b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Forwarded-Host: x\r\n"
        + XF
        + b"\r\n",
    ),
    "other-upgrades-go-up-plain": (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-Forwarded-Host: x\r\n"
        + XF
        + b"\r\n",
    ),
    "websocket-handshake-goes-up-to-be-a-tunnel": (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: WebSocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key: k\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Forwarded-Host: x\r\n"
        + XF
        + b"Connection: Upgrade\r\n\r\n",
    ),
    "websocket-without-connection-upgrade-goes-up-plain": (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: x\r\n" + XF + b"\r\n",
    ),
    "websocket-over-post-goes-up-plain": (
        b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-Forwarded-Host: x\r\n"
        + XF
        + b"\r\n",
    ),
    "host-with-port-and-ip-literal": (
        b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\nConnection: keep-alive, x-a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\nX-Forwarded-Host: [::1]:8443\r\n" + XF + b"\r\n",
    ),
}

REFUSED = {
    "connection-lists-content-length": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: 27\r\n\r\n",
        400,
    ),
    "connection-lists-transfer-encoding": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive, Transfer-Encoding\r\n\r\n",
        400,
    ),
    "connection-lists-host": (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n", 400),
    "upgrade-then-a-length-body": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 27\r\n\r\n",
        400,
    ),
    "a-length-body-then-upgrade": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\nUpgrade: websocket\r\n\r\n",
        400,
    ),
    "upgrade-with-a-chunked-body": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "chunked-then-length": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        400,
    ),
    "length-then-chunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "two-lengths": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
        400,
    ),
    "chunked-with-a-tab": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n",
        400,
    ),
    "a-coding-before-chunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        400,
    ),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "http11-without-host": (b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", 400),
    "host-with-a-space": (b"GET / HTTP/1.1\r\nHost: a b\r\nTE: x\r\n\r\n", 400),
    "host-with-userinfo": (b"GET / HTTP/1.1\r\nHost: u@x\r\nTE: x\r\n\r\n", 400),
    "two-spaces-in-the-request-line": (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "a-space-before-the-version": (b"GET /a  HTTP/1.0\r\n\r\n", 400),
    "http2-request-line": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "http09-request-line": (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
}


@pytest.mark.parametrize(("head", "upstream"), RELAYED.values(), ids=RELAYED.keys())
def test_a_head_goes_upstream_exactly_so(head: bytes, upstream: bytes) -> None:
    assert rewrite(head, PEER).upstream == upstream


@pytest.mark.parametrize(("head", "status"), REFUSED.values(), ids=REFUSED.keys())
def test_a_head_that_could_frame_two_ways_is_refused(head: bytes, status: int) -> None:
    with pytest.raises(Refused) as refused:
        rewrite(head, PEER)
    assert refused.value.status == status


def test_what_routing_needs_is_read_from_the_head() -> None:
    head = rewrite(
        b"POST /u HTTP/1.0\r\nHost: Shop.Example.com\r\nCookie: A=1\r\nCookie: JSESSIONID=s.a1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        PEER,
    )
    assert head.host == b"shop.example.com"
    assert head.cookies == b"A=1; JSESSIONID=s.a1"  # cookies keep their case
    assert head.chunked and head.http10


@pytest.mark.parametrize(
    ("host", "http11", "ok"),
    [
        (b"shop.example.com", True, True),
        (b"shop.example.com:8443", True, True),
        (b"[2001:db8::1]:80", True, True),
        (b"", True, True),  # an empty Host is what RFC 9112 asks for without an authority
        (None, False, True),  # HTTP/1.0 may omit it
        (None, True, False),
        (b"a b", True, False),
        (b"a/b", True, False),
        (b"x:80:80", True, False),
        (b"[::1", True, False),
    ],
)
def test_host_values(host: bytes | None, http11: bool, ok: bool) -> None:
    if ok:
        assert checked_host(host, http11) == host
    else:
        with pytest.raises(Refused):
            checked_host(host, http11)


def test_connect_is_405_and_other_methods_pass() -> None:
    with pytest.raises(Refused) as refused:
        check_method(b"CONNECT")
    assert refused.value.status == 405
    for method in (None, b"POST", b"OPTIONS", b"PROPFIND"):
        check_method(method)


def test_only_a_websocket_handshake_becomes_a_tunnel() -> None:
    tunnels = {name for name, (head, _) in RELAYED.items() if rewrite(head, PEER).tunnel}
    assert tunnels == {"websocket-handshake-goes-up-to-be-a-tunnel"}
