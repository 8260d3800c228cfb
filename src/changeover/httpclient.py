"""The orchestrator's HTTP client: a small face over httpx.

The checks, the embedded balancer's admin API, its release lock, Prometheus and
the webhooks send a handful of small requests each. httpx does the protocol
(h11 through httpcore), the connection pool and TLS; this module keeps what
the callers need: one deadline per request (connecting included), a bound on
requests at once, a body read whole (and capped), and a TLS context built only
for an https URL, when the first one is met (loading a trust store reads files
and costs a command tens of milliseconds it does not need for plain HTTP).
aiohttp's client costs a command a fifth of a second of CPU to import (it
builds TLS contexts then); the desk and the probe, a server and a load
generator, keep aiohttp. Nothing is followed: a redirect is an answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

MAX_BODY = 16 << 20  # an answer larger than this is refused (none of ours comes close)


class HttpError(Exception):
    """No answer: the connection, TLS, the peer's HTTP or the time ran out."""


class HttpTimeout(HttpError):
    """No whole answer within the request's time."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes
    encoding: str = "utf-8"  # the charset the answer names, as httpx reads it

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def text(self) -> str:
        """The body decoded with the charset it names (UTF-8 when none, or an
        unknown one), undecodable bytes replaced."""
        return self.body.decode(self.encoding, "replace")

    def json(self) -> Any:
        """The body as JSON (None when empty); ValueError when it is not JSON."""
        import json

        text = self.text().strip()
        return json.loads(text) if text else None


def _plain() -> ssl.SSLContext:
    # For the http:// client, which never starts TLS: httpx wants a context,
    # and one with no trust store verifies nothing, so it could not be misused.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


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
        self.headers = {
            "user-agent": "changeover",
            **{k.lower(): v for k, v in (headers or {}).items()},
        }
        self._make_tls = tls
        self._limits = httpx.Limits(
            max_connections=limit, max_keepalive_connections=limit if keep_alive else 0
        )
        self._clients: dict[str, httpx.AsyncClient] = {}
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
        wait = self.timeout if timeout is None else timeout
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise HttpError(f"not an http(s) URL with a host: {url!r}: {exc}") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise HttpError(f"not an http(s) URL with a host: {url!r}")
        where = f"{target.host}:{target.port or (443 if target.scheme == 'https' else 80)}"
        try:
            async with asyncio.timeout(wait):
                client = await self._client(target.scheme)
                request = client.build_request(
                    method, target, headers=headers, content=body, json=json, data=form,
                    timeout=wait,
                )  # fmt: skip
                try:
                    return await _exchange(client, request, where)
                except _Stale:
                    # A kept connection the server closed just as the request went
                    # out (its keep-alive timeout): sent once more, on a new one.
                    return await _exchange(client, request, where)
        except (TimeoutError, httpx.TimeoutException):
            raise HttpTimeout(f"no answer from {where} within {wait:g}s") from None
        except httpx.ConnectError as exc:
            raise HttpError(f"cannot connect to {where}: {exc}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise HttpError(f"{where}: the connection closed before an answer ({exc})") from None
        except httpx.HTTPError as exc:
            raise HttpError(f"{where}: {type(exc).__name__}: {exc}") from None

    async def _client(self, scheme: str) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A pool belongs to the loop that made its connections.
            self._clients.clear()
            self._loop = loop
        client = self._clients.get(scheme)
        if client is None:
            # Loading a trust store reads files: not on the loop.
            tls = await asyncio.to_thread(self._make_tls) if scheme == "https" else _plain()
            client = httpx.AsyncClient(
                verify=tls, headers=self.headers, limits=self._limits, trust_env=False
            )
            self._clients[scheme] = client
        return client

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        if self._loop is not asyncio.get_running_loop():
            return  # connections of an ended loop are dropped, never closed or reused
        for client in clients.values():
            await client.aclose()


class _Stale(Exception):
    """A reused connection ended before any answer: send the request again."""


async def _exchange(client: httpx.AsyncClient, request: httpx.Request, where: str) -> Response:
    connected = False

    async def trace(event: str, info: dict[str, Any]) -> None:
        # httpcore's documented trace extension: did this request open a connection?
        nonlocal connected
        connected = connected or event.startswith("connection.connect_tcp")

    request.extensions["trace"] = trace
    try:
        answer = await client.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        if connected:
            raise
        raise _Stale() from None
    try:
        chunks, size = [], 0
        async for chunk in answer.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(f"an answer from {where} larger than {MAX_BODY} bytes")
            chunks.append(chunk)
    finally:
        await answer.aclose()
    return Response(
        answer.status_code,
        tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in answer.headers.raw),
        b"".join(chunks),
        _known(answer.charset_encoding),
    )


def _known(charset: str | None) -> str:
    import codecs

    try:
        return codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"
