"""Assembling the edges (balancer driver, executor, journal) from a topology."""

from __future__ import annotations

from changeover.balancers.base import Balancer
from changeover.config import Topology
from changeover.executors.base import Executor
from changeover.journal import Journal, journal_path


def make_balancer(topo: Topology) -> Balancer:
    if topo.balancer.driver == "builtin":
        from changeover.balancers.builtin import builtin_balancers

        instances = builtin_balancers(topo)
        if len(instances) == 1:
            return instances[0]
        from changeover.balancers.group import BalancerGroup

        return BalancerGroup(instances)  # type: ignore[arg-type]
    from changeover.balancers.factory import make_balancer as make_external

    return make_external(topo)


def make_executor(topo: Topology) -> Executor:
    if topo.executor.kind == "ssh":
        from changeover.executors.ssh import SshExecutor

        return SshExecutor(topo.executor.ssh)  # type: ignore[no-any-return]
    from changeover.executors.local import LocalExecutor

    return LocalExecutor()


def open_journal(topo: Topology) -> Journal:
    return Journal(journal_path(topo.state_dir(), topo.site.name))
