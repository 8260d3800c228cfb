"""What the balancer decides about a request head: pure functions over bytes.

llhttp (fed by protocol.py) has accepted the head's syntax: CRLF line ends,
token names, no obs-fold, one `Name: value` per line, the head ending at its
first blank line. What llhttp does not decide is decided here, before a byte of
the request goes upstream (RFC 9112): whether it is refused and with which
status, the head that goes upstream instead of it, and how its body is framed.
One decision per head: the body is relayed exactly as the head says it ends,
so the member never reads a request the balancer did not see.

- Framing headers (Content-Length, Transfer-Encoding) and Host cannot be listed
  in Connection (that would remove them while their framing still applies), at
  most one framing, exactly `chunked` as a coding: otherwise 400.
- An Upgrade request may not carry a body. A WebSocket handshake (HTTP/1.1
  GET, `Upgrade: websocket`, `Connection` listing `upgrade`) goes upstream
  with its Upgrade line and `Connection: Upgrade`, to become a tunnel if the
  member answers 101; any other Upgrade request is relayed without Upgrade.
- A request line is exactly three words with one space between each.
- HTTP/1.1 needs one Host, a host[:port]; versions other than 1.0 and 1.1 are 505.
- Hop-by-hop lines, those Connection lists, and the forwarding headers a client
  must not choose (X-Forwarded-Proto/Host, Forwarded, X-Real-IP) are removed;
  X-Forwarded-For gets the client's address appended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Request headers the balancer reads or removes; every other line goes upstream
# as received. A match is anchored at the CRLF before the name and ends at the
# colon, so `te` never matches `tex` or `x-te`; the value runs to the line end.
_HOST, _COOKIE, _LENGTH, _CODING, _CONNECTION, _XFF, _DROP = range(7)
_REQUEST_KINDS = {
    b"host": _HOST,
    b"cookie": _COOKIE,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,  # re-added: chunked request bodies are re-framed
    b"connection": _CONNECTION,
    b"x-forwarded-for": _XFF,  # re-added with the client's address appended
    # Hop-by-hop, or ours to set: a client must not choose them.
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"proxy-authorization": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"forwarded": _DROP,  # a client must not choose what the member takes as its address
    b"x-real-ip": _DROP,
}
# Headers that decide how a request is framed or routed: a Connection header
# that lists one would have it removed while its framing still applies (a
# hidden second request), so such a request is refused.
_UNLISTABLE = frozenset({b"content-length", b"transfer-encoding", b"host"})


def names_pattern(names: list[bytes]) -> bytes:
    return b"|".join(re.escape(n) for n in names)


# Matched in a lower-case copy of the head: IGNORECASE makes the scan twice as slow.
REQUEST_SCAN = re.compile(rb"\r\n(%s):[ \t]*([^\r]*)" % names_pattern(list(_REQUEST_KINDS)))

# A Host value (RFC 9110 7.2, RFC 3986 3.2.2), in a lower-case copy: a reg-name
# or an IP literal, then perhaps a port. Anything else (a space, '/', '@') is a
# 400: the member, and whatever logs it, could read it another way.
_VALID_HOST = re.compile(rb"(?:\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")

CHUNKED = b"Transfer-Encoding: chunked\r\n"


class Refused(Exception):
    """The request is answered with `status` and the connection closed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def checked_host(host: bytes | None, http11: bool) -> bytes | None:
    """`host` (lower case) if the request may carry it: present in 1.1, well-formed."""
    if host is None:
        if http11:  # RFC 9112 3.2: a 1.1 request without Host is a 400
            raise Refused(400)
    elif not _VALID_HOST.fullmatch(host):
        raise Refused(400)
    return host


_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive", b"upgrade"})


def lists_upgrade(value: bytes) -> bool:
    """Whether a Connection header's value lists the `upgrade` option."""
    return b"upgrade" in {t.strip() for t in value.lower().split(b",")}


def connection_tokens(value: bytes) -> set[bytes]:
    """Header names a Connection header lists beyond the usual options."""
    value = value.strip().lower()
    if value in _PLAIN_CONNECTION:  # nearly always: skip the split
        return set()
    return {t.strip() for t in value.split(b",")} - _PLAIN_CONNECTION - {b""}


def cut(block: bytes, removed: list[tuple[int, int]] | None, listed: set[bytes] | None) -> bytes:
    """Header lines ("\\r\\nName: value" each) minus the `removed` spans and `listed` names."""
    if removed:
        kept = []
        at = 0
        for a, b in removed:
            kept.append(block[at:a])
            at = b
        kept.append(block[at:])
        block = b"".join(kept)
    if not listed:
        return block
    return b"\r\n".join(
        line for line in block.split(b"\r\n") if line.partition(b":")[0].lower() not in listed
    )


def check_method(method: bytes | None) -> None:
    """CONNECT asks for a tunnel to anywhere: not for a reverse proxy (405)."""
    if method == b"CONNECT":
        raise Refused(405)


