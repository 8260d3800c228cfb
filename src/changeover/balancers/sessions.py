"""The HTTP session a driver talks to its balancer through."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp


class LazySession:
    """An aiohttp session opened at first use, so inside the running event loop
    (drivers are built before it runs), with what `open` sets; `close` ends it,
    and a later use opens a new one."""

    def __init__(self, open: Callable[[], aiohttp.ClientSession]) -> None:
        self._open = open
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._open()
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
