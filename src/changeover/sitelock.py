"""The site's release lock beside the journal's: held by the balancer itself,
so every copy of a site's config (two operators, two state directories) that
releases one balancer meets the same lock. Today the embedded balancer holds
it (its admin API's /v1/lock, `proxy/lease.py`); with the other drivers only
the journal's lock applies (docs/drivers.md).

The owner id is one per copy of the config (host and journal path): within one
copy the journal's lock decides (a crashed holder's lock is stale and taken
over by `resume`), so that copy's claim renews its own lease at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from pathlib import Path

from changeover.balancers.base import BalancerError
from changeover.httpclient import Client, HttpError
from changeover.plan import PlanRefused

LEASE_TTL = 60.0  # a holder that died frees the lock this long after its last renewal
RENEW_EVERY = LEASE_TTL / 3


def owner_id(journal: Path) -> str:
    """The same for every process working from one copy of the config."""
    return hashlib.sha256(f"{socket.gethostname()}:{journal.resolve()}".encode()).hexdigest()[:32]


def shared_owner_id(state_url: str, site: str) -> str:
    """With a shared journal (`[site] state_url`) its lock decides between every
    copy of the config, so all of them are one owner: a resume from another
    machine renews the lease at once."""
    return hashlib.sha256(f"{state_url}#{site}".encode()).hexdigest()[:32]


class AdminApiLock:
    """The embedded balancer's lease, claimed and then renewed in the background
    until `release`."""

    def __init__(self, admin_url: str, token: str, owner: str, timeout: float = 5.0) -> None:
        self.url = admin_url.rstrip("/") + "/v1/lock"
        self.owner = owner
        self._client = Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})
        self._renewal: asyncio.Task[None] | None = None
        self._body: dict[str, object] = {}

    async def _call(self, method: str, body: dict[str, object]) -> None:
        try:
            resp = await self._client.request(method, self.url, json=body)
            data = resp.json()
        except (HttpError, ValueError) as exc:
            raise BalancerError(f"the balancer's release lock at {self.url}: {exc!r}") from None
        error = data.get("error") if isinstance(data, dict) else data
        if resp.status == 409:
            raise PlanRefused(f"{error}: one site, one release (another copy of the config?)")
        if resp.status != 200:
            raise BalancerError(f"the balancer's release lock: HTTP {resp.status}: {error}")

    async def claim(self, holder: str) -> None:
        """Take (or renew) the lease; PlanRefused when another copy holds it."""
        self._body = {"owner": self.owner, "holder": holder, "ttl": LEASE_TTL}
        await self._call("PUT", self._body)
        if self._renewal is None:
            self._renewal = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            # A missed renewal is tried again; the lease lasts three periods.
            with contextlib.suppress(BalancerError, PlanRefused):
                await self._call("PUT", self._body)

    async def release(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
        try:
            with contextlib.suppress(BalancerError, PlanRefused):  # it expires on its own
                await self._call("DELETE", {"owner": self.owner})
        finally:
            await self._client.close()
