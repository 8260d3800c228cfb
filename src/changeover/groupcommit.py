"""Group commit: rows that arrive while a write is on disk go in the next write.

Each `add` returns once its row is written (or raises what the write raised),
as a write of its own would, but 18 (or 200) members finishing together cost a
handful of transactions, not one fsync each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, write: Callable[[Sequence[T]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()

    async def add(self, row: T) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, written))
        async with self._lock:  # one write at a time; the next takes all that queued
            if not written.done():
                batch, self._pending = self._pending, []
                try:
                    await self._write([r for r, _ in batch])
                except asyncio.CancelledError:
                    for _, f in batch:
                        f.cancel()
                    raise
                except Exception as exc:
                    for _, f in batch:
                        f.set_exception(exc)
                else:
                    for _, f in batch:
                        f.set_result(None)
        await written
