"""SIGKILL `changeover release` at every step boundary of a 2 x 2 plan and inside
every long step (drain waits, commands in flight, health waits); `changeover
resume` finishes it under the probe. Ctrl-C stops at the next safe point and
`resume` continues.

One chained release covers the kill points: killed at the first point, its
`resume` killed at the next, and so on (28 kills, each followed by the checks
below), for the cost of one release instead of 28. Inside a health wait a
resumed process often finds the members already up (the step ends before the
kill), so those points, and the swap, are killed in fresh releases, one kill
each, parametrised.

One running site serves the whole matrix; every case is a real release of a
new version. After each kill the journal is held against the site: every step
marked done precedes the kill point and its effect is really there (pool
admissions, deployed and running versions), nothing after it is marked done.
"""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from changeover import journal as J
from changeover.config import load
from changeover.demo.scenario import DemoOptions, DemoSite, write_topology
from changeover.model import Admission
from changeover.plan import make_plan
from changeover.steps import Admit, RunCommand, Step, StepKind
from tests.e2e import support as S
from tests.helpers import wait_until

RATE = 200.0
USERS = (
    200  # each user sends once a second: a stalled probe rarely has two of its requests in flight
)
OPTS = DemoOptions(
    members_per_cluster=2,
    startup_delay=0.1,
    health_timeout=30.0,
)
DURING_DELAY = "0.05"  # seconds into a long step: all of them last longer
LONG_KINDS = (StepKind.WAIT_DRAINED, StepKind.RUN, StepKind.WAIT_HEALTHY)
# Fresh releases killed once: inside each health wait (which the chain cannot
# reach), and after the swap, the point where both clusters change at once,
# from a release that was never resumed before.
CASES = [
    ("healthy-a", "during"),
    ("drain-b", "after"),
    ("healthy-b", "during"),
]

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


def offline_plan() -> list[Step]:
    """The plan the matrix is built from (checked against `changeover plan --json`)."""
    with tempfile.TemporaryDirectory() as tmp:
        return make_plan(load(write_topology(Path(tmp), OPTS)), "v")


PLAN = offline_plan()
# Every kill point in plan order: inside each long step (but health waits, see
# above), then after each step.
CHAIN = [
    (s.id, where)
    for s in PLAN
    for where in (
        ("during", "after")
        if s.kind in LONG_KINDS and s.kind is not StepKind.WAIT_HEALTHY
        else ("after",)
    )
]
_versions = itertools.count(1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DemoSite]:
    demo = DemoSite(tmp_path_factory.mktemp("crash"), OPTS)
    async with demo.running():
        yield demo


async def test_matrix_covers_every_step_of_the_real_plan(site: DemoSite) -> None:
    run = await S.cli(site, "plan", "v-next", "--json")
    assert run.code == 0, run.output
    ids = S.plan_ids(run.output)
    assert ids == [s.id for s in PLAN]
    assert len(ids) >= 19  # preflight + 2 x (drain, drained, out, stop, deploy, start, checks)
    assert {step for step, where in CHAIN if where == "after"} == set(ids)
    long_steps = {s.id for s in PLAN if s.kind in LONG_KINDS}
    assert len(long_steps) >= 10  # 2 x (drained, stop, deploy, start, healthy)
    covered = {step for step, where in [*CHAIN, *CASES] if where == "during"}
    assert covered == long_steps  # every long step is killed inside, chained or fresh


async def expected_admissions(site: DemoSite, done: list[Step]) -> dict[str, Admission]:
    """The pool the done steps left: every done admission change applied in order."""
    state = {c.name: Admission.LIVE for c in site.topo.clusters}
    for step in done:
        if isinstance(step, Admit):
            state |= step.admissions
    return state


async def assert_journal_tells_the_truth(
    site: DemoSite, release_id: int, kill_at: int, where: str, version: str
) -> None:
    states = S.step_states(site, release_id)
    ids = [s.id for s in PLAN]
    done = [s for s in PLAN if states[s.id] == J.STEP_DONE]
    boundary = kill_at + 1 if where == "after" else kill_at
    # Done is exactly the prefix before the kill point; nothing after it is done.
    assert [s.id for s in done] == ids[:boundary], states
    if where == "during":
        assert states[ids[kill_at]] == J.STEP_RUNNING, states
    assert all(states[i] == J.STEP_PENDING for i in ids[kill_at + 1 :]), states
    # What the done steps did is really there.
    assert await S.admissions(site) == await expected_admissions(site, done)
    for step in done:
        if not isinstance(step, RunCommand):
            continue
        cluster = step.cluster
        if step.command == "deploy":
            assert set(S.deployed_versions(site, cluster).values()) == {version}, step.id
        if step.command == "start":
            assert set(S.running_versions(site, cluster).values()) == {version}, step.id
        if step.command == "stop" and states[f"start-{cluster}"] == J.STEP_PENDING:
            assert set(S.running_versions(site, cluster).values()) == {None}, step.id


def failpoint(step_id: str, where: str) -> dict[str, str]:
    return {
        "CHANGEOVER_FAILPOINT": f"{step_id}:{where}",
        "CHANGEOVER_FAILPOINT_DELAY": DURING_DELAY,
    }


