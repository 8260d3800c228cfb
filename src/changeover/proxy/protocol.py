"""The hot path of one worker process: client and upstream connections.

asyncio Protocol callbacks only (no streams, no task per request): httptools
(llhttp) finds message boundaries in both directions and validates every head
strictly (CRLF line ends, token names, no obs-fold, no whitespace before a
colon), so once it has accepted a head, that head ends at its first blank line
and every header is one `Name: value` line. That lets the balancer work on the
raw head bytes: one regular-expression scan per head picks out the few headers
that matter (Host, Cookie, framing, hop-by-hop), and the rest is relayed as
received, without a Python call per header. A plain head (HTTP/1.1, Host and
perhaps a Cookie) is handled inline; every other one is decided by
`heads.rewrite`, pure and tested byte for byte; so is every response head
but the plain one (`responses.answer`). Response bodies are relayed as the
bytes arrived (chunked framing included); llhttp says where each message ends.
Upstream connections are kept alive in a LIFO pool per member. Nothing here
logs per request.

Clients and app servers repeat themselves: a connection's next request head is
usually the same bytes as its last, and so is an upstream's next response head
until its Date header ticks. Each connection keeps its last plain head and what
was decided about it; a head that repeats it is not scanned again, and a read
that is exactly the last whole message (a request without a body, a response
with its Content-Length body) is not even fed to llhttp, which would only end
where it already is, between two messages. Routing still happens per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import Any, cast

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from changeover.config import Topology
from changeover.proxy import responses
from changeover.proxy.heads import (
    REQUEST_SCAN,
    Peer,
    Refused,
    check_method,
    checked_host,
    rewrite,
)
from changeover.proxy.responses import (
    CHUNK_FRAMED,
    CLOSE_FRAMED,
    ERRORS,
    LAST_CHUNK,
    LENGTH_FRAMED,
    NO_BODY,
    Asked,
    Dechunk,
    plain_length,
    switches,
)
from changeover.proxy.routing import (
    NO_MEMBER,
    OUT,
    PUBLIC,
    Table,
    eligible,
    pick,
    qa_cluster,
    sticky_route,
)
from changeover.proxy.state import SharedState, now_ms
from changeover.proxy.tunnel import Tunnel, close_offsets
from changeover.tls import member_ca, member_context

HEADER_LIMIT = 32 * 1024  # request line + headers; more is answered 431
BUFFER_LIMIT = 256 * 1024  # request bytes held while no upstream is attached
REPLAY_LIMIT = 64 * 1024  # request bytes kept to replay on a stale keep-alive connection
IDLE_PER_MEMBER = 256  # idle keep-alive upstream connections kept per member

# Why client reading is paused (bits): upstream is full, request bytes are
# buffered while connecting, pipelined requests wait for their turn, or a
# WebSocket handshake waits for the member's 101.
_UPLOAD, _BUFFERED, _QUEUED, _UPGRADING = 1, 2, 4, 8

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class UnaskedBytes(Exception):
    """Raised from a response parser callback: the upstream sent more than one response."""


_CRLF = (13, 10)


def _skip_empty_lines(buf: bytes, start: int) -> int:
    """Where a message starts: llhttp skips empty lines before one."""
    while buf[start] in _CRLF:
        start += 1
    return start


class Worker:
    """Everything the connections of one worker process share."""

    def __init__(self, topology: Topology, shared: SharedState, index: int) -> None:
        balancer = topology.balancer
        self.loop = asyncio.get_running_loop()
        self.table = Table.from_topology(topology)
        self.routes = self.table.routes
        self.qa_hosts = bool(self.table.qa_hosts)
        self.shared = shared
        self.inflight, self.requests, self.failures = shared.counters(index)
        self.least_conn = balancer.algorithm == "least-conn"
        timeouts = balancer.timeouts
        self.header_timeout, self.body_timeout = timeouts.header, timeouts.body
        self.idle_timeout, self.connect_timeout = timeouts.idle, timeouts.connect
        self.response_timeout = timeouts.response
        self.load = InFlight([shared.counters(w)[0] for w in range(shared.workers)])
        self.sticky = balancer.sticky_cookie.encode() + b"="
        self.inserted = balancer.route_cookie.encode() + b"="
        members = [m for _, m in topology.members()]
        self.addresses = [(m.host, m.port) for m in members]
        # Over TLS the route cookie must never be sent in clear text.
        secure = b"; Secure" if balancer.tls_cert else b""
        self.set_cookie = [
            b"Set-Cookie: %s%s; Path=/; HttpOnly%s\r\n"
            % (self.inserted, m.route_id.encode(), secure)
            for m in members
        ]
        self.member_tls = member_context(balancer, member_ca(topology))
        self.member_names = [balancer.member_tls_name or m.host for m in members]
        self.idle: list[list[Upstream]] = [[] for _ in members]
        self.clients: set[Client] = set()
        # Accepted over TLS, handshake not done (a Client is made at accept, but
        # connection_made comes after the handshake): a retiring worker waits
        # for these too, or its exit resets them. Each until its deadline.
        self.handshaking: dict[Client, float] = {}
        self.stopping = False
        self.drained = asyncio.Event()  # set when a client closes while stopping
        self.tunnels: set[Tunnel] = set()
        self.open_tunnels = shared.tunnels(index)  # per member, for the admin API
        self.errors = shared.errors(index)  # 5xx responses per member (the bake's figure)
        self.sessions = shared.sessions(index)  # sticky sessions seen, for the admin API
        self.close_spread = balancer.close_spread
        self.turn = index  # workers start their round-robin at different members
        # Deadlines are checked once a second, so a clock updated as often is
        # precise enough and spares a loop.time() call per request.
        self.now = self.loop.time()
        self._generation = shared.generation_view()
        self.generation = -1
        self.live: tuple[int, ...] = ()
        self._reload()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _reload(self) -> None:
        self.generation, self.admission, self.healthy = self.shared.snapshot()
        self.candidates = eligible(self.table, self.admission, self.healthy)
        # The common choice (a new session on the public listener, round-robin)
        # is made inline in route() from this tuple.
        self.live = () if self.least_conn else self.candidates.live
        if self.tunnels:
            self._plan_closes()

    def _plan_closes(self) -> None:
        """Tunnels on a member now OUT close spread over `close_spread`, never at once."""
        doomed = [t for t in self.tunnels if self.admission[t.member] == OUT and not t.scheduled]
        for offset, tunnel in zip(
            close_offsets(len(doomed), self.close_spread), doomed, strict=True
        ):
            tunnel.scheduled = True
            self.loop.call_later(offset, self._go_away, tunnel)

    def _go_away(self, tunnel: Tunnel) -> None:
        if self._generation[0] != self.generation:
            self._reload()
        tunnel.scheduled = False
        if self.admission[tunnel.member] == OUT:  # not if it came back meanwhile
            tunnel.go_away()

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self.open_tunnels[tunnel.member] += 1

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self.open_tunnels[tunnel.member] -= 1

    def route(self, scope: int, sticky: int, tried: tuple[int, ...] | list[int]) -> int:
        if self._generation[0] != self.generation:
            self._reload()
        if sticky < 0 and scope == PUBLIC and not tried and self.live:
            chosen = self.live[self.turn % len(self.live)]  # what pick() chooses here
            self.turn += 1
            return chosen
        chosen = pick(
            self.table,
            self.candidates,
            self.admission,
            self.healthy,
            scope,
            sticky,
            self.turn,
            self.load if self.least_conn else None,
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
        upstream.dechunk = None
        upstream.tail = b""
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
        tls = self.member_tls
        name = self.member_names[member] if tls is not None else None
        _, upstream = await asyncio.wait_for(
            self.loop.create_connection(
                partial(Upstream, self, member), host, port, ssl=tls, server_hostname=name
            ),
            self.connect_timeout,
        )
        return upstream

    def _sweep(self) -> None:
        """Close clients past their deadline (slow heads, stalled bodies, idle keep-alive)."""
        self.now = now = self.loop.time()
        if self._generation[0] != self.generation:  # a worker without requests notices too
            self._reload()
        for client in [c for c in self.clients if 0 < c.deadline < now]:
            client.expire()
        late = [c for c, deadline in self.handshaking.items() if deadline < now]
        for client in late:  # the transport gave up on it (ssl_handshake_timeout)
            del self.handshaking[client]
        if late and self.stopping:
            self.drained.set()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def retire(self) -> None:
        """After a reload: every connection closes after its next response (an idle
        keep-alive one is not closed under a client that may be sending on it
        now) and tunnels run on until they close; `stop()` ends the grace."""
        self.stopping = True

    def stop(self) -> None:
        """Stop taking new requests: idle clients close now, busy ones after their response."""
        self.stopping = True
        for tunnel in list(self.tunnels):
            tunnel.go_away()
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


class InFlight:
    """Requests in flight per member, summed over every worker: least-conn
    compares the whole balancer's load, not one worker's share of it."""

    __slots__ = ("views",)

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views

    def __getitem__(self, member: int) -> int:
        return sum(int(view[member]) for view in self.views)


class Head:
    """What one request head asks for. A connection keeps the last plain one: a
    client nearly always repeats its head byte for byte (same path, Host and
    cookies), and then none of the work on it needs doing again."""

    __slots__ = (
        "chunked",
        "head_only",
        "http10",
        "keep_alive",
        "raw",
        "replayable",
        "scope",
        "session",
        "sticky",
        "tunnel",
        "upstream",
    )

    def __init__(
        self,
        upstream: bytes,
        scope: int,
        sticky: int,
        method: bytes | None,
        keep_alive: bool,
        chunked: bool = False,
        http10: bool = False,
        session: int = 0,
    ) -> None:
        # The head as received, blank line included, once it is worth keeping
        # (only such a head becomes a connection's `last`: b"" starts every buffer).
        self.raw = b""
        self.upstream = upstream  # the head that goes upstream
        self.scope = scope
        self.sticky = sticky
        self.session = session  # hash of the sticky session's cookie, 0 for none
        self.head_only = method == b"HEAD"
        self.replayable = method is None or method in _IDEMPOTENT  # None: GET
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.http10 = http10
        self.tunnel = False  # a WebSocket handshake (see heads.rewrite)


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
        "plain",
        "scope",
        "sent",
        "sent_size",
        "session",
        "sticky",
        "tried",
        "tunnel",
        "upstream",
    )

    def __init__(self, head: Head, keep_alive: bool) -> None:
        self.scope = head.scope
        self.sticky = head.sticky
        self.session = head.session
        self.chunked = head.chunked
        self.head_only = head.head_only
        self.http10 = head.http10
        self.tunnel = head.tunnel
        self.keep_alive = keep_alive
        # A keep-alive HTTP/1.1 request for a body: its response head may go as received.
        self.plain = keep_alive and not head.http10 and not head.head_only
        data = head.upstream
        self.pending: list[bytes] | None = [data]  # None once streaming straight upstream
        self.pending_size = len(data)
        self.sent: list[bytes] | None = [data] if head.replayable else None
        self.sent_size = len(data)
        self.done = False  # the client sent the whole request
        self.member = NO_MEMBER
        self.cookie: bytes | None = None  # Set-Cookie to add unless the app sets its own
        self.tried: tuple[int, ...] | list[int] = ()
        self.upstream: Upstream | None = None


class Client(asyncio.Protocol):
    """One client connection on a public or QA listener."""

    __slots__ = (
        "active",
        "data",
        "deadline",
        "eof",
        "forwarded",
        "forwarded_host",
        "head_parts",
        "head_size",
        "last",
        "listen_host",
        "parser",
        "paused",
        "peer",
        "pos",
        "proto",
        "queue",
        "reading_head",
        "req",
        "scope",
        "transport",
        "tunnel",
        "upgrade_rest",
        "w",
        "write_paused",
        "xf",
    )

    def __init__(self, worker: Worker, scope: int, https: bool, listen_host: bytes) -> None:
        self.w = worker
        self.scope = scope
        self.proto = b"https" if https else b"http"
        self.listen_host = listen_host
        self.transport: asyncio.Transport | None = None
        if https:
            worker.handshaking[self] = worker.now + worker.header_timeout + 1.0
        self.parser = httptools.HttpRequestParser(self)
        self.peer = Peer(b"", self.proto, b"")
        self.xf = b""
        # The X-Forwarded-* lines and the blank line that end a request head,
        # kept for the last Host seen (a connection nearly always sends one).
        self.forwarded_host: bytes | None = None
        self.forwarded = b""
        self.req: Request | None = None  # being received
        self.active: Request | None = None  # being answered
        self.queue: deque[Request] | None = None  # pipelined, waiting for `active`
        self.paused = 0
        self.write_paused = False
        self.eof = False  # no more requests will be read on this connection
        self.deadline = 0.0
        self.data = b""  # what data_received is parsing
        self.pos = 0  # where the next message starts in `data`; -1: unknown
        self.reading_head = True
        self.head_parts: list[bytes] | None = None  # a head that began in earlier reads
        self.head_size = 0
        self.last: Head | None = None  # the last plain head, to reuse when it repeats
        self.tunnel: Tunnel | None = None  # after a 101: the bytes flow both ways as they come
        self.upgrade_rest = b""  # what the client sent after its handshake, before the 101

    # --- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]).encode() if peer else b"unknown"
        # A 1.0 request without Host gets the listener's.
        self.peer = Peer(ip, self.proto, b"Host: %s\r\n" % self.listen_host)
        self.xf = self.peer.forwarded
        self.w.handshaking.pop(self, None)
        self.w.clients.add(self)
        self.deadline = self.w.now + self.w.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.eof:  # after a "Connection: close" request, nothing more is read
            if self.tunnel is not None:
                self.tunnel.from_client(data)
            return
        req = self.req
        last = self.last
        if last is not None and data == last.raw and req is None and self.head_parts is None:
            # Exactly the last plain head again, a whole request without a body:
            # llhttp would say what it said then and end up where it is now.
            self._request(last)
            self.on_message_complete()
            return
        self.data = data
        # A chunked request body still coming: llhttp will not say where it ends.
        self.pos = -1 if req is not None and req.chunked else 0
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if self.eof:  # a WebSocket handshake: what follows waits for the 101
                self.upgrade_rest = rest
                self._pause(_UPGRADING)
                return
            # The request went upstream without its Upgrade header; llhttp
            # stopped after it, so what follows is the next request.
            if rest and self.transport is not None:
                self.data_received(rest)
            return
        except HttpParserError as exc:
            if self.eof:
                # Bytes after a "Connection: close" (or HTTP/1.0) request: llhttp
                # refuses them, but that request is answered, and nothing after it.
                return
            reason = exc.__context__
            self._refuse(reason.status if isinstance(reason, Refused) else 400)
            return
        if not self.reading_head:  # a request body is on its way
            self.deadline = self.w.now + self.w.body_timeout
            return
        pos = self.pos
        if pos < 0:
            # A chunked request ended in this read at a place llhttp does not
            # tell; if more follows, where that next head starts is unknown.
            # Take no more requests here: the client retries them elsewhere.
            if not data.endswith(b"\r\n\r\n"):
                self._stop_reading()
        elif pos < len(data):
            rest = data[pos:] if pos else data
            if self.head_parts is None:
                if not rest.lstrip(b"\r\n"):  # llhttp skips empty lines between requests
                    return
                self.head_parts = [rest]
                self.head_size = len(rest)
                self.deadline = self.w.now + self.w.header_timeout
            else:
                self.head_parts.append(rest)
                self.head_size += len(rest)
            if self.head_size > HEADER_LIMIT:
                self._refuse(431)

    def eof_received(self) -> bool | None:
        self.eof = True
        # Nothing in flight, or a request body that can never be finished.
        if (self.active is None or self.req is not None) and self.transport is not None:
            self.transport.close()
        # Half-close: still deliver the response in flight (TLS cannot half-close).
        return None if self.proto == b"https" else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.w.clients.discard(self)
        if self.tunnel is not None:
            self.tunnel.lost(self)
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
        upstream = self.active.upstream if self.active is not None else self._tunnelled()
        if upstream is not None:
            upstream.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        upstream = self.active.upstream if self.active is not None else self._tunnelled()
        if upstream is not None:
            upstream.resume()

    def _tunnelled(self) -> Upstream | None:
        return None if self.tunnel is None else cast(Upstream, self.tunnel.upstream)

    # --- request parser callbacks ----------------------------------------------

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self.deadline = 0.0
        buf = self.data
        start = self.pos
        if start < 0:  # see data_received: a request after a chunked one in one read
            self.req = None
            self._stop_reading()
            return
        offset = 0  # where `data` starts in `buf`
        if self.head_parts is not None:  # the head began in earlier reads
            earlier = b"".join(self.head_parts)
            self.head_parts = None
            self.head_size = 0
            buf = earlier + buf
            start, offset = 0, len(earlier)
        last = self.last
        # The same bytes as the last head: llhttp ended this head at its first
        # blank line, and `last.raw` has exactly one, at its end.
        if last is not None and buf.startswith(last.raw, start):
            self.pos = start + len(last.raw) - offset
            self._request(last)
            return
        if buf[start] in _CRLF:
            start = _skip_empty_lines(buf, start)
        end = buf.find(b"\r\n\r\n", start) + 4
        self.pos = end - offset
        if end - start > HEADER_LIMIT:
            raise Refused(431)
        line_end = buf.find(b"\r\n", start)
        # Names are matched in a lower-case copy (same offsets as `buf`).
        low = buf[line_end : end - 2].lower()

        # Nearly every request: Host, perhaps one Cookie, a plain request line.
        host = cookies = None
        for name, value in REQUEST_SCAN.findall(low):
            if name == b"host" and host is None:
                host = value.rstrip(b" \t")  # as a lower-case copy: host names ignore case
            elif name == b"cookie" and cookies is None:
                at = low.find(b"\r\ncookie:") + 9  # cookies keep their case
                cookies = buf[line_end + at : line_end + low.find(b"\r", at)].strip(b" \t")
            elif name != b"connection" or value != b"keep-alive":
                break
            # "Connection: keep-alive" may go on: it is what we say upstream too.
        else:
            if (
                buf.endswith(b" HTTP/1.1", start, line_end)
                and buf.count(b" ", start, line_end) == 2
            ):
                if host is None or host != self.forwarded_host:
                    self.forwarded_host = checked_host(host, True)
                    self.forwarded = b"X-Forwarded-Host: %s\r\n%s\r\n" % (host, self.xf)
                head = self._head(buf[start : end - 2] + self.forwarded, buf, start, host, cookies)
                head.raw = buf[start:end]
                self.last = head
                self._request(head)
                return
        self._unusual_head(buf, start, end)

    def _unusual_head(self, buf: bytes, start: int, end: int) -> None:
        """A head with hop-by-hop or framing headers, X-Forwarded-For, or an odd request line."""
        head = rewrite(buf[start:end], self.peer)
        if head.chunked:
            self.pos = -1  # llhttp does not say where a chunked body ends
        upstream, host, cookies = head.upstream, head.host, head.cookies
        decided = self._head(upstream, buf, start, host, cookies, head.chunked, head.http10)
        if head.tunnel:
            decided.tunnel = True
            # Nothing after a handshake is HTTP: the connection is a tunnel
            # after a 101, and closes after any other answer.
            decided.keep_alive = False
        self._request(decided)

    def _head(
        self,
        upstream: bytes,
        buf: bytes,
        start: int,
        host: bytes | None,
        cookies: bytes | None,
        chunked: bool = False,
        http10: bool = False,
    ) -> Head:
        """Where the request whose head (ending with its blank line) goes upstream may go."""
        w = self.w
        scope = self.scope
        if scope == PUBLIC and w.qa_hosts:
            scope = qa_cluster(w.table, host)
        sticky, session = NO_MEMBER, 0
        if cookies is not None:
            found = sticky_route(cookies, w.sticky, w.inserted)
            if found is not None:
                sticky = w.routes.get(found[0], NO_MEMBER)
                # Forked workers share the hash seed, so one session is one key.
                session = hash(found[1]) or 1
        method = None if buf.startswith(b"GET ", start) else self.parser.get_method()
        check_method(method)
        keep_alive = self.parser.should_keep_alive()
        return Head(upstream, scope, sticky, method, keep_alive, chunked, http10, session)

    def _request(self, head: Head) -> None:
        req = Request(head, head.keep_alive and not self.w.stopping)
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
        if req is None:
            return
        if req.chunked:
            self._send(req, b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.pos += len(body)  # a Content-Length body: its bytes follow the head
            self._send(req, body)

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        self.reading_head = True
        # The body timeout ends; a response head still to come is due (504 after that).
        active = self.active
        waiting = active is not None and not (active.upstream and active.upstream.head_sent)
        self.deadline = self.w.now + self.w.response_timeout if waiting else 0.0
        if req is None:
            return
        if req.chunked:
            self._send(req, LAST_CHUNK)
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
        if member == req.sticky:
            req.cookie = None
            if req.session and req.scope == PUBLIC:  # the live pool's sessions, for drains
                w.sessions.seen(req.session, member, now_ms())
        else:
            req.cookie = w.set_cookie[member]
        self.active = req
        w.inflight[member] += 1
        idle = w.idle[member]
        while idle:  # Worker.acquire and _attach, inline: this runs per request
            upstream = idle.pop()
            transport = upstream.transport
            if transport is not None and not transport.is_closing():
                req.upstream = upstream
                upstream.client = self
                upstream.req = req
                upstream.got = upstream.head_sent = upstream.done = False
                if self.write_paused:
                    upstream.pause()
                pending = req.pending
                assert pending is not None
                req.pending = None
                transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
                if self.paused & _BUFFERED:
                    self._resume(_BUFFERED)
                return
        w.loop.create_task(self._connect(req))

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
        w = self.w
        w.inflight[req.member] -= 1  # _settle(req, served=True), inline
        w.requests[req.member] += 1
        if reusable and req.done:
            w.release(upstream)
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
            self.deadline = self.w.now + self.w.idle_timeout

    def tunnel_open(self, upstream: Upstream, rest: bytes) -> None:
        """The member answered 101 (already written to the client): the request
        is served and the two connections are one tunnel until either closes."""
        req = self.active
        assert req is not None
        self.active = None
        req.upstream = None
        w = self.w
        self._settle(req, served=True)
        tunnel = Tunnel(self, upstream, req.member, w.tunnel_ended)
        self.tunnel = upstream.tunnel = tunnel
        w.tunnel_opened(tunnel)
        self.deadline = 0.0  # a tunnel may be quiet for as long as its ends like
        early, self.upgrade_rest = self.upgrade_rest, b""
        if early:
            tunnel.from_client(early)
        if rest:
            tunnel.from_member(rest)
        if w.stopping or w.admission[req.member] == OUT:
            tunnel.go_away()
        self._resume(_UPGRADING)

    def upstream_lost(self, upstream: Upstream) -> None:
        """The upstream connection closed before its response was complete."""
        req = self.active
        if req is None or req.upstream is not upstream or self.transport is None:
            return
        req.upstream = None
        if upstream.framing == CLOSE_FRAMED and upstream.head_sent:
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
            self.transport.write(ERRORS[status])
            self.transport.close()

    def _refuse(self, status: int) -> None:
        """Bad input from the client: answer it if no response is under way, then close."""
        if self.active is None:
            self._answer(status)
        elif self.transport is not None:
            self.transport.abort()

    def _stop_reading(self) -> None:
        """Take no more requests on this connection; close once the one in flight is answered."""
        self.eof = True
        if self.active is None and self.transport is not None:
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        self.paused &= ~reason
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()

    def expire(self) -> None:
        """Past the deadline: a slow request head gets 408, a response head that did
        not come 504; an idle connection or a stalled body just closes."""
        if self.transport is None:
            return
        req = self.active
        if self.reading_head and self.head_size > 0 and req is None:
            self._answer(408)
        elif req is not None and self.req is None and not (req.upstream and req.upstream.head_sent):
            upstream = req.upstream
            self._settle(req, served=False)
            self.active = None
            if upstream is not None:  # it may still answer: that connection is done for
                upstream.client = None
                if upstream.transport is not None:
                    upstream.transport.close()
            self._answer(504)
        else:
            self.transport.close()

    def stop(self) -> None:
        if (
            self.transport is not None
            and self.active is None
            and self.req is None
            and not self.head_size
            and self.tunnel is None  # the worker closes tunnels with 1001
        ):
            self.transport.close()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a member; relays one response at a time.

    The response head goes to the client as received unless something in it
    must change (hop-by-hop headers, HTTP/1.0 status line or client); the
    route cookie and our Connection header are inserted before its blank line.
    The body is relayed as the bytes arrived. llhttp gets no per-header or
    per-body callback: it only says where a head and a message end.
    """

    __slots__ = (
        "client",
        "cursor",
        "data",
        "dechunk",
        "done",
        "framing",
        "got",
        "head_parts",
        "head_sent",
        "keep",
        "last",
        "last_5xx",
        "last_length",
        "last_size",
        "left",
        "mark",
        "member",
        "out",
        "parser",
        "peer",
        "raw_from",
        "read_paused",
        "rechunk",
        "req",
        "reused",
        "switching",
        "tail",
        "transport",
        "tunnel",
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
        self.out: list[bytes] = []  # what this read sends to the client
        self.data = b""  # what data_received is parsing
        self.mark = 0  # where the next response head starts in `data`
        self.cursor = 0  # where the body bytes of this read start in `data`
        self.raw_from = 0  # where the bytes relayed as received start (<= cursor)
        self.head_parts: list[bytes] | None = None  # a head that began in earlier reads
        self.framing = LENGTH_FRAMED
        self.left = 0  # Content-Length body bytes still to come
        self.rechunk = False  # a close-framed body goes to an HTTP/1.1 client chunked
        self.tail = b""  # the last bytes of a chunked body relayed so far
        self.tunnel: Tunnel | None = None
        self.switching = False  # a 101 to a WebSocket handshake is on its way
        self.dechunk: Dechunk | None = None  # a chunked body goes to an HTTP/1.0 client plain
        self.keep = False
        self.got = False
        self.head_sent = False
        self.done = True
        # The last plain response head (status line to blank line) and its
        # Content-Length: the next one is often the same bytes (until Date ticks).
        self.last = b"\x00"  # starts no response
        self.last_length = 0
        self.last_5xx = False
        self.last_size = -1  # the whole response: head and body

    def start(self, client: Client, req: Request) -> None:
        """Take on `req` (Client._dispatch does the same inline for pooled connections)."""
        self.client = client
        self.req = req
        self.got = self.head_sent = self.done = False

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
            if self.tunnel is not None:
                self.tunnel.from_member(data)
                return
            # Bytes nobody asked for: this connection can no longer be trusted.
            self._discard()
            return
        self.got = True
        req = self.req
        if (
            len(data) == self.last_size
            and req is not None
            and req.plain
            and not self.head_sent  # this read starts the response
            and self.head_parts is None
            and data.startswith(self.last)
            and not self.w.stopping
        ):
            # The last plain response again, head and whole body in this read:
            # llhttp would end up where it is now, between two messages.
            if self.last_5xx:
                self.w.errors[req.member] += 1
            self.head_sent = self.done = True
            if req.cookie is None:
                client.transport.write(data)
            else:  # inserted before the blank line, which goes with the body
                cut = len(self.last) - 2
                client.transport.write(b"".join((data[:cut], req.cookie, data[cut:])))
            client.response_done(self, True)
            return
        self.data = data
        self.mark = self.cursor = self.raw_from = 0
        failed = False
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if not self.switching:
                raise UnaskedBytes from None  # an upgrade nobody asked for
            self._flush(client, self.out)
            client.tunnel_open(self, data[exc.args[0] :])
            return
        except HttpParserError:
            failed = True  # llhttp stopped somewhere in `data`: it does not say where
        out = self.out
        if not self.head_sent:
            if not failed and self.mark < len(data):  # keep the head begun so far
                rest = data[self.mark :]
                if self.head_parts is None:
                    self.head_parts = [rest]
                else:
                    self.head_parts.append(rest)
            self._flush(client, out)
            if failed:
                self._discard()  # connection_lost answers the client 502
            return

        cursor = self.cursor
        framing = self.framing
        cut = False  # the bytes in `data` cannot be relayed exactly: cut the client off
        if framing in (LENGTH_FRAMED, NO_BODY):
            size = len(data) - cursor
            if size > self.left:  # bytes after the response, even if only empty lines
                size = self.left
                failed = True
            self.left -= size
            stop = cursor + size
            out.append(
                data if self.raw_from == 0 and stop == len(data) else data[self.raw_from : stop]
            )
            cut = (self.left == 0) != self.done  # llhttp and Content-Length must agree
        elif self.dechunk is not None:
            out.append(data[self.raw_from : cursor])
            out += self.dechunk.feed(data[cursor:] if cursor else data)
        elif framing == CHUNK_FRAMED:
            # The last chunk ends the body with a blank line; more after it,
            # or a parse error, means bytes that must not reach the client.
            # That blank line may have begun in the read before.
            cut = failed or (self.done and not (self.tail + data).endswith(b"\r\n\r\n"))
            if not cut:
                out.append(data[self.raw_from :] if self.raw_from else data)
                self.tail = data[-3:]
        elif self.rechunk:  # close-framed: everything until the upstream closes is body
            out.append(data[self.raw_from : cursor])
            if cursor < len(data):
                out += (b"%x\r\n" % (len(data) - cursor), data[cursor:], b"\r\n")
        else:
            out.append(data[self.raw_from :] if self.raw_from else data)

        if cut:
            out.clear()
            self.client = None
            self._discard()
            client.transport.abort()
            return
        if out:  # _flush, inline
            # One write: uvloop sends it at once, so a following abort() loses nothing.
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.done:
            client.response_done(self, not failed and self.keep)
        elif failed:
            self._discard()  # connection_lost cuts the client short

    def _flush(self, client: Client, out: list[bytes]) -> None:
        if out:
            transport = client.transport
            assert transport is not None
            # One write: uvloop sends it at once, so a following abort() loses nothing.
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause(_UPLOAD)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(_UPLOAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.tunnel is not None:
            self.tunnel.lost(self)
            return
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

    def on_headers_complete(self) -> None:
        req = self.req
        if self.done or req is None:
            raise UnaskedBytes  # a second response in one read
        if self.head_parts is None:
            buf = self.data
            start = self.mark
            if req.plain and buf.startswith(self.last, start) and not self.w.stopping:
                # The same bytes as the last plain head: the same decisions.
                if self.last_5xx:
                    self.w.errors[req.member] += 1
                self.mark = self.cursor = end = start + len(self.last)
                self._plain_head(req, buf, start, end, self.last_length)
                return
            if buf[start] in _CRLF:
                start = _skip_empty_lines(buf, start)
            end = buf.find(b"\r\n\r\n", start) + 4
            self.mark = self.cursor = end
        else:  # the head began in earlier reads
            earlier = b"".join(self.head_parts)
            self.head_parts = None
            buf = earlier + self.data
            start = _skip_empty_lines(buf, 0)
            end = buf.find(b"\r\n\r\n", start) + 4
            self.mark = self.cursor = end - len(earlier)
        status: int = self.parser.get_status_code()
        if status >= 500:
            self.w.errors[req.member] += 1
        if status == 101:
            # Only a WebSocket handshake may switch protocols, to WebSocket only.
            if not (req.tunnel and switches(buf[start:end])):
                raise UnaskedBytes
            self.out.append(buf[start:end])  # relayed as received
            self.raw_from = self.cursor
            self.switching = True
            self._head_sent()
            return
        # Nearly every response to a keep-alive HTTP/1.1 client: see plain_length.
        if (
            req.plain
            and buf is self.data
            and status >= 200
            and buf.startswith(b"HTTP/1.1 ", start)
            and not self.w.stopping
            and status != 204
            and status != 304
        ):
            line_end = buf.find(b"\r\n", start)
            length = plain_length(buf[line_end : end - 2].lower())
            if length >= 0 and self.parser.should_keep_alive():
                self.last = buf[start:end]
                self.last_5xx = status >= 500
                self.last_length = length
                self.last_size = end - start + length
                self._plain_head(req, buf, start, end, length)
                return
        self._unusual_head(req, buf[start:end], start if buf is self.data else -1, status)

    def _head_sent(self) -> None:
        """The final response head is on its way: the response timeout is met."""
        self.head_sent = True
        if self.client is not None:
            self.client.deadline = 0.0

    def _plain_head(self, req: Request, buf: bytes, start: int, end: int, length: int) -> None:
        """A keep-alive HTTP/1.1 response with a Content-Length and nothing to remove."""
        self.framing = LENGTH_FRAMED
        self.left = length
        self.keep = True
        self._head_sent()
        if req.cookie is None:  # relayed as received, from the status line on
            self.raw_from = start
        else:  # inserted before the blank line, which goes with the body
            self.out += (buf[start : end - 2], req.cookie)
            self.raw_from = end - 2

    def _unusual_head(self, req: Request, head: bytes, start: int, status: int) -> None:
        """Any other response head (status line to blank line): `responses.answer`
        decides. `start`: where it starts in this read, -1 if in an earlier one."""
        w = self.w
        asked = Asked(req.head_only, req.http10, req.keep_alive, w.stopping, req.cookie, w.sticky)
        answer = responses.answer(head, status, asked)
        if start < 0:  # the head began in earlier reads: all of it goes here
            self.out.append(answer.written(head))
            self.raw_from = self.cursor
        else:
            if answer.prefix:
                self.out.append(answer.prefix)
            self.raw_from = start + answer.relay_from
        if answer.interim:
            return
        self.framing = answer.framing
        self.left = answer.left
        self.rechunk = answer.rechunk
        if answer.close:
            req.keep_alive = False
        self.keep = self.parser.should_keep_alive()
        self._head_sent()
        if answer.dechunk:
            self.dechunk = Dechunk()
        if req.head_only:
            # llhttp cannot be told that a HEAD response has no body: finish
            # here and give the next response a fresh parser.
            self.done = True
            self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        if self.head_sent:  # an interim response ends here too: the final one follows
            self.done = True

    def finish_close_framed(self) -> None:
        """The upstream closed: that is the end of a body framed by the close."""
        client = self.client
        if self.rechunk and client is not None and client.transport is not None:
            client.transport.write(LAST_CHUNK)
        self.done = True


def client_factory(worker: Worker, scope: int, https: bool, listen_host: str) -> Any:
    """The protocol factory for one listener of this worker."""
    return partial(Client, worker, scope, https, listen_host.encode())
