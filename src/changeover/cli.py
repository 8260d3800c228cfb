"""The `changeover` command line (Typer + Rich).

Exit codes (documented in README and `changeover --help`):
0 success; 1 the release (or check) failed; 2 bad input (config, arguments);
3 refused by the release lock, an interlock or the migration check; 4 stopped at a safe point
(Ctrl-C or `changeover abort`), resumable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# typer's own click: the usage errors it raises when not in standalone mode.
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from yarl import URL

from changeover import __version__
from changeover import journal as J
from changeover.balancers.base import BalancerError
from changeover.balancers.factory import make_balancer
from changeover.config import DEFAULT_CONFIG, ConfigError, Topology, load
from changeover.journal import JournalError, LockHeld
from changeover.migrations import format_findings
from changeover.migrations.cli import app as migrations_app
from changeover.plan import PlanRefused, describe, make_plan
from changeover.ports import MigrationError, Review
from changeover.releases import (
    BadRequest,
    Begin,
    GateRefused,
    Outcome,
    Releases,
    SiteStatus,
    operator,
)
from changeover.runtime import make_executor, review, with_releases

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_STOPPED = 0, 1, 2, 3, 4

HELP = f"""Zero-downtime releases across separate clusters behind a load balancer.

A release drains one cluster out of the live pool, stops, deploys, starts and
checks it, lets QA test it through its own entry point, then puts it live and
drains the next one in a single balancer change, and so on.

Exit codes: {EXIT_OK} success, {EXIT_FAILED} release/check failed,
{EXIT_BAD_INPUT} bad input, {EXIT_REFUSED} refused by the lock, an interlock or
the migration check, {EXIT_STOPPED} stopped at a safe point (resumable).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode=None, add_completion=False)
balancer_app = typer.Typer(help="Run the embedded balancer.", no_args_is_help=True)
app.add_typer(balancer_app, name="balancer")
app.add_typer(
    migrations_app, name="migrations", help="Check migrations for expand/contract safety."
)

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", envvar="CHANGEOVER_CONFIG", help="Topology file.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]

T = TypeVar("T")


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"changeover {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    pass


def _print_error(message: str) -> None:
    # The message carries user text (versions, paths, rule names): data, not markup.
    err.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True
    )


def fail(code: int, message: str) -> NoReturn:
    _print_error(message)
    raise typer.Exit(code)


def _load(path: Path) -> Topology:
    try:
        return load(path)
    except ConfigError as exc:
        fail(EXIT_BAD_INPUT, str(exc))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, mapping the expected failures to exit codes."""
    try:
        return asyncio.run(coro)
    except (ConfigError, JournalError, BadRequest) as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    except GateRefused as exc:
        err.print(
            format_findings(exc.findings, "text"), markup=False, highlight=False, soft_wrap=True
        )
        fail(EXIT_REFUSED, str(exc))
    except LockHeld as exc:
        fail(EXIT_REFUSED, f"another release holds the lock: {exc}")
    except PlanRefused as exc:
        fail(EXIT_REFUSED, str(exc))
    except (BalancerError, MigrationError) as exc:
        fail(EXIT_FAILED, str(exc))


def _service(
    topo: Topology, call: Callable[[Releases], Awaitable[T]], console: Console | None = None
) -> T:
    """Call the release service with the site's ports, mapping failures to exit codes."""
    return _run(with_releases(topo, call, console or out))


