"""The HTTP-to-HTTPS redirect listener (`balancer.redirect_listen`).

Every request is answered `308 Permanent Redirect` (the method and body are
kept by the client) to the same host name and target on the HTTPS listener,
then the connection closes; nothing reaches a member. The decision is
`location`, a pure function; `Redirect` is the transport glue (llhttp parses).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, cast

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from changeover.proxy.heads import Refused, checked_host
from changeover.proxy.responses import ERRORS


def location(host: bytes | None, target: bytes, https_port: int, fallback: bytes) -> bytes:
    """Where a request for `target` with Host `host` (None: none sent) goes over
    HTTPS: the host's name (its port dropped; `fallback` when there is no Host)
    and the HTTPS port, omitted when it is 443. Refused(400) for a Host that is
    not one, or a target that is not a path (absolute form, `*`)."""
    name = checked_host(host.lower() if host is not None else None, False) or fallback
    if not name or not target.startswith(b"/"):
        raise Refused(400)
    # An IPv6 literal's port follows its bracket.
    name = name[: name.index(b"]") + 1] if name.startswith(b"[") else name.partition(b":")[0]
    port = b"" if https_port == 443 else b":%d" % https_port
    return b"https://%s%s%s" % (name, port, target)


def redirect_response(where: bytes) -> bytes:
    return (
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n" % where
    )


class Redirect(asyncio.Protocol):
    """One client connection on the redirect listener: one answer, then close."""

    def __init__(self, https_port: int, fallback: bytes, timeout: float) -> None:
        self.https_port = https_port
        self.fallback = fallback
        self.timeout = timeout
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.target = b""
        self.hosts: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # A client that never finishes its head does not hold the connection.
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            reason = exc.__context__
            self._send(ERRORS[reason.status if isinstance(reason, Refused) else 400])

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.hosts.append(value.strip(b" \t"))

    def on_headers_complete(self) -> None:
        if len(self.hosts) > 1:
            raise Refused(400)
        host = self.hosts[0] if self.hosts else None
        self._send(redirect_response(location(host, self.target, self.https_port, self.fallback)))

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()


def redirect_factory(https_port: int, fallback: str, timeout: float) -> Any:
    return partial(Redirect, https_port, fallback.encode(), timeout)
