"""The `changeover` command line (Typer + Rich).

Exit codes (documented in README and `changeover --help`):
0 success; 1 the release (or check) failed; 2 bad input (config, arguments);
3 refused by the release lock, an interlock or the migration check; 4 stopped at a safe point
(Ctrl-C or `changeover abort`), resumable.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

# typer's own click: the usage errors it raises when not in standalone mode.
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from changeover import __version__
from changeover.commands import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_STOPPED
from changeover.migrations.cli import app as migrations_app  # its analyser loads when it runs

# Start-up: this module imports typer and nothing heavy (`--help` needs only the
# declarations below); each command's body is in changeover.commands, imported
# when the command runs (tests/unit/test_cli_surface.py holds this).

DEFAULT_CONFIG = "changeover.toml"  # changeover.config.DEFAULT_CONFIG, without pydantic

HELP = f"""Zero-downtime releases across separate clusters behind a load balancer.

A release drains one cluster out of the live pool, stops, deploys, starts and
checks it, lets QA test it through its own entry point, then puts it live and
drains the next one in a single balancer change, and so on.

Exit codes: {EXIT_OK} success, {EXIT_FAILED} release/check failed,
{EXIT_BAD_INPUT} bad input, {EXIT_REFUSED} refused by the lock, an interlock or
the migration check, {EXIT_STOPPED} stopped at a safe point (resumable).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode=None)
balancer_app = typer.Typer(help="Run the embedded balancer.", no_args_is_help=True)
app.add_typer(balancer_app, name="balancer")


app.add_typer(
    migrations_app, name="migrations", help="Check migrations for expand/contract safety."
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", envvar="CHANGEOVER_CONFIG", help="Topology file.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"changeover {__version__}")
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
    """Print a one-line error and exit with `code`."""
    from changeover.commands.output import fail as print_and_exit

    print_and_exit(code, message)


# --- topology --------------------------------------------------------------------


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter file.")] = Path(
        DEFAULT_CONFIG
    ),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a commented starter changeover.toml."""
    from changeover.commands import site

    site.init(path, force, json_out)


@app.command()
def check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    reach: Annotated[
        bool, typer.Option("--reach", help="Also run a trivial command on every member.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Validate the topology and print it as a table."""
    from changeover.commands import site

    site.check(config, reach, json_out)


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
    from changeover.commands import site

    site.render(driver, config, output, instance, current)


@app.command()
def schema() -> None:
    """Print the JSON Schema of changeover.toml, for editors (see docs/configuration.md)."""
    from changeover.commands import site

    site.schema()


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
    from changeover.commands import releasing
    from changeover.releases import Begin

    releasing.plan(config, Begin(version, tuple(allow or ()), reason, first), json_out, offline)


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
    from changeover.commands import releasing
    from changeover.releases import Begin

    releasing.release(config, Begin(version, tuple(allow or ()), reason, first), json_out)


