"""What the balancer decides about a response head: pure functions over bytes.

llhttp (fed by protocol.py) has accepted the head's syntax and found where it
ends; what goes back to the client instead of it is decided here (RFC 9112):

- Hop-by-hop lines (Keep-Alive, TE, Trailer, Upgrade, Proxy-Authorization,
  Connection and the names it lists) are removed; a lone `Connection:
  keep-alive` that already says what the balancer would say stays.
- The client is told `Connection: close` when its request asked for it, when
  the balancer stops, or when the body can only end with the connection; an
  HTTP/1.0 client that keeps its connection is told `keep-alive`.
- How the body ends: nothing for HEAD, 204 and 304; else Content-Length,
  chunks, or the upstream's close. A close-framed body goes to an HTTP/1.1
  client as chunks (so its connection survives), a chunked one to an HTTP/1.0
  client plain, and the status line always says HTTP/1.1.
- The route cookie goes in before the blank line unless the app set the
  sticky cookie itself.
- An interim (1xx) head is relayed minus its hop-by-hop lines; the final one
  follows. A 101 is relayed as received, only to a WebSocket handshake and
  only if it switches to WebSocket (`switches`).

A head is written as `prefix` followed by the head's own bytes from
`relay_from` on: nothing is copied when nothing changes, and an insertion
goes before the blank line, which then travels with the body bytes.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from http import HTTPStatus

import httptools
from httptools import HttpParserError

from changeover.proxy.heads import CHUNKED, connection_tokens, cut, lists_upgrade, names_pattern

# Response headers that decide the framing, the route cookie, or are hop-by-hop.
_HOP_BY_HOP = [b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"]
_HOP_BY_HOP += [b"proxy-authorization"]
RESPONSE_SCAN = re.compile(  # in a lower-case copy, like heads.REQUEST_SCAN
    rb"\r\n(%s):[ \t]*([^\r]*)"
    % names_pattern(
        [b"content-length", b"transfer-encoding", b"set-cookie", b"connection", *_HOP_BY_HOP]
    )
)
_CODING_LINE = re.compile(rb"\r\ntransfer-encoding:[^\r]*")

# How the upstream response body ends: no body, Content-Length, chunked, connection close.
NO_BODY, LENGTH_FRAMED, CHUNK_FRAMED, CLOSE_FRAMED = range(4)

CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def error_response(status: int) -> bytes:
    """A whole response of the balancer's own, after which it closes."""
    body = b"%d %s\n" % (status, HTTPStatus(status).phrase.encode())
    return b"%sContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status_line(status),
        len(body),
        body,
    )


ERRORS = {s: error_response(s) for s in (400, 405, 408, 431, 502, 503, 504, 505)}


def plain_length(block: bytes) -> int:
    """The Content-Length of a plain head, else -1.

    `block` is the lower-case header block of an HTTP/1.1 head with a final
    status; plain means a Content-Length and nothing to remove or look at but
    perhaps `Connection: keep-alive`: nearly every response, relayed as
    received (the route cookie aside)."""
    length = -1
    for name, value in RESPONSE_SCAN.findall(block):
        if name == b"content-length":
            length = int(value)  # llhttp has checked it: digits, one value
        elif name != b"connection" or value != b"keep-alive":
            return -1
    return length


@dataclass(frozen=True, slots=True)
class Asked:
    """What the client asked that decides how its response head is written."""

    head_only: bool  # a HEAD request: the response has no body
    http10: bool  # the client speaks HTTP/1.0
    keep_alive: bool  # the client's connection may serve another request
    stopping: bool  # the balancer is shutting down: every connection closes
    cookie: bytes | None  # the route cookie's Set-Cookie line to add, if any
    sticky: bytes  # b"<sticky cookie name>=": the app's own session cookie


@dataclass(frozen=True, slots=True)
class Answer:
    """A response head as it goes to the client, and how its body is relayed."""

    prefix: bytes  # written first, then the head's bytes from relay_from on
    relay_from: int
    interim: bool  # 1xx: the final response follows
    framing: int  # NO_BODY, LENGTH_FRAMED, CHUNK_FRAMED or CLOSE_FRAMED
    left: int  # the body's length when LENGTH_FRAMED
    close: bool  # the client connection closes after this response
    rechunk: bool  # a close-framed body goes as chunks
    dechunk: bool  # a chunked body goes plain (to an HTTP/1.0 client)

    def written(self, head: bytes) -> bytes:
        """The whole head as the client receives it."""
        return self.prefix + head[self.relay_from :]


def _rewritten(
    head: bytes,
    line_end: int,
    http11: bool,
    removed: list[tuple[int, int]] | None,
    listed: set[bytes] | None,
) -> bytes:
    """The head minus the `removed` spans and `listed` names, without its blank line."""
    # "HTTP/1.0 200 OK" becomes "HTTP/1.1 200 OK": we speak HTTP/1.1 to the client.
    line = head[:line_end] if http11 else b"HTTP/1.1" + head[head.find(b" ") : line_end]
    return line + cut(head[line_end:-4], removed, listed) + b"\r\n"


