"""The one driver table, and the driver (or group of drivers) a topology names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from pathlib import Path
from typing import ClassVar, Protocol, cast

from changeover.balancers.base import Balancer, BalancerError
from changeover.balancers.group import BalancerGroup
from changeover.config import BalancerInstance, Topology


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


class _Drivers(Mapping[str, Driver]):
    """Driver name -> how it is built, each driver's module imported when it is
    first looked up (a site running HAProxy never imports Jinja2 for Apache's
    templates, nor the builtin driver aiohttp, at start-up)."""

    _WHERE: ClassVar[dict[str, tuple[str, str]]] = {
        "builtin": ("changeover.balancers.builtin", "builtin_driver"),
        "haproxy": ("changeover.balancers.haproxy", "HAProxyBalancer"),
        "apache": ("changeover.balancers.apache", "ApacheBalancer"),
        "nginx": ("changeover.balancers.nginx", "NginxBalancer"),
    }

    def __getitem__(self, name: str) -> Driver:
        module, attr = self._WHERE[name]
        return cast(Driver, getattr(import_module(module), attr))

    def __iter__(self) -> Iterator[str]:
        return iter(self._WHERE)

    def __len__(self) -> int:
        return len(self._WHERE)


DRIVERS: Mapping[str, Driver] = _Drivers()


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
    return drivers[0] if len(drivers) == 1 else BalancerGroup(drivers)


def _run_dir(topology: Topology, instance: BalancerInstance, override: Path | None) -> Path | None:
    if override is not None:
        return override / instance.name
    return topology.resolve_path(instance.run_dir) if instance.run_dir else None
