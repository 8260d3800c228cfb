"""The orchestrator's HTTP client: HTTP/1.1 over asyncio streams, the protocol
(framing, chunks, keep-alive) entirely h11's.

The checks, the embedded balancer's admin API, its release lock, Prometheus and
the webhooks send a handful of small requests each. aiohttp's client costs a
command a fifth of a second of CPU to import (it builds TLS contexts then);
this one costs about 10 ms, and builds a TLS context only for an https URL.
(The desk and the probe, a server and a load generator, keep aiohttp.)

A `Client` keeps idle connections per origin for the next request; one the
server closed meanwhile is noticed before it is used, and a request that meets
a reused connection's end before any answer is sent once more on a new one.
Nothing is followed: a redirect is an answer like any other.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json as jsonlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11

MAX_BODY = 16 << 20  # an answer larger than this is refused (none of ours comes close)
_READ = 65536


class HttpError(Exception):
    """No answer: the connection, TLS, the peer's HTTP or the time ran out."""


class HttpTimeout(HttpError):
    """No whole answer within the request's time."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def text(self) -> str:
        """The body decoded with the charset it names (UTF-8 when none, or an
        unknown one), undecodable bytes replaced."""
        return self.body.decode(_charset(self.header("content-type")), "replace")

    def json(self) -> Any:
        """The body as JSON (None when empty); ValueError when it is not JSON."""
        text = self.text().strip()
        return jsonlib.loads(text) if text else None


def _charset(content_type: str | None) -> str:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            name = value.strip().strip('"')
            try:
                return codecs.lookup(name).name
            except LookupError:
                break
    return "utf-8"


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(our_role=h11.CLIENT)

    def usable(self) -> bool:
        """Idle and not closed by the peer meanwhile."""
        return not (self.reader.at_eof() or self.writer.is_closing())

    async def close(self) -> None:
        self.writer.close()
        # A TLS peer that never answers the close is not waited for long.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


class _Stale(Exception):
    """A reused connection ended before any answer: send the request again."""


class Client:
    """HTTP requests with `headers` sent on each, every request within `timeout`
    seconds (connecting included), at most `limit` at once. `tls` makes the
    context for https URLs, when the first one is met (default: the system's
    trust store, verified). `keep_alive=False`: a new connection each time."""

    def __init__(
        self,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        tls: Callable[[], ssl.SSLContext] = ssl.create_default_context,
        limit: int = 64,
        keep_alive: bool = True,
    ) -> None:
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._make_tls = tls
        self._tls: ssl.SSLContext | None = None
        self._limit = limit
        self._keep_alive = keep_alive
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        json: Any = None,
        form: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request and read the whole answer; HttpError when there is none."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError(f"not an http(s) URL with a host: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise HttpError(f"bad port in {url!r}: {exc}") from None
        origin = _Origin(parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = {k.lower(): v for k, v in self.headers.items()}
        sent.update({k.lower(): v for k, v in (headers or {}).items()})
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent.setdefault("content-type", "application/json")
        elif form is not None:
            body = urlencode(form).encode()
            sent.setdefault("content-type", "application/x-www-form-urlencoded")
        sent.setdefault("host", parts.netloc.rpartition("@")[2])
        if body is not None:
            sent["content-length"] = str(len(body))
        sent.setdefault("accept", "*/*")
        sent.setdefault("user-agent", "changeover")
        wait = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(wait), self._slot():
                conn, reused = await self._connection(origin)
                try:
                    return await self._exchange(conn, origin, method, target, sent, body, reused)
                except _Stale:
                    conn, _ = await self._connection(origin, fresh=True)
                    return await self._exchange(conn, origin, method, target, sent, body, False)
        except TimeoutError:
            where = f"{origin.host}:{origin.port}"
            raise HttpTimeout(f"no answer from {where} within {wait:g}s") from None

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:
            # Connections (and the semaphore) belong to the loop that made them.
            self._idle.clear()
            self._slots = asyncio.Semaphore(self._limit)
            self._loop = loop
        return self._slots

    async def _connection(self, origin: _Origin, fresh: bool = False) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin, [])
        while idle and not fresh:
            conn = idle.pop()
            if conn.usable():
                return conn, True
            await conn.close()
        tls = None
        if origin.scheme == "https":
            if self._tls is None:  # loading a trust store reads files: not on the loop
                self._tls = await asyncio.to_thread(self._make_tls)
            tls = self._tls
        try:
            reader, writer = await asyncio.open_connection(
                origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
            )
        except OSError as exc:  # ssl.SSLError included
            raise HttpError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return _Connection(reader, writer), False

    async def _exchange(
        self,
        conn: _Connection,
        origin: _Origin,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None,
        reused: bool,
    ) -> Response:
        kept = False
        try:
            try:
                data = conn.h11.send(
                    h11.Request(method=method, target=target, headers=list(headers.items()))
                )
                if body:
                    data = (data or b"") + (conn.h11.send(h11.Data(data=body)) or b"")
                data = (data or b"") + (conn.h11.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError as exc:
                raise HttpError(f"cannot send {method} {target}: {exc}") from None
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                response = await self._read(conn, reused)
            except OSError as exc:  # ssl.SSLError included
                if reused:
                    raise _Stale() from None
                raise HttpError(f"{origin.host}:{origin.port}: {exc}") from None
            except h11.RemoteProtocolError as exc:
                raise HttpError(f"{origin.host}:{origin.port} answered badly: {exc}") from None
            done = conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
            if done and self._keep_alive:
                conn.h11.start_next_cycle()
                self._idle.setdefault(origin, []).append(conn)
                kept = True
            return response
        finally:
            if not kept:
                await conn.close()

    async def _read(self, conn: _Connection, reused: bool) -> Response:
        head: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(_READ)
                if not data and head is None:
                    if reused:
                        raise _Stale()
                    raise HttpError("the connection closed before an answer")
                conn.h11.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise HttpError(f"an answer larger than {MAX_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return Response(
                    head.status_code,
                    tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers),
                    b"".join(chunks),
                )
            else:  # ConnectionClosed before the answer ended
                raise HttpError("the connection closed before the answer ended")

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        if self._loop is not asyncio.get_running_loop():
            return  # opened by a loop that has ended: they went with it
        for conns in idle.values():
            for conn in conns:
                await conn.close()
