"""The `changeover` command line (Typer + Rich).

Exit codes (documented in README and `changeover --help`):
0 success; 1 the release (or check) failed; 2 bad input (config, arguments);
3 refused by the release lock, an interlock or the migration check; 4 stopped at a safe point
(Ctrl-C or `changeover abort`), resumable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from changeover import __version__
from changeover import journal as J
from changeover.balancers.base import BalancerError
from changeover.balancers.factory import make_balancer
from changeover.config import DEFAULT_CONFIG, ConfigError, Topology, load
from changeover.database import MigrationError, Review, migration_pins
from changeover.database import review as review_migrations
from changeover.engine import Engine, approval_request
from changeover.journal import Journal, JournalError, LockHeld
from changeover.migrations import RULES, format_findings
from changeover.migrations.cli import app as migrations_app
from changeover.plan import PlanRefused, describe, make_plan
from changeover.runtime import make_executor, open_journal, run_engine

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


def fail(code: int, message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
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
    except (ConfigError, JournalError) as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    except LockHeld as exc:
        fail(EXIT_REFUSED, f"another release holds the lock: {exc}")
    except PlanRefused as exc:
        fail(EXIT_REFUSED, str(exc))
    except (BalancerError, MigrationError) as exc:
        fail(EXIT_FAILED, str(exc))


def _journal(topo: Topology) -> Journal:
    try:
        return open_journal(topo)
    except JournalError as exc:
        fail(EXIT_BAD_INPUT, str(exc))


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
    path.write_text(STARTER)
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
            cluster.name, member.name, f"{member.host}:{member.port}", member.route_id, qa or "-"
        )
    out.print(table)
    bal, pol = topo.balancer, topo.policy
    out.print(
        f"balancer: {bal.driver}, public {bal.listen}, sticky cookie {bal.sticky_cookie}, "
        f"{bal.algorithm}; executor: {topo.executor.kind}; strategy {pol.strategy}, "
        f"order {' -> '.join(topo.cluster_order())}, approval {pol.approval}, "
        f"min_healthy {pol.min_healthy}"
    )
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


def _gate(topo: Topology, version: str, allow: list[str], reason: str | None) -> Review | None:
    """Check the migrations this release would apply; refuse (exit 3, the findings
    printed) unless every finding's rule is allowed."""
    unknown = sorted(set(allow) - RULES.keys())
    if unknown:
        fail(EXIT_BAD_INPUT, f"unknown rule(s) for --allow: {', '.join(unknown)}")
    if allow and not (reason or "").strip():
        fail(EXIT_BAD_INPUT, '--allow needs --reason "why this is safe here" (for the journal)')
    if topo.database is None:
        if allow:
            fail(EXIT_BAD_INPUT, r"--allow accepts migration findings, but there is no \[database]")
        return None
    found = _run(review_migrations(topo, version))
    blocking = found.blocking(allow)
    if blocking:
        err.print(format_findings(blocking, "text"), markup=False, highlight=False, soft_wrap=True)
        fail(
            EXIT_REFUSED,
            f"refused: {len(blocking)} migration finding(s) would break the release still "
            'serving or lock a table; fix them, or accept a rule with --allow RULE --reason "..."',
        )
    return found


def _pins(topo: Topology) -> dict[str, str] | None:
    try:
        return migration_pins(topo)
    except (ConfigError, OSError) as exc:
        fail(EXIT_BAD_INPUT, f"database.migrations_dir: {exc}")


def _allowance(found: Review | None, allow: list[str], reason: str | None) -> str | None:
    """The journal's record of what --allow accepted, and why."""
    if found is None or not allow:
        return None
    # Past the gate, every finding is of an allowed rule.
    accepted = "; ".join(f"{f.rule} at {f.path}:{f.line}" for f in found.findings)
    return (
        f"migration check: --allow {', '.join(allow)} --reason {reason!r}; "
        f"accepted {accepted or 'no finding (nothing matched)'}"
    )


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
) -> None:
    """Print the ordered steps of a release and check its migrations; touches nothing."""
    topo = _load(config)
    found = _gate(topo, version, allow or [], reason)

    async def go() -> list[Any]:
        view = None
        if not offline:
            balancer = make_balancer(topo)
            try:
                view = await balancer.read()
            finally:
                await balancer.close()
        return make_plan(topo, version, view)

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
    out.print(f"[bold]plan[/]: release {version!r} to {topo.site.name}", highlight=False)
    for line in describe(steps):
        out.print(line, highlight=False, markup=False)
    if found is not None:
        pending = "; ".join(f"{p}: {', '.join(n) or 'none'}" for p, n in found.pending.items())
        out.print(f"pending migrations: {pending}", highlight=False, markup=False, soft_wrap=True)
        note = _allowance(found, allow or [], reason)
        if note:
            out.print(note, highlight=False, markup=False, soft_wrap=True)


