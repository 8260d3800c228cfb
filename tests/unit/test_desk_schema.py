"""Schemathesis against the desk's own OpenAPI description: requests generated
from `/api/openapi.json`, sent to a real desk on a loopback port (its service
on the engine's in-memory fakes, one finished release in its journal), each
with a viewer and an operator token. Every answer must be documented, match
its schema, and no request may get a 5xx.

`/api/events` is left out: it is a stream that never ends by itself
(tests/unit/test_desk_api.py reads it)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from changeover import journal as J
from changeover.desk.app import Desk, serve
from changeover.desk.auth import Role, Tokens
from changeover.desk.openapi import SPEC
from changeover.journal import Journal
from changeover.model import COUNTERS
from changeover.ports import JournalStore, Ports
from changeover.releases import Begin, Releases
from tests.unit.engine_fakes import Site

VIEWER, OPERATOR = "view-token-1", "op-token-2"
EXAMPLES = 25  # per operation and token: the whole file runs in a few seconds


def _serve(root: Path, ready: threading.Event, box: dict[str, object]) -> None:
    """A desk in a thread of its own (schemathesis' client is synchronous)."""

    async def main() -> None:
        site = Site.build(root, frozenset(COUNTERS))
        path = root / "journal.sqlite"

        def own_ports(journal: JournalStore) -> Ports:
            return dataclasses.replace(site.ports(), journal=journal)

        service = Releases(site.topo, lambda: Journal(path), site.migrator, own_ports)
        outcome = await service.release(Begin("2.0"))  # something for history and show
        assert outcome.state == J.DONE, outcome
        tokens = Tokens(((VIEWER, Role.VIEWER), (OPERATOR, Role.OPERATOR)))
        desk = Desk(site.topo, service, tokens)
        box["desk"], box["loop"] = desk, asyncio.get_running_loop()

        def bound(url: str) -> None:
            box["url"] = url
            ready.set()

        await serve(desk, "127.0.0.1", 0, bound, signals=False)

    try:
        asyncio.run(main())
    except BaseException as exc:  # the test says why instead of waiting
        box["error"] = exc
        ready.set()


@pytest.fixture(scope="module")
def desk_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ready, box = threading.Event(), dict[str, object]()
    thread = threading.Thread(
        target=_serve, args=(tmp_path_factory.mktemp("desk"), ready, box), daemon=True
    )
    thread.start()
    try:
        assert ready.wait(30), "the desk did not start"
        assert "error" not in box, box["error"]
        yield str(box["url"])
    finally:
        if "desk" in box and "error" not in box:
            desk, loop = box["desk"], box["loop"]
            assert isinstance(desk, Desk) and isinstance(loop, asyncio.AbstractEventLoop)
            loop.call_soon_threadsafe(desk.stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the desk did not stop"


schema = schemathesis.openapi.from_dict(SPEC).exclude(path="/api/events")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_desk_answers_as_its_openapi_says(case: schemathesis.Case[Any], desk_url: str) -> None:
    for token in (VIEWER, OPERATOR):
        case.call_and_validate(base_url=desk_url, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/history?limit=0", 400),  # the description says minimum 1: found by the above
        ("/api/history?limit=-3", 400),
        ("/api/history?limit=99999999999999999999", 200),  # more than kept: all of them
        ("/api/releases/177774736986041384960", 404),  # beyond SQLite's integers: was a 500
    ],
)
def test_what_schemathesis_found(desk_url: str, path: str, status: int) -> None:
    request = urllib.request.Request(desk_url + path, headers={"Authorization": f"Bearer {VIEWER}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            got = response.status
    except urllib.error.HTTPError as exc:
        got = exc.code
    assert got == status
