"""The site's release lock as the embedded balancer holds it: one lease, pure
decisions over plain data (the admin API keeps the lease and the clock).

Every copy of a site's config that releases this balancer claims the lease
before its first step and renews it while it runs, so two operators with two
copies cannot release it at once. A claim by the lease's own owner renews it;
a lease not renewed within its time to live is free again.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str  # an id the claimant keeps (one per copy of the config)
    holder: str  # who holds it, for people: "release #3 by ops@host (pid 12)"
    expires: float  # on the balancer's monotonic clock


def held_by_other(current: Lease | None, owner: str, now: float) -> Lease | None:
    """The lease that keeps `owner` out, or None."""
    if current is None or current.owner == owner or current.expires <= now:
        return None
    return current


def claim(
    current: Lease | None, owner: str, holder: str, ttl: float, now: float
) -> tuple[Lease | None, str | None]:
    """(the lease after the claim, None), or (the lease unchanged, why refused)."""
    other = held_by_other(current, owner, now)
    if other is not None:
        return current, refusal(other, now)
    return Lease(owner, holder, now + ttl), None


def release(current: Lease | None, owner: str, now: float) -> tuple[Lease | None, str | None]:
    """(the lease after `owner` let go of it, None), or (unchanged, why refused)."""
    other = held_by_other(current, owner, now)
    if other is not None:
        return current, refusal(other, now)
    return None, None


def refusal(lease: Lease, now: float) -> str:
    return (
        f"the release lock of this balancer is held by {lease.holder} "
        f"(free in {max(0.0, lease.expires - now):.0f}s unless renewed)"
    )