def _no_length_body(low: bytes) -> bool:
    """Whether the (single) Content-Length in a lower-case head is 0."""
    at = low.find(b"\r\ncontent-length:") + 17
    return low[at : low.find(b"\r", at)].strip(b" \t") == b"0"


@dataclass(frozen=True, slots=True)
class Peer:
    """What the balancer says about a client connection in the heads it relays."""

    ip: bytes  # the client's address, appended to X-Forwarded-For
    proto: bytes  # http or https
    fallback_host: bytes  # "Host: <listener>\r\n" for an HTTP/1.0 request without one

    @property
    def forwarded(self) -> bytes:
        """The X-Forwarded-For and -Proto lines of a request that had neither."""
        return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (self.ip, self.proto)


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A request head as it goes upstream, and what routing needs from it."""

    upstream: bytes  # request line to blank line, always HTTP/1.1
    host: bytes | None  # lower case
    cookies: bytes | None  # every Cookie line's value, joined with "; "
    chunked: bool  # the body is re-framed as chunks (llhttp hands over its data)
    http10: bool
    tunnel: bool  # a WebSocket handshake: a 101 makes the connection a tunnel


def rewrite(head: bytes, peer: Peer) -> Rewritten:
    """`head` (request line to blank line, as llhttp accepted it) as it goes
    upstream, or Refused(status) when it must not go at all."""
    line_end = head.find(b"\r\n")
    low = head[line_end:-2].lower()  # names are matched in a lower-case copy, same offsets
    host = cookies = xff = None
    listed: set[bytes] | None = None
    chunked = length = upgrade = connection_upgrade = False
    websocket: tuple[int, int] | None = None  # the span of an "Upgrade: websocket" line
    removed: list[tuple[int, int]] | None = None
    for match in REQUEST_SCAN.finditer(low):
        kind = _REQUEST_KINDS[match[1]]
        if kind == _HOST:
            if host is not None:
                raise Refused(400)
            host = match[2].rstrip(b" \t")
            continue
        if kind == _COOKIE:
            a, b = match.span(2)
            value = head[line_end + a : line_end + b]  # cookies keep their case
            cookies = value if cookies is None else cookies + b"; " + value
            continue
        if kind == _LENGTH:
            # llhttp refuses these too, but only once the head could be upstream.
            if length or chunked:
                raise Refused(400)
            length = True
            if upgrade and match[2].rstrip(b" \t") != b"0":
                raise Refused(400)
            continue
        if kind == _CODING:
            # Exactly "chunked": llhttp reports other codings, and "chunked<TAB>",
            # only once the head could be upstream.
            if length or chunked or upgrade or match[2] != b"chunked":
                raise Refused(400)
            chunked = True
        elif kind == _CONNECTION:
            connection_upgrade = connection_upgrade or lists_upgrade(match[2])
            tokens = connection_tokens(match[2])
            if tokens & _UNLISTABLE:
                raise Refused(400)
            if tokens:
                listed = tokens if listed is None else listed | tokens
        elif kind == _XFF:
            value = match[2].rstrip(b" \t")
            xff = value if xff is None else xff + b", " + value
        elif match[1] == b"upgrade":
            # Not tunnelled: the request goes upstream without Upgrade, and
            # llhttp would skip a body it then takes for the next request.
            if chunked or (length and not _no_length_body(low)):
                raise Refused(400)
            if upgrade:  # two Upgrade lines: never a tunnel
                websocket = None
            elif match[2].rstrip(b" \t") == b"websocket":
                websocket = match.span()
            upgrade = True
        # This line does not go upstream (hop-by-hop, or ours to set).
        if removed is None:
            removed = []
        removed.append(match.span())

    request_line = head[:line_end]
    words = request_line.split(b" ")
    if len(words) != 3:  # llhttp takes "GET  / HTTP/1.1"; RFC 9112 3 says one SP each
        raise Refused(400)
    method, target, version = words
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):  # llhttp takes any digit.digit
        raise Refused(505)
    http10 = version == b"HTTP/1.0"
    host = checked_host(host, not http10)
    if http10:  # always HTTP/1.1 upstream
        request_line = b"%s %s HTTP/1.1" % (method, target)
    # RFC 6455 4.1: a WebSocket handshake is an HTTP/1.1 GET without a body.
    tunnel = websocket is not None and connection_upgrade and method == b"GET" and not http10
    if tunnel:
        assert removed is not None and websocket is not None
        removed.remove(websocket)  # the Upgrade line goes up as received
    parts = [request_line, cut(head[line_end:-4], removed, listed), b"\r\n"]
    if host is not None:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    else:
        parts.append(peer.fallback_host)
    if xff is None:
        parts.append(peer.forwarded)
    else:
        parts += (b"X-Forwarded-For: ", xff, b", ", peer.ip, b"\r\n")
        parts += (b"X-Forwarded-Proto: ", peer.proto, b"\r\n")
    if chunked:
        parts.append(CHUNKED)
    if tunnel:
        parts.append(b"Connection: Upgrade\r\n")
    parts.append(b"\r\n")
    return Rewritten(b"".join(parts), host, cookies, chunked, http10, tunnel)
