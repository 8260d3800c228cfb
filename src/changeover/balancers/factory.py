"""The one driver table, and the driver (or group of drivers) a topology names."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from changeover.balancers.base import Balancer, BalancerError, Counter
from changeover.config import BalancerInstance, Topology

T = TypeVar("T")


class Driver(Protocol):
    """How a driver is built for one balancer instance of a topology."""

    def __call__(
        self,
        topology: Topology,
        instance: BalancerInstance,
        *,
        run_dir: Path | None = None,
        template_dir: Path | None = None,
    ) -> Balancer: ...


class _Lazy(Mapping[str, T]):
    """Driver name -> something of its module, the module imported when it is
    first looked up (a site on the embedded balancer never imports Jinja2 for
    the others' templates, nor a site on HAProxy the nginx driver)."""

    def __init__(self, where: dict[str, tuple[str, str]], pick: Callable[[Any], T]) -> None:
        self._where = where
        self._pick = pick

    def __getitem__(self, name: str) -> T:
        module, attr = self._where[name]
        return self._pick(getattr(import_module(module), attr))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_MODULES = {
    "builtin": "changeover.balancers.builtin",
    "haproxy": "changeover.balancers.haproxy",
    "apache": "changeover.balancers.apache",
    "nginx": "changeover.balancers.nginx",
}
_CLASSES = {
    "builtin": "BuiltinBalancer",
    "haproxy": "HAProxyBalancer",
    "apache": "ApacheBalancer",
    "nginx": "NginxBalancer",
}

# How each driver is built (the builtin one through a function of its own).
DRIVERS: Mapping[str, Driver] = _Lazy(
    {n: (m, "builtin_driver" if n == "builtin" else _CLASSES[n]) for n, m in _MODULES.items()},
    lambda build: cast(Driver, build),
)
# What each driver counts per member (its class's `fills`), known before one is
# built: `check` refuses rules the driver's counters cannot judge.
COUNTS: Mapping[str, frozenset[Counter]] = _Lazy(
    {n: (m, _CLASSES[n]) for n, m in _MODULES.items()},
    lambda cls: cast(frozenset[Counter], cls.fills),
)


def make_balancer(
    topology: Topology, *, run_dir: Path | None = None, template_dir: Path | None = None
) -> Balancer:
    """One driver per `balancer.instances` entry (one default instance if none),
    grouped when there are several. `run_dir` gives every instance a private
    directory `run_dir/<instance name>` for its runtime files instead of the
    distribution's locations (see docs/drivers.md)."""
    driver = topology.balancer.driver
    build = DRIVERS.get(driver)
    if build is None:
        raise BalancerError(f"no {driver!r} driver here; expected one of {', '.join(DRIVERS)}")
    instances = topology.balancer.instances or [BalancerInstance()]
    if template_dir is None and topology.balancer.template_dir:
        template_dir = topology.resolve_path(topology.balancer.template_dir)
    drivers = [
        build(
            topology,
            instance,
            run_dir=_run_dir(topology, instance, run_dir),
            template_dir=template_dir,
        )
        for instance in instances
    ]
    if len(drivers) == 1:
        return drivers[0]
    from changeover.balancers.group import BalancerGroup

    return BalancerGroup(drivers)


def _run_dir(topology: Topology, instance: BalancerInstance, override: Path | None) -> Path | None:
    if override is not None:
        return override / instance.name
    return topology.resolve_path(instance.run_dir) if instance.run_dir else None
