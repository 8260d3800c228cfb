"""Early checks: a member's health, then its version, asked once as soon as its
own start command succeeded, while the other members' commands still run.

The health wait and the version check that follow the start step take what was
found and ask only the members not found healthy (or on the version) yet: 100
members no longer wait for the slowest start before their first health request
goes out, nor for the whole health step before their version request. Only
successes are kept: a member that answered badly (not up yet, an error, another
version) is asked again by the step itself, under its timeout and the failure
budget, exactly as without early checks.
"""

from __future__ import annotations

import asyncio

from changeover.config import Member
from changeover.ports import Checks


class EarlyChecks:
    """The early checks of one command step's members."""

    def __init__(self, checks: Checks, version: str | None) -> None:
        self._checks = checks
        self._version = version  # None: no version check follows
        self._tasks: list[asyncio.Task[None]] = []
        self.healthy: set[str] = set()  # members that answered their health check
        self.on_version: set[str] = set()  # ... and then reported the version

    def start(self, member: Member) -> None:
        """Ask `member` now, in the background (its start command succeeded)."""
        self._tasks.append(asyncio.create_task(self._ask(member)))

    async def _ask(self, member: Member) -> None:
        health = await self._checks.health(member)
        if not health.ok:
            return
        self.healthy.add(member.name)
        if self._version is not None:
            version = await self._checks.version(member, self._version)
            if version.ok:
                self.on_version.add(member.name)

    async def settle(self) -> None:
        """Wait for the checks under way (each within the checks' own timeout);
        one that raised found nothing."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.settle()