_STATE_EXIT = {
    J.DONE: EXIT_OK,
    J.FAILED: EXIT_FAILED,
    J.ROLLED_BACK: EXIT_FAILED,
    J.INTERRUPTED: EXIT_STOPPED,
}


def _finish(topo: Topology, release_id: int, state: str, json_out: bool) -> None:
    if json_out:
        journal = _journal(topo)
        print(json.dumps(release_json(journal, release_id), indent=2))
    raise typer.Exit(_STATE_EXIT.get(state, EXIT_STOPPED))


@app.command()
def release(
    version: Annotated[str, typer.Argument(help="The version to release.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    allow: AllowOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Release VERSION to every cluster, one cluster at a time, with zero downtime."""
    topo = _load(config)
    console = err if json_out else out
    note = _allowance(_gate(topo, version, allow or [], reason), allow or [], reason)
    pins = _pins(topo)

    async def begin(engine: Engine) -> int:
        release_id = await engine.begin(version)
        if pins is not None:  # files edited before a resume are checked again
            message = json.dumps({"files": pins, "allow": sorted(allow or [])}, sort_keys=True)
            await asyncio.to_thread(engine.journal.add_event, release_id, J.MIGRATION_PINS, message)
        if note:
            await asyncio.to_thread(engine.journal.add_event, release_id, "allow", note)
            console.print(note, highlight=False, markup=False, soft_wrap=True)
        return release_id

    release_id, state = _run(run_engine(topo, begin, console))
    _finish(topo, release_id, state, json_out)


@app.command()
def rollback(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Go back to the previous version: an instant flip to the clusters a bluegreen
    release kept on it (within policy.keep_previous), else a release of it. After a
    release that failed or was aborted: back to the version that one replaced."""
    topo = _load(config)
    console = err if json_out else out
    release_id, state = _run(run_engine(topo, lambda e: e.begin_rollback(), console))
    _finish(topo, release_id, state, json_out)


@app.command()
def resume(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Continue the unfinished release after a crash, Ctrl-C or a fixed failure."""
    topo = _load(config)
    console = err if json_out else out
    release_id, state = _run(run_engine(topo, lambda e: e.take_over(), console))
    _finish(topo, release_id, state, json_out)


@app.command()
def abort(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Stop the release in progress at its next safe point (from another shell)."""
    topo = _load(config)
    journal = _journal(topo)
    row = journal.unfinished(topo.site.name)
    if row is None:
        fail(EXIT_BAD_INPUT, "no release in progress")
    holder = journal.lock_holder(topo.site.name)
    if holder is None or holder.is_stale():
        # Nobody is running it: mark it aborted now; the pool stays as it is.
        journal.set_state(row.id, J.ABORTED, "aborted while not running")
        if holder is not None:
            journal.force_unlock(topo.site.name)
        out.print(
            f"release #{row.id} aborted; the pool was left as it is (see `changeover status`)"
        )
        return
    journal.request(row.id, "abort")
    out.print(f"asked release #{row.id} ({holder.describe()}) to stop at its next safe point")


@app.command()
def approve(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Approve the cluster that a release with approval = "manual" waits for."""
    topo = _load(config)
    journal = _journal(topo)
    row = journal.unfinished(topo.site.name)
    if row is None or row.state != J.AWAITING_APPROVAL:
        fail(EXIT_BAD_INPUT, "no release is awaiting approval")
    running = [s for s in journal.steps(row.id) if s.state == J.STEP_RUNNING]
    if not running:
        fail(EXIT_BAD_INPUT, "no step is awaiting approval")
    journal.request(row.id, approval_request(running[0].step_id))
    out.print(f"approved {running[0].step_id} of release #{row.id}")


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
    journal = _journal(topo)
    holder = journal.lock_holder(topo.site.name)
    if holder is None:
        out.print("the site is not locked")
        return
    if not yes and not typer.confirm(f"break the lock held by {holder.describe()}?"):
        raise typer.Exit(EXIT_REFUSED)
    journal.force_unlock(topo.site.name)
    out.print(f"lock of {holder.describe()} broken")


# --- looking ------------------------------------------------------------------------


def release_json(journal: Journal, release_id: int) -> dict[str, Any]:
    row = journal.release(release_id)
    steps = {s.idx: s for s in journal.steps(release_id)}
    return {
        "id": row.id,
        "site": row.site,
        "version": row.version,
        "previous_version": row.previous_version,
        "strategy": row.strategy,
        "kind": row.kind,
        "state": row.state,
        "error": row.error,
        "started": row.started,
        "finished": row.finished,
        "user": row.user,
        "host": row.host,
        "steps": [
            {
                "id": s["id"],
                "description": s["description"],
                "state": steps[i].state,
                "started": steps[i].started,
                "finished": steps[i].finished,
                "detail": steps[i].detail,
            }
            for i, s in enumerate(row.plan)
        ],
    }


@app.command()
def status(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Show the pool as the balancer sees it and any release in progress."""
    topo = _load(config)
    journal = _journal(topo)

    async def read() -> Any:
        balancer = make_balancer(topo)
        try:
            return await balancer.read()
        except BalancerError as exc:
            return exc
        finally:
            await balancer.close()

    view = asyncio.run(read())
    pending = journal.unfinished(topo.site.name)
    holder = journal.lock_holder(topo.site.name)
    if json_out:
        print(
            json.dumps(
                {
                    "pool": None
                    if isinstance(view, Exception)
                    else [
                        {
                            "name": m.name,
                            "cluster": m.cluster,
                            "admission": m.admission.value,
                            "healthy": m.healthy,
                            "active": m.active,
                        }
                        for m in view.members
                    ],
                    "balancer_error": str(view) if isinstance(view, Exception) else None,
                    "release": release_json(journal, pending.id) if pending else None,
                    "lock": holder.describe() if holder else None,
                },
                indent=2,
            )
        )
        return
    if isinstance(view, Exception):
        err.print(f"[red]balancer unreachable:[/] {view}", highlight=False)
    else:
        table = Table(title=f"pool of {topo.site.name}")
        for col in ("cluster", "member", "admission", "health", "in flight"):
            table.add_column(col)
        colour = {"live": "green", "draining": "yellow", "out": "red"}
        for m in view.members:
            table.add_row(
                m.cluster,
                m.name,
                f"[{colour[m.admission.value]}]{m.admission.value}[/]",
                "up" if m.healthy else "[red]down[/]",
                str(m.active),
            )
        out.print(table)
    if pending:
        done = sum(1 for s in journal.steps(pending.id) if s.state == J.STEP_DONE)
        out.print(
            f"release #{pending.id} {pending.version!r}: [bold]{pending.state}[/], "
            f"{done}/{len(pending.plan)} steps done"
            + (f"; {pending.error}" if pending.error else ""),
            highlight=False,
        )
    else:
        out.print("no release in progress")
    if holder:
        stale = " (stale: its process is gone)" if holder.is_stale() else ""
        out.print(f"lock: {holder.describe()}{stale}", highlight=False)
    if isinstance(view, Exception):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def history(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="How many releases.")] = 20,
) -> None:
    """List past releases, newest first."""
    topo = _load(config)
    journal = _journal(topo)
    rows = journal.releases(topo.site.name, limit)
    if json_out:
        print(json.dumps([release_json(journal, r.id) for r in rows], indent=2))
        return
    table = Table(title=f"releases of {topo.site.name}")
    for col in ("#", "version", "previous", "kind", "state", "started", "took", "by"):
        table.add_column(col)
    for r in rows:
        took = f"{r.finished - r.started:.1f}s" if r.finished else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started))
        table.add_row(
            str(r.id),
            r.version,
            r.previous_version or "-",
            r.kind,
            r.state,
            started,
            took,
            f"{r.user}@{r.host}",
        )
    out.print(table)


@app.command()
def show(
    release_id: Annotated[int, typer.Argument(metavar="RELEASE", help="Release number.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
) -> None:
    """Show every step of one release with times, outputs and who ran it."""
    topo = _load(config)
    journal = _journal(topo)
    try:
        data = release_json(journal, release_id)
    except KeyError:
        fail(EXIT_BAD_INPUT, f"no release #{release_id}")
    outputs = journal.outputs(release_id)
    if json_out:
        # The rows are slotted dataclasses: they have no __dict__.
        data["outputs"] = [dataclasses.asdict(o) for o in outputs]
        data["events"] = [dataclasses.asdict(e) for e in journal.events(release_id)]
        print(json.dumps(data, indent=2, default=str))
        return
    out.print(
        f"[bold]release #{data['id']}[/] {data['version']!r} ({data['kind']}, {data['strategy']}) "
        f"by {data['user']}@{data['host']}: {data['state']}",
        highlight=False,
    )
    if data["error"]:
        out.print(f"[red]{data['error']}[/]", highlight=False)
    for i, s in enumerate(data["steps"]):
        took = f"{s['finished'] - s['started']:.1f}s" if s["finished"] and s["started"] else ""
        out.print(
            f"{i + 1:>3}. {s['state']:<8} {took:>7} {s['description']}"
            + (f": {s['detail']}" if s["detail"] else ""),
            highlight=False,
            markup=False,
        )
        for o in (o for o in outputs if o.idx == i):
            status_text = (
                "timeout/unreachable" if o.exit_status is None else f"exit {o.exit_status}"
            )
            out.print(f"       {o.member}: {status_text} in {o.seconds:.2f}s", markup=False)
            for line in o.output.strip().splitlines()[-5:]:
                out.print(f"         | {line}", markup=False, highlight=False)


# --- the embedded balancer, the probe and the demo ----------------------------------


@balancer_app.command("serve")
def balancer_serve(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: balancer.workers).")
    ] = None,
) -> None:
    """Serve the live pool, the QA entry points and the admin API."""
    from changeover.proxy.server import run as serve

    raise typer.Exit(serve(_load(config), workers))


@app.command()
def probe(
    url: Annotated[str, typer.Argument(help="Where to send traffic, e.g. the balancer.")],
    rate: Annotated[float, typer.Option(help="Requests per second, open loop.")] = 200.0,
    duration: Annotated[float, typer.Option(help="Seconds (Ctrl-C ends early).")] = 10.0,
    sticky_users: Annotated[int, typer.Option(help="Virtual users keeping cookies.")] = 50,
    json_out: JsonOpt = False,
    host_header: Annotated[str | None, typer.Option(help="Host header to send.")] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 2.0,
    insecure: Annotated[bool, typer.Option(help="Do not verify TLS certificates.")] = False,
    watch_admin: Annotated[
        str | None,
        typer.Option(help="Embedded balancer admin URL: moves off an OUT member are no break."),
    ] = None,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the admin token.")
    ] = "CHANGEOVER_ADMIN_TOKEN",
    watch_config: Annotated[
        Path | None,
        typer.Option(help="changeover.toml: watch its balancer through its driver (any driver)."),
    ] = None,
) -> None:
    """Send traffic at a fixed rate with sticky users; report failures, latency,
    broken sessions and version flaps (exit 1 on any)."""
    from changeover.probe import main_cli

    if watch_admin and watch_config:
        raise typer.BadParameter("give --watch-admin or --watch-config, not both")
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
            os.environ.get(token_env),
            out,
            watch_config=watch_config,
        )
    )


@app.command()
def demo(
    members_per_cluster: Annotated[
        int, typer.Option(min=1, max=200, help="Members in each of the two clusters.")
    ] = 3,
    rate: Annotated[float, typer.Option(help="Probe requests per second.")] = 200.0,
    sticky_users: Annotated[int, typer.Option(help="Probe virtual users.")] = 40,
    workers: Annotated[int, typer.Option(help="Embedded balancer worker processes.")] = 1,
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
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()
