"""The hot path of one worker process: client and upstream connections.

asyncio Protocol callbacks only (no streams, no task per request): httptools
(llhttp) finds message boundaries in both directions and calls back per
header, body piece and message end. A request head is rebuilt once (hop-by-hop
headers out, X-Forwarded-* in); body pieces are written on as they arrive, with
pause_reading/resume_reading for backpressure both ways. Upstream connections
are kept alive in a LIFO pool per member. Nothing here logs per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from http import HTTPStatus
from typing import Any, cast

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from changeover.config import Topology
from changeover.proxy.routing import (
    NO_MEMBER,
    PUBLIC,
    Table,
    eligible,
    pick,
    qa_cluster,
    sticky_route,
)
from changeover.proxy.state import SharedState

HEADER_LIMIT = 32 * 1024  # request line + headers; more is answered 431
BUFFER_LIMIT = 256 * 1024  # request bytes held while no upstream is attached
REPLAY_LIMIT = 64 * 1024  # request bytes kept to replay on a stale keep-alive connection
IDLE_PER_MEMBER = 256  # idle keep-alive upstream connections kept per member
HEADER_TIMEOUT = 10.0  # a request head must arrive within this
IDLE_TIMEOUT = 60.0  # an idle keep-alive client connection is closed after this
CONNECT_TIMEOUT = 5.0

# Why client reading is paused (bits): upstream is full, request bytes are
# buffered while connecting, or pipelined requests wait for their turn.
_UPLOAD, _BUFFERED, _QUEUED = 1, 2, 4

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# What to do with each request header (absent: forward as is).
_HOST, _COOKIE, _LENGTH, _CODING, _CONNECTION, _XFF, _DROP = range(7)
_REQUEST_HEADERS = {
    b"host": _HOST,
    b"cookie": _COOKIE,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"x-forwarded-for": _XFF,
    # Hop-by-hop, or ours to set: a client must not choose them.
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"proxy-authorization": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
}
# What to do with each response header (absent: relay as is).
_RESPONSE_HEADERS = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,  # re-added when the body is relayed chunked
    b"connection": _CONNECTION,
    b"set-cookie": _COOKIE,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"proxy-authorization": _DROP,
}
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# How the upstream response body ends.
_LENGTH_FRAMED, _CHUNK_FRAMED, _CLOSE_FRAMED = range(3)


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def error_response(status: int) -> bytes:
    body = b"%d %s\n" % (status, HTTPStatus(status).phrase.encode())
    return b"%sContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status_line(status),
        len(body),
        body,
    )


_ERRORS = {s: error_response(s) for s in (400, 408, 431, 502, 503)}


class Refused(Exception):
    """Raised from a parser callback to answer the request with `status` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive", b"upgrade"})


def _connection_tokens(value: bytes) -> set[bytes]:
    """Header names a Connection header lists beyond the usual options."""
    value = value.lower()
    if value in _PLAIN_CONNECTION:  # nearly always: skip the split
        return set()
    return {t.strip() for t in value.split(b",")} - _PLAIN_CONNECTION - {b""}