def answer(head: bytes, status: int, asked: Asked) -> Answer:
    """How `head` (status line to blank line, as llhttp accepted it) goes to the client."""
    line_end = head.find(b"\r\n")
    block = head[line_end:-2].lower()  # names are matched in a lower-case copy, same offsets
    http11 = head.startswith(b"HTTP/1.1 ")
    length = -1
    coding: bytes | None = None
    listed: set[bytes] | None = None
    removed: list[tuple[int, int]] | None = None
    sticky_seen = False
    connections = 0  # Connection lines
    keep_alive_line = False  # the only one says "keep-alive"
    for match in RESPONSE_SCAN.finditer(block):
        name = match[1]
        if name == b"content-length":
            length = int(match[2])  # llhttp has checked it: digits, one value
            continue
        if name == b"set-cookie":
            # Cookie names are case-sensitive: look at the original line.
            sticky_seen = sticky_seen or head.startswith(asked.sticky, line_end + match.start(2))
            continue
        if name == b"transfer-encoding":
            value = match[2].rstrip(b" \t")
            coding = value if coding is None else coding + b", " + value
            continue
        if name == b"connection":
            connections += 1
            value = match[2].strip()
            keep_alive_line = connections == 1 and value == b"keep-alive"
            tokens = connection_tokens(value)
            if tokens:
                listed = tokens if listed is None else listed | tokens
        if removed is None:
            removed = []
        removed.append(match.span())

    if status < 200:  # interim (100 Continue, 103): relay, the final one follows
        prefix = _rewritten(head, line_end, http11, removed, listed) + b"\r\n"
        return Answer(prefix, len(head), True, NO_BODY, 0, False, False, False)

    left = 0
    if asked.head_only or status in (204, 304):
        framing = LENGTH_FRAMED
    elif coding is not None:
        framing = CHUNK_FRAMED if coding.endswith(b"chunked") else CLOSE_FRAMED
    elif length >= 0:
        framing = LENGTH_FRAMED
        left = length
    else:
        framing = CLOSE_FRAMED
    http10 = asked.http10
    # HTTP/1.0 clients cannot read chunks: they get the raw body and a close.
    rechunk = framing == CLOSE_FRAMED and coding is None and not http10
    dechunk = framing == CHUNK_FRAMED and http10
    close = (
        not asked.keep_alive
        or asked.stopping
        or dechunk
        or (framing == CLOSE_FRAMED and not rechunk)
    )

    # Our Connection header: an upstream's lone "Connection: keep-alive"
    # already says what we would say to a keep-alive client, so it stays.
    said = keep_alive_line and not close and connections == 1 and len(removed or ()) == 1
    if said:
        removed = None
    if dechunk:  # the body goes plain: its Transfer-Encoding line goes too
        removed = sorted([*(removed or []), *(m.span() for m in _CODING_LINE.finditer(block))])
    rewritten = removed is not None or listed is not None or not http11
    parts: list[bytes] = []
    if close:
        parts.append(CLOSE)
    elif http10 and not said:
        parts.append(KEEP_ALIVE)
    if rechunk:
        parts.append(CHUNKED)
    if asked.cookie is not None and not sticky_seen:
        parts.append(asked.cookie)

    if rewritten:
        prefix = b"".join([_rewritten(head, line_end, http11, removed, listed), *parts, b"\r\n"])
        relay_from = len(head)
    elif parts:  # inserted before the blank line, which goes with the body bytes
        prefix = b"".join([head[:-2], *parts])
        relay_from = len(head) - 2
    else:  # relayed as received, from the status line on
        prefix = b""
        relay_from = 0
    return Answer(prefix, relay_from, False, framing, left, close, rechunk, dechunk)


_UPGRADE_WEBSOCKET = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n")
_CONNECTION_VALUE = re.compile(rb"\r\nconnection:([^\r]*)")


def switches(head: bytes) -> bool:
    """Whether a 101 head switches to WebSocket (RFC 6455 4.2.2): `Upgrade:
    websocket` and a Connection header listing `upgrade`. Such a head is
    relayed as received: its Upgrade and Connection lines are the handshake."""
    low = head.lower()
    return bool(_UPGRADE_WEBSOCKET.search(low)) and any(
        lists_upgrade(value) for value in _CONNECTION_VALUE.findall(low)
    )


class Dechunk:
    """Decodes a chunked body for an HTTP/1.0 client; llhttp does the framing."""

    __slots__ = ("done", "out", "parser")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.done = False
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.out.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    def feed(self, data: bytes) -> list[bytes]:
        with contextlib.suppress(HttpParserError):  # the upstream's own parser reports it
            self.parser.feed_data(data)
        out, self.out = self.out, []
        return out
