"""The probe's WebSocket users.

Each user holds one WebSocket to an echo endpoint (the sample app's GET /ws)
through the balancer, sends a text message every `interval` seconds and
checks that the same text comes back within `timeout`. A close frame with
1001 (going away, as the balancer ends its tunnels at a drain) is a normal
close: the user reconnects at once, through the balancer, so it lands on a
member still in the pool. Every other end is abnormal and counted by kind
(`accounting.ws_close_failure`, and `handshake`, `echo_timeout`,
`echo_mismatch`): the user tries again after `interval`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import WSMsgType
from yarl import URL

from changeover.probe.accounting import WebSocketLedger, ws_close_failure

# Why a conversation ended, besides a failure kind.
GOING_AWAY = "going_away"
STOPPED = "stopped"

# (kind, detail, user, member): an abnormal close, for the report's examples and log.
FailureSink = Callable[[str, str, int, str | None], None]


def ws_url(url: str, path: str) -> str:
    """The echo endpoint on the probe's target: `url` with its path replaced."""
    return str(URL(url).with_path(path).with_query(None).with_fragment(None))


class WebSocketUsers:
    """`users` WebSocket users until `stop` is set; what they saw is in `ledger`."""

    def __init__(
        self,
        url: str,
        *,
        users: int,
        interval: float,
        timeout: float,
        headers: Mapping[str, str],
        member_header: str,
        stop: asyncio.Event,
        failed: FailureSink,
    ) -> None:
        if users < 1 or not interval > 0 or not timeout > 0:
            raise ValueError("users must be at least 1, interval and timeout positive")
        self.url = url
        self.users = users
        self.interval = interval
        self.timeout = timeout
        self.headers = dict(headers)
        self.member_header = member_header
        self.stop = stop
        self.on_failure = failed
        self.ledger = WebSocketLedger(users)

    async def run(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._user(session, user) for user in range(self.users)))

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when the run stops meanwhile."""
        if seconds > 0 and not self.stop.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await self.stop.wait()
            except TimeoutError:
                pass

    async def _user(self, session: aiohttp.ClientSession, user: int) -> None:
        # The users' messages are spread evenly over one interval.
        await self._pause(self.interval * user / self.users)
        while not self.stop.is_set():
            ws = await self._connect(session, user)
            if ws is None:
                await self._pause(self.interval)
                continue
            member = self._member(ws)
            try:
                end, detail = await self._converse(ws, user)
            finally:
                if not ws.closed:  # we end it: a close frame, the answer awaited (bounded)
                    await ws.close()
            if end == GOING_AWAY:
                self.ledger.going_away(user, member)
            elif end != STOPPED:
                self._failed(end, detail, user, member)
                await self._pause(self.interval)

    async def _connect(
        self, session: aiohttp.ClientSession, user: int
    ) -> aiohttp.ClientWebSocketResponse | None:
        self.ledger.attempt(user, time.monotonic())
        try:
            async with asyncio.timeout(self.timeout):
                ws = await session.ws_connect(
                    self.url,
                    headers=self.headers,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout),
                )
        except aiohttp.WSServerHandshakeError as exc:  # an answer, but not a 101
            self._failed("handshake", f"HTTP {exc.status}: {exc.message}", user, None)
            return None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._failed("handshake", detail, user, None)
            return None
        self.ledger.open(user)
        return ws

    def _member(self, ws: aiohttp.ClientWebSocketResponse) -> str | None:
        # aiohttp keeps the 101 response (with the member's headers) only here.
        return ws._response.headers.get(self.member_header)

    async def _converse(self, ws: aiohttp.ClientWebSocketResponse, user: int) -> tuple[str, str]:
        """Send and check messages until the connection ends or the run stops:
        why it ended (GOING_AWAY, STOPPED or a failure kind) and the detail."""
        stopped = asyncio.ensure_future(self.stop.wait())
        receiving: asyncio.Future[aiohttp.WSMessage] | None = None
        expected: str | None = None  # the message whose echo is awaited
        echo_by = next_send = time.monotonic()
        seq = 0
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.ensure_future(ws.receive())
                wake = echo_by if expected is not None else next_send
                done, _ = await asyncio.wait(
                    (receiving, stopped),
                    timeout=max(0.0, wake - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if receiving in done:
                    message, receiving = receiving.result(), None
                    if message.type is WSMsgType.TEXT and message.data == expected:
                        self.ledger.echo()
                        expected = None
                        continue
                    return _ended(message, expected)
                if stopped in done:
                    # close() ends the pending receive itself, then says goodbye.
                    await ws.close()
                    return STOPPED, ""
                if expected is not None:
                    return "echo_timeout", f"no echo of {expected!r} within {self.timeout:g}s"
                seq += 1
                expected = f"user {user} message {seq}"
                try:
                    await ws.send_str(expected)
                except (ConnectionError, aiohttp.ClientError) as exc:
                    return "no_close_frame", f"sending: {type(exc).__name__}: {exc}"
                now = time.monotonic()
                echo_by = now + self.timeout
                next_send = max(next_send + self.interval, now)
        finally:
            stopped.cancel()
            if receiving is not None:
                receiving.cancel()

    def _failed(self, kind: str, detail: str, user: int, member: str | None) -> None:
        self.ledger.failed(kind)
        self.on_failure(kind, detail, user, member)


def _ended(message: aiohttp.WSMessage, expected: str | None) -> tuple[str, str]:
    """What a message other than the awaited echo means."""
    if message.type is WSMsgType.CLOSE:
        kind = ws_close_failure(message.data)
        return kind or GOING_AWAY, f"closed with code {message.data} {message.extra or ''}"
    if message.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
        kind = ws_close_failure(None)
        assert kind is not None
        return kind, f"ended without a close frame ({message.type.name}: {message.data!r})"
    got = repr(message.data)[:60]
    return "echo_mismatch", f"sent {expected!r}, got {message.type.name} {got}"
