"""The balancer interface every driver implements, and the group of instances.

A driver converges a balancer to the desired admissions and verifies that they
took effect by reading them back; it never restarts a balancer in a way that
drops connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from changeover.model import COUNTERS, Admission, Counter, PoolView

# The MemberState counters a balancer may or may not count: each driver says
# which it fills (`fills`); the others read None, "not counted".
__all__ = ["COUNTERS", "Balancer", "BalancerError", "Counter", "fills_of"]


class BalancerError(Exception):
    """A balancer refused a change, could not be reached, or did not converge."""


class Balancer(Protocol):
    """One balancer instance (or a group of them, which is itself a Balancer)."""

    name: str

    async def read(self) -> PoolView:
        """Every member's admission, health and in-flight work as the balancer sees it."""
        ...

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        """Set the admissions of the named members (others untouched), atomically
        where the balancer allows it; verify by reading back; return the new view."""
        ...

    async def close(self) -> None: ...


def fills_of(balancer: object) -> frozenset[Counter]:
    """The counters `balancer` declares it fills; one that declares none claims none."""
    return frozenset(getattr(balancer, "fills", ()))
