"""Apache httpd 2.4 with mod_proxy_balancer, through the rendered config and the
balancer-manager.

The rendered config is the source of truth (a graceful restart re-reads it and
forgets balancer-manager changes: no BalancerPersist): LIVE is no flag, DRAINING
`status=+N`, OUT `status=+D`. `apply` re-renders and checks the file first
(`apache2 -t`), then makes the same change at run time through the
balancer-manager (a POST with the balancer's nonce and a matching Referer), so
no restart is needed, and reads `?xml=1` back: the manager answers 200 even to
a change it ignored, so only the read-back proves it.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from changeover.balancers.base import BalancerError
from changeover.balancers.process import ConfiguredBalancer, ordered_changes
from changeover.balancers.render import bound
from changeover.httpclient import Client, HttpError
from changeover.model import REACH, Admission, MemberState, PoolView
from changeover.polling import poll_until

NS = {"h": "http://httpd.apache.org"}
LIVE_BALANCER = "live"


def manager_form(admission: Admission) -> dict[str, str]:
    """The balancer-manager's status fields for `admission` (the config's +N, +D):
    w_status_N drain (sticky requests only), w_status_D disabled (none), and
    w_status_S stopped, cleared when admitting so a hand-stopped member comes back too."""
    reach = REACH[admission]
    form = {
        "w_status_N": str(int(reach.sticky and not reach.new)),
        "w_status_D": str(int(not reach.sticky)),
    }
    return form | ({"w_status_S": "0"} if reach.sticky else {})


@dataclass(frozen=True, slots=True)
class Worker:
    balancer: str  # without "balancer://"
    url: str  # the worker's name, as the form's "w" field wants it
    route: str
    status: frozenset[str]  # "Init", "Ok", "Drn", "Dis", "Stop", "Err", "HcFl", ...
    busy: int
    elected: int

    @property
    def admission(self) -> Admission:
        if self.status & {"Dis", "Stop"}:
            return Admission.OUT
        if "Drn" in self.status:
            return Admission.DRAINING
        return Admission.LIVE

    @property
    def healthy(self) -> bool:
        return not self.status & {"Err", "HcFl"}


@dataclass(frozen=True, slots=True)
class ManagerState:
    nonces: dict[str, str]  # balancer -> nonce
    workers: dict[tuple[str, str], Worker]  # (balancer, route) -> worker


def parse_manager_xml(text: str) -> ManagerState:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BalancerError(f"balancer-manager did not answer XML: {exc}: {text[:200]!r}") from None
    nonces: dict[str, str] = {}
    workers: dict[tuple[str, str], Worker] = {}
    for balancer in root.iterfind("h:balancers/h:balancer", NS):
        name = (balancer.findtext("h:name", "", NS)).removeprefix("balancer://")
        nonces[name] = balancer.findtext("h:nonce", "", NS)
        for w in balancer.iterfind("h:workers/h:worker", NS):
            route = w.findtext("h:route", "", NS)
            workers[name, route] = Worker(
                balancer=name,
                url=w.findtext("h:name", "", NS),
                route=route,
                status=frozenset(w.findtext("h:status", "", NS).split()),
                busy=int(w.findtext("h:busy", "0", NS) or 0),
                elected=int(w.findtext("h:elected", "0", NS) or 0),
            )
    return ManagerState(nonces, workers)


class ApacheBalancer(ConfiguredBalancer):
    product = "apache"
    fills = frozenset({"active", "requests"})  # balancer-manager: busy, elected
    default_config = "/etc/apache2/apache2.conf"
    default_check = ("apache2", "-t", "-f", "{config}")
    default_reload = ("apache2", "-k", "graceful", "-f", "{config}")

    @property
    def manager_url(self) -> str:
        if self.instance.manager_url:
            return self.instance.manager_url
        return bound(self.topology.balancer.admin_listen, self.instance).url() + "/balancer-manager"

    @functools.cached_property
    def _client(self) -> Client:
        return Client(timeout=self.timeout)

    async def _reachable(self, url: str) -> str:
        """`url` as this process reaches it (a port forward for a remote instance)."""
        return await self.host.reachable_url(url)

    async def _referer(self) -> dict[str, str]:
        """The manager answers (in full) and honours only requests that come "from
        itself": the Referer names the manager's URL as the request reaches it."""
        return {"Referer": await self._reachable(self.manager_url)}

    async def close(self) -> None:
        await self._client.close()
        await super().close()

    async def _get(self, url: str) -> str:
        try:
            target, headers = await self._reachable(url), await self._referer()
            resp = await self._client.request("GET", target, headers=headers)
        except HttpError as exc:
            raise BalancerError(
                f"{self.name}: cannot reach {url}{self.host.where}: {exc!r}"
            ) from None
        if resp.status != 200:
            raise BalancerError(f"{self.name}: GET {url}: HTTP {resp.status}")
        return resp.text()

    async def manager(self) -> ManagerState:
        return parse_manager_xml(await self._get(self.manager_url + "?xml=1"))

    async def read(self) -> PoolView:
        state = await self.manager()
        members = []
        for cluster, member in self.topology.members():
            live = state.workers.get((LIVE_BALANCER, member.route_id))
            if live is None:
                raise BalancerError(
                    f"{self.name}: balancer://{LIVE_BALANCER} has no member with route "
                    f"{member.route_id!r} (is the running config the rendered one?)"
                )
            # The QA balancer's worker is never disabled: its health check result
            # stands for the member even while it is OUT of the live pool.
            qa = state.workers.get((f"qa-{cluster.name}", member.route_id), live)
            members.append(
                MemberState(
                    name=member.name,
                    cluster=cluster.name,
                    admission=live.admission,
                    healthy=qa.healthy,
                    active=live.busy,
                    requests=live.elected,
                )
            )
        return PoolView(tuple(members))

    async def _enact(self, current: PoolView, target: Mapping[str, Admission]) -> None:
        changes = ordered_changes(current.admissions(), target)
        if not changes:
            return
        state = await self.manager()
        routes = {m.name: m.route_id for _, m in self.topology.members()}
        url, headers = await self._reachable(self.manager_url), await self._referer()
        # One member per POST: the manager has no batch; order keeps the pool non-empty.
        for name, admission in changes:
            worker = state.workers[LIVE_BALANCER, routes[name]]
            form = {
                "b": LIVE_BALANCER,
                "w": worker.url,
                "nonce": state.nonces[LIVE_BALANCER],
                **manager_form(admission),
            }
            try:
                resp = await self._client.request("POST", url, form=form, headers=headers)
            except HttpError as exc:
                raise BalancerError(f"{self.name}: balancer-manager unreachable: {exc!r}") from None
            if resp.status != 200:
                raise BalancerError(
                    f"{self.name}: balancer-manager refused {name} -> {admission}: "
                    f"HTTP {resp.status}"
                )

    async def _generation(self) -> int:
        status_url = self.manager_url.rsplit("/", 1)[0] + "/server-status?auto"
        for line in (await self._get(status_url)).splitlines():
            if line.startswith("ParentServerConfigGeneration:"):
                return int(line.split(":", 1)[1])
        raise BalancerError(f"{self.name}: server-status shows no ParentServerConfigGeneration")

    async def _reload(self, admissions: Mapping[str, Admission]) -> None:
        # A graceful restart re-reads the config (with its status flags); it has
        # happened when the parent's config generation moves on.
        before = await self._generation()
        await self.config.reload()

        async def restarted() -> bool:
            return await self._generation() > before

        # While the children are replaced, server-status may not answer.
        if not await poll_until(restarted, self.timeout, not_yet=(BalancerError,)):
            raise BalancerError(f"{self.name}: Apache did not restart within {self.timeout:g}s")
