"""The sample app: one member of a cluster, behaving like a JBoss app server.

    python -m changeover.demo.app --host H --port P --member M --route R --version V
        [--startup-delay S] [--drain-timeout S] [--fault-dir DIR] [--db URL]

- The port opens only after the start-up delay, as a server booting its app.
- GET / returns {"version", "member", "route", "session", "count"}: a
  per-session counter kept in this process's memory. A request without a
  session this member knows gets a new one and `JSESSIONID=<id>.<route>`, so a
  user moved to another member loses its session, as with a real app.
- GET /health: "ok" (503 once shutting down). GET /version: the version.
- Fault injection, read on every request from --fault-dir (appctl passes the
  member's directory): while `unhealthy` exists /health answers 503 (when the
  file holds a version, only an app running that version is unhealthy); while
  `report-version` exists /version answers its content instead of the version;
  while `errors` exists GET / answers 500 (a file holding a version: only an app
  running that version), as a release that goes bad in production.
  GET /slow?ms=N: sends the headers at once and the body after N ms (at most
  30000), for drain tests.
- GET /ws: a WebSocket that sends every text and binary message back as it
  came (its 101 names the member and version like any response), open until
  the client closes it; at SIGTERM the app closes every one still open with
  code 1001 (going away), as an app server does at undeploy.
- With --db (a postgresql:// URL or a SQLite file path), GET /db returns
  {"version", "users": [{"id", "name", "email"}]} read from the users table,
  or 500 with the database's error (e.g. after a migration dropped a column).
- Every response carries X-Changeover-Member and X-Changeover-Version.
- SIGTERM (or SIGINT): stop accepting connections, finish the requests in
  flight (for at most --drain-timeout seconds), exit 0.

Exit codes: 0 after a graceful stop; 1 when the port cannot be opened; 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("changeover.demo.app")

SESSION_COOKIE = "JSESSIONID"
MEMBER_HEADER = "X-Changeover-Member"
VERSION_HEADER = "X-Changeover-Version"
MAX_SLOW_MS = 30_000
MAX_SESSIONS = 100_000  # the oldest session is forgotten past this, like a session timeout


@dataclass
class AppState:
    member: str
    route: str
    version: str
    sessions: dict[str, int] = field(default_factory=dict)  # insertion order: oldest first
    shutting_down: bool = False
    fault_dir: Path | None = None
    sockets: set[web.WebSocketResponse] = field(default_factory=set)  # open WebSockets
    db: str | None = None  # a postgresql:// URL or a SQLite file path

    def fault(self, name: str) -> str | None:
        """The stripped content of fault-injection file `name`, None when it is absent."""
        if self.fault_dir is None:
            return None
        try:
            return (self.fault_dir / name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None


STATE = web.AppKey("state", AppState)


async def index(request: web.Request) -> web.Response:
    state = request.app[STATE]
    broken = state.fault("errors")
    if broken is not None and broken in ("", state.version):
        return web.json_response(
            {"member": state.member, "error": "errors (fault injection)"}, status=500
        )
    session = request.cookies.get(SESSION_COOKIE)
    new = session is None or session not in state.sessions
    if session is None or new:
        session = f"{secrets.token_hex(8)}.{state.route}"
        if len(state.sessions) >= MAX_SESSIONS:
            del state.sessions[next(iter(state.sessions))]
        state.sessions[session] = 0
    state.sessions[session] += 1
    response = web.json_response(
        {
            "version": state.version,
            "member": state.member,
            "route": state.route,
            "session": session,
            "count": state.sessions[session],
        }
    )
    if new:
        response.set_cookie(SESSION_COOKIE, session, path="/", httponly=True)
    return response


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.shutting_down:
        return web.Response(status=503, text="shutting down")
    sick = state.fault("unhealthy")
    if sick is not None and sick in ("", state.version):
        return web.Response(status=503, text="unhealthy (fault injection)")
    return web.Response(text="ok")


async def version_text(request: web.Request) -> web.Response:
    state = request.app[STATE]
    reported = state.fault("report-version")
    return web.Response(text=state.version if reported is None else reported)


async def fail(request: web.Request) -> web.Response:
    """A 500 on purpose: what a balancer counts as the member's 5xx response."""
    return web.json_response(
        {"member": request.app[STATE].member, "error": "on purpose"}, status=500
    )