@app.command()
def rollback(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Go back to the previous version: an instant flip to the clusters a bluegreen
    release kept on it (within policy.keep_previous), else a release of it. After a
    release that failed or was aborted: back to the version that one replaced."""
    from changeover.commands import releasing

    releasing.rollback(config, json_out)


@app.command()
def resume(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Continue the unfinished release after a crash, Ctrl-C or a fixed failure."""
    from changeover.commands import releasing

    releasing.resume(config, json_out)


@app.command()
def abort(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Stop the release in progress at its next safe point (from another shell).
    It stays resumable: `resume` continues it, `rollback` or a new release
    supersedes it; `status` warns while healthy members are left out. An
    approval not yet acted on is withdrawn."""
    from changeover.commands import releasing

    releasing.abort(config, json_out)


@app.command()
def approve(config: ConfigOpt = Path(DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Approve the cluster that a release with approval = "manual" waits for,
    also while no process runs it (killed while waiting): the `resume` that
    takes it over keeps the approval and goes on."""
    from changeover.commands import releasing

    releasing.approve(config, json_out)


@app.command()
def unlock(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    force: Annotated[bool, typer.Option("--force", help="Required: break the lock.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Break the site's release lock (only when its holder is surely gone)."""
    from changeover.commands import releasing

    releasing.unlock(config, force, yes, json_out)


# --- looking ------------------------------------------------------------------------


def _interval(value: float) -> float:
    if not (math.isfinite(value) and 0.1 <= value <= 3600):
        raise typer.BadParameter(f"expected seconds between 0.1 and 3600, got {value}")
    return value


@app.command()
def status(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Follow the release in progress (or the next to begin) until it ends: "
            "the status again on every change (--json: one line each), a progress line "
            "during long waits; exit as the release ends (0 done, 1 failed, 4 stopped "
            "or Ctrl-C).",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(callback=_interval, help="--watch: seconds between reads.")
    ] = 2.0,
    progress: Annotated[
        float,
        typer.Option(
            callback=_interval, help="--watch: a progress line after this many quiet seconds."
        ),
    ] = 5.0,
) -> None:
    """Show the pool as the balancer sees it and any release in progress."""
    from changeover.commands import looking

    if watch:
        looking.watch(config, json_out, interval, progress)
    else:
        looking.status(config, json_out)


@app.command()
def history(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="How many releases.")] = 20,
) -> None:
    """List past releases, newest first."""
    from changeover.commands import looking

    looking.history(config, json_out, limit)


@app.command()
def show(
    release_id: Annotated[
        int, typer.Argument(metavar="RELEASE", min=1, max=2**63 - 1, help="Release number.")
    ],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    json_out: JsonOpt = False,
) -> None:
    """Show every step of one release with times, outputs and who ran it."""
    from changeover.commands import looking

    looking.show(config, release_id, json_out)


@app.command()
def desk(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    listen: Annotated[str, typer.Option(help="host:port of the web page and API.")] = (
        "127.0.0.1:8700"
    ),
) -> None:
    """Serve the release desk: the web page, its JSON API under /api/ and /metrics."""
    from changeover.commands.common import load_config, service
    from changeover.commands.output import out
    from changeover.config import ConfigError, parse_hostport
    from changeover.desk.app import Desk, serve
    from changeover.desk.auth import load_tokens

    topo = load_config(config)
    try:
        host, port = parse_hostport(listen)
        tokens = load_tokens(topo, os.environ)
    except (ConfigError, ValueError) as exc:
        fail(EXIT_BAD_INPUT, str(exc))

    def ready(url: str) -> None:
        out.print(f"desk of {topo.site.name} on {url}", highlight=False, markup=False)

    service(topo, lambda r: serve(Desk(topo, r, tokens), host, port, ready))


# --- the embedded balancer, the probe and the demo ----------------------------------


WorkersOpt = Annotated[int, typer.Option(min=1, max=64, help="Embedded balancer worker processes.")]


@balancer_app.command("serve")
def balancer_serve(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Worker processes (default: balancer.workers)."),
    ] = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="Binary upgrade: take the listening sockets and the pool state over from "
            "the balancer running with this config (it drains and exits); none is closed.",
        ),
    ] = False,
) -> None:
    """Serve the live pool, the QA entry points and the admin API."""
    from changeover.commands.common import load_config
    from changeover.proxy.server import run as serve

    raise typer.Exit(serve(load_config(config), workers, take_over=take_over))


@balancer_app.command("reload")
def balancer_reload(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Make the running embedded balancer re-read its topology file (as SIGHUP does).

    Sent to its admin API (POST /v1/reload, with the admin token), so the answer
    says how it went. New workers take the listening sockets over, the old ones
    finish their requests and WebSockets (within balancer.reload_grace);
    admissions and sessions stay. A file that does not load is refused here
    (exit 2) and nothing is sent; one the balancer refuses (say, a port it cannot
    listen on) changes nothing there: the old topology serves on and the error
    is printed (exit 1). The balancer re-reads the file it was started with;
    CONFIG says where its admin API is.
    """
    from changeover.commands.balancer import reload

    reload(config)


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
    from yarl import URL

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
    from changeover.commands.output import out
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
    from changeover.commands.common import run
    from changeover.commands.output import out
    from changeover.demo.scenario import DemoOptions, run_demo

    opts = DemoOptions(
        members_per_cluster=members_per_cluster,
        rate=rate,
        sticky_users=sticky_users,
        workers=workers,
        keep=keep,
    )
    raise typer.Exit(run(run_demo(opts, out)))


# --- moving history (bodies in commands/history.py) -------------------------------------

journal_app = typer.Typer(
    help="Move a site's history between the SQLite journal and [site] state_url.",
    no_args_is_help=True,
)
app.add_typer(journal_app, name="journal")
SqliteOpt = Annotated[
    bool,
    typer.Option("--sqlite", help="The SQLite journal in state_dir, even with [site] state_url."),
]


@journal_app.command("export")
def journal_export(
    target: Annotated[
        Path | None, typer.Argument(help="JSON lines file to write (default: stdout).")
    ] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    sqlite: SqliteOpt = False,
) -> None:
    """Write the site's releases, steps, outputs and events as JSON lines."""
    from changeover.commands import history

    history.export(config, target, sqlite)


@journal_app.command("import")
def journal_import(
    source: Annotated[Path, typer.Argument(help="A file `journal export` wrote ('-': stdin).")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    force: Annotated[
        bool, typer.Option("--force", help="Replace the history the journal holds.")
    ] = False,
    sqlite: SqliteOpt = False,
) -> None:
    """Read an export into the site's journal (refused over existing history)."""
    from changeover.commands import history

    history.import_(config, source, force, sqlite)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except UsageError as exc:  # found before any command ran
        # One line, not the usage block: what was wrong, and where to look.
        from changeover.commands.output import print_error

        where = exc.ctx.command_path if exc.ctx is not None else "changeover"
        print_error(f"{exc.format_message()} (see `{where} --help`)")
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
