"""Small shared test helpers: ports, real binaries, awaiting conditions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

REQUIRE_REAL = os.environ.get("CHANGEOVER_REQUIRE_REAL") == "1"


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago on `host`, never one this
    process handed out before: the kernel may offer a just-closed port again, and
    one site's members would then share it."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def require_binary(name: str, *candidates: str) -> Path:
    """Path of a real server binary; skip on a laptop without it, fail in CI."""
    for candidate in (name, *candidates):
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found:
            return Path(found)
    message = f"real {name} not installed (make system-deps installs it)"
    if REQUIRE_REAL:
        pytest.fail(f"{message}; CHANGEOVER_REQUIRE_REAL=1 forbids skipping")
    pytest.skip(message)


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def toml_value(value: Any) -> str:
    """One TOML value on one line (inline tables and arrays); JSON strings are TOML strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"no TOML for {value!r}")


def put_output(journal: Any, release_id: int, row: Any) -> None:
    """One member's output (a journal.OutputRow), through whichever call the
    journal has: `add_outputs` where outputs are group-committed, else `add_output`."""
    many = getattr(journal, "add_outputs", None)
    if many is not None:
        many(release_id, [row])
    else:
        journal.add_output(release_id, row.idx, row.member, row.argv, row.exit_status,
                           row.seconds, row.output)  # fmt: skip
