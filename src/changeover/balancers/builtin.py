"""Driver for the embedded balancer (`changeover balancer serve`), via its admin API."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from changeover.balancers.base import BalancerError, Counter
from changeover.config import BalancerInstance, ConfigError, Topology
from changeover.httpclient import Client, HttpError
from changeover.model import Admission, MemberState, PoolView, differs


def admin_url_of(topo: Topology) -> str:
    return topo.balancer.admin_listen.url()


def pool_from_json(data: Any) -> PoolView:
    """PoolView from the admin API's {"members": [{"name", "cluster", "admission", ...}]}.
    A counter the document does not give (an older balancer) is not counted."""
    try:
        return PoolView(
            tuple(
                MemberState(
                    name=str(m["name"]),
                    cluster=str(m["cluster"]),
                    admission=Admission(m["admission"]),
                    healthy=bool(m.get("healthy", False)),
                    **{c: None if m.get(c) is None else int(m[c]) for c in BuiltinBalancer.fills},
                )
                for m in data["members"]
            )
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BalancerError(f"unexpected pool document from the admin API: {exc!r}") from None


class BuiltinBalancer:
    """One embedded balancer instance; admission changes are atomic on its side."""

    fills: ClassVar[frozenset[Counter]] = frozenset(
        {"active", "requests", "errors", "sessions", "tunnels"}
    )

    def __init__(
        self,
        url: str,
        token: str | None,
        name: str = "builtin",
        timeout: float = 5.0,
        session_idle: float | None = None,
    ) -> None:
        if not token:  # the config lacks it: bad input, not an unreachable balancer
            raise ConfigError(
                "the embedded balancer's admin API needs a token: set balancer.admin_token_env "
                "(default CHANGEOVER_ADMIN_TOKEN) or balancer.admin_token"
            )
        self.name = name
        self.url = url.rstrip("/")
        # Sessions are counted over this site's session_idle, not the balancer's own.
        idle = "" if session_idle is None else f"?session_idle={session_idle:g}"
        self._pool = "/v1/pool" + idle
        self._admissions = "/v1/admissions" + idle
        self._client = Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    async def _call(self, method: str, path: str, body: object = None) -> PoolView:
        try:
            resp = await self._client.request(method, self.url + path, json=body)
            data = resp.json()
        except (HttpError, ValueError) as exc:
            raise BalancerError(
                f"{self.name}: admin API at {self.url} unreachable or invalid: {exc!r}"
            ) from exc
        if resp.status != 200:
            error = data.get("error") if isinstance(data, dict) else data
            raise BalancerError(f"{self.name}: {method} {path}: HTTP {resp.status}: {error}")
        return pool_from_json(data)

    async def read(self) -> PoolView:
        return await self._call("GET", self._pool)

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        body = {"admissions": {name: adm.value for name, adm in desired.items()}}
        # The answer is the master's pool document after the change: the read-back.
        view = await self._call("POST", self._admissions, body)
        missing = differs(view, desired)
        if missing:
            raise BalancerError(
                f"{self.name}: admissions did not take effect for {sorted(missing)}"
            )
        return view

    async def close(self) -> None:
        await self._client.close()


def builtin_driver(
    topology: Topology,
    instance: BalancerInstance,
    *,
    run_dir: Path | None = None,
    template_dir: Path | None = None,
) -> BuiltinBalancer:
    """The driver table's entry: the embedded balancer keeps its own files, so
    `run_dir` and `template_dir` do not apply. Without `balancer.instances` the
    one instance is the topology's own admin listener."""
    token = topology.balancer.token()
    idle = topology.policy.session_idle
    if not topology.balancer.instances:
        return BuiltinBalancer(admin_url_of(topology), token, session_idle=idle)
    if not instance.admin_url:
        raise BalancerError(
            f"balancer.instances {instance.name!r}: the builtin driver needs admin_url"
        )
    return BuiltinBalancer(instance.admin_url, token, instance.name, session_idle=idle)
