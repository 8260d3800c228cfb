"""Several balancer instances (an LB tier behind DNS, say) changed as one.

`apply` first has every instance that can check a change (the config-driven
drivers: the product's own check of the config it would install) check it, so
an instance that would refuse refuses before any has changed; then it goes to
every instance at once; if any instance fails, every instance is put back to
the admissions it had before, and the error names what failed and whether
putting back worked. `read` refuses to merge instances that disagree:
a pool view that is true for one instance and false for another would mislead
the interlocks; applying the desired admissions again brings them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from changeover.balancers.base import Balancer, BalancerError, fills_of
from changeover.model import COUNTERS, Admission, MemberState, PoolView, differs, total


@runtime_checkable
class Preparing(Protocol):
    """A balancer that can check a change without making it (`ConfiguredBalancer`)."""

    async def prepare(self, desired: Mapping[str, Admission]) -> None: ...


class BalancerGroup:
    def __init__(self, instances: Sequence[Balancer], name: str | None = None) -> None:
        if not instances:
            raise ValueError("a balancer group needs at least one instance")
        self.instances = list(instances)
        self.name = name or "+".join(b.name for b in self.instances)
        # A sum is only a count where every instance counts.
        self.fills = frozenset.intersection(*(fills_of(b) for b in self.instances))

    async def _read_all(self) -> list[PoolView]:
        results = await asyncio.gather(*(b.read() for b in self.instances), return_exceptions=True)
        errors = [
            f"{b.name}: {r}"
            for b, r in zip(self.instances, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if errors:
            raise BalancerError("cannot read every balancer of the group: " + "; ".join(errors))
        return [r for r in results if isinstance(r, PoolView)]

    async def read(self) -> PoolView:
        views = await self._read_all()
        first = views[0]
        disagreements = [
            f"{b.name} has {name}={adm}, {self.instances[0].name} has "
            f"{first.member(name).admission}"
            for b, view in zip(self.instances[1:], views[1:], strict=True)
            for name, adm in differs(first, view.admissions()).items()
        ]
        if disagreements:
            raise BalancerError(
                "the balancers of the group disagree: "
                + "; ".join(disagreements)
                + " (apply the desired admissions again to bring them together)"
            )
        # Healthy only if every instance sees it healthy; counters add up, and
        # one instance that does not count a counter makes the sum unknown.
        return PoolView(
            tuple(
                MemberState(
                    name=m.name,
                    cluster=m.cluster,
                    admission=m.admission,
                    healthy=all(v.member(m.name).healthy for v in views),
                    **{c: total([v.member(m.name) for v in views], c) for c in COUNTERS},
                )
                for m in first.members
            )
        )

    async def _prepare_all(self, desired: Mapping[str, Admission]) -> None:
        """Every instance that can check a change first (the config-driven ones run
        their product's check) checks this one; any refusal changes nothing anywhere."""
        results = await asyncio.gather(
            *(b.prepare(desired) for b in self.instances if isinstance(b, Preparing)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        refused = [str(r) for r in results if isinstance(r, Exception)]
        if refused:
            raise BalancerError(
                f"the change was refused by {len(refused)} of {len(self.instances)} balancers "
                f"before any changed ({'; '.join(refused)}); no instance was changed"
            )

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        before = await self._read_all()
        await self._prepare_all(desired)
        results = await asyncio.gather(
            *(b.apply(desired) for b in self.instances), return_exceptions=True
        )
        failed = [
            (b, r)
            for b, r in zip(self.instances, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if not failed:
            return await self.read()
        for _, exc in failed:
            if not isinstance(exc, Exception):
                raise exc  # cancellation and the like are not ours to turn into an error
        # Put every instance back, the ones that failed included (they may be half-way).
        undone = await asyncio.gather(
            *(_put_back(b, view) for b, view in zip(self.instances, before, strict=True)),
            return_exceptions=True,
        )
        not_undone = [
            f"{b.name}: {r}"
            for b, r in zip(self.instances, undone, strict=True)
            if isinstance(r, BaseException)
        ]
        cause = "; ".join(f"{b.name}: {exc}" for b, exc in failed)
        outcome = (
            "every instance was put back as it was"
            if not not_undone
            else "putting back failed too, the group may disagree: " + "; ".join(not_undone)
        )
        raise BalancerError(
            f"the change failed on {len(failed)} of {len(self.instances)} balancers "
            f"({cause}); {outcome}"
        )

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.instances), return_exceptions=True)


async def _put_back(balancer: Balancer, before: PoolView) -> None:
    """Restore `before` on one instance, touching it only if it changed: an
    instance that refused the change (a config its checker rejects) still runs
    as before and would refuse the restoring change for the same reason."""
    try:
        changed = bool(differs(await balancer.read(), before.admissions()))
    except BalancerError:
        changed = True  # unknown: try to restore anyway
    if changed:
        await balancer.apply(before.admissions())