# --- topology --------------------------------------------------------------------


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter file.")] = Path(
        DEFAULT_CONFIG
    ),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter changeover.toml."""
    from changeover.starter import STARTER

    if path.exists() and not force:
        fail(EXIT_BAD_INPUT, f"{path} exists (use --force to overwrite)")
    try:
        path.write_text(STARTER)
    except OSError as exc:
        fail(EXIT_BAD_INPUT, f"{path}: cannot write: {exc.strerror}")
    out.print(f"wrote {path}; edit it, then run `changeover check -c {path}`")


@app.command()
def check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    reach: Annotated[
        bool, typer.Option("--reach", help="Also run a trivial command on every member.")
    ] = False,
) -> None:
    """Validate the topology and print it as a table."""
    topo = _load(config)
    from changeover.balancers.factory import COUNTS
    from changeover.policy import error_ratio_refusal

    refusal = error_ratio_refusal(topo, COUNTS[topo.balancer.driver])
    if refusal is not None:
        fail(EXIT_BAD_INPUT, f"{config}: {refusal}")
    table = Table(title=f"site {topo.site.name} ({config})")
    for col in ("cluster", "member", "address", "route", "QA entry point"):
        table.add_column(col)
    for cluster, member in topo.members():
        qa = ", ".join(
            x
            for x in (
                f"port {cluster.qa_port}" if cluster.qa_port else "",
                f"Host {cluster.qa_host}" if cluster.qa_host else "",
            )
            if x
        )
        table.add_row(
            cluster.name,
            member.name,
            f"{member.host}:{member.port}",
            member.route_id,
            escape(qa) or "-",
        )
    out.print(table)
    bal, pol = topo.balancer, topo.policy
    out.print(
        f"balancer: {bal.driver}, public {bal.listen}, sticky cookie {bal.sticky_cookie}, "
        f"{bal.algorithm}; executor: {topo.executor.kind}; strategy {pol.strategy}, "
        f"order {' -> '.join(topo.cluster_order())}, approval {pol.approval}, "
        f"min_healthy {pol.min_healthy}"
    )
    from changeover.tls import expiry_warnings

    for warning in expiry_warnings(topo, datetime.datetime.now(datetime.UTC)):
        out.print(f"warning: {warning}", markup=False, highlight=False)
    if reach:
        _check_reach(topo)


def _check_reach(topo: Topology) -> None:
    from changeover.executors.reach import reach as reach_all

    async def go() -> list[Any]:
        executor = make_executor(topo)
        try:
            return await reach_all(topo, executor)
        finally:
            await executor.close()

    results = _run(go())
    table = Table(title="reachability")
    for col in ("member", "host", "node", "reachable", "seconds", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.member,
            r.host,
            r.node or "-",  # what the host calls itself: catches an address that reaches another
            "[green]yes[/]" if r.ok else "[red]no[/]",
            f"{r.seconds:.2f}",
            r.error or "",
        )
    out.print(table)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


@app.command("render")
def render_config(
    driver: Annotated[str, typer.Argument(help="apache, haproxy or nginx.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    instance: Annotated[
        str | None, typer.Option(help="Which balancer.instances entry (default: the first).")
    ] = None,
    current: Annotated[
        bool, typer.Option(help="Each member's admission as the running balancer has it.")
    ] = False,
) -> None:
    """Write the complete balancer config for the topology (QA entry points included);
    every member live unless --current."""
    from changeover.balancers.render import RenderError, RenderOptions, render

    topo = _load(config)
    chosen = next((i for i in topo.balancer.instances if i.name == instance), None)
    if instance and chosen is None:
        fail(EXIT_BAD_INPUT, f"no balancer instance named {instance!r} in {config}")
    chosen = chosen or (topo.balancer.instances[0] if topo.balancer.instances else None)
    admissions = None
    if current:

        async def read() -> dict[str, Any]:
            balancer = make_balancer(topo)
            try:
                return dict((await balancer.read()).admissions())
            finally:
                await balancer.close()

        admissions = _run(read())
    run_dir = chosen.run_dir if chosen and chosen.run_dir else None
    options = RenderOptions(
        instance=chosen,
        run_dir=topo.resolve_path(run_dir) if run_dir else None,
        template_dir=topo.resolve_path(topo.balancer.template_dir)
        if topo.balancer.template_dir
        else None,
    )
    try:
        text = render(topo, driver, admissions, options=options)
    except RenderError as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        err.print(f"wrote {output}")


# --- planning and releasing -------------------------------------------------------


AllowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow",
        metavar="RULE",
        help="Accept the migration check's findings of RULE (repeatable; needs --reason).",
    ),
]
ReasonOpt = Annotated[
    str | None,
    typer.Option(help="Why the allowed findings are safe here; written to the journal."),
]
FirstOpt = Annotated[
    bool,
    typer.Option(
        "--first",
        help="First deploy of a site that serves nothing yet: every cluster out of "
        "service, each deployed and checked, then put live.",
    ),
]


def _reviewed(topo: Topology, begin: Begin) -> Review | None:
    """The migration gate of `plan` (exit 3 with the findings printed when refused)."""
    return _run(review(topo, begin))


@app.command()
def plan(
    version: Annotated[str, typer.Argument(help="The version to release.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    offline: Annotated[
        bool, typer.Option(help="Plan without reading the balancer (no interlock check).")
    ] = False,
    allow: AllowOpt = None,
    reason: ReasonOpt = None,
    first: FirstOpt = False,
) -> None:
    """Print the ordered steps of a release and check its migrations; touches nothing."""
    topo = _load(config)
    begin = Begin(version, tuple(allow or ()), reason, first)
    found = _reviewed(topo, begin)

    async def go() -> list[Any]:
        view = None
        if not offline:
            balancer = make_balancer(topo)
            try:
                view = await balancer.read()
            except BalancerError as exc:
                # Not a failed release (exit 1): the plan could not be checked against the pool.
                fail(
                    EXIT_BAD_INPUT,
                    f"cannot read the balancer: {exc}; `changeover plan --offline` plans "
                    "without it (no interlock check)",
                )
            finally:
                await balancer.close()
        return make_plan(topo, version, view, first=first)

    steps = _run(go())
    if json_out:
        data: dict[str, Any] = {"version": version, "steps": [s.to_dict() for s in steps]}
        if found is not None:
            data["migrations"] = {
                "pending": found.pending,
                "allowed_findings": [dataclasses.asdict(f) for f in found.findings],
            }
        print(json.dumps(data, indent=2))
        return
    out.print(
        f"[bold]plan[/]: release {escape(repr(version))} to {topo.site.name}", highlight=False
    )
    for line in describe(steps):
        out.print(line, highlight=False, markup=False)
    if found is not None:
        pending = "; ".join(f"{p}: {', '.join(n) or 'none'}" for p, n in found.pending.items())
        out.print(f"pending migrations: {pending}", highlight=False, markup=False, soft_wrap=True)
        note = Releases.allowance(found, begin)
        if note:
            out.print(note, highlight=False, markup=False, soft_wrap=True)


_STATE_EXIT = {
    J.DONE: EXIT_OK,
    J.FAILED: EXIT_FAILED,
    J.ROLLED_BACK: EXIT_FAILED,
    J.INTERRUPTED: EXIT_STOPPED,
}


def _finish(topo: Topology, done: Outcome, json_out: bool) -> None:
    if json_out:
        print(json.dumps(_service(topo, lambda r: r.describe(done.release_id)), indent=2))
    raise typer.Exit(_STATE_EXIT.get(done.state, EXIT_STOPPED))


@app.command()
def release(
    version: Annotated[str, typer.Argument(help="The version to release.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    allow: AllowOpt = None,
    reason: ReasonOpt = None,
    first: FirstOpt = False,
) -> None:
    """Release VERSION to every cluster, one cluster at a time, with zero downtime."""
    topo = _load(config)
    begin = Begin(version, tuple(allow or ()), reason, first)
    done = _service(topo, lambda r: r.release(begin), err if json_out else out)
    _finish(topo, done, json_out)


@app.command()
def rollback(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Go back to the previous version: an instant flip to the clusters a bluegreen
    release kept on it (within policy.keep_previous), else a release of it. After a
    release that failed or was aborted: back to the version that one replaced."""
    topo = _load(config)
    done = _service(topo, lambda r: r.rollback(), err if json_out else out)
    _finish(topo, done, json_out)


