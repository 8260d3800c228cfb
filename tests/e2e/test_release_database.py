"""End to end with a shared PostgreSQL: expand migrations under the probe, the
check as a gate, and the old release's live check stopping a forced release."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from changeover import journal as J
from changeover.balancers.factory import make_balancer
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.model import Admission
from changeover.runtime import open_journal
from changeover.steps import StepKind
from tests.e2e import support as S
from tests.postgres import Postgres, running_postgres

RATE = 100.0
CLI_TIMEOUT = 180.0
pytestmark = [pytest.mark.slow, pytest.mark.real]

# The schema release 1.0 runs on; its GET /db reads id, name and email.
SCHEMA = (
    "CREATE TABLE users (id integer PRIMARY KEY, name text NOT NULL, email text);"
    "INSERT INTO users VALUES (1, 'ada', 'ada@example.com'), (2, 'bob', NULL)"
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
async def site(tmp_path: Path, postgres: Postgres) -> AsyncIterator[DemoSite]:
    with postgres.database() as url:
        with psycopg.connect(url) as conn:
            conn.execute(SCHEMA)
        (tmp_path / "migrations").mkdir()
        opts = DemoOptions(
            members_per_cluster=2,
            startup_delay=0.3,
            database_url=url,
            migrations_dir=tmp_path / "migrations",
        )
        demo = DemoSite(tmp_path, opts)
        async with demo.running():
            yield demo


def migration(site: DemoSite, name: str, statement: str) -> None:
    assert site.opts.migrations_dir is not None
    (site.opts.migrations_dir / name).write_text(
        f"SET lock_timeout = '2s'; SET statement_timeout = '5s';\n{statement}\n"
    )


def columns(site: DemoSite) -> list[str]:
    assert site.opts.database_url is not None
    with psycopg.connect(site.opts.database_url) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'users' ORDER BY ordinal_position"
        ).fetchall()
    return [row[0] for row in rows]


async def release(site: DemoSite, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", "release", "2.0", *args, "-c", str(site.config),
        env=site.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def admissions(site: DemoSite) -> set[Admission]:
    balancer = make_balancer(site.topo)
    try:
        return {m.admission for m in (await balancer.read()).members}
    finally:
        await balancer.close()


async def versions_served(site: DemoSite) -> set[str | None]:
    return set((await S.versions_by_member(site)).values())


async def test_expand_adding_a_nullable_column_releases_with_zero_failed_requests(
    site: DemoSite,
) -> None:
    migration(site, "0002_expand_add_nickname.sql", "ALTER TABLE users ADD COLUMN nickname text;")
    async with site.probe(RATE, sticky_users=20) as probe:
        code, output = await release(site)
        report = await probe.finish()
    assert code == 0, output
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0
    assert report.sessions_cut == 0
    assert report.version_flaps == 0
    assert set(report.versions_seen) == {"1.0", "2.0"}
    assert columns(site) == ["id", "name", "email", "nickname"]
    journal = open_journal(site.topo)
    (row,) = journal.releases(site.topo.site.name)
    steps = {s.step_id: s for s in journal.steps(row.id)}
    assert all(s.state == J.STEP_DONE for s in steps.values())
    assert steps["migrate-expand"].detail == "applied 0002_expand_add_nickname.sql"
    assert steps["migrate-contract"].detail == "no pending contract migrations"
    # What the check read is journaled: a resume applies only those files, unedited.
    (pins,) = [e.message for e in journal.events(row.id) if e.kind == J.MIGRATION_PINS]
    assert "0002_expand_add_nickname.sql" in json.loads(pins)["files"]
    async with aiohttp.ClientSession() as http, http.get(site.public_url + "/db") as resp:
        assert resp.status == 200
        assert (await resp.json())["version"] == "2.0"


async def test_expand_dropping_a_column_the_old_release_reads_is_refused(site: DemoSite) -> None:
    migration(site, "0002_expand_drop_email.sql", "ALTER TABLE users DROP COLUMN email;")
    code, output = await release(site)
    assert code == 3, output
    assert "0002_expand_drop_email.sql:2: error [ban-drop-column]" in output
    assert "refused" in output
    # Nothing was applied or recorded, nothing was planned, the pool is as it was.
    assert columns(site) == ["id", "name", "email"]
    with psycopg.connect(site.opts.database_url or "") as conn:
        assert conn.execute("SELECT to_regclass('changeover_migrations')").fetchone() == (None,)
    assert open_journal(site.topo).releases(site.topo.site.name) == []
    assert await admissions(site) == {Admission.LIVE}
    assert await versions_served(site) == {"1.0"}


async def test_forced_drop_is_caught_by_the_old_release_checks_before_any_swap(
    site: DemoSite,
) -> None:
    migration(site, "0002_expand_drop_email.sql", "ALTER TABLE users DROP COLUMN email;")
    reason = "email moved to the accounts service"
    async with site.probe(RATE, sticky_users=20) as probe:
        code, output = await release(site, "--allow", "ban-drop-column", "--reason", reason)
        report = await probe.finish()
    assert code == 1, output
    journal = open_journal(site.topo)
    (row,) = journal.releases(site.topo.site.name)
    assert row.state == J.FAILED
    assert row.error is not None
    assert "expand migration(s) 0002_expand_drop_email.sql" in row.error
    assert "GET /db" in row.error and "stopped before any swap" in row.error
    steps = {s.step_id: s.state for s in journal.steps(row.id)}
    assert steps["migrate-expand"] == J.STEP_DONE
    assert steps["verify-live"] == J.STEP_FAILED
    admits = {s["id"] for s in row.plan if s["kind"] == StepKind.ADMIT}
    assert admits and all(steps[a] != J.STEP_DONE for a in admits)  # no cluster was moved
    allow = [e.message for e in journal.events(row.id) if e.kind == "allow"]
    assert len(allow) == 1 and reason in allow[0] and "ban-drop-column" in allow[0]
    assert await admissions(site) == {Admission.LIVE}
    assert await versions_served(site) == {"1.0"}
    # The probe reads `/`, which does not touch the database: the site kept serving.
    assert report.sent > 0
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.passed
