"""The admin API on `balancer.admin_listen`, served by the master process.

GET /v1/pool[?session_idle=S], POST /v1/admissions[?session_idle=S], POST /v1/tls/reload,
POST /v1/reload (re-read the topology file, as SIGHUP does) and GET /v1/reload
(how the last reload went), the site's release lock at /v1/lock (GET, PUT to
claim or renew, DELETE to let go; see `proxy/lease.py`), all behind the bearer
token, and GET /v1/healthz (open).
GET /metrics (each member's counters for Prometheus, `proxy/metrics.py`) takes
the admin token or the read-only metrics token (`balancer.metrics_token_env`),
which opens nothing else.
aiohttp is fine here: this is not the request hot path.

A body that cannot be read as JSON (not JSON, not text in its charset, an
unknown charset, nested deeper than the parser goes, too big) is a 400 (413)
with a JSON error, never a 500. A change that would leave the live pool with
fewer than `policy.min_healthy` healthy members is refused with 409, exactly as
the engine's interlock refuses it, unless the body says `"force": true`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from changeover.proxy import lease, metrics
from changeover.proxy.state import AdmissionError, InterlockError, PoolState

log = logging.getLogger("changeover.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/v1/healthz"})
METRICS_PATH = "/metrics"


def _digest(value: str) -> bytes:
    # Comparing digests keeps the comparison constant-time whatever the lengths.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _session_idle(request: web.Request) -> float | web.Response | None:
    """`?session_idle=S`: the seconds the pool document counts sessions over
    (None: the balancer's own), or the 400 for a value that is none."""
    if "session_idle" not in request.query:
        return None
    try:
        idle = float(request.query["session_idle"])
    except ValueError:
        idle = -1.0
    if not 0 < idle < 1e9:  # also refuses nan
        return _error(400, "session_idle must be a positive number of seconds")
    return idle


ADMISSIONS_SHAPE = (
    'expected {"admissions": {"<member>": "live|draining|out", ...}} and optionally "force": true'
)


LOCK_SHAPE = 'expected {"owner": "<id>", "holder": "<who>", "ttl": <seconds>} (DELETE: "owner")'


async def _json_body(request: web.Request) -> tuple[Any, web.Response | None]:
    """(the decoded body, None), or (None, the error response to send instead)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None, _error(413, f"the body is larger than {request.client_max_size} bytes")
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(charset)
    except LookupError:  # an unknown charset, or a codec that is not a text encoding
        return None, _error(400, f"unknown charset {charset[:40]!r}: send UTF-8 JSON")
    except UnicodeError:
        return None, _error(400, f"the body is not {charset[:40]} text")
    try:
        return json.loads(text), None
    except RecursionError:
        return None, _error(400, "the body is JSON nested too deep")
    except ValueError:
        return None, _error(400, "the body is not JSON")


def build_app(
    pool: PoolState,
    token: str,
    reload_tls: Callable[[], Awaitable[list[str]]] | None = None,
    *,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    held_lease: list[lease.Lease | None] | None = None,
) -> web.Application:
    """`reload_tls` loads the certificates again (ValueError: not loaded, the old
    kept); `reload` re-reads the topology (an exception: refused, see its message)
    and `status` says how the last reload went; `held_lease` holds the release lock
    (one item, kept by the caller so that it survives a hand-over)."""
    expected = _digest(f"Bearer {token}")
    read_only = pool.topology.balancer.metrics_token()
    scraper = _digest(f"Bearer {read_only}") if read_only else None

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = _digest(request.headers.get("Authorization", ""))
            allowed = hmac.compare_digest(given, expected)
            if scraper is not None and request.path == METRICS_PATH:
                allowed = hmac.compare_digest(given, scraper) or allowed
            if not allowed:
                response = _error(401, "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await handler(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    # At start-up a read waits for the checker's verdict on every member rather
    # than report a guess: a member that is down takes `fall` probes. The wait is
    # capped below the drivers' read timeouts; a member still without a verdict is
    # reported unhealthy.
    health = pool.topology.balancer.health
    first_verdicts = min(3.0, health.fall * health.interval + health.timeout)

    async def get_pool(request: web.Request) -> web.Response:
        idle = _session_idle(request)
        if isinstance(idle, web.Response):
            return idle
        await pool.first_verdicts(first_verdicts)
        return web.json_response(pool.view(idle))

    async def post_admissions(request: web.Request) -> web.Response:
        idle = _session_idle(request)
        if isinstance(idle, web.Response):
            return idle
        body, problem = await _json_body(request)
        if problem is not None:
            return problem
        changes = body.get("admissions") if isinstance(body, dict) else None
        if not isinstance(changes, dict) or not changes:
            return _error(400, ADMISSIONS_SHAPE)
        force = body.get("force", False)
        if not isinstance(force, bool):
            return _error(400, '"force" must be true or false')
        # Judge the change on real verdicts, not on the start-up guess.
        await pool.first_verdicts(first_verdicts)
        try:
            done = pool.set_admissions(changes, force=force)
        except AdmissionError as exc:
            return _error(400, str(exc))
        except InterlockError as exc:
            return _error(409, f'{exc}; refused (send "force": true to apply it anyway)')
        except OSError as exc:
            return _error(500, f"cannot save the balancer state: {exc}")
        if done:
            log.info("admissions changed%s: %s", " (forced)" if force else "", ", ".join(done))
        return web.json_response(pool.view(idle))

    async def post_tls_reload(_: web.Request) -> web.Response:
        if reload_tls is None:
            return _error(409, "this balancer has no TLS listener (balancer.tls_cert)")
        try:
            files = await reload_tls()
        except ValueError as exc:
            return _error(400, f"{exc}; the old certificates still serve")
        return web.json_response({"reloaded": files})

    held: list[lease.Lease | None] = [None] if held_lease is None else held_lease

    async def post_reload(_: web.Request) -> web.Response:
        if reload is None:
            return _error(409, "this balancer cannot reload")
        try:
            return web.json_response(await reload())
        except Exception as exc:  # the reload's own refusal, already logged
            body = {"error": str(exc), "reload": status() if status else None}
            return web.json_response(body, status=400)

    async def get_reload(_: web.Request) -> web.Response:
        return web.json_response(status() if status else {"reloads": 0, "attempts": 0, "ok": None})

    def lock_view() -> web.Response:
        now, current = time.monotonic(), held[0]
        if current is None or current.expires <= now:
            return web.json_response({"holder": None})
        left = current.expires - now
        return web.json_response({"holder": current.holder, "expires_in": left})

    async def lock_request(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body, problem = await _json_body(request)
        if problem is not None:
            return {}, problem
        if not isinstance(body, dict) or not isinstance(body.get("owner"), str):
            return {}, _error(400, LOCK_SHAPE)
        return body, None

    async def get_lock(_: web.Request) -> web.Response:
        return lock_view()

    async def put_lock(request: web.Request) -> web.Response:
        body, problem = await lock_request(request)
        if problem is not None:
            return problem
        holder, ttl = body.get("holder"), body.get("ttl")
        if not isinstance(holder, str) or not isinstance(ttl, int | float) or isinstance(ttl, bool):
            return _error(400, LOCK_SHAPE)
        if not (math.isfinite(ttl) and 0 < ttl <= lease.MAX_TTL):
            return _error(400, f'"ttl" must be above 0 and at most {lease.MAX_TTL:g} seconds')
        held[0], refused = lease.claim(held[0], body["owner"], holder[:200], ttl, time.monotonic())
        return _error(409, refused) if refused else lock_view()

    async def delete_lock(request: web.Request) -> web.Response:
        body, problem = await lock_request(request)
        if problem is not None:
            return problem
        held[0], refused = lease.release(held[0], body["owner"], time.monotonic())
        return _error(409, refused) if refused else lock_view()

    async def get_metrics(_: web.Request) -> web.Response:
        await pool.first_verdicts(first_verdicts)
        return web.Response(
            body=metrics.render(pool.view()["members"]),
            content_type="text/plain",
            charset="utf-8",
        )

    app = web.Application(middlewares=[require_token])
    app.router.add_get(METRICS_PATH, get_metrics)
    app.router.add_get("/v1/healthz", healthz)
    app.router.add_get("/v1/pool", get_pool)
    app.router.add_post("/v1/admissions", post_admissions)
    app.router.add_post("/v1/tls/reload", post_tls_reload)
    app.router.add_post("/v1/reload", post_reload)
    app.router.add_get("/v1/reload", get_reload)
    app.router.add_get("/v1/lock", get_lock)
    app.router.add_put("/v1/lock", put_lock)
    app.router.add_delete("/v1/lock", delete_lock)
    return app