@app.command()
def resume(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Continue the unfinished release after a crash, Ctrl-C or a fixed failure."""
    topo = _load(config)
    done = _service(topo, lambda r: r.resume(), err if json_out else out)
    _finish(topo, done, json_out)


@app.command()
def abort(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Stop the release in progress at its next safe point (from another shell).
    It stays resumable: `resume` continues it, `rollback` or a new release
    supersedes it; `status` warns while healthy members are left out."""
    topo = _load(config)
    out.print(_service(topo, lambda r: r.abort(operator())), highlight=False, markup=False)


@app.command()
def approve(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Approve the cluster that a release with approval = "manual" waits for."""
    topo = _load(config)
    out.print(_service(topo, lambda r: r.approve(operator())), highlight=False, markup=False)


@app.command()
def unlock(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    force: Annotated[bool, typer.Option("--force", help="Required: break the lock.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Break the site's release lock (only when its holder is surely gone)."""
    if not force:
        fail(EXIT_BAD_INPUT, "unlock needs --force: it breaks the lock of a release in progress")
    topo = _load(config)
    holder = _service(topo, lambda r: r.lock_holder())
    if holder is None:
        out.print("the site is not locked")
        return
    if not yes and not typer.confirm(f"break the lock held by {holder.describe()}?"):
        raise typer.Exit(EXIT_REFUSED)
    _service(topo, lambda r: r.unlock())
    out.print(f"lock of {holder.describe()} broken", highlight=False, markup=False)


# --- looking ------------------------------------------------------------------------


@app.command()
def status(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Show the pool as the balancer sees it and any release in progress."""
    topo = _load(config)
    now = _service(topo, lambda r: r.status())
    view = now.view
    if json_out:
        print(
            json.dumps(
                {
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
                },
                indent=2,
            )
        )
        return
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
    for line in _status_notes(now):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if now.lock:
        stale = " (stale: its process is gone)" if now.lock.is_stale() else ""
        out.print(f"lock: {now.lock.describe()}{stale}", highlight=False, markup=False)
    if now.warning:
        out.print(
            f"[bold yellow]warning:[/] {escape(now.warning)}", highlight=False, soft_wrap=True
        )
    if view is None:
        raise typer.Exit(EXIT_FAILED)


def _status_notes(now: SiteStatus) -> list[str]:
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


@app.command()
def history(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="How many releases.")] = 20,
) -> None:
    """List past releases, newest first."""
    topo = _load(config)

    async def read(r: Releases) -> list[dict[str, Any]]:
        return [await r.describe(row.id) for row in await r.history(limit)]

    rows = _service(topo, read)
    if json_out:
        print(json.dumps(rows, indent=2))
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


@app.command()
def show(
    release_id: Annotated[
        int, typer.Argument(metavar="RELEASE", min=1, max=2**63 - 1, help="Release number.")
    ],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
) -> None:
    """Show every step of one release with times, outputs and who ran it."""
    topo = _load(config)
    try:
        data = _service(topo, lambda r: r.describe(release_id, detail=True))
    except KeyError:
        fail(EXIT_BAD_INPUT, f"no release #{release_id}")
    if json_out:
        print(json.dumps(data, indent=2, default=str))
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


@app.command()
def desk(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    listen: Annotated[str, typer.Option(help="host:port of the web page and API.")] = (
        "127.0.0.1:8700"
    ),
) -> None:
    """Serve the release desk: the web page, its JSON API under /api/ and /metrics."""
    from changeover.config import parse_hostport
    from changeover.desk.app import Desk, serve
    from changeover.desk.auth import load_tokens

    topo = _load(config)
    try:
        host, port = parse_hostport(listen)
        tokens = load_tokens(topo, os.environ)
    except (ConfigError, ValueError) as exc:
        fail(EXIT_BAD_INPUT, str(exc))

    def ready(url: str) -> None:
        out.print(f"desk of {topo.site.name} on {url}", highlight=False, markup=False)

    _service(topo, lambda r: serve(Desk(topo, r, tokens), host, port, ready))


# --- the embedded balancer, the probe and the demo ----------------------------------


WorkersOpt = Annotated[int, typer.Option(min=1, max=64, help="Embedded balancer worker processes.")]


@balancer_app.command("serve")
def balancer_serve(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Worker processes (default: balancer.workers)."),
    ] = None,
) -> None:
    """Serve the live pool, the QA entry points and the admin API."""
    from changeover.proxy.server import run as serve

    raise typer.Exit(serve(_load(config), workers))


def _positive(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"expected a finite number above 0, got {value}")
    return value


def _not_negative(value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"expected a finite number of 0 or more, got {value}")
    return value


def _http_url(value: str | None) -> str | None:
    """An absolute http(s) URL with a host (yarl parses it, as aiohttp will)."""
    if value is None:
        return None
    try:
        url = URL(value)
        ok = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise typer.BadParameter(f"expected an http:// or https:// URL with a host, got {value!r}")
    return value


RateOpt = Annotated[
    float, typer.Option(callback=_positive, help="Probe requests per second, open loop.")
]
UsersOpt = Annotated[
    int, typer.Option(min=1, max=1_000_000, help="Probe virtual users keeping cookies.")
]


@app.command()
def probe(
    url: Annotated[
        str, typer.Argument(callback=_http_url, help="Where to send traffic, e.g. the balancer.")
    ],
    rate: RateOpt = 200.0,
    duration: Annotated[
        float, typer.Option(callback=_not_negative, help="Seconds (Ctrl-C ends early).")
    ] = 10.0,
    sticky_users: UsersOpt = 50,
    json_out: JsonOpt = False,
    host_header: Annotated[str | None, typer.Option(help="Host header to send.")] = None,
    timeout: Annotated[
        float, typer.Option(callback=_positive, help="Per-request timeout, seconds.")
    ] = 2.0,
    insecure: Annotated[bool, typer.Option(help="Do not verify TLS certificates.")] = False,
    watch_admin: Annotated[
        str | None,
        typer.Option(
            callback=_http_url,
            help="Embedded balancer admin URL: moves off an OUT member are no break.",
        ),
    ] = None,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the admin token.")
    ] = "CHANGEOVER_ADMIN_TOKEN",
    watch_config: Annotated[
        Path | None,
        typer.Option(help="changeover.toml: watch its balancer through its driver (any driver)."),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="Trust the CA certificates in this PEM file (a private CA's HTTPS)."),
    ] = None,
    session_mean: Annotated[
        float, typer.Option(help="Seconds a user stays on average (exponential).")
    ] = 3.0,
    session_max: Annotated[float, typer.Option(help="Seconds a user stays at most.")] = 10.0,
) -> None:
    """Send traffic at a fixed rate with sticky users, who think sticky_users/rate
    seconds between requests and leave after a while; report failures, latency,
    broken and cut sessions and version flaps (exit 1 on any)."""
    from changeover.probe import SessionLengths, main_cli

    if watch_admin and watch_config:
        raise typer.BadParameter("give --watch-admin or --watch-config, not both")
    token = os.environ.get(token_env)
    if watch_admin and not token:
        fail(EXIT_BAD_INPUT, f"--watch-admin needs the admin token in ${token_env} (--token-env)")
    try:
        sessions = SessionLengths(session_mean, session_max)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    raise typer.Exit(
        main_cli(
            url,
            rate,
            duration,
            sticky_users,
            json_out,
            host_header,
            timeout,
            insecure,
            watch_admin,
            token,
            out,
            watch_config=watch_config,
            ca_file=ca_file,
            sessions=sessions,
        )
    )


@app.command()
def demo(
    members_per_cluster: Annotated[
        int, typer.Option(min=1, max=200, help="Members in each of the two clusters.")
    ] = 3,
    rate: RateOpt = 200.0,
    sticky_users: UsersOpt = 40,
    workers: WorkersOpt = 1,
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory.")] = False,
) -> None:
    """Release v1 -> v2 across two local clusters behind the embedded balancer,
    under the probe, and print the timeline and the report (exit 1 on any failure)."""
    from changeover.demo.scenario import DemoOptions, run_demo

    opts = DemoOptions(
        members_per_cluster=members_per_cluster,
        rate=rate,
        sticky_users=sticky_users,
        workers=workers,
        keep=keep,
    )
    raise typer.Exit(_run(run_demo(opts, out)))


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        err.print(exc.format_message(), markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except UsageError as exc:  # found before any command ran
        # One line, not the usage block: what was wrong, and where to look.
        where = exc.ctx.command_path if exc.ctx is not None else "changeover"
        _print_error(f"{exc.format_message()} (see `{where} --help`)")
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        err.print("interrupted")
        sys.exit(EXIT_STOPPED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