def _without(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    """Header pieces (name, ": ", value, CRLF) minus those a Connection header listed."""
    kept: list[bytes] = []
    for i in range(0, len(lines), 4):
        if lines[i].lower() not in names:
            kept += lines[i : i + 4]
    return kept


class Worker:
    """Everything the connections of one worker process share."""

    def __init__(self, topology: Topology, shared: SharedState, index: int) -> None:
        balancer = topology.balancer
        self.loop = asyncio.get_running_loop()
        self.table = Table.from_topology(topology)
        self.shared = shared
        self.inflight, self.requests, self.failures = shared.counters(index)
        self.least_conn = balancer.algorithm == "least-conn"
        self.sticky = balancer.sticky_cookie.encode() + b"="
        self.inserted = balancer.route_cookie.encode() + b"="
        members = [m for _, m in topology.members()]
        self.addresses = [(m.host, m.port) for m in members]
        self.set_cookie = [
            b"Set-Cookie: %s%s; Path=/; HttpOnly\r\n" % (self.inserted, m.route_id.encode())
            for m in members
        ]
        self.idle: list[list[Upstream]] = [[] for _ in members]
        self.clients: set[Client] = set()
        self.stopping = False
        self.drained = asyncio.Event()  # set when a client closes while stopping
        self.turn = index  # workers start their round-robin at different members
        # Deadlines are checked once a second, so a clock updated as often is
        # precise enough and spares a loop.time() call per request.
        self.now = self.loop.time()
        self._generation = shared.generation_view()
        self.generation = -1
        self._reload()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _reload(self) -> None:
        self.generation, self.admission, self.healthy = self.shared.snapshot()
        self.candidates = eligible(self.table, self.admission, self.healthy)

    def route(self, scope: int, sticky: int, tried: tuple[int, ...] | list[int]) -> int:
        if self._generation[0] != self.generation:
            self._reload()
        chosen = pick(
            self.table,
            self.candidates,
            self.admission,
            self.healthy,
            scope,
            sticky,
            self.turn,
            self.inflight if self.least_conn else None,
            tried,
        )
        if chosen != sticky:  # only new-session choices take a round-robin turn
            self.turn += 1
        return chosen

    def acquire(self, member: int) -> Upstream | None:
        idle = self.idle[member]
        while idle:
            upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                return upstream
        return None

    def release(self, upstream: Upstream) -> None:
        upstream.client = None
        upstream.req = None
        upstream.reused = True
        transport = upstream.transport
        if transport is None:
            return
        idle = self.idle[upstream.member]
        if self.stopping or len(idle) >= IDLE_PER_MEMBER:
            transport.close()
            return
        if upstream.read_paused:  # keep reading while idle: we must see the upstream close
            upstream.read_paused = False
            transport.resume_reading()
        idle.append(upstream)

    async def connect(self, member: int) -> Upstream:
        host, port = self.addresses[member]
        _, upstream = await asyncio.wait_for(
            self.loop.create_connection(partial(Upstream, self, member), host, port),
            CONNECT_TIMEOUT,
        )
        return upstream

    def _sweep(self) -> None:
        """Close clients past their deadline (slow heads, idle keep-alive)."""
        self.now = now = self.loop.time()
        for client in [c for c in self.clients if 0 < c.deadline < now]:
            client.expire()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def stop(self) -> None:
        """Stop taking new requests: idle clients close now, busy ones after their response."""
        self.stopping = True
        for client in list(self.clients):
            client.stop()

    def close(self) -> None:
        self._sweeper.cancel()
        for idle in self.idle:
            for upstream in idle:
                if upstream.transport is not None:
                    upstream.transport.close()
            idle.clear()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()


class Request:
    """One request on its way: routing inputs and bytes not yet sent upstream."""

    __slots__ = (
        "chunked",
        "cookie",
        "done",
        "head_only",
        "http10",
        "keep_alive",
        "member",
        "pending",
        "pending_size",
        "scope",
        "sent",
        "sent_size",
        "sticky",
        "tried",
        "upstream",
    )

    def __init__(
        self,
        head: bytes,
        scope: int,
        sticky: int,
        chunked: bool,
        head_only: bool,
        http10: bool,
        keep_alive: bool,
        replayable: bool,
    ) -> None:
        self.scope = scope
        self.sticky = sticky
        self.chunked = chunked
        self.head_only = head_only
        self.http10 = http10
        self.keep_alive = keep_alive
        self.pending: list[bytes] | None = [head]  # None once streaming straight upstream
        self.pending_size = len(head)
        self.sent: list[bytes] | None = [head] if replayable else None
        self.sent_size = len(head)
        self.done = False  # the client sent the whole request
        self.member = NO_MEMBER
        self.cookie: bytes | None = None  # Set-Cookie to add unless the app sets its own
        self.tried: tuple[int, ...] | list[int] = ()
        self.upstream: Upstream | None = None


class Client(asyncio.Protocol):
    """One client connection on a public or QA listener."""

    __slots__ = (
        "active",
        "chunked",
        "cookies",
        "deadline",
        "drop",
        "eof",
        "fallback_host",
        "head_size",
        "header_bytes",
        "host",
        "ip",
        "length_seen",
        "lines",
        "parser",
        "paused",
        "proto",
        "queue",
        "reading_head",
        "req",
        "scope",
        "transport",
        "url",
        "w",
        "write_paused",
        "xf",
        "xff",
    )

    def __init__(self, worker: Worker, scope: int, https: bool, listen_host: bytes) -> None:
        self.w = worker
        self.scope = scope
        self.proto = b"https" if https else b"http"
        self.fallback_host = b"Host: %s\r\n" % listen_host  # for HTTP/1.0 requests without one
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.ip = b""
        self.xf = b""
        self.req: Request | None = None  # being received
        self.active: Request | None = None  # being answered
        self.queue: deque[Request] | None = None  # pipelined, waiting for `active`
        self.paused = 0
        self.write_paused = False
        self.eof = False  # no more requests will be read on this connection
        self.deadline = 0.0
        self._new_head()

    def _new_head(self) -> None:
        self.reading_head = True
        self.head_size = 0
        self.header_bytes = 0
        self.url = b""
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.cookies: bytes | None = None
        self.xff: bytes | None = None
        self.drop: set[bytes] | None = None
        self.length_seen = False
        self.chunked = False

    # --- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]).encode() if peer else b"unknown"
        self.xf = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (self.ip, self.proto)
        self.w.clients.add(self)
        self.deadline = self.w.now + HEADER_TIMEOUT

    def data_received(self, data: bytes) -> None:
        if self.eof:  # after a "Connection: close" request, nothing more is read
            return
        if self.reading_head:
            if self.head_size == 0:
                self.deadline = self.w.now + HEADER_TIMEOUT
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # The request went upstream without its Upgrade header; llhttp
            # stopped after it, so what follows is the next request.
            rest = data[exc.args[0] :]
            if rest and self.transport is not None:
                self.data_received(rest)
            return
        except HttpParserError as exc:
            reason = exc.__context__
            self._refuse(reason.status if isinstance(reason, Refused) else 400)
            return
        if self.reading_head and self.head_size > HEADER_LIMIT:
            self._refuse(431)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.active is None and self.transport is not None:
            self.transport.close()
        # Half-close: still deliver the response in flight (TLS cannot half-close).
        return None if self.proto == b"https" else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.w.clients.discard(self)
        if self.w.stopping:
            self.w.drained.set()
        self.queue = None
        req, self.active = self.active, None
        if req is not None and req.member >= 0:
            self._settle(req, served=False)
            upstream = req.upstream
            if upstream is not None:  # mid-exchange: that connection cannot be reused
                upstream.client = None
                if upstream.transport is not None:
                    upstream.transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        upstream = self.active.upstream if self.active is not None else None
        if upstream is not None:
            upstream.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        upstream = self.active.upstream if self.active is not None else None
        if upstream is not None:
            upstream.resume()

    # --- request parser callbacks ----------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > HEADER_LIMIT:
            raise Refused(431)
        kind = _REQUEST_HEADERS.get(name.lower())
        if kind is None:
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            if self.host is not None:
                raise Refused(400)
            self.host = value
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == _COOKIE:
            self.cookies = value if self.cookies is None else self.cookies + b"; " + value
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == _LENGTH:
            # llhttp refuses these too; checking here keeps it out of upstream for sure.
            if self.length_seen or self.chunked:
                raise Refused(400)
            self.length_seen = True
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == _CODING:
            # Only "chunked" is relayed: llhttp reports other codings only after
            # the head is complete, when the request would already be upstream.
            if self.length_seen or self.chunked or value.strip().lower() != b"chunked":
                raise Refused(400)
            self.chunked = True
        elif kind == _CONNECTION:
            tokens = _connection_tokens(value)
            if tokens:
                self.drop = tokens if self.drop is None else self.drop | tokens
        elif kind == _XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value

    def on_headers_complete(self) -> None:
        parser = self.parser
        w = self.w
        if self.header_bytes + len(self.url) > HEADER_LIMIT:
            raise Refused(431)
        self.reading_head = False
        self.deadline = 0.0
        method: bytes = parser.get_method()
        http10 = parser.get_http_version() == "1.0"
        lines = self.lines if self.drop is None else _without(self.lines, self.drop)
        parts = [method, b" ", self.url, b" HTTP/1.1\r\n", *lines]
        if self.host is not None:
            parts += (b"X-Forwarded-Host: ", self.host, b"\r\n")
        else:
            parts.append(self.fallback_host)
        if self.xff is None:
            parts.append(self.xf)
        else:
            parts += (b"X-Forwarded-For: ", self.xff, b", ", self.ip, b"\r\n")
            parts += (b"X-Forwarded-Proto: ", self.proto, b"\r\n")
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")

        scope = self.scope
        if scope == PUBLIC and w.table.qa_hosts:
            scope = qa_cluster(w.table, self.host)
        sticky = NO_MEMBER
        if self.cookies is not None:
            route = sticky_route(self.cookies, w.sticky, w.inserted)
            if route is not None:
                sticky = w.table.routes.get(route, NO_MEMBER)
        req = Request(
            b"".join(parts),
            scope,
            sticky,
            self.chunked,
            method == b"HEAD",
            http10,
            parser.should_keep_alive() and not w.stopping,
            method in _IDEMPOTENT,
        )
        self.req = req
        if self.active is None:
            self._dispatch(req)
        else:  # pipelined: answered in order once `active` is done
            if self.queue is None:
                self.queue = deque()
            self.queue.append(req)
            self._pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is not None:
            self._send(req, b"%x\r\n%s\r\n" % (len(body), body) if req.chunked else body)

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        self._new_head()
        if req is None:
            return
        if req.chunked:
            self._send(req, b"0\r\n\r\n")
        req.done = True
        if not req.keep_alive:
            self.eof = True

    # --- exchange ----------------------------------------------------------------

    def _send(self, req: Request, data: bytes) -> None:
        if req.sent is not None:
            req.sent_size += len(data)
            if req.sent_size > REPLAY_LIMIT:
                req.sent = None
            else:
                req.sent.append(data)
        if req.pending is None:
            assert req.upstream is not None and req.upstream.transport is not None
            req.upstream.transport.write(data)
            return
        req.pending.append(data)
        req.pending_size += len(data)
        if req.pending_size > BUFFER_LIMIT:
            self._pause(_BUFFERED)

    def _dispatch(self, req: Request) -> None:
        w = self.w
        member = w.route(req.scope, req.sticky, req.tried)
        if member == NO_MEMBER:
            self._answer(502 if req.tried else 503)
            return
        req.member = member
        req.cookie = None if member == req.sticky else w.set_cookie[member]
        self.active = req
        w.inflight[member] += 1
        upstream = w.acquire(member)
        if upstream is None:
            w.loop.create_task(self._connect(req))
        else:
            self._attach(req, upstream)

    async def _connect(self, req: Request) -> None:
        w = self.w
        member = req.member
        try:
            upstream = await w.connect(member)
        except (OSError, TimeoutError):
            w.failures[member] += 1  # passive health: the master counts these
            if self.active is req:
                self._settle(req, served=False)
                self.active = None
                req.tried = [*req.tried, member]
                self._dispatch(req)
            return
        if self.active is req and self.transport is not None:
            self._attach(req, upstream)
        else:
            w.release(upstream)

    def _attach(self, req: Request, upstream: Upstream) -> None:
        assert req.pending is not None and upstream.transport is not None
        req.upstream = upstream
        upstream.start(self, req)
        if self.write_paused:
            upstream.pause()
        pending, req.pending = req.pending, None
        upstream.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self.paused & _BUFFERED:
            self._resume(_BUFFERED)

    def _settle(self, req: Request, served: bool) -> None:
        """Account for the end of one attempt at a member (exactly once per dispatch)."""
        self.w.inflight[req.member] -= 1
        if served:
            self.w.requests[req.member] += 1

    def response_done(self, upstream: Upstream, reusable: bool) -> None:
        """The upstream delivered a whole response (already written to the client)."""
        req = self.active
        assert req is not None
        self.active = None
        req.upstream = None
        self._settle(req, served=True)
        if reusable and req.done:
            self.w.release(upstream)
        else:
            upstream.client = None
            if upstream.transport is not None:
                upstream.transport.close()
        if self.transport is None:
            return
        if self.paused & _UPLOAD:
            self._resume(_UPLOAD)
        if not req.keep_alive or not req.done or (not self.queue and (self.eof or self.w.stopping)):
            self.transport.close()
        elif self.queue:
            following = self.queue.popleft()
            if not self.queue:
                self._resume(_QUEUED)
            self._dispatch(following)
        else:
            self.deadline = self.w.now + IDLE_TIMEOUT

    def upstream_lost(self, upstream: Upstream) -> None:
        """The upstream connection closed before its response was complete."""
        req = self.active
        if req is None or req.upstream is not upstream or self.transport is None:
            return
        req.upstream = None
        if upstream.framing == _CLOSE_FRAMED and upstream.head_sent:
            upstream.finish_close_framed()
            self.response_done(upstream, reusable=False)
        elif not upstream.got and upstream.reused and req.sent is not None:
            # A keep-alive connection the upstream had closed: nothing was
            # answered, so replay the request on a fresh connection.
            req.pending = list(req.sent)
            req.pending_size = req.sent_size
            self.w.loop.create_task(self._connect(req))
        elif not upstream.head_sent:
            self._settle(req, served=False)
            self.active = None
            self._answer(502)
        else:
            self.transport.abort()  # mid-response: nothing better than cutting it short

    def _answer(self, status: int) -> None:
        """A response of our own, then close (the request body may be unread)."""
        self.eof = True
        self.req = None
        if self.transport is not None:
            self.transport.write(_ERRORS[status])
            self.transport.close()

    def _refuse(self, status: int) -> None:
        """Bad input from the client: answer it if no response is under way, then close."""
        if self.active is None:
            self._answer(status)
        elif self.transport is not None:
            self.transport.abort()

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        self.paused &= ~reason
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()

    def expire(self) -> None:
        """Past the deadline: a slow request head gets 408, an idle connection just closes."""
        if self.transport is None:
            return
        if self.reading_head and self.head_size > 0 and self.active is None:
            self._answer(408)
        else:
            self.transport.close()

    def stop(self) -> None:
        if (
            self.transport is not None
            and self.active is None
            and self.req is None
            and not self.head_size
        ):
            self.transport.close()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a member; relays one response at a time."""

    __slots__ = (
        "client",
        "close_client",
        "done",
        "drop",
        "framing",
        "got",
        "head_sent",
        "interim",
        "keep",
        "length",
        "lines",
        "member",
        "out",
        "parser",
        "read_paused",
        "rechunk",
        "req",
        "reused",
        "sticky_seen",
        "te",
        "transport",
        "w",
    )

    def __init__(self, worker: Worker, member: int) -> None:
        self.w = worker
        self.member = member
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.req: Request | None = None
        self.reused = False
        self.read_paused = False
        self.out: list[bytes] = []
        self.lines: list[bytes] = []
        self.done = True

    def start(self, client: Client, req: Request) -> None:
        self.client = client
        self.req = req
        self.got = False
        self.head_sent = False
        self.done = False
        self.interim = False
        self.lines = []
        self.drop: set[bytes] | None = None
        self.sticky_seen = False
        self.te = False
        self.length = False
        self.framing = _LENGTH_FRAMED
        self.rechunk = False
        self.keep = False

    def pause(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # --- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None or self.done:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self._discard()
            return
        self.got = True
        reusable = True
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            reusable = False
            if not self.done:
                self._discard()  # connection_lost tells the client (502 or cut short)
        if self.out:
            out = self.out
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.done:
            client.response_done(self, reusable and self.keep)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause(_UPLOAD)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(_UPLOAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        client = self.client
        if client is not None:
            client.upstream_lost(self)
        else:
            idle = self.w.idle[self.member]
            if self in idle:
                idle.remove(self)

    def _discard(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- response parser callbacks -----------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = _RESPONSE_HEADERS.get(name.lower())
        if kind is not None:
            if kind == _LENGTH:
                self.length = True
            elif kind == _COOKIE:
                self.sticky_seen = self.sticky_seen or value.startswith(self.w.sticky)
            elif kind == _CODING:
                self.te = True
                return
            elif kind == _CONNECTION:
                tokens = _connection_tokens(value)
                if tokens:
                    self.drop = tokens if self.drop is None else self.drop | tokens
                return
            else:
                return
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        req = self.req
        client = self.client
        assert req is not None and client is not None
        status: int = self.parser.get_status_code()
        lines = self.lines if self.drop is None else _without(self.lines, self.drop)
        self.lines = []
        if status < 200:  # interim (100 Continue, 103): relay, the final one follows
            self.interim = True
            self.out.append(b"".join((status_line(status), *lines, b"\r\n")))
            return
        if req.head_only or status in (204, 304):
            self.framing = _LENGTH_FRAMED
        elif self.te:
            self.framing = _CHUNK_FRAMED
        elif self.length:
            self.framing = _LENGTH_FRAMED
        else:
            self.framing = _CLOSE_FRAMED
        # HTTP/1.0 clients cannot read chunks: they get the raw body and a close.
        unsized = self.framing != _LENGTH_FRAMED
        self.rechunk = unsized and not req.http10
        close = not req.keep_alive or self.w.stopping or (unsized and req.http10)
        if close:
            req.keep_alive = False
        self.keep = self.parser.should_keep_alive()
        parts = [status_line(status), *lines]
        if self.rechunk:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if req.cookie is not None and not self.sticky_seen:
            parts.append(req.cookie)
        if close:
            parts.append(b"Connection: close\r\n")
        elif req.http10:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))
        self.head_sent = True
        if req.head_only:
            # llhttp cannot be told that a HEAD response has no body: finish
            # here and give the next response a fresh parser.
            self.done = True
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        if self.done:
            raise HttpParserError("bytes after the response")
        if self.rechunk:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.done:
            return
        if self.rechunk:
            self.out.append(b"0\r\n\r\n")
        self.done = True

    def finish_close_framed(self) -> None:
        """The upstream closed: that is the end of a body framed by the close."""
        client = self.client
        if self.rechunk and client is not None and client.transport is not None:
            client.transport.write(b"0\r\n\r\n")
        self.done = True


def client_factory(worker: Worker, scope: int, https: bool, listen_host: str) -> Any:
    """The protocol factory for one listener of this worker."""
    return partial(Client, worker, scope, https, listen_host.encode())
