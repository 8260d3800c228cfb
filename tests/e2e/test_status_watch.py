"""`changeover status --watch` from another shell follows a real release on the
embedded balancer through its states, prints progress while it waits, and
exits when the release ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from changeover import journal as J
from changeover.demo.scenario import DemoOptions, DemoSite
from tests.e2e import support as S

pytestmark = pytest.mark.slow

LINE_TIMEOUT = 90.0  # one read of the site on a loaded 2-core box, with margin


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[DemoSite]:
    demo = DemoSite(
        tmp_path, DemoOptions(members_per_cluster=1, startup_delay=0.1, approval="manual")
    )
    async with demo.running():
        yield demo


async def next_json(proc: asyncio.subprocess.Process) -> dict[str, Any] | None:
    """The watcher's next JSON line (None at its end); other lines are skipped."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), LINE_TIMEOUT)
        if not line:
            return None
        if line.startswith(b"{"):
            data: dict[str, Any] = json.loads(line)
            return data


def running_step(release: dict[str, Any]) -> str | None:
    return next((s["id"] for s in release["steps"] if s["state"] == J.STEP_RUNNING), None)


async def test_status_watch_follows_a_release_until_it_ends(site: DemoSite) -> None:
    started: list[asyncio.subprocess.Process] = []
    try:
        watch_args = ("status", "--watch", "--interval", "0.2", "--progress", "1")
        watcher = await S.start_cli(site, *watch_args, "--json")
        started.append(watcher)
        text_watcher = await S.start_cli(site, *watch_args)
        started.append(text_watcher)
        text_run = asyncio.create_task(S.finish(text_watcher))  # read as it prints
        first = await next_json(watcher)
        assert first is not None and first["release"] is None  # nothing to follow yet
        assert {m["admission"] for m in first["pool"]} == {"live"}

        release = await S.start_cli(site, "release", "2.0")
        started.append(release)
        states: list[str] = []
        progress_while_waiting: list[str] = []
        approved: list[str] = []
        last: dict[str, Any] | None = None
        while (line := await next_json(watcher)) is not None:
            followed = line["release"]
            if followed is None:  # the lock taken, say, before the release is journaled
                assert not states, line  # once one began, it follows that one
                continue
            if "progress" in line:
                if followed["state"] == J.AWAITING_APPROVAL:
                    progress_while_waiting.append(line["progress"])
            else:
                last = line
                if not states or states[-1] != followed["state"]:
                    states.append(followed["state"])
            step = running_step(followed)
            waiting = followed["state"] == J.AWAITING_APPROVAL and step not in approved
            # The first approval waits for a progress line: a long wait shows it.
            if waiting and step is not None and (approved or progress_while_waiting):
                said = await S.cli(site, "approve", "--json")
                assert said.code == 0, said.output
                assert json.loads(said.output)["message"].startswith(f"approved {step}")
                approved.append(step)

        assert await asyncio.wait_for(watcher.wait(), LINE_TIMEOUT) == 0  # the release is done
        done = await S.finish(release)
        assert done.code == 0, done.output
        assert approved == ["approve-a", "approve-b"]
        assert states[0] == J.RUNNING and states[-1] == J.DONE
        assert J.AWAITING_APPROVAL in states
        assert progress_while_waiting and "approve-a" in progress_while_waiting[0]
        assert last is not None and last["release"]["id"] == S.newest(site).id
        assert all(s["state"] == J.STEP_DONE for s in last["release"]["steps"])
        assert {m["version"] for m in last["pool"]} == {"2.0"}

        text = await text_run
        assert text.code == 0, text.output
        assert (
            "awaiting approval of a" in text.text and f"release #{S.newest(site).id}" in text.text
        )
        assert "approve-a (" in text.text  # its progress line while QA had the cluster
    finally:
        for proc in started:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_status_watch_ends_at_ctrl_c_with_the_release_running_on(site: DemoSite) -> None:
    watcher = await S.start_cli(site, "status", "--watch", "--json", "--interval", "0.2")
    try:
        first = await next_json(watcher)
        assert first is not None and first["release"] is None
        watcher.send_signal(2)  # SIGINT, as Ctrl-C sends it
        assert await asyncio.wait_for(watcher.wait(), LINE_TIMEOUT) == 4
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
