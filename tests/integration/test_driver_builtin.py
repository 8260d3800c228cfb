"""The builtin driver against the embedded balancer, and the probe watching any
driver through a changeover.toml (`--watch-config`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

from changeover.balancers.builtin import BuiltinBalancer
from changeover.probe import ProbeReport
from tests.helpers import free_port, wait_until
from tests.integration.proxy_fixtures import TOKEN, FakeMember, balancer_site, members

HOST = "127.0.0.1"


async def test_read_at_start_up_never_reports_an_unchecked_member_healthy(tmp_path: Path) -> None:
    """A member that is down when the balancer starts is not reported healthy by
    the very first read (it used to be, until `fall` checks had failed), so
    whoever waits for health does not go ahead with every member still down."""
    dead = FakeMember(name="a2", cluster="a", route="a2", port=free_port())  # nothing listens
    async with (
        members({"a": ["a1"], "b": ["b1"]}) as started,
        balancer_site(tmp_path, [started[0], dead, started[1]]) as site,
    ):
        driver = BuiltinBalancer(site.admin, TOKEN)
        try:
            first = await driver.read()  # as soon as the admin API answers
        finally:
            await driver.close()
    health = {m.name: m.healthy for m in first.members}
    assert health == {"a1": True, "a2": False, "b1": True}
    assert "member a2 is down" in site.log_text()


async def _probe(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.probe", *argv,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_probe_watch_config_reads_the_balancer_the_config_names(tmp_path: Path) -> None:
    """`--watch-config FILE` builds the driver from the topology (here the builtin
    one, token from the config) and counts its admission reads."""
    async with (
        members({"a": ["a1"], "b": ["b1"]}) as started,
        balancer_site(tmp_path, started) as site,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "changeover.probe", site.public + "/",
            "--rate=50", "--duration=60", "--sticky-users=5", "--json",
            f"--watch-config={site.config}",
            env={k: v for k, v in os.environ.items() if k != "CHANGEOVER_ADMIN_TOKEN"},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

        async def served() -> bool:
            async with aiohttp.ClientSession() as http:
                pool = await site.pool(http)
            return sum(int(m["requests"]) for m in pool.values()) >= 20

        await wait_until(served, what="probe traffic")
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    report = ProbeReport.from_dict(json.loads(out))
    assert report.watched and report.admission_reads >= 1
    assert report.admission_read_failures == 0 and report.failed == 0


async def test_probe_watch_config_refuses_a_bad_config_and_both_watchers(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    code, out, err = await _probe([f"http://{HOST}:1/", f"--watch-config={missing}"])
    assert code == 2 and out == ""
    assert str(missing) in err
    code, _, err = await _probe(
        [f"http://{HOST}:1/", f"--watch-config={missing}", f"--watch-admin=http://{HOST}:1"]
    )
    assert code == 2 and "not allowed with" in err
