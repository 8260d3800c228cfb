"""Faults during a release, each under the probe with zero failed requests.

A member that does not start, is unhealthy or reports the wrong version, and a
failing smoke check: the release stops before any swap, the other cluster
keeps serving the old release, `changeover rollback` restores it everywhere.
A balancer that refuses changes or cannot be reached: retries with backoff,
then a clear failure with the pool unchanged; a short outage is ridden out.
The release lock: a second release is refused naming the holder; a lock left
by a killed process is stale; `unlock --force` asks first.

One running site serves the module; every test starts and ends with every
member live on one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from changeover import journal as J
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.model import Admission
from changeover.probe import ProbeReport
from tests.e2e import support as S
from tests.helpers import free_port

RATE = 200.0
USERS = 200
OPTS = DemoOptions(
    members_per_cluster=2,
    startup_delay=0.1,
)
LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
_versions = itertools.count(1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DemoSite]:
    demo = DemoSite(tmp_path_factory.mktemp("faults"), OPTS)
    async with demo.running():
        yield demo


@pytest_asyncio.fixture(loop_scope="module")
async def clean(site: DemoSite) -> AsyncIterator[str]:
    """Every member live and healthy on one version (returned), whatever the
    previous test left; faults cleared after."""
    yield await S.restored(site)
    S.faults_cleared(site)


def new_version() -> str:
    return f"f{next(_versions):03d}"


def variant(site: DemoSite, name: str, replace: dict[str, str], append: str = "") -> str:
    """A sibling config (same journal, same balancer) with some lines changed."""
    text = site.config.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = site.root / f"{name}.toml"
    path.write_text(text + append)
    return str(path)


def assert_clean(report: ProbeReport) -> None:
    assert report.sent >= RATE, report  # the release ran under traffic
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0


async def assert_stopped_before_any_swap(site: DemoSite, version: str, old: str) -> J.ReleaseRow:
    """The release failed with cluster a out; b, never swapped, serves the old release."""
    row = S.newest(site)
    assert row.version == version and row.state == J.FAILED, row
    states = S.step_states(site, row.id)
    promotions = [s["id"] for s in row.plan if s.get("promote")]
    assert promotions and all(states[p] == J.STEP_PENDING for p in promotions), states
    assert await S.admissions(site) == {"a": OUT, "b": LIVE}
    assert set(S.running_versions(site, "b").values()) == {old}
    return row


async def rollback_restores(site: DemoSite, old: str, config: str | None = None) -> None:
    run = await S.cli(site, "rollback", config=config)
    assert run.code == 0, run.output
    row = S.newest(site)
    assert (row.kind, row.version, row.state) == ("rollback", old, J.DONE)
    assert set((await S.versions_by_member(site)).values()) == {old}
    assert await S.all_live(site)


async def under_probe(site: DemoSite, scenario: Callable[[], Awaitable[None]]) -> ProbeReport:
    async with site.probe(RATE, sticky_users=USERS) as probe:
        await S.traffic_flows(site)
        await scenario()
        return await probe.finish()


# --- a member goes wrong -------------------------------------------------------------


async def test_member_fails_to_start(site: DemoSite, clean: str) -> None:
    old, version = clean, new_version()
    (S.app_member(site, "a1").dir / "fail-start").touch()

    async def scenario() -> None:
        run = await S.cli(site, "release", version)
        assert run.code == 1, run.output
        row = await assert_stopped_before_any_swap(site, version, old)
        assert row.error and "start a" in row.error and "a1" in row.error, row.error
        assert "fail-start" in row.error
        S.faults_cleared(site)  # the operator repairs the host, then goes back
        await rollback_restores(site, old)

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set(report.versions_seen) == {old}  # nobody was ever served the failed release


async def test_a_member_failing_within_max_failed_is_left_out_and_brought_back(
    site: DemoSite, clean: str
) -> None:
    old, version, later = clean, new_version(), new_version()
    budget = variant(site, "budget", {"[executor]\n": "[executor]\nmax_failed = 1\n"})
    (S.app_member(site, "a1").dir / "fail-start").touch()

    async def scenario() -> None:
        run = await S.cli(site, "release", version, config=budget)
        assert run.code == 0, run.output
        assert "kept a1 out of the live pool for the rest of this release" in run.output
        view = await S.pool(site)
        assert {m.name: m.admission for m in view.members} == {
            "a1": OUT, "a2": LIVE, "b1": LIVE, "b2": LIVE,
        }  # fmt: skip
        status = await S.cli(site, "status", "--json", config=budget)
        assert json.loads(status.output)["kept_out"] == ["a1"], status.output
        S.faults_cleared(site)  # the operator repairs the host; the next release has it back
        run = await S.cli(site, "release", later, config=budget)
        assert run.code == 0, run.output

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set(report.versions_seen) == {old, version, later}
    assert set((await S.versions_by_member(site)).values()) == {later}
    assert await S.all_live(site)


async def test_member_fails_health(site: DemoSite, clean: str) -> None:
    old, version = clean, new_version()
    # The new build is sick on a2: its /health answers 503; the old one is fine.
    (S.app_member(site, "a2").dir / "unhealthy").write_text(version)
    impatient = variant(site, "impatient", {"health_timeout = 30\n": "health_timeout = 3\n"})

    async def scenario() -> None:
        run = await S.cli(site, "release", version, config=impatient)
        assert run.code == 1, run.output
        row = await assert_stopped_before_any_swap(site, version, old)
        assert row.error and "not healthy after 3s" in row.error and "a2: HTTP 503" in row.error
        await rollback_restores(site, old)  # the marker stays: the old build is healthy

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set(report.versions_seen) == {old}


async def test_member_reports_the_wrong_version(site: DemoSite, clean: str) -> None:
    old, version = clean, new_version()
    (S.app_member(site, "a1").dir / "report-version").write_text("0.0-stale-build")

    async def scenario() -> None:
        run = await S.cli(site, "release", version)
        assert run.code == 1, run.output
        row = await assert_stopped_before_any_swap(site, version, old)
        assert row.error and "wrong version" in row.error and "0.0-stale-build" in row.error
        S.faults_cleared(site)
        await rollback_restores(site, old)

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set(report.versions_seen) == {old}


async def test_failing_smoke_check_means_no_swap(site: DemoSite, clean: str) -> None:
    old, version = clean, new_version()
    strict = variant(
        site,
        "smoke-fails",
        {'body_contains = "{version}"': 'body_contains = "text the app never sends"'},
    )

    async def scenario() -> None:
        run = await S.cli(site, "release", version, config=strict)
        assert run.code == 1, run.output
        row = await assert_stopped_before_any_swap(site, version, old)
        assert row.error and "smoke check failed" in row.error, row.error
        assert "body lacks 'text the app never sends'" in row.error
        await rollback_restores(site, old)

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set(report.versions_seen) == {old}


# --- the balancer goes wrong ---------------------------------------------------------


class FlakyAdmin:
    """An HTTP forwarder in front of the balancer's admin API that the test can
    make unreachable (connections dropped) for a while from the first change on,
    or (`after_change`) from the second read after the first change (the first is
    the change's own read-back: the second is the next step's)."""

    def __init__(self, target: str, after_change: bool = False) -> None:
        self.target = target
        self.after_change = after_change
        self.reads_after_change = -1  # counting once a change went through
        self.outage = 0.0
        self.down_until: float | None = None
        self.dropped = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = asyncio.get_running_loop().time()
        if request.method == "POST" and self.reads_after_change < 0:
            self.reads_after_change = 0
        elif request.method == "GET" and self.reads_after_change >= 0:
            self.reads_after_change += 1
        after = self.reads_after_change >= 2 if self.after_change else request.method == "POST"
        if self.down_until is None and after and self.outage:
            self.down_until = now + self.outage
        if self.down_until is not None and now < self.down_until:
            self.dropped += 1
            assert request.transport is not None
            request.transport.close()  # the client sees the connection die
            raise web.HTTPServiceUnavailable()
        async with (
            ClientSession() as http,
            http.request(
                request.method,
                self.target + request.path_qs,
                headers={"Authorization": request.headers.get("Authorization", "")},
                data=await request.read(),
            ) as resp,
        ):
            return web.Response(
                status=resp.status, body=await resp.read(), content_type="application/json"
            )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FlakyAdmin]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()


def retry_warnings(site: DemoSite, release_id: int) -> list[str]:
    events = S.show(site, release_id)["events"]
    return [e["message"] for e in events if "retrying in" in e["message"]]


async def test_balancer_rejecting_changes_is_retried_then_a_clear_failure(
    site: DemoSite, clean: str
) -> None:
    version = new_version()
    state_file = site.root / "state" / "admissions.json"
    state_file.unlink(missing_ok=True)
    state_file.mkdir()  # the balancer cannot save: it answers every change with HTTP 500
    try:

        async def scenario() -> None:
            run = await S.cli(site, "release", version)
            assert run.code == 1, run.output
            row = S.newest(site)
            assert row.state == J.FAILED
            assert row.error and "did not take the change after 4 attempts" in row.error
            assert "cannot save the balancer state" in row.error
            # Backoff: 0.5 s, 1 s, 2 s between the four attempts.
            assert [w.rsplit("retrying in ", 1)[1] for w in retry_warnings(site, row.id)] == [
                "0.5s",
                "1s",
                "2s",
            ]
            assert await S.all_live(site)  # the pool is as it was
            state_file.rmdir()
            resumed = await S.cli(site, "resume")  # the balancer is fixed: carry on
            assert resumed.code == 0, resumed.output

        report = await under_probe(site, scenario)
    finally:
        if state_file.is_dir():
            state_file.rmdir()
    assert_clean(report)
    assert set((await S.versions_by_member(site)).values()) == {version}


@pytest.mark.parametrize(("outage", "succeeds"), [(1.2, True), (60.0, False)])
async def test_balancer_unreachable_for_a_while(
    site: DemoSite, clean: str, outage: float, succeeds: bool
) -> None:
    version = new_version()
    flaky = FlakyAdmin(site.admin_url)
    via_flaky = variant(
        site,
        "flaky-admin",
        {},
        f'\n[[balancer.instances]]\nname = "lb1"\nadmin_url = "{flaky.url}"\n',
    )
    flaky.outage = outage

    async def scenario() -> None:
        async with flaky.running():
            run = await S.cli(site, "release", version, config=via_flaky)
        assert flaky.dropped >= 1
        row = S.newest(site)
        warnings = retry_warnings(site, row.id)
        if succeeds:  # shorter than the retry window: ridden out
            assert run.code == 0, run.output
            assert 1 <= len(warnings) < 3, warnings
            return
        assert run.code == 1, run.output
        assert row.state == J.FAILED and row.error, row
        assert "did not take the change after 4 attempts" in row.error
        assert "unreachable" in row.error
        assert len(warnings) == 3, warnings
        assert await S.all_live(site)  # nothing was changed
        resumed = await S.cli(site, "resume")
        assert resumed.code == 0, resumed.output

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set((await S.versions_by_member(site)).values()) == {version}


async def test_balancer_reads_failing_for_a_while_are_retried(site: DemoSite, clean: str) -> None:
    """The admin API drops connections for 1.2 s from the first read after the first
    drain (the drain wait's reads): the release rides it out with retries."""
    version = new_version()
    flaky = FlakyAdmin(site.admin_url, after_change=True)
    via_flaky = variant(
        site,
        "flaky-reads",
        {},
        f'\n[[balancer.instances]]\nname = "lb1"\nadmin_url = "{flaky.url}"\n',
    )
    flaky.outage = 1.2

    async def scenario() -> None:
        async with flaky.running():
            run = await S.cli(site, "release", version, config=via_flaky)
        assert flaky.dropped >= 1
        assert run.code == 0, run.output
        warnings = retry_warnings(site, S.newest(site).id)
        assert warnings and all(w.startswith("balancer read failed") for w in warnings), warnings

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set((await S.versions_by_member(site)).values()) == {version}


# --- the release lock -----------------------------------------------------------------


async def test_second_release_is_refused_naming_the_holder(site: DemoSite, clean: str) -> None:
    first_version, second_version = new_version(), new_version()

    async def scenario() -> None:
        first = await S.start_cli(site, "release", first_version)
        release_id = await S.step_running(site, "drained-a")
        second = await S.cli(site, "release", second_version)
        assert second.code == 3, second.output
        assert "another release holds the lock" in second.text
        assert f"release #{release_id}" in second.text, second.output
        assert f"(pid {first.pid})" in second.text, second.output
        done = await S.finish(first)
        assert done.code == 0, done.output

    report = await under_probe(site, scenario)
    assert_clean(report)
    rows = S.releases(site, 2)
    assert rows[0].version == first_version  # the refused one left no trace
    assert set((await S.versions_by_member(site)).values()) == {first_version}


async def test_stale_lock_and_unlock_force(site: DemoSite, clean: str) -> None:
    version = new_version()

    async def scenario() -> None:
        killed = await S.cli(site, "release", version, env={"CHANGEOVER_FAILPOINT": "out-a:after"})
        assert killed.code == -signal.SIGKILL, killed.output
        status = await S.cli(site, "status")
        assert "stale: its process is gone" in status.text, status.output

        said_no = await S.cli(site, "unlock", "--force", stdin=b"n\n")
        assert said_no.code == 3, said_no.output
        assert "break the lock held by release #" in said_no.text, said_no.output
        assert S.lock_holder(site) is not None  # kept

        said_yes = await S.cli(site, "unlock", "--force", stdin=b"y\n")
        assert said_yes.code == 0 and "broken" in said_yes.text, said_yes.output
        assert S.lock_holder(site) is None
        # A new release is refused all the same: the killed one is unfinished.
        refused = await S.cli(site, "release", new_version())
        assert refused.code == 3 and "changeover resume" in refused.text, refused.output

        resumed = await S.cli(site, "resume")
        assert resumed.code == 0, resumed.output

    report = await under_probe(site, scenario)
    assert_clean(report)
    assert set((await S.versions_by_member(site)).values()) == {version}


async def test_unlock_without_force_is_refused(site: DemoSite) -> None:
    run = await S.cli(site, "unlock")
    assert run.code == 2 and "--force" in run.text
