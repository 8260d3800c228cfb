"""End to end on the embedded balancer: whole releases under the probe."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from rich.console import Console

from changeover import journal as J
from changeover.balancers.factory import make_balancer
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.model import Admission
from changeover.releases import Begin
from changeover.runtime import open_journal, with_releases
from tests.certs import ca_file, client_context, issue
from tests.e2e import support as S
from tests.helpers import wait_until

RATE = 200.0
pytestmark = pytest.mark.slow


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[DemoSite]:
    demo = DemoSite(tmp_path, DemoOptions(members_per_cluster=3, startup_delay=0.3))
    async with demo.running():
        yield demo


async def versions_served(site: DemoSite) -> set[str | None]:
    return set((await S.versions_by_member(site)).values())


async def pool_admissions(site: DemoSite) -> set[Admission]:
    balancer = make_balancer(site.topo)
    try:
        return {m.admission for m in (await balancer.read()).members}
    finally:
        await balancer.close()


async def test_full_release_under_probe_has_zero_downtime(site: DemoSite) -> None:
    async with site.probe(RATE, sticky_users=40) as probe:
        release_id, state = await with_releases(
            site.topo, lambda r: r.release(Begin("2.0")), Console(quiet=True)
        )
        report = await probe.finish()
    assert state == J.DONE
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    # Traffic saw both releases: the release really ran under the probe.
    assert set(report.versions_seen) == {"1.0", "2.0"}
    assert await versions_served(site) == {"2.0"}
    assert await pool_admissions(site) == {Admission.LIVE}
    journal = open_journal(site.topo)
    assert all(s.state == J.STEP_DONE for s in journal.steps(release_id))


async def test_a_drain_timeout_shorter_than_the_sessions_cuts_them_and_the_probe_counts_it(
    tmp_path: Path,
) -> None:
    """Users stay 4 s on average, the drain gives them 0.5 s: the release finishes
    (it warns), and the probe counts the sessions still on a when a went out as
    cut: not failed, not broken, and not excused either."""
    opts = DemoOptions(
        members_per_cluster=2,
        startup_delay=0.1,
        drain_timeout=0.5,
        probe_session_mean=4.0,
        probe_session_max=8.0,
    )
    demo = DemoSite(tmp_path, opts)
    console = Console(record=True, width=200)
    async with demo.running(), demo.probe(RATE, sticky_users=40) as probe:
        await S.traffic_flows(demo)  # sessions on both clusters before the drain
        _, state = await with_releases(demo.topo, lambda r: r.release(Begin("2.0")), console)
        report = await probe.finish()
    assert state == J.DONE
    assert "drain timeout (0.5s) with" in console.export_text()
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut > 0
    assert not report.passed


async def _cli(site: DemoSite, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", *args, "-c", str(site.config),
        env=site.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.parametrize("kill_in", ["drained-a", "start-b", "healthy-b"])
async def test_sigkill_mid_step_then_resume_keeps_the_site_up(site: DemoSite, kill_in: str) -> None:
    journal = open_journal(site.topo)
    async with site.probe(RATE, sticky_users=40) as probe:
        release = await _cli(site, "release", "2.0")

        def step_running() -> bool:
            row = journal.unfinished(site.topo.site.name)
            return row is not None and any(
                s.step_id == kill_in and s.state == J.STEP_RUNNING for s in journal.steps(row.id)
            )

        await wait_until(step_running, timeout=60, interval=0.02, what=f"step {kill_in} running")
        release.send_signal(signal.SIGKILL)
        await release.wait()
        row = journal.unfinished(site.topo.site.name)
        assert row is not None and row.state == J.RUNNING  # the journal says: not finished

        resumed = await _cli(site, "resume")
        output, _ = await resumed.communicate()
        report = await probe.finish()
    assert resumed.returncode == 0, output.decode()
    assert b"took over a stale lock" in output or b"resumed" in output
    final = journal.release(row.id)
    assert final.state == J.DONE
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert await versions_served(site) == {"2.0"}
    assert await pool_admissions(site) == {Admission.LIVE}


async def test_https_release_with_a_certificate_reload_mid_release(tmp_path: Path) -> None:
    ca = trustme.CA()
    first = issue(ca, tmp_path / "certs", "site", "127.0.0.1")
    tls = (first.cert, first.key, ca_file(ca, tmp_path))
    demo = DemoSite(tmp_path, DemoOptions(members_per_cluster=3, startup_delay=0.3, tls=tls))
    async with demo.running() as site, site.probe(RATE, sticky_users=40) as probe:
        assert site.public_url.startswith("https://")
        release = asyncio.create_task(
            with_releases(site.topo, lambda r: r.release(Begin("2.0")), Console(quiet=True))
        )
        await S.step_running(site, "start-a")
        renewed = issue(ca, tmp_path / "renewed", "site", "127.0.0.1")
        first.cert.write_bytes(renewed.cert.read_bytes())
        first.key.write_bytes(renewed.key.read_bytes())
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{site.admin_url}/v1/tls/reload", headers={"Authorization": f"Bearer {site.token}"}
            ) as r,
        ):
            assert r.status == 200, await r.text()
        _, state = await release
        report = await probe.finish()
        listen = site.topo.balancer.listen
        context = client_context(ca)
        _, writer = await asyncio.open_connection(listen.host, listen.port, ssl=context)
        served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    assert state == J.DONE
    assert served == renewed.der  # the reload took, mid-release
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.version_flaps == 0
    assert set(report.versions_seen) == {"1.0", "2.0"}


async def test_a_fresh_site_is_started_by_a_first_deploy(tmp_path: Path) -> None:
    """Nothing deployed, nothing serving: `release --first` deploys every cluster
    out of service, checks it, puts it live; then releases run as usual."""
    demo = DemoSite(tmp_path, DemoOptions(members_per_cluster=2, startup_delay=0.1))
    async with demo.running(fresh=True):
        assert await versions_served(demo) == {None}
        planned = await S.cli(demo, "plan", "1.0", "--first")
        assert planned.code == 0, planned.output
        assert "take every cluster out of service (first deploy" in planned.text

        first = await S.cli(demo, "release", "1.0", "--first")

        assert first.code == 0, first.output
        assert await versions_served(demo) == {"1.0"}
        assert await pool_admissions(demo) == {Admission.LIVE}
        again = await S.cli(demo, "release", "1.1", "--first")  # it serves now: refused
        assert again.code == 3 and "serves already" in again.text, again.output
        async with demo.probe(RATE, sticky_users=20) as probe:
            after = await S.cli(demo, "release", "2.0")
            report = await probe.finish()
        assert after.code == 0, after.output
        assert report.failed == 0, (report.failure_examples, report.failure_log)
        assert await versions_served(demo) == {"2.0"}
