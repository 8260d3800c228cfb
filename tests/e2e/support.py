"""Shared pieces of the crash and fault tests: the CLI as a user runs it, and
what the site really looks like (pool, versions, processes) to hold the
journal against."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from changeover import journal as J
from changeover.balancers.factory import make_balancer
from changeover.demo.appctl import Member as AppMember
from changeover.demo.appctl import running_version
from changeover.demo.scenario import DemoSite
from changeover.journal import Journal
from changeover.model import Admission, PoolView, cluster_admission, total
from changeover.runtime import open_journal
from tests.helpers import wait_until

CLI_TIMEOUT = 180.0  # one whole release on a loaded 2-core box


@dataclass(frozen=True)
class Run:
    code: int
    output: str

    @property
    def text(self) -> str:
        """The output with Rich's line wrapping undone (whitespace collapsed)."""
        return " ".join(self.output.split())


async def start_cli(
    site: DemoSite,
    *args: str,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
    new_session: bool = False,
) -> asyncio.subprocess.Process:
    """`python -m changeover.cli ARGS -c CONFIG` with the site's environment;
    `new_session`: in its own process group, as a terminal's foreground job."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", *args, "-c", config or str(site.config),
        env=dict(site.env) | dict(env or {}),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=new_session,
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, stdin: bytes | None = None) -> Run:
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), CLI_TIMEOUT)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        out, _ = await proc.communicate()
        raise AssertionError(f"the CLI ran longer than {CLI_TIMEOUT}s: {out.decode()}") from None
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(errors="replace"))


async def cli(
    site: DemoSite,
    *args: str,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
    stdin: bytes | None = None,
) -> Run:
    return await finish(await start_cli(site, *args, env=env, config=config), stdin)


async def pool(site: DemoSite) -> PoolView:
    balancer = make_balancer(site.topo)
    try:
        return await balancer.read()
    finally:
        await balancer.close()


async def admissions(site: DemoSite) -> dict[str, Admission | None]:
    view = await pool(site)
    return {c.name: cluster_admission(view, c.name) for c in site.topo.clusters}


async def all_live(site: DemoSite) -> bool:
    view = await pool(site)
    return all(m.admission is Admission.LIVE and m.healthy for m in view.members)


async def requests_served(site: DemoSite) -> int:
    served = total((await pool(site)).members, "requests")
    assert served is not None, "the embedded balancer counts requests"
    return served


async def traffic_flows(site: DemoSite, at_least: int = 50) -> None:
    """Wait until the balancer forwarded `at_least` more requests (the probe is up)."""
    start = await requests_served(site)

    async def grown() -> bool:
        return await requests_served(site) >= start + at_least

    await wait_until(grown, timeout=30, interval=0.1, what="probe traffic through the balancer")


async def versions_by_member(site: DemoSite, path: str = "/version") -> dict[str, str | None]:
    """What each member answers now (None: not answering)."""
    out: dict[str, str | None] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for _, member in site.topo.members():
            try:
                async with http.get(member.base_url + path) as resp:
                    out[member.name] = (await resp.text()).strip() if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                out[member.name] = None
    return out


def app_member(site: DemoSite, name: str) -> AppMember:
    return AppMember(site.root / "apps", name)


def running_versions(site: DemoSite, cluster: str) -> dict[str, str | None]:
    """The version each member's app process runs (None: no process), from appctl's files."""
    out: dict[str, str | None] = {}
    for member in site.topo.cluster(cluster).members:
        proc = app_member(site, member.name).process()
        out[member.name] = running_version(proc) if proc else None
    return out


def deployed_versions(site: DemoSite, cluster: str) -> dict[str, str | None]:
    return {m.name: app_member(site, m.name).deployed() for m in site.topo.cluster(cluster).members}


def journal(site: DemoSite) -> Journal:
    return open_journal(site.topo)


def unfinished(site: DemoSite) -> J.ReleaseRow | None:
    j = journal(site)
    try:
        return j.unfinished(site.topo.site.name)
    finally:
        j.close()


def lock_holder(site: DemoSite) -> J.LockInfo | None:
    j = journal(site)
    try:
        return j.lock_holder(site.topo.site.name)
    finally:
        j.close()


def releases(site: DemoSite, limit: int = 20) -> list[J.ReleaseRow]:
    j = journal(site)
    try:
        return j.releases(site.topo.site.name, limit)
    finally:
        j.close()


def outputs(site: DemoSite, release_id: int) -> list[J.OutputRow]:
    j = journal(site)
    try:
        return j.outputs(release_id)
    finally:
        j.close()


def newest(site: DemoSite) -> J.ReleaseRow:
    with_journal = journal(site)
    try:
        rows = with_journal.releases(site.topo.site.name, 1)
    finally:
        with_journal.close()
    assert rows, "no release in the journal"
    return rows[0]


def step_states(site: DemoSite, release_id: int) -> dict[str, str]:
    j = journal(site)
    try:
        return {s.step_id: s.state for s in j.steps(release_id)}
    finally:
        j.close()


def failed_steps(site: DemoSite, release_id: int) -> list[tuple[str, str | None]]:
    """(step id, detail) of each failed step of a release: why it failed."""
    j = journal(site)
    try:
        return [(s.step_id, s.detail) for s in j.steps(release_id) if s.state == J.STEP_FAILED]
    finally:
        j.close()


def show(site: DemoSite, release_id: int) -> dict[str, Any]:
    """`changeover show N --json`, in process (same code path, no interpreter start-up)."""
    from changeover.releases import describe_release

    j = journal(site)
    try:
        return describe_release(j, release_id, detail=True)
    finally:
        j.close()


async def step_running(site: DemoSite, step_id: str, timeout: float = 60) -> int:
    """Wait until the unfinished release's `step_id` is running; its release id."""
    return await _step_of_unfinished(site, step_id, None, None, timeout)


