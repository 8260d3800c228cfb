"""approval = "manual": the release waits for `changeover approve` or `abort`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from changeover import journal as J
from changeover.config import load
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.releases import operator
from changeover.runtime import open_journal
from tests.e2e import support as S

pytestmark = pytest.mark.slow


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[DemoSite]:
    demo = DemoSite(
        tmp_path, DemoOptions(members_per_cluster=2, startup_delay=0.1, approval="manual")
    )
    async with demo.running():
        yield demo


async def cli(site: DemoSite, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", *args, "-c", str(site.config),
        env=site.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def approved_run(site: DemoSite, *args: str) -> None:
    """Run a command that waits for approval of a, then b, approving each; it must succeed."""
    await approved_run_with(site, str(site.config), *args)


async def approved_run_with(site: DemoSite, config: str, *args: str) -> None:
    """`approved_run` from the copy of the config at `config` (its own journal)."""
    run = asyncio.create_task(S.cli(site, *args, config=config))
    journal = open_journal(load(config))
    for step in ("approve-a", "approve-b"):
        await S.awaiting_approval(site, step, journal)
        approved = await S.cli(site, "approve", config=config)
        assert approved.code == 0, approved.output
    done = await asyncio.wait_for(run, 120)
    assert done.code == 0, done.output


async def test_release_waits_for_each_approval(site: DemoSite) -> None:
    release = asyncio.create_task(cli(site, "release", "2.0"))
    await S.awaiting_approval(site, "approve-a")
    code, text = await cli(site, "status")
    assert code == 0 and "awaiting-approval" in text
    assert "awaiting approval of a: QA at http://127.0.0.1:" in text, text
    code, text = await cli(site, "status", "--json")
    now = json.loads(text)
    assert {m["name"]: m["version"] for m in now["pool"]} == {
        "a1": "2.0", "a2": "2.0", "b1": "1.0", "b2": "1.0"
    }  # fmt: skip
    assert now["awaiting_approval"]["cluster"] == "a"
    assert not release.done()  # nothing was swapped without a person
    code, text = await cli(site, "approve")
    assert code == 0, text
    await S.awaiting_approval(site, "approve-b")
    code, text = await cli(site, "approve")
    assert code == 0, text
    code, text = await asyncio.wait_for(release, 60)
    assert code == 0, text
    show_code, shown = await cli(site, "show", "1")
    assert show_code == 0
    assert "approved by" in shown


async def test_abort_while_awaiting_approval_stops_at_a_safe_point_and_resumes(
    site: DemoSite,
) -> None:
    release = asyncio.create_task(cli(site, "release", "2.0"))
    await S.awaiting_approval(site, "approve-a")
    code, text = await cli(site, "abort")
    assert code == 0, text
    code, text = await asyncio.wait_for(release, 60)
    assert code == 4, text
    row = open_journal(site.topo).releases(site.topo.site.name)[0]
    assert row.state == J.ABORTED
    # b never left the live pool: the site was served throughout.
    code, text = await cli(site, "status", "--json")
    assert code == 0
    pool = json.loads(text)["pool"]
    assert {m["admission"] for m in pool if m["cluster"] == "b"} == {"live"}
    # a is out and healthy, and nothing runs: status says so, and resume finishes.
    code, text = await cli(site, "status")
    assert code == 0 and "warning: healthy members are out of the live pool" in text, text
    assert "`changeover resume` continues release #1" in text, text
    await approved_run(site, "resume")
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
    code, text = await cli(site, "status", "--json")
    assert json.loads(text)["warning"] is None
    assert {m["admission"] for m in json.loads(text)["pool"]} == {"live"}


async def test_an_approval_given_after_the_release_was_killed_survives_its_resume(
    site: DemoSite,
) -> None:
    """The release process is killed while a waits for approval; `approve` while
    nothing runs; the `resume` that takes the release over keeps that approval
    and waits for b's only."""
    killed = await S.start_cli(site, "release", "2.0")
    try:
        await S.awaiting_approval(site, "approve-a")
    finally:
        if killed.returncode is None:
            killed.kill()
        out = await killed.stdout.read() if killed.stdout else b""
        await killed.wait()
    assert killed.returncode == -9, out.decode(errors="replace")
    code, text = await cli(site, "approve")
    assert code == 0 and "approved approve-a of release #1" in text, text
    resumed = await S.start_cli(site, "resume")
    try:
        await S.awaiting_approval(site, "approve-b")
        code, text = await cli(site, "approve")
        assert code == 0 and "approved approve-b of release #1" in text, text
        done = await S.finish(resumed)
    finally:
        if resumed.returncode is None:
            resumed.kill()
            await resumed.wait()
    assert done.code == 0, done.output
    journal = open_journal(site.topo)
    messages = [e.message for e in journal.events(1)]
    kept = next(i for i, m in enumerate(messages) if m.startswith("kept the approval of approve-a"))
    assert not [m for m in messages[kept:] if m.startswith("awaiting approval of a")], messages
    details = {s.step_id: s.detail for s in journal.steps(1)}
    assert details["approve-a"] == details["approve-b"] == f"approved by {operator()}"
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}


async def test_rollback_after_an_abort_returns_to_the_version_it_replaced(
    site: DemoSite,
) -> None:
    """1.0 -> 2.0 finished; 2.0 -> 3.0 aborted with cluster a already on 3.0; the way
    back is 2.0 everywhere (not 1.0, what the last finished release replaced)."""
    await approved_run(site, "release", "2.0")
    aborted = asyncio.create_task(cli(site, "release", "3.0"))
    await S.awaiting_approval(site, "approve-a")
    assert set(S.running_versions(site, "a").values()) == {"3.0"}
    code, text = await cli(site, "abort")
    assert code == 0, text
    assert (await asyncio.wait_for(aborted, 60))[0] == 4
    await approved_run(site, "rollback")
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
    newest = S.newest(site)
    assert (newest.kind, newest.version, newest.state) == ("rollback", "2.0", J.DONE)
    aborted_row = S.releases(site)[1]
    assert aborted_row.state == J.SUPERSEDED and "abort" in (aborted_row.error or "")


async def test_a_second_copy_of_the_config_cannot_release_the_same_balancer(
    site: DemoSite,
) -> None:
    """Two operators, two copies of one config (two journals): one release at a time."""
    copy = site.root / "operator-2.toml"
    copy.write_text(site.config.read_text().replace('state_dir = "state"', 'state_dir = "op2"'))
    first = asyncio.create_task(cli(site, "release", "2.0"))
    await S.awaiting_approval(site, "approve-a")

    second = await S.cli(site, "release", "3.0", config=str(copy))

    assert second.code == 3, second.output
    assert "the release lock of this balancer is held by release #1" in second.text
    assert "another copy of the config?" in second.text
    code, text = await cli(site, "abort")
    assert code == 0, text
    assert (await asyncio.wait_for(first, 60))[0] == 4
    # Let go of at the stop: the other copy may release now (and finishes it).
    await approved_run_with(site, str(copy), "release", "2.0")
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
