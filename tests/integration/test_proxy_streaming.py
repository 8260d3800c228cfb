"""100 MB bodies stream through the embedded balancer without being held in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.helpers import wait_until
from tests.integration.proxy_fixtures import Site, balancer_site, members

SIZE = 100 * 1024 * 1024
MAX_GROWTH = 30 * 1024 * 1024


class PeakRss:
    """Samples the balancer's resident memory (master + workers) while a transfer runs."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.base = site.rss()
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.site.rss())
            await asyncio.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self.site.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


async def test_100mb_upload_and_download_with_bounded_memory(tmp_path: Path) -> None:
    async def body() -> AsyncIterator[bytes]:
        block = b"u" * (1024 * 1024)
        for _ in range(SIZE // len(block)):
            yield block

    async with (
        members({"a": ["a1"], "b": ["b1"]}) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as client,
    ):
        async with client.get(site.public + "/plain") as r:  # warm up the pools
            await r.read()
        with PeakRss(site) as upload_rss:
            headers = {"Content-Length": str(SIZE)}
            async with client.post(site.public + "/upload", data=body(), headers=headers) as r:
                assert (await r.json())["received"] == SIZE
        assert upload_rss.growth < MAX_GROWTH, f"upload grew RSS by {upload_rss.growth} bytes"

        with PeakRss(site) as download_rss:
            async with client.get(f"{site.public}/download?size={SIZE}") as r:
                received = 0
                async for chunk in r.content.iter_chunked(1024 * 1024):
                    received += len(chunk)
        assert received == SIZE
        assert download_rss.growth < MAX_GROWTH, f"download grew RSS by {download_rss.growth}"


async def test_a_client_that_stops_reading_holds_the_upstream_back(tmp_path: Path) -> None:
    async with (
        members({"a": ["a1"], "b": ["b1"]}) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession(read_bufsize=64 * 1024) as client,
    ):
        await site.admit(client, b1="out")
        a1 = started[0]
        async with client.get(f"{site.public}/download?size={SIZE}&chunked=1") as r:
            await r.content.readexactly(1024 * 1024)
            last = -1

            async def stalled() -> bool:  # the upstream stops once every buffer is full
                nonlocal last
                still, last = a1.streamed == last, a1.streamed
                return still

            await wait_until(stalled, timeout=20, interval=0.3, what="the upstream to stall")
            assert a1.streamed < SIZE // 2, f"upstream ran ahead by {a1.streamed} bytes"
            received = 1024 * 1024 + len(await r.read())
        assert received == SIZE
