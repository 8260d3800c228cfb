"""The orchestrator's HTTP client: a small face over aiohttp's client.

The checks, the embedded balancer's admin API, its release lock, Prometheus and
the webhooks send small requests, many of them during a release (health and
version of every member). This module keeps what the callers need: one
deadline per request (connecting included), a bound on requests at once, a
body read whole (and capped), errors as `HttpError`, and a TLS context built
only for an https URL, when the first one is met. aiohttp is imported with
this module, which only the commands that send HTTP import (its import builds
TLS contexts: about 0.15 s of CPU); httpx was tried and costs 7x the CPU per
request (docs/benchmarks.md). Nothing is followed: a redirect is an answer.
aiohttp sends an idempotent request once more when the connection closes
before the answer (a kept connection the server closed as it went out).
"""

from __future__ import annotations

import asyncio
import codecs
import json as jsonlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

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
    encoding: str = "utf-8"  # the charset the answer names (UTF-8 when none or unknown)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def text(self) -> str:
        """The body decoded with the charset it names (UTF-8 when none, or an
        unknown one), undecodable bytes replaced."""
        return self.body.decode(self.encoding, "replace")

    def json(self) -> Any:
        """The body as JSON (None when empty); ValueError when it is not JSON."""
        text = self.text().strip()
        return jsonlib.loads(text) if text else None


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
        self.headers = {"User-Agent": "changeover", **(headers or {})}
        self._make_tls = tls
        self._tls: ssl.SSLContext | None = None
        self._limit = limit
        self._keep_alive = keep_alive
        self._session: aiohttp.ClientSession | None = None
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
            target = URL(url)
        except ValueError as exc:
            raise HttpError(f"not an http(s) URL with a host: {url!r}: {exc}") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise HttpError(f"not an http(s) URL with a host: {url!r}")
        try:
            where = f"{target.host}:{target.port}"
        except ValueError as exc:
            raise HttpError(f"bad port in {url!r}: {exc}") from None
        tls: ssl.SSLContext | bool = True
        if target.scheme == "https":
            if self._tls is None:  # loading a trust store reads files: not on the loop
                self._tls = await asyncio.to_thread(self._make_tls)
            tls = self._tls
        try:
            async with self._sessions().request(
                method, target, headers=headers, data=form if form is not None else body,
                json=json, ssl=tls, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=wait),
            ) as answer:  # fmt: skip
                chunks, size = [], 0
                async for chunk in answer.content.iter_any():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise HttpError(f"an answer from {where} larger than {MAX_BODY} bytes")
                    chunks.append(chunk)
                return Response(
                    answer.status,
                    tuple(
                        (k.decode("latin-1").lower(), v.decode("latin-1"))
                        for k, v in answer.raw_headers
                    ),
                    b"".join(chunks),
                    _known(answer.charset),
                )
        except TimeoutError:
            raise HttpTimeout(f"no answer from {where} within {wait:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise HttpError(f"cannot connect to {where}: {exc.os_error}") from None
        except aiohttp.ServerDisconnectedError:
            raise HttpError(f"{where}: the connection closed before an answer") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise HttpError(f"{where}: {type(exc).__name__}: {exc}") from None

    def _sessions(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            # A pool belongs to the loop that made its connections: those of an
            # ended loop are dropped, never closed or reused.
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=self._limit, force_close=not self._keep_alive),
                raise_for_status=False,
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()


def _known(charset: str | None) -> str:
    try:
        return codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"
