"""The open-loop traffic generator.

Request i is dispatched at t0 + i/rate whether or not earlier requests have
returned, as real users do; request i belongs to virtual user i % sticky_users,
who keeps the cookies the balancer and the app set, like a browser. So a user
thinks sticky_users/rate seconds between two requests; with `sessions`, it
stays for a drawn length and then leaves (its cookies with it), and a new user
takes its place on the schedule. Beside them, `ws_users` WebSocket users
(`changeover.probe.websockets`) each hold a WebSocket to `ws_path` and echo a
message every `ws_interval` seconds.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections import Counter

import aiohttp

from changeover.probe.accounting import (
    BreakLedger,
    LatencyHistogram,
    SessionLengths,
    Sessions,
)
from changeover.probe.report import ProbeReport
from changeover.probe.watcher import AdmissionWatcher
from changeover.probe.websockets import WebSocketUsers, ws_url

STAY_FOR_GOOD = SessionLengths()  # users who never leave
MAX_EXAMPLES = 5  # distinct failure messages kept for the report
MAX_LOGGED = 20  # failed requests kept with their time and member, to tell when and where
MAX_SLEEP = 0.05  # the scheduler wakes at least this often to notice `stop`


async def run_probe(
    url: str,
    *,
    rate: float,
    duration: float,
    sticky_users: int,
    timeout: float = 2.0,
    host_header: str | None = None,
    stop: asyncio.Event | None = None,
    watcher: AdmissionWatcher | None = None,
    member_header: str = "X-Changeover-Member",
    version_header: str = "X-Changeover-Version",
    verify_tls: bool | ssl.SSLContext = True,
    sessions: SessionLengths = STAY_FOR_GOOD,
    seed: int | None = None,
    ws_users: int = 0,
    ws_path: str = "/ws",
    ws_interval: float = 1.0,
) -> ProbeReport:
    """Send GET `url` at `rate` requests/s until `duration` elapses or `stop` is set.

    `verify_tls`: an SSL context verifies with it (e.g. a site's own CA), False not at all.
    With a running `watcher`, a user moved off a member that the balancer had
    taken out counts as a cut session, any other move as a broken one; without
    one every move is a break. `seed` makes the session lengths repeatable.
    `ws_users` WebSocket users run alongside, on `ws_path` of the same host.
    """
    if rate <= 0 or duration < 0 or sticky_users < 1 or timeout <= 0:
        raise ValueError("rate and timeout must be positive, duration >= 0, sticky_users >= 1")
    if ws_users < 0 or not ws_interval > 0:
        raise ValueError("ws_users must be >= 0 and ws_interval positive")
    probe = _Probe(
        url,
        rate=rate,
        sticky_users=sticky_users,
        timeout=timeout,
        host_header=host_header,
        watcher=watcher,
        member_header=member_header,
        version_header=version_header,
        lengths=sessions,
        rng=random.Random(seed),
    )
    # The pool is sized to the rate: enough connections for a slow second, not unbounded.
    connector = aiohttp.TCPConnector(
        limit=max(64, min(512, int(rate // 2))),
        ssl=verify_tls,
    )
    ws_stop = asyncio.Event()
    sockets = (
        WebSocketUsers(
            ws_url(url, ws_path),
            users=ws_users,
            interval=ws_interval,
            timeout=timeout,
            headers={"Host": host_header} if host_header else {},
            member_header=member_header,
            stop=ws_stop,
            failed=probe.ws_failed,
        )
        if ws_users
        else None
    )
    async with (
        aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are kept per virtual user instead
            timeout=aiohttp.ClientTimeout(total=timeout),
            auto_decompress=False,
        ) as session,
        # The WebSockets hold their connections: a pool of their own, unbounded;
        # their handshakes are timed by the users themselves.
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=verify_tls),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        ) as ws_session,
    ):
        users = asyncio.create_task(sockets.run(ws_session)) if sockets else None
        try:
            elapsed = await probe.schedule(session, duration, stop or asyncio.Event())
        finally:
            ws_stop.set()
        await probe.drain()
        if users is not None:
            await users  # each user's goodbye is bounded by the timeout
    await probe.settle_breaks()
    return probe.report(duration=elapsed, sockets=sockets)


def failure_kind(exc: BaseException) -> str:
    """The report's failure kind for an exception raised by a request."""
    if isinstance(exc, TimeoutError):  # also aiohttp's connect and read timeouts
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnect"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "protocol"
    return "other"


class _Probe:
    def __init__(
        self,
        url: str,
        *,
        rate: float,
        sticky_users: int,
        timeout: float,
        host_header: str | None,
        watcher: AdmissionWatcher | None,
        member_header: str,
        version_header: str,
        lengths: SessionLengths,
        rng: random.Random,
    ) -> None:
        self.url = url
        self.rate = rate
        self.users = sticky_users
        self.timeout = timeout
        self.host_header = host_header
        self.watcher = watcher
        self.member_header = member_header
        self.version_header = version_header
        # Past this many requests in flight, further ones are failed, not queued.
        self.max_in_flight = max(100, int(10 * rate))
        self.in_flight: set[asyncio.Task[None]] = set()
        self.cookies: list[dict[str, str]] = [{} for _ in range(sticky_users)]
        self.cookie_header: list[str] = [""] * sticky_users
        # The member whose session the user's current cookies stand for: the one
        # that set them, or that last answered a request carrying them. A user's
        # concurrent requests can each get a new session (after a move, say); the
        # jar keeps the last one set, and that is the session the next request
        # carries, whichever response happened to arrive last.
        self.cookie_owner: list[str | None] = [None] * sticky_users
        self.sessions = Sessions(sticky_users)
        self.lengths, self.rng = lengths, rng
        # When each user leaves (relative to t0 until the schedule starts), and
        # which user of the slot it is: a response to a user who has left is
        # counted, but changes nothing of the user who replaced it.
        self.leaves = [lengths.draw(rng) for _ in range(sticky_users)]
        self.generation = [0] * sticky_users
        self.ledger = BreakLedger(watcher.timeline if watcher else None)
        self.latency = LatencyHistogram()
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []
        self.failure_log: list[str] = []
        self.t0 = time.monotonic()
        self.sent = 0
        self.completed = 0
        self.ok = 0
        self.max_lag = 0.0
        self.last_done = 0.0

    async def schedule(
        self, session: aiohttp.ClientSession, duration: float, stop: asyncio.Event
    ) -> float:
        """Dispatch every request when it is due; return the seconds spent."""
        total = int(duration * self.rate)
        self.t0 = t0 = time.monotonic()
        self.leaves = [t0 + stay for stay in self.leaves]
        i = 0
        while i < total and not stop.is_set():
            now = time.monotonic()
            due = min(total, int((now - t0) * self.rate) + 1)
            while i < due:
                self._dispatch(session, i, t0 + i / self.rate)
                i += 1
            delay = t0 + i / self.rate - time.monotonic()
            # sleep(0) when behind still lets the dispatched requests run.
            await asyncio.sleep(min(max(delay, 0.0), MAX_SLEEP))
        if not stop.is_set():  # the last request owns a 1/rate slot too
            await asyncio.sleep(max(0.0, t0 + total / self.rate - time.monotonic()))
        return time.monotonic() - t0

    async def drain(self) -> None:
        """Wait for the requests in flight; each is bounded by the timeout."""
        if not self.in_flight:
            return
        _, late = await asyncio.wait(self.in_flight, timeout=self.timeout + 1.0)
        for task in late:  # only if a response handler itself hung
            task.cancel()
            self._fail("timeout", "request still running after the timeout")

    async def settle_breaks(self) -> None:
        """Judge the last moves once the watcher has read past the last response."""
        if self.watcher is not None and self.ledger.pending:
            await self.watcher.wait_for_read_after(
                self.last_done, timeout=max(1.0, 5 * self.watcher.interval)
            )
        self.ledger.settle(final=True)

    def _dispatch(self, session: aiohttp.ClientSession, seq: int, due: float) -> None:
        if len(self.in_flight) >= self.max_in_flight:
            self._fail("overload", f"more than {self.max_in_flight} requests in flight")
            return
        self.sent += 1
        user = seq % self.users
        if due >= self.leaves[user]:
            self._replace(user, due)
        task = asyncio.create_task(self._request(session, user, self.generation[user], due))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    def _replace(self, user: int, now: float) -> None:
        """The user's session is over: it leaves, a new user arrives in its place."""
        self.generation[user] += 1
        self.cookies[user] = {}
        self.cookie_header[user] = ""
        self.cookie_owner[user] = None
        self.sessions.replace(user)
        self.leaves[user] = now + self.lengths.draw(self.rng)

    async def _request(
        self, session: aiohttp.ClientSession, user: int, generation: int, due: float
    ) -> None:
        started = time.monotonic()
        self.max_lag = max(self.max_lag, started - due)
        sent_cookies = self.cookie_header[user]
        # Whose session this request carries: without cookies, the member that
        # served the user last (an app that keeps no session can still be sticky).
        sent_member = self.cookie_owner[user] if sent_cookies else self.sessions.users[user].member
        headers = {}
        if sent_cookies:
            headers["Cookie"] = sent_cookies
        if self.host_header:
            headers["Host"] = self.host_header
        try:
            async with session.get(self.url, headers=headers, allow_redirects=False) as resp:
                while await resp.content.readany():  # the body is read and discarded
                    pass
                status = resp.status
                member = resp.headers.get(self.member_header)
                version = resp.headers.get(self.version_header)
                # A user who left while this was in flight took its cookies along.
                current = self.generation[user] == generation
                if current and "Set-Cookie" in resp.headers:
                    self._keep_cookies(user, resp)
                    self.cookie_owner[user] = member
                elif current and self.cookie_header[user] == sent_cookies and sent_cookies:
                    # The session it carried is the user's current one: whoever
                    # answered holds it now (a stale cookie's answer changes nothing).
                    self.cookie_owner[user] = member
        except Exception as exc:  # every request sent is accounted for, whatever went wrong
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._fail(failure_kind(exc), detail)
            self._log(due, f"{failure_kind(exc)} ({detail}), user {user} of {sent_member}")
            return
        done = time.monotonic()
        self.last_done = done
        self.completed += 1
        self.latency.record((done - due) * 1000.0)
        if 200 <= status < 400:
            self.ok += 1
        else:
            self._fail("http_5xx" if status >= 500 else "http_other", f"HTTP {status}")
            self._log(due, f"HTTP {status} from {member}, user {user} of {sent_member}")
        if not current:
            self.sessions.seen(member, version)  # the totals, not the successor's history
            return
        move = self.sessions.served(user, sent_member, member, version, started, done)
        if move is not None:
            self.ledger.add(move)

    def _keep_cookies(self, user: int, resp: aiohttp.ClientResponse) -> None:
        jar = self.cookies[user]
        for name, morsel in resp.cookies.items():
            if morsel["max-age"] in ("0", "-1"):  # the server deleted it
                jar.pop(name, None)
            else:
                jar[name] = morsel.value
        self.cookie_header[user] = "; ".join(f"{k}={v}" for k, v in jar.items())

    def _fail(self, kind: str, message: str) -> None:
        self.failures[kind] += 1
        self._example(f"{kind}: {message}")

    def _example(self, example: str) -> None:
        if len(self.examples) < MAX_EXAMPLES and example not in self.examples:
            self.examples.append(example)

    def _log(self, due: float, what: str) -> None:
        if len(self.failure_log) < MAX_LOGGED:
            self.failure_log.append(f"at {due - self.t0:.2f}s: {what}")

    def ws_failed(self, kind: str, detail: str, user: int, member: str | None) -> None:
        """A WebSocket user's abnormal close, for the examples and the log (the
        count is the WebSocket ledger's)."""
        self._example(f"ws {kind}: {detail}")
        self._log(time.monotonic(), f"ws {kind} ({detail}), ws user {user} on {member}")

    def report(self, *, duration: float, sockets: WebSocketUsers | None = None) -> ProbeReport:
        watcher = self.watcher
        ws = sockets.ledger if sockets else None
        return ProbeReport(
            url=self.url,
            target_rate=self.rate,
            sticky_users=self.users,
            duration=round(duration, 3),
            sent=self.sent,
            completed=self.completed,
            ok=self.ok,
            failures=dict(self.failures),
            latency_ms={
                "p50": round(self.latency.percentile(50), 3),
                "p99": round(self.latency.percentile(99), 3),
                "max": round(self.latency.max_ms, 3),
            },
            session_moves=self.sessions.moves,
            session_breaks=self.ledger.breaks,
            sessions_cut=self.ledger.cuts,
            users_arrived=self.sessions.arrived,
            think_time=round(self.users / self.rate, 3),
            session_mean=self.lengths.mean,
            session_max=self.lengths.maximum,
            version_flaps=self.sessions.flaps,
            versions_seen=dict(self.sessions.versions_seen),
            members_seen=dict(self.sessions.members_seen),
            max_schedule_lag_ms=round(self.max_lag * 1000.0, 3),
            achieved_rate=round(self.sent / duration, 1) if duration > 0 else 0.0,
            watched=watcher is not None,
            admission_reads=watcher.reads if watcher else 0,
            admission_read_failures=watcher.failures if watcher else 0,
            failure_examples=self.examples,
            failure_log=self.failure_log,
            ws_users=ws.users if ws else 0,
            ws_interval=sockets.interval if sockets else None,
            ws_opened=ws.opened if ws else 0,
            ws_echoed=ws.echoed if ws else 0,
            ws_normal_closes=dict(ws.normal) if ws else {},
            ws_abnormal_closes=dict(ws.abnormal) if ws else {},
            ws_reconnects=ws.reconnects if ws else 0,
            ws_max_reconnects_per_second=ws.reconnecting.peak if ws else 0,
            ws_waiting_to_reconnect=ws.waiting_to_reconnect if ws else 0,
        )
