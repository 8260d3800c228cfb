"""The desk's web app (aiohttp): the JSON API, the page, the live stream and
/metrics. Each handler asks the `Releases` service, as the CLI does, and turns
its answer or its refusal into HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from aiohttp import web

from changeover.balancers.base import BalancerError
from changeover.config import Topology
from changeover.desk import metrics, views
from changeover.desk.auth import Role, Sessions, Tokens, bearer, csrf_ok
from changeover.desk.openapi import SPEC
from changeover.journal import LockHeld
from changeover.plan import PlanRefused
from changeover.releases import BadRequest, Outcome, Releases

log = logging.getLogger(__name__)

COOKIE = "changeover_desk"
CSRF_HEADER = "X-CSRF-Token"
STREAM_EVERY = 1.0  # seconds between two looks at the site for the live stream
HISTORY_LIMIT = 20
# Everything the page needs comes from this server; nothing inline runs.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
ASSETS = {
    "/": ("page.html", "text/html"),
    "/desk.js": ("desk.js", "text/javascript"),
    "/desk.css": ("desk.css", "text/css"),
}


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    name: str | None  # the name given at the page's login
    csrf: str | None  # the session's CSRF token (None with a bearer token)


def refusal(status: type[web.HTTPException], reason: str) -> web.HTTPException:
    return status(text=json.dumps({"error": reason}), content_type="application/json")


async def json_object(request: web.Request) -> dict[str, str]:
    """The string fields of the JSON object the request carries ({} for no
    body); 400 for a body that is not a JSON object."""
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise refusal(web.HTTPBadRequest, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise refusal(web.HTTPBadRequest, "the body must be a JSON object")
    return {k: v for k, v in body.items() if isinstance(v, str)}


class Desk:
    """One site's desk: the service, the tokens, the page's sessions and the
    release it runs itself (a rollback asked from the desk)."""

    def __init__(self, topo: Topology, releases: Releases, tokens: Tokens) -> None:
        self.topo = topo
        self.releases = releases
        self.tokens = tokens
        self.sessions = Sessions()
        self.stop = asyncio.Event()
        self.running: asyncio.Task[Outcome] | None = None
        self._streams = 0  # open event streams
        self._latest: str | None = None  # the status they were sent last
        self._changed = asyncio.Condition()
        self._watcher: asyncio.Task[None] | None = None

    # --- who is asking ----------------------------------------------------------

    def caller(self, request: web.Request, need: Role) -> Caller:
        token = bearer(request.headers.get("Authorization"))
        if token is not None:
            role = self.tokens.role_of(token)
            caller = Caller(role, None, None) if role else None
        else:
            session = self.sessions.get(request.cookies.get(COOKIE))
            caller = Caller(session.role, session.name, session.csrf) if session else None
        if caller is None:
            raise refusal(web.HTTPUnauthorized, "a viewer or operator token is needed")
        if caller.role < need:
            raise refusal(web.HTTPForbidden, "this needs an operator token")
        return caller

    async def actor(self, request: web.Request) -> str:
        """The name an action is journaled under, after the operator and CSRF checks."""
        caller = self.caller(request, Role.OPERATOR)
        if caller.csrf is not None and not csrf_ok(caller.csrf, request.headers.get(CSRF_HEADER)):
            raise refusal(web.HTTPForbidden, f"missing or wrong {CSRF_HEADER} header")
        name = ((await json_object(request)).get("name") or caller.name or "").strip()
        if not name:
            raise refusal(web.HTTPBadRequest, 'say who you are: {"name": "..."}')
        return f"{name} (desk)"

    # --- reading -----------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        now = await self.releases.status()
        if now.release is not None:  # with its events: who asked what, and when
            detail = await self.releases.describe(now.release["id"], detail=True)
            now = dataclasses.replace(now, release=detail)
        return views.site(self.topo, now)

    async def status(self, request: web.Request) -> web.Response:
        self.caller(request, Role.VIEWER)
        return web.json_response(await self.snapshot())

    async def release(self, request: web.Request) -> web.Response:
        self.caller(request, Role.VIEWER)
        return web.json_response((await self.snapshot())["release"])

    async def history(self, request: web.Request) -> web.Response:
        self.caller(request, Role.VIEWER)
        try:
            limit = int(request.query.get("limit", HISTORY_LIMIT))
        except ValueError:
            limit = 0
        if limit < 1:
            raise refusal(web.HTTPBadRequest, "limit must be a whole number of 1 or more")
        rows = await self.releases.history(min(limit, 500))
        return web.json_response([await self.releases.describe(r.id) for r in rows])

    async def show(self, request: web.Request) -> web.Response:
        self.caller(request, Role.VIEWER)
        try:
            number = int(request.match_info["id"])
            return web.json_response(await self.releases.describe(number, detail=True))
        except (KeyError, ValueError, OverflowError):  # OverflowError: beyond SQLite's integers
            raise refusal(web.HTTPNotFound, f"no release #{request.match_info['id']}") from None

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the status each time it changes."""
        self.caller(request, Role.VIEWER)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        self._streams += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        watcher = self._watcher
        try:
            sent: str | None = None

            def news() -> bool:
                return self.stop.is_set() or watcher.done() or self._latest != sent

            while True:
                async with self._changed:
                    await self._changed.wait_for(news)
                # A watcher that failed ends the stream: the page reconnects.
                if self.stop.is_set() or watcher.done() or self._latest is None:
                    return response
                sent = self._latest
                await response.write(f"event: status\ndata: {sent}\n\n".encode())
        finally:
            self._streams -= 1

    async def _watch(self) -> None:
        """One look at the site every STREAM_EVERY seconds, whatever the number
        of open streams, while there is one: the balancer and the journal are
        read once for all viewers."""
        while True:
            # No await between this test and the return: a stream opening now
            # either keeps this watcher going or finds it done and starts one.
            if not self._streams or self.stop.is_set():
                self._latest = None  # the next stream starts from a fresh look
                return
            try:
                self._latest = json.dumps(await self.snapshot(), sort_keys=True)
            except Exception:  # the streams end (the page reconnects); say why here
                log.exception("the desk could not read the site")
                return
            finally:  # the streams send a change, or end when the look failed
                async with self._changed:
                    self._changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), STREAM_EVERY)

    async def metrics(self, request: web.Request) -> web.Response:
        self.caller(request, Role.VIEWER)
        rows = await self.releases.history(1)
        newest = await self.releases.describe(rows[0].id) if rows else None
        return web.Response(body=metrics.render(newest), content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(SPEC)

    # --- acting ----------------------------------------------------------------------

    async def act(self, call: Callable[[], Awaitable[str]]) -> web.Response:
        try:
            return web.json_response({"ok": True, "message": await call()})
        except (BadRequest, PlanRefused) as exc:
            raise refusal(web.HTTPConflict, str(exc)) from None
        except LockHeld as exc:  # worded as the CLI words it
            raise refusal(web.HTTPConflict, f"another release holds the lock: {exc}") from None
        except BalancerError as exc:
            raise refusal(web.HTTPBadGateway, str(exc)) from None

    async def approve(self, request: web.Request) -> web.Response:
        who = await self.actor(request)
        return await self.act(lambda: self.releases.approve(who))

    async def abort(self, request: web.Request) -> web.Response:
        who = await self.actor(request)
        return await self.act(lambda: self.releases.abort(who))

    async def rollback(self, request: web.Request) -> web.Response:
        """Journal the rollback now (refusals answer 409), run it in the desk."""
        who = await self.actor(request)

        async def begin() -> str:
            if self.running is not None and not self.running.done():
                raise BadRequest("this desk is already running a rollback")
            release_id = await self.releases.begin_rollback(who)
            self.running = asyncio.create_task(self.releases.run(release_id))
            return f"rollback #{release_id} started"

        return await self.act(begin)

    # --- the page ----------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        role = self.tokens.role_of(body.get("token"))
        if role is None:
            raise refusal(web.HTTPUnauthorized, "unknown token")
        name = body.get("name", "").strip()
        if not name:
            raise refusal(web.HTTPBadRequest, "say who you are: the journal records the name")
        sid, session = self.sessions.open(role, name)
        response = web.json_response(_session_json(session.role, name, session.csrf))
        response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/")
        return response

    async def whoami(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise refusal(web.HTTPUnauthorized, "not logged in")
        return web.json_response(_session_json(session.role, session.name, session.csrf))

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.close(request.cookies.get(COOKIE))
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def asset(self, request: web.Request) -> web.Response:
        name, kind = ASSETS[request.path]
        return web.Response(
            text=files("changeover.desk").joinpath(name).read_text(),
            content_type=kind,
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/api/openapi.json", self.openapi),
                web.get("/api/status", self.status),
                web.get("/api/release", self.release),
                web.get("/api/history", self.history),
                web.get("/api/releases/{id}", self.show),
                web.get("/api/events", self.stream),
                web.post("/api/approve", self.approve),
                web.post("/api/abort", self.abort),
                web.post("/api/rollback", self.rollback),
                web.post("/api/login", self.login),
                web.get("/api/session", self.whoami),
                web.post("/api/logout", self.logout),
                web.get("/metrics", self.metrics),
                *(web.get(path, self.asset) for path in ASSETS),
            ]
        )
        return app

    async def close(self) -> None:
        """Stop the live streams and any rollback at its next safe point."""
        self.stop.set()
        async with self._changed:
            self._changed.notify_all()
        if self._watcher is not None:
            await self._watcher
        if self.running is not None:
            self.releases.interrupt()
            with contextlib.suppress(Exception):
                await self.running


def _session_json(role: Role, name: str, csrf: str) -> dict[str, Any]:
    return {"role": role.name.lower(), "name": name, "csrf": csrf}


async def serve(
    desk: Desk,
    host: str,
    port: int,
    ready: Callable[[str], None] = lambda url: None,
    *,
    signals: bool = True,
) -> None:
    """Serve until SIGINT or SIGTERM (with `signals`: only the main thread can
    take them) or `desk.stop`."""
    runner = web.AppRunner(desk.app())
    await runner.setup()
    try:
        tcp = web.TCPSite(runner, host, port)
        await tcp.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM) if signals else ():
            loop.add_signal_handler(sig, desk.stop.set)
        bound_host, bound_port = runner.addresses[0][:2]
        ready(f"http://{bound_host}:{bound_port}")
        await desk.stop.wait()
    finally:
        await desk.close()
        await runner.cleanup()
