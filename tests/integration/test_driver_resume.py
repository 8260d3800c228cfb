"""On HAProxy, the safety of a release beyond the happy path: `changeover release`
killed mid-step (and its `resume` killed again) finishes on `resume`, a
manual approval waits for QA on the cluster's own entry point, and a bluegreen
release is rolled back by an instant flip; each under the probe with zero
failed requests and no session broken or cut."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from changeover import journal as J
from changeover.config import BalancerInstance, Topology, load
from changeover.demo.appctl import Member as AppMember
from changeover.model import Admission, cluster_admission, total
from changeover.runtime import open_journal
from tests.e2e import support as S
from tests.helpers import wait_until
from tests.integration.realbalancers import (
    RealBalancer,
    finish_probe,
    need,
    parse_site,
    probe_process,
    running_balancer,
    write_probe_site,
)
from tests.integration.test_driver_release import (
    members_up,
    release_site,
    run_on_members,
    under_load,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

PRODUCT = "haproxy"
RATE = 200.0


@dataclass
class Site:
    config: Path
    topology: Topology
    real: RealBalancer
    probe: asyncio.subprocess.Process

    async def cli(self, *args: str, env: Mapping[str, str] | None = None) -> S.Run:
        return await S.finish(await self.start(*args, env=env))

    async def start(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "changeover.cli", *args, "-c", str(self.config),
            env=os.environ | dict(env or {}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    def journal(self) -> J.Journal:
        return open_journal(load(self.config))

    async def cluster_admissions(self) -> dict[str, Admission | None]:
        view = await self.real.driver.read()
        return {c.name: cluster_admission(view, c.name) for c in self.topology.clusters}


@asynccontextmanager
async def haproxy_site(root: Path, policy: Mapping[str, Any] | None = None) -> AsyncIterator[Site]:
    """A 2 x 3 site on a real HAProxy, v1.0 serving, the probe running through it."""
    need(PRODUCT)
    data = under_load(release_site(PRODUCT, root))
    data["policy"] |= dict(policy or {})
    topology = parse_site(data, root)
    instance = BalancerInstance.model_validate(data["balancer"]["instances"][0])
    await run_on_members(topology, "deploy", "1.0")
    await run_on_members(topology, "start")
    try:
        await wait_until(lambda: members_up(topology), timeout=30, what="members listening")
        async with running_balancer(PRODUCT, topology, root / "lb1", instance=instance) as real:
            config = write_probe_site(root / "changeover.toml", real, data)
            async with probe_process(
                config, real.url, rate=RATE, sticky_users=40, log=root / "probe.log"
            ) as probe:
                site = Site(config, topology, real, probe)

                async def flowing() -> bool:
                    served = total((await real.driver.read()).members, "requests")
                    return (served or 0) >= 50

                await wait_until(flowing, timeout=30, what="probe traffic through HAProxy")
                yield site
    finally:
        await run_on_members(topology, "stop")


def failpoint(step_id: str, where: str) -> dict[str, str]:
    return {"CHANGEOVER_FAILPOINT": f"{step_id}:{where}", "CHANGEOVER_FAILPOINT_DELAY": "0.05"}


def assert_untouched(report: Any) -> None:
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0


async def test_killed_inside_a_command_and_after_the_swap_then_resumed(tmp_path: Path) -> None:
    async with haproxy_site(tmp_path) as site:
        first = await site.cli("release", "2.0", env=failpoint("start-a", "during"))
        assert first.code == -signal.SIGKILL, first.output
        journal = site.journal()
        row = journal.unfinished(site.topology.site.name)
        assert row is not None and row.state == J.RUNNING and row.version == "2.0"
        states = {s.step_id: s.state for s in journal.steps(row.id)}
        assert states["start-a"] == J.STEP_RUNNING and states["stop-a"] == J.STEP_DONE
        # Killed mid-start: a is out of the pool, b alone serves.
        assert await site.cluster_admissions() == {"a": Admission.OUT, "b": Admission.LIVE}

        second = await site.cli("resume", env=failpoint("drain-b", "after"))
        assert second.code == -signal.SIGKILL, second.output
        # Killed after the swap: a (on 2.0) is live, b draining.
        admitted = await site.cluster_admissions()
        assert admitted["a"] == Admission.LIVE and admitted["b"] != Admission.LIVE, admitted

        third = await site.cli("resume")
        report = await finish_probe(site.probe)
        final = await site.cluster_admissions()
        served = await S.versions_at(site.real.url)
        journal.close()
        journal = site.journal()
        events = [e.message for e in journal.events(row.id)]
        done = journal.release(row.id)
        journal.close()
    assert third.code == 0, third.output
    assert done.state == J.DONE
    assert sum("took over a stale lock" in e for e in events) == 2, events
    assert final == {"a": Admission.LIVE, "b": Admission.LIVE}
    assert served == {"2.0"}
    assert set(report.versions_seen) == {"1.0", "2.0"}  # the kills happened under traffic
    assert_untouched(report)


async def test_manual_approval_waits_for_qa_on_the_clusters_own_entry_point(
    tmp_path: Path,
) -> None:
    async with haproxy_site(tmp_path, {"approval": "manual"}) as site:
        release = await site.start("release", "2.0")
        journal = site.journal()
        for cluster in ("a", "b"):

            def waiting(step: str = f"approve-{cluster}") -> bool:
                row = journal.unfinished(site.topology.site.name)
                return (
                    row is not None
                    and row.state == J.AWAITING_APPROVAL
                    and any(s.step_id == step and s.state == J.STEP_RUNNING
                            for s in journal.steps(row.id))
                )  # fmt: skip

            await wait_until(waiting, timeout=90, what=f"approve-{cluster} awaiting approval")
            # QA sees the new version on the cluster's own entry point while it is out.
            assert await S.versions_at(site.real.qa_url(cluster), 5) == {"2.0"}
            assert (await site.cluster_admissions())[cluster] == Admission.OUT
            approved = await site.cli("approve")
            assert approved.code == 0, approved.output
        finished = await S.finish(release)
        report = await finish_probe(site.probe)
        final = await site.cluster_admissions()
        journal.close()
    assert finished.code == 0, finished.output
    assert final == {"a": Admission.LIVE, "b": Admission.LIVE}
    assert set(report.versions_seen) == {"1.0", "2.0"}
    assert_untouched(report)


def app_pids(root: Path, topology: Topology, cluster: str) -> dict[str, int | None]:
    """The pid of each member's app process (release_site's appctl root)."""
    pids: dict[str, int | None] = {}
    for member in topology.cluster(cluster).members:
        proc = AppMember(root / "apps", member.name).process()
        pids[member.name] = proc.pid if proc else None
    return pids


RELEASE_COMMANDS = ("stop-", "upload-", "deploy-", "start-")


async def test_a_bluegreen_release_rolled_back_is_an_instant_flip(tmp_path: Path) -> None:
    """bluegreen: a is released and swapped live while b is kept draining on 1.0;
    `rollback` puts b live and drains a out, stopping, deploying and starting
    nothing: b's very processes serve again. Nobody noticed either change."""
    async with haproxy_site(tmp_path, {"strategy": "bluegreen"}) as site:
        released = await site.cli("release", "2.0")
        assert released.code == 0, released.output
        assert await site.cluster_admissions() == {"a": Admission.LIVE, "b": Admission.DRAINING}
        kept = app_pids(tmp_path, site.topology, "b")
        assert None not in kept.values(), kept

        rolled = await site.cli("rollback")
        report = await finish_probe(site.probe)
        final = await site.cluster_admissions()
        served = await S.versions_at(site.real.url)
        journal = site.journal()
        row = journal.newest(site.topology.site.name)
        assert row is not None
        steps = [s.step_id for s in journal.steps(row.id)]
        journal.close()
        after = app_pids(tmp_path, site.topology, "b")
    assert rolled.code == 0, rolled.output
    assert (row.kind, row.version, row.previous_version, row.state) == (
        "rollback",
        "1.0",
        "2.0",
        J.DONE,
    )
    assert "flip-a" in steps and "drained-a" in steps, steps
    assert not [s for s in steps if s.startswith(RELEASE_COMMANDS)], steps
    assert after == kept  # not even restarted
    assert final == {"a": Admission.OUT, "b": Admission.LIVE}
    assert served == {"1.0"}
    assert set(report.versions_seen) == {"1.0", "2.0"}  # both changes ran under traffic
    assert_untouched(report)