async def slow(request: web.Request) -> web.StreamResponse:
    """Headers at once, the body after `ms`: a long response that is visibly in flight."""
    try:
        ms = int(request.query.get("ms", "1000"))
    except ValueError:
        raise web.HTTPBadRequest(text="ms must be an integer") from None
    ms = min(max(ms, 0), MAX_SLOW_MS)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await asyncio.sleep(ms / 1000)
    await response.write(json.dumps({"slept_ms": ms, "member": request.app[STATE].member}).encode())
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Every text or binary message back as it came, until the client closes."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sockets = request.app[STATE].sockets
    sockets.add(ws)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
    finally:
        sockets.discard(ws)
    return ws


async def _close_sockets(app: web.Application) -> None:
    """At shutdown: every open WebSocket gets 1001 (going away)."""
    sockets = list(app[STATE].sockets)
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down") for ws in sockets)
    )


async def _identify(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also covers errors raised by the router (404, 405).
    state = request.app[STATE]
    response.headers[MEMBER_HEADER] = state.member
    response.headers[VERSION_HEADER] = state.version


# The columns this release reads: a migration that drops one breaks this page.
USERS_QUERY = "SELECT id, name, email FROM users ORDER BY id"


def _sqlite_users(path: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
        return conn.execute(USERS_QUERY).fetchall()


class _DatabaseError(Exception):
    """The database refused the query (either engine's error, as text)."""


async def _postgres_users(url: str) -> list[tuple[object, ...]]:
    # Imported here: only a PostgreSQL site pays for psycopg, a quarter of the
    # app's boot, and a fleet's members boot at once.
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5) as conn:
            return await (await conn.execute(USERS_QUERY)).fetchall()
    except psycopg.Error as exc:
        raise _DatabaseError(str(exc)) from exc


async def users(request: web.Request) -> web.Response:
    """The users table, read on every request (one connection each: no pool to go stale)."""
    state = request.app[STATE]
    assert state.db is not None
    try:
        if state.db.startswith(("postgresql://", "postgres://")):
            rows = await _postgres_users(state.db)
        else:
            rows = await asyncio.to_thread(_sqlite_users, state.db)
    except (_DatabaseError, sqlite3.Error) as exc:
        return web.json_response({"version": state.version, "error": str(exc)}, status=500)
    return web.json_response(
        {
            "version": state.version,
            "users": [{"id": i, "name": n, "email": e} for i, n, e in rows],
        }
    )


def build_app(
    member: str, route: str, version: str, fault_dir: Path | None = None, db: str | None = None
) -> web.Application:
    app = web.Application()
    app[STATE] = AppState(member=member, route=route, version=version, fault_dir=fault_dir, db=db)
    app.on_response_prepare.append(_identify)
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version_text)
    app.router.add_get("/slow", slow)
    app.router.add_get("/fail", fail)
    app.router.add_get("/ws", echo)
    if db is not None:
        app.router.add_get("/db", users)
    return app


async def serve(
    host: str,
    port: int,
    app: web.Application,
    *,
    startup_delay: float = 0.0,
    drain_timeout: float = 30.0,
) -> None:
    """Boot (wait `startup_delay`), listen, and on SIGTERM/SIGINT drain and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    log.info("%s booting version %r (%.1f s)", state.member, state.version, startup_delay)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), startup_delay)
    if stop.is_set():
        log.info("%s stopped while booting", state.member)
        return
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("%s listening on %s:%d", state.member, host, port)
        await stop.wait()
        log.info("%s stopping: finishing requests in flight", state.member)
        state.shutting_down = True
    finally:
        # Closes the listener first, then waits for handlers in flight (bounded).
        await runner.cleanup()
    log.info("%s stopped", state.member)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m changeover.demo.app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--member", required=True)
    parser.add_argument("--route", help="sticky-session route (default: the member name)")
    parser.add_argument("--version", required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--fault-dir", type=Path, help="where fault-injection files are read")
    parser.add_argument("--db", help="GET /db reads users from: a postgresql:// URL or a path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app = build_app(args.member, args.route or args.member, args.version, args.fault_dir, args.db)
    coro = serve(
        args.host,
        args.port,
        app,
        startup_delay=args.startup_delay,
        drain_timeout=args.drain_timeout,
    )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    except OSError as exc:
        log.error("%s cannot listen on %s:%d: %s", args.member, args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
