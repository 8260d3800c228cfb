"""The one driver table, and the driver (or group of drivers) a topology names."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from changeover.balancers.apache import ApacheBalancer
from changeover.balancers.base import Balancer, BalancerError, Counter
from changeover.balancers.builtin import BuiltinBalancer, builtin_driver
from changeover.balancers.group import BalancerGroup
from changeover.balancers.haproxy import HAProxyBalancer
from changeover.balancers.nginx import NginxBalancer
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


DRIVERS: dict[str, Driver] = {
    "builtin": builtin_driver,
    "haproxy": HAProxyBalancer,
    "apache": ApacheBalancer,
    "nginx": NginxBalancer,
}

# What each driver counts per member (its `fills`), known before one is built:
# `check` refuses rules the driver's counters cannot judge.
COUNTS: dict[str, frozenset[Counter]] = {
    "builtin": BuiltinBalancer.fills,
    "haproxy": HAProxyBalancer.fills,
    "apache": ApacheBalancer.fills,
    "nginx": NginxBalancer.fills,
}


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
