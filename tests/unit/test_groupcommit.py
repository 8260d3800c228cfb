"""Group commit: one write per burst, every row written once, in order, and a
failed write fails every row it carried."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from changeover.groupcommit import GroupCommit


class Disk:
    def __init__(self, fail_on: int | None = None) -> None:
        self.writes: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = asyncio.Event()

    async def write(self, rows: Sequence[int]) -> None:
        self.writes.append(list(rows))
        await self.gate.wait()  # the fsync: others arrive meanwhile
        if self.fail_on in rows:
            raise OSError("disk full")


async def test_rows_that_arrive_during_a_write_share_the_next_one() -> None:
    disk = Disk()
    commit = GroupCommit(disk.write)
    adds = [asyncio.create_task(commit.add(n)) for n in range(10)]
    await asyncio.sleep(0)  # all ten queued; the first is writing
    disk.gate.set()
    await asyncio.gather(*adds)
    assert disk.writes == [[0], list(range(1, 10))]


async def test_each_add_returns_only_once_its_row_is_written() -> None:
    disk = Disk()
    commit = GroupCommit(disk.write)
    second = asyncio.create_task(commit.add(2))
    first = asyncio.create_task(commit.add(1))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    disk.gate.set()
    await asyncio.gather(first, second)
    assert sorted(r for w in disk.writes for r in w) == [1, 2]


async def test_a_failed_write_fails_every_row_it_carried() -> None:
    disk = Disk(fail_on=5)
    commit = GroupCommit(disk.write)
    adds = [asyncio.create_task(commit.add(n)) for n in range(8)]
    await asyncio.sleep(0)
    disk.gate.set()
    results = await asyncio.gather(*adds, return_exceptions=True)
    assert results[0] is None  # written alone, before the bad batch
    assert all(isinstance(r, OSError) for r in results[1:])
    with pytest.raises(OSError):
        raise results[5]  # type: ignore[misc]