async def awaiting_approval(
    site: DemoSite, step_id: str, journal: Journal | None = None, timeout: float = 60
) -> int:
    """Wait until the unfinished release awaits approval in `step_id` (in the
    journal `journal`, else the site's); its release id."""
    return await _step_of_unfinished(site, step_id, J.AWAITING_APPROVAL, journal, timeout)


async def _step_of_unfinished(
    site: DemoSite, step_id: str, state: str | None, journal: Journal | None, timeout: float
) -> int:
    """Wait until the unfinished release (in `state`, if given) runs `step_id`."""
    reading = journal or open_journal(site.topo)
    found: list[int] = []

    def there() -> bool:
        row = reading.unfinished(site.topo.site.name)
        if row is None or state not in (None, row.state):
            return False
        if any(s.step_id == step_id and s.state == J.STEP_RUNNING for s in reading.steps(row.id)):
            found.append(row.id)
            return True
        return False

    what = f"{step_id} {'running' if state is None else state}"
    try:
        await wait_until(there, timeout=timeout, interval=0.02, what=what)
    finally:
        if journal is None:
            reading.close()
    return found[0]


async def versions_at(url: str, count: int = 20) -> set[str]:
    """The versions `count` GETs of `url`/version were answered with."""
    async with aiohttp.ClientSession() as http:
        seen = set()
        for _ in range(count):
            async with http.get(url + "/version") as resp:
                seen.add((await resp.text()).strip())
        return seen


def plan_ids(plan_json: str) -> list[str]:
    return [s["id"] for s in json.loads(plan_json)["steps"]]


async def restored(site: DemoSite) -> str:
    """The site clean for the next test of a module-scoped site, whatever the
    last one left (a test that failed half-way must not fail the ones after it):
    no unfinished release or lock, every member running one version and live.
    Returns that version. A clean site is left untouched."""
    faults_cleared(site)
    j = journal(site)
    try:
        row = j.unfinished(site.topo.site.name)
        if row is not None:
            j.set_state(row.id, J.ABORTED, "reset by the test harness")
        j.force_unlock(site.topo.site.name)
    finally:
        j.close()
    versions = set((await versions_by_member(site)).values())
    if len(versions) != 1 or None in versions:
        known = sorted(v for v in versions if v is not None)
        await site.restart_members(known[-1] if known else site.opts.from_version)
        versions = set((await versions_by_member(site)).values())
    if not await all_live(site):
        balancer = make_balancer(site.topo)
        try:
            await balancer.apply({m.name: Admission.LIVE for _, m in site.topo.members()})
        finally:
            await balancer.close()
        await wait_until(lambda: all_live(site), timeout=30, what="every member live")
    (version,) = versions
    assert version is not None
    return version


def faults_cleared(site: DemoSite) -> None:
    for _, member in site.topo.members():
        d = app_member(site, member.name).dir
        for name in ("fail-start", "unhealthy", "report-version", "errors"):
            (d / name).unlink(missing_ok=True)
