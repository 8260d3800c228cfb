"""`status` (and `status --watch`), `history` and `show`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from changeover import journal as J
from changeover.commands import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_STOPPED
from changeover.commands.common import load_config, service, state_exit
from changeover.commands.output import err, fail, out, print_json
from changeover.config import Topology
from changeover.releases import Releases, SiteStatus


def status_data(now: SiteStatus) -> dict[str, Any]:
    """`status --json`: the documented shape (README, "Machine-readable output")."""
    view = now.view
    return {
        "pool": None
        if view is None
        else [
            {
                "name": m.name,
                "cluster": m.cluster,
                "admission": m.admission.value,
                "healthy": m.healthy,
                "active": m.active,
                "version": now.versions.get(m.name),
            }
            for m in view.members
        ],
        "awaiting_approval": dataclasses.asdict(now.awaiting) if now.awaiting else None,
        "kept": dataclasses.asdict(now.kept) if now.kept else None,
        "balancer_error": now.balancer_error,
        "release": now.release,
        "lock": now.lock.describe() if now.lock else None,
        "kept_out": now.kept_out,
        "warning": now.warning,
    }


def status(config: Path, json_out: bool) -> None:
    topo = load_config(config)
    now = service(topo, lambda r: r.status())
    if json_out:
        print_json(status_data(now))
    else:
        print_status(topo, now)
    if now.view is None:
        raise typer.Exit(EXIT_FAILED)


def print_status(topo: Topology, now: SiteStatus) -> None:
    view = now.view
    if view is None:
        err.print(f"[red]balancer unreachable:[/] {escape(now.balancer_error or '')}")
    else:
        table = Table(title=f"pool of {escape(topo.site.name)}")
        for col in ("cluster", "member", "admission", "health", "in flight", "version"):
            table.add_column(col)
        colour = {"live": "green", "draining": "yellow", "out": "red"}
        for m in view.members:
            table.add_row(
                escape(m.cluster),
                escape(m.name),
                f"[{colour[m.admission.value]}]{m.admission.value}[/]",
                "up" if m.healthy else "[red]down[/]",
                "not counted" if m.active is None else str(m.active),
                escape(now.versions.get(m.name) or "-"),
            )
        out.print(table)
    pending = now.release
    if pending:
        done = sum(1 for s in pending["steps"] if s["state"] == J.STEP_DONE)
        out.print(
            f"release #{pending['id']} {escape(repr(pending['version']))}: "
            f"[bold]{pending['state']}[/], {done}/{len(pending['steps'])} steps done"
            + (f"; {escape(pending['error'])}" if pending["error"] else ""),
            highlight=False,
        )
    else:
        out.print("no release in progress")
    if now.kept_out:
        out.print(
            f"kept out of the live pool by release #{now.kept_by} after failing a step: "
            f"{', '.join(now.kept_out)} (the next release brings them back)",
            highlight=False,
            markup=False,
        )
    for line in status_notes(now):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if now.lock:
        stale = " (stale: its process is gone)" if now.lock.is_stale() else ""
        out.print(f"lock: {now.lock.describe()}{stale}", highlight=False, markup=False)
    if now.warning:
        out.print(
            f"[bold yellow]warning:[/] {escape(now.warning)}", highlight=False, soft_wrap=True
        )


def status_notes(now: SiteStatus) -> list[str]:
    """The approval a release waits for, and what bluegreen kept for a rollback."""
    notes = []
    if now.awaiting:
        wait = now.awaiting
        where = (
            f"QA at {wait.qa_url}" + (f" (Host: {wait.qa_host})" if wait.qa_host else "")
            if wait.qa_url
            else "no QA entry point"
        )
        notes.append(
            f"awaiting approval of {wait.cluster}: {where}; "
            "`changeover approve` (or `changeover abort`)"
        )
    if now.kept:
        minutes, seconds = divmod(max(0, int(now.kept.seconds_left)), 60)
        notes.append(
            f"kept for an instant rollback: {', '.join(now.kept.clusters)} (draining, on "
            f"{now.kept.version!r}) for {minutes}m {seconds:02d}s more (policy.keep_previous)"
        )
    return notes


# --- status --watch -------------------------------------------------------------------

# A release still moving: the others (failed, aborted, interrupted, done, ...) have ended.
_MOVING = (J.RUNNING, J.AWAITING_APPROVAL)


def _moving(release: dict[str, Any], now: SiteStatus) -> bool:
    """The release runs or waits for approval, and its process is there (holds
    the lock): one that failed, stopped or lost its process has ended."""
    return release["state"] in _MOVING and now.lock is not None and not now.lock.is_stale()


def _progress(release: dict[str, Any], clock: float) -> str:
    """One line for a long wait: which step runs, for how long."""
    steps = release["steps"]
    done = sum(1 for s in steps if s["state"] == J.STEP_DONE)
    running = next((s for s in steps if s["state"] == J.STEP_RUNNING), None)
    where = (
        f"{running['id']} ({running['description']}) for {clock - running['started']:.0f}s"
        if running and running["started"]
        else "between steps"
    )
    return (
        f"release #{release['id']} {release['version']!r}: {release['state']}, "
        f"{done}/{len(steps)} steps done; {where}"
    )


class Watch:
    """Follows the site until the release in progress (or, when none is, the
    next one to begin) ends: prints the status on every change, or one JSON line
    per change; a progress line while nothing changes for `progress` seconds."""

    def __init__(self, topo: Topology, json_out: bool, interval: float, progress: float) -> None:
        self.topo = topo
        self.json_out = json_out
        self.interval = interval
        self.progress = progress
        self.stop = asyncio.Event()

    async def __call__(self, releases: Releases) -> int:
        # Ctrl-C ends the watch (the release it follows runs on, in its own process).
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        followed: int | None = None
        last: str | None = None
        quiet_since = time.monotonic()
        while True:
            now = await releases.status()
            data = status_data(now)
            pending = now.release
            if followed is None and pending is not None and _moving(pending, now):
                followed = pending["id"]
            release = pending if pending is not None and pending["id"] == followed else None
            if release is None and followed is not None:
                # Done, or superseded: no longer the unfinished one.
                release = await releases.describe(followed)
                data["release"] = release
            shown = json.dumps(data, sort_keys=True, default=str)
            if shown != last:
                self.show(now, data)
                last, quiet_since = shown, time.monotonic()
            elif release is not None and time.monotonic() - quiet_since >= self.progress:
                self.say(_progress(release, time.time()), release)
                quiet_since = time.monotonic()
            if release is not None and not _moving(release, now):
                return state_exit(release["state"])
            try:
                await asyncio.wait_for(self.stop.wait(), self.interval)
            except TimeoutError:
                continue
            return EXIT_STOPPED

    def show(self, now: SiteStatus, data: dict[str, Any]) -> None:
        if self.json_out:
            print(json.dumps(data, default=str), flush=True)
        else:
            out.rule(time.strftime("%H:%M:%S"), style="dim")
            print_status(self.topo, now)

    def say(self, line: str, release: dict[str, Any]) -> None:
        if self.json_out:
            print(json.dumps({"progress": line, "release": release}, default=str), flush=True)
        else:
            out.print(line, highlight=False, markup=False, soft_wrap=True)


def watch(config: Path, json_out: bool, interval: float, progress: float) -> None:
    topo = load_config(config)
    raise typer.Exit(service(topo, Watch(topo, json_out, interval, progress)))


# --- the record -------------------------------------------------------------------------


def history(config: Path, json_out: bool, limit: int) -> None:
    topo = load_config(config)

    async def read(r: Releases) -> list[dict[str, Any]]:
        return [await r.describe(row.id) for row in await r.history(limit)]

    rows = service(topo, read)
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"releases of {escape(topo.site.name)}")
    for col in ("#", "version", "previous", "kind", "state", "started", "took", "by"):
        table.add_column(col)
    for r in rows:
        took = f"{r['finished'] - r['started']:.1f}s" if r["finished"] else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
        table.add_row(
            str(r["id"]),
            escape(r["version"]),
            escape(r["previous_version"] or "-"),
            r["kind"],
            r["state"],
            started,
            took,
            escape(f"{r['user']}@{r['host']}"),
        )
    out.print(table)


def show(config: Path, release_id: int, json_out: bool) -> None:
    topo = load_config(config)
    try:
        data = service(topo, lambda r: r.describe(release_id, detail=True))
    except KeyError:
        fail(EXIT_BAD_INPUT, f"no release #{release_id}")
    if json_out:
        print_json(data)
        return
    outputs = data["outputs"]
    out.print(
        f"[bold]release #{data['id']}[/] {escape(repr(data['version']))} "
        f"({data['kind']}, {data['strategy']}) "
        f"by {escape(data['user'])}@{escape(data['host'])}: {data['state']}",
        highlight=False,
    )
    if data["error"]:
        out.print(f"[red]{escape(data['error'])}[/]", highlight=False)
    for i, s in enumerate(data["steps"]):
        took = f"{s['finished'] - s['started']:.1f}s" if s["finished"] and s["started"] else ""
        out.print(
            f"{i + 1:>3}. {s['state']:<8} {took:>7} {s['description']}"
            + (f": {s['detail']}" if s["detail"] else ""),
            highlight=False,
            markup=False,
        )
        for o in (o for o in outputs if o["idx"] == i):
            status_text = (
                "timeout/unreachable" if o["exit_status"] is None else f"exit {o['exit_status']}"
            )
            out.print(f"       {o['member']}: {status_text} in {o['seconds']:.2f}s", markup=False)
            for line in o["output"].strip().splitlines()[-5:]:
                out.print(f"         | {line}", markup=False, highlight=False)
