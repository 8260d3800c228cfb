"""nginx (open source, 1.18 or later) through its rendered config and reloads.

Open-source nginx has no runtime API: every admission change is a new rendered
config, `nginx -t`, `nginx -s reload` (new workers take new connections, old
ones finish their requests). The config answers for itself on the control
listener: /changeover/state returns the admissions it was rendered with, so a
reload that the master refused (a port it cannot bind, say) is detected.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from changeover.balancers.base import BalancerError
from changeover.balancers.process import ConfiguredBalancer, converge
from changeover.balancers.render import runtime_paths
from changeover.model import Admission, MemberState, PoolView


class NginxBalancer(ConfiguredBalancer):
    product = "nginx"
    default_config = "/etc/nginx/nginx.conf"
    default_check = ("nginx", "-t", "-q", "-c", "{config}")
    default_reload = ("nginx", "-s", "reload", "-c", "{config}")

    _session: aiohttp.ClientSession | None = None
    _health_session: aiohttp.ClientSession | None = None

    @property
    def control_url(self) -> str:
        if self.instance.admin_url:
            return self.instance.admin_url.rstrip("/")
        return self.topology.balancer.admin_listen.url()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # A kept-alive connection could still reach an old worker after a reload.
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._session

    def _health_client(self) -> aiohttp.ClientSession:
        # Health reads may reuse connections: any worker, old or new, proxies them to
        # the same member (nginx opens a fresh upstream connection for each). A
        # connection per read cost the probe's watcher (70 reads/s) as much CPU as a
        # tenth of its traffic.
        if self._health_session is None:
            self._health_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._health_session

    async def close(self) -> None:
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
        self._session = self._health_session = None

    async def _state(self) -> dict[str, Admission]:
        url = f"{self.control_url}/changeover/state"
        try:
            async with self._client().get(url) as resp:
                if resp.status != 200:
                    raise BalancerError(f"{self.name}: GET {url}: HTTP {resp.status}")
                data = json.loads(await resp.text())
            return {name: Admission(adm) for name, adm in data["admissions"].items()}
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            raise BalancerError(f"{self.name}: cannot read nginx state at {url}: {exc!r}") from None

    async def _healthy(self, member: str) -> bool:
        """nginx's own view: can it reach the member's health URL right now?"""
        try:
            url = f"{self.control_url}/changeover/health/{member}"
            async with self._health_client().get(url) as resp:
                await resp.read()
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _view(self, admissions: Mapping[str, Admission], health: Mapping[str, bool]) -> PoolView:
        return PoolView(
            tuple(
                MemberState(
                    name=m.name,
                    cluster=c.name,
                    admission=admissions.get(m.name, Admission.OUT),
                    healthy=health.get(m.name, True),
                    # Open-source nginx counts nothing per upstream server.
                    active=0,
                )
                for c, m in self.topology.members()
            )
        )

    async def read(self) -> PoolView:
        names = [m.name for _, m in self.topology.members()]
        admissions, *health = await asyncio.gather(
            self._state(), *(self._healthy(name) for name in names)
        )
        return self._view(admissions, dict(zip(names, health, strict=True)))  # type: ignore[arg-type]

    async def _read_admissions(self) -> PoolView:
        return self._view(await self._state(), {})

    async def _enact(self, current: PoolView, target: Mapping[str, Admission]) -> None:
        if current.admissions() != dict(target):
            await self._reload_to(target)

    async def _reload(self) -> None:
        await self._reload_to(await self._state())

    async def _reload_to(self, target: Mapping[str, Admission]) -> None:
        await self.config.reload()
        try:
            await converge(self._read_admissions, target, timeout=self.timeout, what=self.name)
        except BalancerError as exc:
            # The master logs why it kept the old configuration.
            raise BalancerError(f"{exc}\nnginx error log says: {await self._log_tail()}") from None

    async def _log_tail(self, lines: int = 5) -> str:
        path = Path(runtime_paths("nginx", self.options)["error_log"])
        try:
            text = await asyncio.to_thread(path.read_text, errors="replace")
        except OSError as exc:
            return f"(cannot read {path}: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"
