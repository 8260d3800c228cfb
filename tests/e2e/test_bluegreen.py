"""Bluegreen releases, rollback and the post-promotion bake, under the probe.

A bluegreen release keeps the cluster it replaced draining on the old release;
`changeover rollback` within `keep_previous` is an instant flip back (no stop,
deploy or start); after the window it is a release of the previous version.
With `bake` and `auto_rollback`, a promoted cluster that goes bad is flipped
back on its own and the journal says why.

The tests run in order on one site: each starts where the previous one left it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from changeover import journal as J
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.model import Admission
from changeover.probe import ProbeReport
from tests.e2e import support as S
from tests.helpers import wait_until

RATE = 200.0
USERS = 200
OLD = "1.0"
OPTS = DemoOptions(
    members_per_cluster=2,
    startup_delay=0.1,
    strategy="bluegreen",
    keep_previous=600.0,
    from_version=OLD,
)
LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT
RELEASE_STEPS = ("stop-", "upload-", "deploy-", "start-")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DemoSite]:
    demo = DemoSite(tmp_path_factory.mktemp("bluegreen"), OPTS)
    async with demo.running():
        yield demo


def variant(site: DemoSite, name: str, replace: dict[str, str]) -> str:
    text = site.config.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = site.root / f"{name}.toml"
    path.write_text(text)
    return str(path)


def app_pids(site: DemoSite, cluster: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for member in site.topo.cluster(cluster).members:
        proc = S.app_member(site, member.name).process()
        out[member.name] = proc.pid if proc else None
    return out


def assert_no_failures(report: ProbeReport) -> None:
    assert report.sent >= RATE, report
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    # A rollback serves users the old release again: version flaps are expected.


async def test_release_keeps_the_previous_cluster_then_rollback_is_an_instant_flip(
    site: DemoSite,
) -> None:
    assert await S.all_live(site)
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        release = await S.cli(site, "release", "bg1")
        assert release.code == 0, release.output
        # a was released and is live; b kept draining, still running the old release.
        assert await S.admissions(site) == {"a": LIVE, "b": DRAINING}
        assert set(S.running_versions(site, "a").values()) == {"bg1"}
        assert set(S.running_versions(site, "b").values()) == {OLD}
        kept = app_pids(site, "b")

        rollback = await S.cli(site, "rollback")
        report = await probe.finish()
    assert rollback.code == 0, rollback.output
    row = S.newest(site)
    assert (row.kind, row.version, row.previous_version, row.state) == (
        "rollback",
        OLD,
        "bg1",
        J.DONE,
    )
    ids = [s["id"] for s in S.show(site, row.id)["steps"]]
    assert "flip-a" in ids, ids
    assert not [i for i in ids if i.startswith(RELEASE_STEPS)], ids  # nothing redeployed
    assert app_pids(site, "b") == kept  # the kept processes were not even restarted
    assert await S.admissions(site) == {"a": OUT, "b": LIVE}
    assert set(S.running_versions(site, "b").values()) == {OLD}
    assert_no_failures(report)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    # Sticky users stay on the kept (draining) cluster: they never left the old release.
    assert OLD in report.versions_seen


async def test_rollback_after_keep_previous_is_a_release_of_the_previous_version(
    site: DemoSite,
) -> None:
    assert await S.admissions(site) == {"a": OUT, "b": LIVE}
    short_window = variant(site, "short-window", {"keep_previous = 600\n": "keep_previous = 1\n"})
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        release = await S.cli(site, "release", "bg2", config=short_window)
        assert release.code == 0, release.output
        assert await S.admissions(site) == {"a": LIVE, "b": DRAINING}  # idle a was released
        finished = S.newest(site).finished
        assert finished is not None
        await wait_until(lambda: time.time() > finished + 1.0, timeout=10, what="window over")

        rollback = await S.cli(site, "rollback", config=short_window)
        report = await probe.finish()
    assert rollback.code == 0, rollback.output
    row = S.newest(site)
    assert (row.kind, row.version, row.state) == ("rollback", OLD, J.DONE)
    ids = [s["id"] for s in S.show(site, row.id)["steps"]]
    assert {"stop-b", "deploy-b", "start-b", "swap-b"} <= set(ids), ids  # a real release
    assert not [i for i in ids if i.startswith("flip-")], ids
    assert await S.admissions(site) == {"a": DRAINING, "b": LIVE}
    assert set(S.running_versions(site, "b").values()) == {OLD}
    assert set(S.running_versions(site, "a").values()) == {"bg2"}  # kept for a flip forward
    assert_no_failures(report)


async def test_bake_rolls_back_a_cluster_that_goes_bad(site: DemoSite) -> None:
    assert await S.admissions(site) == {"a": DRAINING, "b": LIVE}
    baking = variant(
        site,
        "bake",
        {"bake = 0\n": "bake = 30\n", "auto_rollback = false\n": "auto_rollback = true\n"},
    )
    markers = [S.app_member(site, m.name).dir / "unhealthy" for m in site.topo.cluster("a").members]
    try:
        async with site.probe(RATE, sticky_users=USERS) as probe:
            await S.traffic_flows(site)
            release = await S.start_cli(site, "release", "bg3", config=baking)
            await S.step_running(site, "bake-a")
            assert await S.admissions(site) == {"a": LIVE, "b": DRAINING}  # promoted
            for marker in markers:  # the new release goes bad in production
                marker.write_text("bg3")
            run = await S.finish(release)
            report = await probe.finish()
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    assert run.code == 1, run.output
    row = S.newest(site)
    assert (row.version, row.state) == ("bg3", J.ROLLED_BACK)
    assert row.error and "the balancer sees" in row.error and "unhealthy" in row.error
    assert "flipped back: b live on the previous release, a out" in row.error
    assert "rolled back" in run.text and "unhealthy" in run.text  # said on screen too
    states = S.step_states(site, row.id)
    assert states["bake-a"] == J.STEP_FAILED, states  # finished, not left running
    assert await S.admissions(site) == {"a": OUT, "b": LIVE}
    assert set(S.running_versions(site, "b").values()) == {OLD}
    assert_no_failures(report)
