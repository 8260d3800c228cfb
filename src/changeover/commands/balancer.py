"""`changeover balancer reload`: ask the running embedded balancer to re-read its topology."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from changeover.balancers.builtin import admin_url_of
from changeover.commands import EXIT_BAD_INPUT, EXIT_FAILED
from changeover.commands.common import load_config
from changeover.commands.output import fail, out


def reload(config: Path) -> None:
    topo = load_config(config)
    token = topo.balancer.token()
    if not token:
        fail(EXIT_BAD_INPUT, f"no admin token: set {topo.balancer.admin_token_env}")
    url = admin_url_of(topo).rstrip("/") + "/v1/reload"

    async def send() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
            http.post(url, headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)

    try:
        status, body = asyncio.run(send())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        fail(EXIT_FAILED, f"cannot reach the balancer at {url}: {exc}")
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else body
        fail(EXIT_FAILED, f"reload failed, the old topology still serves: {error}")
    changes = " ".join(body.get("members") or []) or "the same members"
    out.print(f"reloaded: {changes}", highlight=False, markup=False)
