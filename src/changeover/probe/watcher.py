"""Watching a balancer's admissions while the probe runs, so a session that
moved because its member was taken out is told apart from a broken one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Protocol

from changeover.model import PoolView
from changeover.polling import poll_until
from changeover.probe.accounting import Timeline


class PoolReader(Protocol):
    """Anything that reads a pool: every Balancer driver."""

    async def read(self) -> PoolView: ...


class AdmissionWatcher:
    """Polls `balancer.read()` every `interval` seconds in a background task.

    `timeline` holds what each successful read saw, timed by when the read
    started (time.monotonic()); failed reads are counted and leave a gap.
    """

    def __init__(self, balancer: PoolReader, interval: float = 0.1) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.balancer = balancer
        self.interval = interval
        self.timeline = Timeline()
        self.reads = 0
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="admission-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> AdmissionWatcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _read_once(self) -> None:
        started = time.monotonic()
        try:
            # A read that hangs must not stall the timeline for longer than this.
            async with asyncio.timeout(max(1.0, 10 * self.interval)):
                view = await self.balancer.read()
        except Exception as exc:  # any failure is tolerated: the timeline has a gap
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        else:
            self.reads += 1
            self.timeline.record(started, view.admissions())

    async def wait_for_read_after(self, t: float, timeout: float) -> bool:
        """Wait (at most `timeout` s) until a successful read started at or after `t`."""

        async def read_after() -> bool:
            last = self.timeline.last_read
            return (last is not None and last >= t) or self._task is None

        done = await poll_until(read_after, timeout, interval=self.interval / 4)
        last = self.timeline.last_read
        return done and last is not None and last >= t

    async def _poll(self) -> None:
        while True:  # until stop() cancels it
            started = time.monotonic()
            await self._read_once()
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))