async def test_killed_at_every_boundary_and_inside_every_long_step(site: DemoSite) -> None:
    assert await S.all_live(site), "the site is not clean"
    version = f"v{next(_versions):03d}"
    ids = [s.id for s in PLAN]
    release_id: int | None = None
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        command: tuple[str, ...] = ("release", version)
        for step_id, where in CHAIN:
            run = await S.cli(site, *command, env=failpoint(step_id, where))
            assert run.code == -signal.SIGKILL, f"{step_id}:{where}: {run.output}"
            row = S.newest(site)
            release_id = release_id or row.id
            assert (row.id, row.version, row.state) == (release_id, version, J.RUNNING)
            await assert_journal_tells_the_truth(site, row.id, ids.index(step_id), where, version)
            holder = S.lock_holder(site)
            assert holder is not None and holder.is_stale()  # the dead process's lock
            command = ("resume",)  # the next kill lands in a resumed release
        finished = await S.cli(site, "resume")
        report = await probe.finish()
    assert finished.code == 0, finished.output
    assert release_id is not None
    events = [e["message"] for e in S.show(site, release_id)["events"]]
    assert sum("took over a stale lock" in e for e in events) == len(CHAIN), events
    assert S.newest(site).state == J.DONE
    assert set(S.step_states(site, release_id).values()) == {J.STEP_DONE}
    assert len(report.versions_seen) >= 2  # the whole chain ran under traffic
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set((await S.versions_by_member(site)).values()) == {version}
    assert await S.all_live(site)


@pytest.mark.parametrize(("step_id", "where"), CASES, ids=[f"{s}:{w}" for s, w in CASES])
async def test_sigkill_then_resume(site: DemoSite, step_id: str, where: str) -> None:
    await S.restored(site)
    version = f"v{next(_versions):03d}"
    kill_at = [s.id for s in PLAN].index(step_id)
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        release = await S.cli(site, "release", version, env=failpoint(step_id, where))
        assert release.code == -signal.SIGKILL, release.output
        row = S.newest(site)
        assert row.version == version and row.state == J.RUNNING  # not finished, says so
        await assert_journal_tells_the_truth(site, row.id, kill_at, where, version)
        holder = S.lock_holder(site)
        assert holder is not None and holder.is_stale()  # the dead process's lock is left

        resumed = await S.cli(site, "resume")
        report = await probe.finish()
    assert resumed.code == 0, resumed.output
    events = [e["message"] for e in S.show(site, row.id)["events"]]
    assert any("took over a stale lock" in e for e in events), events
    assert S.newest(site).state == J.DONE
    assert set(S.step_states(site, row.id).values()) == {J.STEP_DONE}
    assert report.sent >= RATE  # the release ran under traffic
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set((await S.versions_by_member(site)).values()) == {version}
    assert await S.all_live(site)


def commands_running(pid: int, count: int) -> bool:
    """`count` release commands started by `pid`, all out of its process group."""
    try:
        children = psutil.Process(pid).children()
        groups = [os.getpgid(c.pid) for c in children]
    except (psutil.Error, ProcessLookupError):
        return False
    return len(children) >= count and pid not in groups


@pytest.mark.parametrize("during", ["drained-a", "stop-b"])
async def test_ctrl_c_stops_at_a_safe_point_then_resume(site: DemoSite, during: str) -> None:
    """SIGINT to the release's process group, as Ctrl-C in a terminal sends it:
    a wait stops at once; a command in flight is not cut but finishes first."""
    await S.restored(site)
    version = f"v{next(_versions):03d}"
    ids = [s.id for s in PLAN]
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        release = await S.start_cli(site, "release", version, new_session=True)
        release_id = await S.step_running(site, during)
        if during != "drained-a":  # press Ctrl-C once the commands run, each in its session
            members = len(site.topo.cluster(during.split("-")[1]).members)
            await wait_until(
                lambda: commands_running(release.pid, members),
                timeout=30,
                interval=0.01,
                what="the step's commands running outside the release's process group",
            )
        os.killpg(release.pid, signal.SIGINT)
        stopped = await S.finish(release)
        assert stopped.code == 4, stopped.output  # stopped at a safe point, resumable
        row = S.newest(site)
        assert row.id == release_id and row.state == J.INTERRUPTED, row
        states = S.step_states(site, release_id)
        done = [i for i in ids if states[i] == J.STEP_DONE]
        assert done == ids[: len(done)], states  # a prefix, then nothing
        assert all(states[i] == J.STEP_PENDING for i in ids[len(done) :]), states
        if during == "drained-a":  # a wait: interrupted at once, runs again on resume
            assert done == ids[: ids.index(during)], states
        else:  # a command: never cut, the step completes, then the release stops
            assert during in done, states
            outputs = S.outputs(site, release_id)
            assert outputs and all(o.exit_status == 0 for o in outputs), outputs
        assert S.lock_holder(site) is None  # a clean stop leaves no lock

        resumed = await S.cli(site, "resume")
        report = await probe.finish()
    assert resumed.code == 0, resumed.output
    assert S.newest(site).state == J.DONE
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set((await S.versions_by_member(site)).values()) == {version}
    assert await S.all_live(site)
