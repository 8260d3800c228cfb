"""Two operators, two copies of one config (two state directories), one shared
journal in a real PostgreSQL (`[site] state_url`): exactly one releases, the
other is refused naming the holder, and either can approve, abort or resume
what the other began, SIGKILL of the holder included (an approval given while
nothing runs survives the other's take-over); `history` is the same from both."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from changeover import journal as J
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.pgjournal import PgJournal
from tests.e2e import support as S
from tests.helpers import wait_until
from tests.postgres import Postgres, running_postgres

pytestmark = [pytest.mark.slow, pytest.mark.real]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def state_url(postgres: Postgres) -> Iterator[str]:
    with postgres.database() as url:
        yield url


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[DemoSite]:
    demo = DemoSite(
        tmp_path, DemoOptions(members_per_cluster=2, startup_delay=0.1, approval="manual")
    )
    async with demo.running():
        yield demo


def operator_config(site: DemoSite, name: str, state_url: str) -> str:
    """A copy of the site's config with its own state directory and the shared journal."""
    copy = site.root / f"{name}.toml"
    copy.write_text(
        site.config.read_text().replace(
            'state_dir = "state"', f'state_dir = "{name}"\nstate_url = {json.dumps(state_url)}'
        )
    )
    return str(copy)


async def shared(state_url: str, read: str, *args: object) -> object:
    def call() -> object:
        journal = PgJournal(state_url, "demo")
        try:
            return getattr(journal, read)(*args)
        finally:
            journal.close()

    return await asyncio.to_thread(call)


async def awaiting(state_url: str, step_id: str) -> None:
    async def waiting() -> bool:
        row = await shared(state_url, "unfinished", "demo")
        if not isinstance(row, J.ReleaseRow) or row.state != J.AWAITING_APPROVAL:
            return False
        steps = await shared(state_url, "steps", row.id)
        assert isinstance(steps, list)
        return any(s.step_id == step_id and s.state == J.STEP_RUNNING for s in steps)

    await wait_until(waiting, timeout=180, interval=0.1, what=f"{step_id} awaiting approval")


async def resumed_without_asking(
    state_url: str, resumed: asyncio.subprocess.Process, cluster: str
) -> None:
    """`resumed` ends without waiting for `cluster`'s approval again after its
    take-over; fails as soon as it waits."""

    async def asked_again() -> bool:
        events = await shared(state_url, "events", 1)
        assert isinstance(events, list)
        took = [i for i, e in enumerate(events) if "took over a stale lock" in e.message]
        message = f"awaiting approval of {cluster}"
        return bool(took) and any(e.message.startswith(message) for e in events[took[0] :])

    async def over() -> bool:
        assert not await asked_again(), f"the resumed release waits for {cluster} again"
        return resumed.returncode is not None

    await wait_until(over, timeout=180, interval=0.1, what="the resumed release to end")


async def test_two_operators_one_release_approved_killed_and_resumed_across_machines(
    site: DemoSite, state_url: str
) -> None:
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str, config: str) -> asyncio.subprocess.Process:
        started.append(await S.start_cli(site, *args, config=config))
        return started[-1]

    try:
        await two_operators(site, state_url, start)
    except AssertionError as exc:
        outputs = []
        for proc in started:
            if proc.returncode is None:
                proc.kill()
            out = await proc.stdout.read() if proc.stdout else b""
            outputs.append(f"pid {proc.pid} ({proc.returncode}): {out.decode(errors='replace')}")
        raise AssertionError(f"{exc}\n" + "\n".join(outputs)) from None
    finally:
        for proc in started:  # every CLI this test started ends with it
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def two_operators(
    site: DemoSite,
    state_url: str,
    start: Callable[..., Awaitable[asyncio.subprocess.Process]],
) -> None:
    one, two = (operator_config(site, name, state_url) for name in ("op1", "op2"))
    # Both at once: exactly one releases, the other is refused naming the holder.
    first = await start("release", "2.0", config=one)
    second = await start("release", "2.0", config=two)
    await awaiting(state_url, "approve-a")
    holder = await shared(state_url, "lock_holder", "demo")
    assert isinstance(holder, J.LockInfo) and holder.alive
    running, refused = (first, second) if holder.pid == first.pid else (second, first)
    assert holder.pid == running.pid
    configs = {first.pid: one, second.pid: two}
    mine, theirs = configs[running.pid], configs[refused.pid]
    lost = await S.finish(refused)
    assert lost.code == 3, lost.output
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    # Refused while the winner was taking the lock, before it journaled release #1.
    assert "another release holds the lock: " in lost.text, lost.text
    assert f" by {who} (pid {running.pid}) since " in lost.text, lost.text
    retried = await S.cli(site, "release", "3.0", config=theirs)
    assert retried.code == 3, retried.output
    assert f"lock: release #1 by {who} (pid {running.pid}) since " in retried.text, retried.text
    assert running.returncode is None

    # The other operator approves; the release goes on to b.
    approved = await S.cli(site, "approve", config=theirs)
    assert approved.code == 0 and "approved approve-a of release #1" in approved.text, approved
    await awaiting(state_url, "approve-b")

    # The holder dies; the server frees its lock with its session.
    running.kill()
    await running.wait()

    async def freed() -> bool:
        lock = await shared(state_url, "lock_holder", "demo")
        return isinstance(lock, J.LockInfo) and lock.is_stale()

    await wait_until(freed, timeout=30, interval=0.05, what="the killed holder's lock freed")
    status = await S.cli(site, "status", config=theirs)
    assert status.code == 0 and "stale" in status.text, status.output

    # The first machine approves b while no process runs the release; the other
    # resumes it, and that approval stands: it goes on without asking again.
    approved = await S.cli(site, "approve", config=mine)
    assert approved.code == 0 and "approved approve-b of release #1" in approved.text, approved
    resumed = await start("resume", config=theirs)
    try:
        await resumed_without_asking(state_url, resumed, "b")
    finally:
        done = await S.finish(resumed)
    assert done.code == 0, done.output
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
    events = await shared(state_url, "events", 1)
    assert isinstance(events, list)
    assert any("took over a stale lock left by release #1" in e.message for e in events)
    assert any(
        f"kept the approval of approve-b by {who}, given before the take-over" in e.message
        for e in events
    )

    # History is the same from both copies, and neither wrote a SQLite journal.
    histories = [await S.cli(site, "history", "--json", config=c) for c in (one, two)]
    assert histories[0].code == 0 and histories[0].output == histories[1].output
    rows = json.loads(histories[0].output)
    assert [(r["id"], r["version"], r["state"]) for r in rows] == [(1, "2.0", J.DONE)]
    assert not list(site.root.glob("op*/*.sqlite"))

    # An abort asked from the other copy stops the holder at its next safe point.
    again = await start("release", "3.0", config=mine)
    try:
        await awaiting(state_url, "approve-a")
        aborted = await S.cli(site, "abort", config=theirs)
        assert aborted.code == 0 and "asked release #2" in aborted.text, aborted.output
    finally:
        stopped = await S.finish(again)
    assert stopped.code == 4, stopped.output
    newest = await shared(state_url, "newest", "demo")
    assert isinstance(newest, J.ReleaseRow) and newest.state == J.ABORTED
