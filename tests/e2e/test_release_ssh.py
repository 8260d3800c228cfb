"""The seed's scale end to end: 2 clusters x 18 members of the sample app, each
member on its own loopback address (127.0.1.1..18 and 127.0.2.1..18), every
release command run over SSH by a real OpenSSH server, under the probe.

The tests share one site (36 apps take a while to boot on 2 cores) and run in
file order: each releases a new version from whatever the previous one left;
the failure test comes last since it leaves cluster a out of the pool. The
manual approval runs first, on a small fleet of its own (2 x 2 behind their
own sshd), before the big one boots.
"""

from __future__ import annotations

import io
import json
import shlex
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from rich.console import Console

from changeover import journal as J
from changeover.balancers.factory import make_balancer
from changeover.config import Topology, parse
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.executors.base import member_values, render_argv
from changeover.model import Admission
from changeover.polling import poll_until
from changeover.releases import Begin, operator
from changeover.runtime import make_executor, with_releases
from tests.e2e import support as S
from tests.integration.sshd import SshdServer, cluster_hosts, running_sshd

N = 18
RATE = 300.0
STICKY_USERS = 60
PARALLEL = 6
NICENESS = 10
A_HOSTS, B_HOSTS = cluster_hosts(1, N), cluster_hosts(2, N)
COMMANDS = ("stop", "deploy", "start")

