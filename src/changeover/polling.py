"""Waiting for a condition the outside world will make true, with a deadline.

Every wait on a balancer, an app or a probe reading goes through `poll_until`,
so each says only what it waits for and what to say when it did not happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def poll_until(
    attempt: Callable[[], Awaitable[bool]],
    timeout: float,
    *,
    interval: float = 0.05,
    not_yet: tuple[type[Exception], ...] = (),
) -> bool:
    """Await `attempt()` every `interval` seconds until it is true (True) or
    `timeout` has passed (False). An exception in `not_yet` counts as false
    (the thing asked is briefly absent, e.g. a socket during a reload)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if await attempt():
                return True
        except not_yet:
            pass
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
