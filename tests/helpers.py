"""Small shared test helpers: ports, real binaries, awaiting conditions."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from changeover.journal import STEP_DONE
from changeover.ports import JournalStore

REQUIRE_REAL = os.environ.get("CHANGEOVER_REQUIRE_REAL") == "1"


_HANDED_OUT: set[int] = set()

# Ports are taken below the kernel's ephemeral range (32768-60999 by default):
# a port found free there could be taken as the local end of some outgoing
# connection before the server under test binds it (seen: nginx's "bind() ...
# Address already in use" beside a probe). Each xdist worker has its own slice,
# so two workers never hand out the same port.
_PORTS_LOW, _PORTS_HIGH = 12000, 32000


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    width = (_PORTS_HIGH - _PORTS_LOW) // max(count, 1)
    start = _PORTS_LOW + width * (index % max(count, 1))
    return range(start, start + width)


_SLICE = _port_slice()
_NEXT = itertools.count(random.randrange(len(_SLICE)))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now, outside the ephemeral range and this
    worker's alone, never one this process handed out before (one site's members
    would then share it)."""
    for _ in range(len(_SLICE)):
        port = _SLICE[next(_NEXT) % len(_SLICE)]
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port left in {_SLICE.start}-{_SLICE.stop - 1} on {host}")


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


def assert_a_step_ends_in_one_transaction(j: JournalStore, text: str, stored: str) -> None:
    """`step_finished` writes the step and its event together and reads what
    another shell asked meanwhile (the engine's check between steps); `text`
    as the journal stores it: `stored`."""
    rid = j.create_release("site", "2.0", "1.0", "rolling-clusters", [{"id": "s0"}, {"id": "s1"}])
    j.step_started(rid, 0)
    j.request(rid, "abort")  # another shell asks while the step runs
    row = j.step_finished(rid, 0, True, text, ("step-done", f"s0: {text}"))
    assert (row.id, row.request) == (rid, "abort")
    step = j.steps(rid)[0]
    [event] = j.events(rid)
    assert (step.state, step.detail) == (STEP_DONE, stored)
    assert (event.kind, event.message, event.at) == ("step-done", f"s0: {stored}", step.finished)
    assert j.step_finished(rid, 1, False, "broke").request == "abort"  # no event: none added
    assert len(j.events(rid)) == 1


def assert_withdraw_clears_only_what_it_read(j: JournalStore) -> None:
    """`withdraw` clears a request only while it is the one read: an approval
    another shell gave meanwhile stands."""
    rid = j.create_release("site", "2.0", "1.0", "rolling-clusters", [{"id": "s0"}])
    j.request(rid, "approve:s0")
    assert not j.withdraw(rid, "abort")  # something else was asked meanwhile
    assert j.release(rid).request == "approve:s0"
    assert j.withdraw(rid, "approve:s0")
    assert j.release(rid).request is None
    assert not j.withdraw(rid, "approve:s0")  # nothing left to withdraw