pytestmark = [pytest.mark.slow, pytest.mark.real, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sshd() -> AsyncIterator[SshdServer]:
    # The 36 hosts stand for other machines: what they run (release commands,
    # the apps) yields the CPU to the balancer and the probe, which stand for
    # the balancer host and its users.
    async with running_sshd(A_HOSTS + B_HOSTS, niceness=NICENESS) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(
    sshd: SshdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DemoSite]:
    # The 36 "hosts" share this machine's cores with the balancer and the probe:
    # 18 sshd sessions, appctl runs and app boots at once starve both (the probe
    # saw 2 s timeouts in CI), so a cluster is released PARALLEL members at a
    # time, as a real site bounds its fan-out; and a cluster's boot may take the
    # product's default health_timeout, not the demo's 30 s, under load.
    opts = DemoOptions(
        members_per_cluster=N,
        startup_delay=0.2,
        member_hosts=(A_HOSTS, B_HOSTS),
        ssh=sshd.settings(),
        parallel=PARALLEL,
        health_timeout=120.0,
    )
    demo = DemoSite(tmp_path_factory.mktemp("fleet"), opts)
    async with demo.running():
        yield demo


async def release(topo: Topology, version: str, console: Console | None = None) -> tuple[int, str]:
    console = console or Console(quiet=True)
    return await with_releases(topo, lambda r: r.release(Begin(version)), console)


def outputs(site: DemoSite, release_id: int) -> list[J.OutputRow]:
    journal = S.journal(site)
    try:
        return journal.outputs(release_id)
    finally:
        journal.close()


SMALL = 2  # members per cluster of the approval's own fleet
SMALL_RATE, SMALL_USERS = 100.0, 20  # think time 0.2 s, below the demo's session_idle


@pytest_asyncio.fixture(loop_scope="module")
async def small_fleet(tmp_path: Path) -> AsyncIterator[tuple[DemoSite, SshdServer]]:
    """2 x 2 members on 127.0.3.1-2 and 127.0.4.1-2 behind their own sshd, the
    release commands over SSH, approval = "manual"."""
    hosts = (cluster_hosts(3, SMALL), cluster_hosts(4, SMALL))
    # Four hosts boot nothing at once worth yielding to: at the test's priority,
    # since below it any other busy session starves the members (seen beside
    # stress-ng: their health checks timed out and the probe got 503s).
    async with running_sshd([*hosts[0], *hosts[1]]) as server:
        opts = DemoOptions(
            members_per_cluster=SMALL,
            startup_delay=0.1,
            member_hosts=hosts,
            ssh=server.settings(),
            approval="manual",
        )
        demo = DemoSite(tmp_path, opts)
        async with demo.running():
            yield demo, server


async def qa_versions(site: DemoSite, cluster: str) -> set[str]:
    """What QA sees on `cluster`'s own entry point (its QA port)."""
    qa = f"http://{site.topo.balancer.listen.host}:{site.topo.cluster(cluster).qa_port}"
    return await S.versions_at(qa, 5)


async def test_a_manual_approval_release_over_ssh_waits_for_qa_under_the_probe(
    small_fleet: tuple[DemoSite, SshdServer],
) -> None:
    """`changeover release` over SSH waits for each cluster's approval while QA
    sees the new version on that cluster's entry point and the other cluster
    serves everyone; `changeover approve` from another shell lets it go on."""
    site, sshd = small_fleet
    before = {h: sshd.accepted(h) for h in sshd.hosts}
    async with site.probe(SMALL_RATE, sticky_users=SMALL_USERS) as probe:
        await S.traffic_flows(site)
        release_cli = await S.start_cli(site, "release", "2.0")
        try:
            for cluster, other in (("a", "b"), ("b", "a")):
                release_id = await S.awaiting_approval(site, f"approve-{cluster}", timeout=90)
                assert await qa_versions(site, cluster) == {"2.0"}
                admissions = await S.admissions(site)
                assert admissions == {cluster: Admission.OUT, other: Admission.LIVE}, admissions
                approved = await S.cli(site, "approve")
                assert approved.code == 0, approved.output
                assert f"approved approve-{cluster} of release #{release_id}" in approved.text
            done = await S.finish(release_cli)
        finally:
            if release_cli.returncode is None:
                release_cli.kill()
                await release_cli.wait()
        report = await probe.finish()

    assert done.code == 0, done.output
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set(report.versions_seen) == {"1.0", "2.0"}
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
    assert await S.all_live(site)
    details = {s["id"]: s["detail"] for s in S.show(site, release_id)["steps"]}
    assert details["approve-a"] == details["approve-b"] == f"approved by {operator()}"
    # Every command went over SSH, one connection per host for the whole release.
    ran = outputs(site, release_id)
    assert len(ran) == 2 * SMALL * len(COMMANDS)
    assert all(o.exit_status == 0 for o in ran), [o for o in ran if o.exit_status]
    assert {h: sshd.accepted(h) - before[h] for h in sshd.hosts} == dict.fromkeys(sshd.hosts, 1)


async def test_36_members_released_over_ssh_under_the_probe(
    site: DemoSite, sshd: SshdServer
) -> None:
    assert [m.host for _, m in site.topo.members()] == A_HOSTS + B_HOSTS
    before = {h: sshd.accepted(h) for h in sshd.hosts}
    async with site.probe(RATE, sticky_users=STICKY_USERS) as probe:
        await S.traffic_flows(site)  # sticky sessions exist before the first drain
        release_id, state = await release(site.topo, "2.0")
        report = await probe.finish()

    assert state == J.DONE, S.failed_steps(site, release_id)
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set(report.versions_seen) == {"1.0", "2.0"}  # the release ran under traffic
    assert set((await S.versions_by_member(site)).values()) == {"2.0"}
    assert {m.admission for m in (await S.pool(site)).members} == {Admission.LIVE}
    # Every command went over SSH: 36 x 3 outputs, one connection per host for all steps.
    ran = outputs(site, release_id)
    assert len(ran) == 2 * N * len(COMMANDS)
    assert all(o.exit_status == 0 for o in ran), [o for o in ran if o.exit_status]
    assert {h: sshd.accepted(h) - before[h] for h in sshd.hosts} == dict.fromkeys(sshd.hosts, 1)


# Each release command, wrapped: the member's shell appends "START END" (wall clock)
# to STAMPS/<member>.<command> around the real command and keeps its exit status.
STAMP = 's=$(date +%s.%N); f=$1; shift; "$@"; rc=$?; echo "$s $(date +%s.%N)" >>"$f"; exit $rc'


def stamped(topo: Topology, stamps: Path, parallel: int) -> Topology:
    """The site's topology with `executor.parallel` and every release command timed."""
    wrap = shlex.join(["/bin/sh", "-c", STAMP, "stamp"])
    release = topo.release.model_copy(
        update={
            cmd: f"{wrap} {shlex.quote(str(stamps))}/{{member}}.{cmd} {getattr(topo.release, cmd)}"
            for cmd in COMMANDS
        }
    )
    executor = topo.executor.model_copy(update={"parallel": parallel})
    return topo.model_copy(update={"release": release, "executor": executor})


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # at a tie an end (-1) sorts before a start: touching is no overlap
        running += change
        peak = max(peak, running)
    return peak


async def test_parallel_bounds_the_members_running_a_command_at_once(
    site: DemoSite, tmp_path: Path
) -> None:
    parallel = 5
    _, state = await release(stamped(site.topo, tmp_path, parallel), "3.0")
    assert state == J.DONE

    peaks = {}
    for cluster in site.topo.clusters:
        for cmd in COMMANDS:
            intervals = []
            for member in cluster.members:
                lines = (tmp_path / f"{member.name}.{cmd}").read_text().splitlines()
                assert len(lines) == 1, (member.name, cmd, lines)  # ran exactly once
                start, end = map(float, lines[0].split())
                intervals.append((start, end))
            peaks[f"{cmd}-{cluster.name}"] = most_at_once(intervals)
    assert all(peak <= parallel for peak in peaks.values()), peaks
    assert max(peaks.values()) == parallel, peaks  # the bound was reached, not just respected
    assert set((await S.versions_by_member(site)).values()) == {"3.0"}


async def test_killed_while_commands_run_over_ssh_then_resumed(site: DemoSite) -> None:
    """SIGKILL of `changeover release` with start-a in flight on 18 hosts, then
    `resume` from the journal: every step done once, the site served throughout."""
    fail = {"CHANGEOVER_FAILPOINT": "start-a:during", "CHANGEOVER_FAILPOINT_DELAY": "0.05"}
    async with site.probe(RATE, sticky_users=STICKY_USERS) as probe:
        await S.traffic_flows(site)
        killed = await S.cli(site, "release", "3.1", env=fail)
        assert killed.code == -signal.SIGKILL, killed.output
        row = S.newest(site)
        assert row.version == "3.1" and row.state == J.RUNNING
        assert S.step_states(site, row.id)["start-a"] == J.STEP_RUNNING
        assert await S.admissions(site) == {"a": Admission.OUT, "b": Admission.LIVE}
        resumed = await S.cli(site, "resume")
        report = await probe.finish()

    assert resumed.code == 0, resumed.output
    assert S.newest(site).state == J.DONE
    assert set(S.step_states(site, row.id).values()) == {J.STEP_DONE}
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set((await S.versions_by_member(site)).values()) == {"3.1"}
    assert await S.all_live(site)


def from_inventory(site: DemoSite, sshd: SshdServer, folder: Path) -> Topology:
    """The site's topology with its members read from an Ansible inventory: one
    group per cluster under a parent whose vars give `ansible_port` and
    `ansible_user`, while [executor.ssh] names a port and a user that reach nothing."""
    lines = []
    for cluster in site.topo.clusters:
        lines.append(f"[fleet_{cluster.name}]")
        lines += [
            f"{m.name} ansible_host={m.host} changeover_port={m.port}" for m in cluster.members
        ]
    lines += ["[fleet:children]", *(f"fleet_{c.name}" for c in site.topo.clusters)]
    lines += ["[fleet:vars]", f"ansible_port={sshd.port}", f"ansible_user={sshd.user}"]
    (folder / "hosts.ini").write_text("\n".join(lines) + "\n")
    data = site.topo.model_dump(mode="json")
    data["site"]["inventory"] = str(folder / "hosts.ini")
    data["executor"]["ssh"].update(port=1, user="nobody-here")
    data["executor"]["max_failed"] = 1
    for cluster in data["clusters"]:
        del cluster["members"]
        cluster["group"] = f"fleet_{cluster['name']}"
    assert site.topo.source is not None  # the same file: the same state directory
    return parse(data, site.topo.source)


async def bring_back(site: DemoSite, topo: Topology, name: str, version: str) -> None:
    """What the operator does for a member kept out: start it, put it live."""
    cluster, member = next((c, m) for c, m in topo.members() if m.name == name)
    assert topo.release.start is not None
    executor = make_executor(topo)
    try:
        argv = render_argv(topo.release.start, member_values(cluster, member, version))
        started = await executor.run(cluster, member, argv, 60)
    finally:
        await executor.close()
    assert started.ok, started.output
    balancer = make_balancer(site.topo)
    try:
        await balancer.apply({name: Admission.LIVE})

        async def healthy() -> bool:
            view = await balancer.read()
            return any(m.name == name and m.healthy for m in view.members)

        assert await poll_until(healthy, 30), f"{name} not healthy again"
    finally:
        await balancer.close()


async def test_one_member_failing_its_start_is_kept_out_within_max_failed(
    site: DemoSite, sshd: SshdServer, tmp_path: Path
) -> None:
    """The failure budget over SSH, with the members from an inventory: with
    max_failed = 1, a7 failing its start is left out and the release completes."""
    topo = from_inventory(site, sshd, tmp_path)
    assert [(m.name, m.host, m.port) for _, m in topo.members()] == [
        (m.name, m.host, m.port) for _, m in site.topo.members()
    ]
    assert {(m.ssh_port, m.ssh_user) for _, m in topo.members()} == {(sshd.port, sshd.user)}
    failing, version = "a7", "3.5"
    (S.app_member(site, failing).dir / "fail-start").touch()
    timeline = Console(file=io.StringIO(), width=200, color_system=None)
    try:
        async with site.probe(RATE, sticky_users=STICKY_USERS) as probe:
            await S.traffic_flows(site)
            release_id, state = await release(topo, version, timeline)
            report = await probe.finish()
    finally:
        S.faults_cleared(site)

    assert state == J.DONE, S.failed_steps(site, release_id)
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    admissions = {m.name: m.admission for m in (await S.pool(site)).members}
    assert admissions.pop(failing) is Admission.OUT
    assert set(admissions.values()) == {Admission.LIVE}
    versions = await S.versions_by_member(site)
    assert versions.pop(failing) is None  # stopped, and its start failed
    assert set(versions.values()) == {version}

    text = timeline.file.getvalue()  # type: ignore[attr-defined]
    assert f"kept {failing} out of the live pool for the rest of this release" in text, text
    journal = S.journal(site)
    try:
        kept = [e.message for e in journal.events(release_id) if e.kind == J.KEPT_OUT]
    finally:
        journal.close()
    assert kept == [failing]
    status = await S.cli(site, "status", "--json")
    assert status.code == 0, status.output
    assert json.loads(status.output)["kept_out"] == [failing], status.output
    said = await S.cli(site, "status")
    assert f"kept out of the live pool by release #{release_id}" in said.text, said.text
    assert failing in said.text.split(f"release #{release_id}", 1)[1]

    await bring_back(site, topo, failing, version)  # the next test starts from a full pool
    assert await S.all_live(site)


async def test_a_failing_start_stops_the_release_and_the_site_stays_up(site: DemoSite) -> None:
    parallel, failing = 5, "a1"  # a1 is the first member to take a slot
    topo = site.topo.model_copy(
        update={"executor": site.topo.executor.model_copy(update={"parallel": parallel})}
    )
    previous = set((await S.versions_by_member(site)).values())
    (S.app_member(site, failing).dir / "fail-start").touch()
    try:
        async with site.probe(RATE, sticky_users=STICKY_USERS) as probe:
            await S.traffic_flows(site)
            release_id, state = await release(topo, "4.0")
            report = await probe.finish()
    finally:
        S.faults_cleared(site)

    assert state == J.FAILED
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert await S.admissions(site) == {"a": Admission.OUT, "b": Admission.LIVE}
    assert {v for m, v in (await S.versions_by_member(site)).items() if m[0] == "b"} == previous

    steps = S.step_states(site, release_id)
    assert steps["start-a"] == J.STEP_FAILED and steps["stop-a"] == steps["deploy-a"] == J.STEP_DONE
    journal = S.journal(site)
    try:
        start_idx = next(s.idx for s in journal.steps(release_id) if s.step_id == "start-a")
        ran = [o for o in journal.outputs(release_id) if o.idx == start_idx]  # order recorded
    finally:
        journal.close()
    first_failure = next(i for i, o in enumerate(ran) if o.exit_status != 0)
    assert ran[first_failure].member == failing
    # A member takes a slot only while nothing failed: the first `parallel`, plus one
    # per member that finished (freeing its slot) before the failure was recorded.
    assert len(ran) <= parallel + first_failure
    not_started = {m.name for m in site.topo.cluster("a").members} - {o.member for o in ran}
    assert len(not_started) >= N - 2 * parallel
    assert all(S.running_versions(site, "a")[m] is None for m in not_started)

    shown = await S.cli(site, "show", str(release_id))
    assert shown.code == 0, shown.output
    assert f"{failing}: exit 1" in shown.text
    assert "start refused" in shown.text and "fault injection" in shown.text
    assert f"not started on {len(not_started)} member(s)" in shown.text
