"""`changeover demo`: a whole release, v1 -> v2, on loopback, under the probe.

It starts the embedded balancer and two clusters of the sample app, sends
sticky traffic through the balancer at a fixed rate, releases with the seed's
procedure, and prints the timeline and the probe's report. Everything runs in
a temporary directory and is stopped at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console

from changeover.balancers.factory import make_balancer
from changeover.config import SshSettings, Topology, load
from changeover.polling import poll_until
from changeover.probe import ProbeReport
from changeover.releases import Begin
from changeover.runtime import with_releases

TOKEN_ENV = "CHANGEOVER_ADMIN_TOKEN"


@dataclass(frozen=True)
class DemoOptions:
    members_per_cluster: int = 3
    rate: float = 200.0
    sticky_users: int = 40
    ws_users: int = 0  # the probe's WebSocket users, on the sample app's /ws echo
    from_version: str = "1.0"
    to_version: str = "2.0"
    workers: int = 1
    startup_delay: float = 0.5
    keep: bool = False
    strategy: str = "rolling-clusters"
    bake: float = 0.0
    auto_rollback: bool = False
    # Policy timings, short to stay fast: session_idle above the probe's think
    # time (sticky_users/rate), drain_timeout above the longest probe session plus
    # session_idle, so that a drain cuts no session.
    drain_timeout: float = 10.0
    session_idle: float = 2.0
    # WebSockets still open when a cluster goes out are closed over this long.
    close_spread: float = 3.0
    # How long the probe's users stay (seconds, mean and maximum): then they leave.
    probe_session_mean: float = 1.0
    probe_session_max: float = 2.0
    health_timeout: float = 30.0
    keep_previous: float = 600.0
    approval: str = "auto"
    # A fleet instead of one box: each cluster's member addresses (default: all on
    # 127.0.0.1), and the members reached over SSH with these settings.
    member_hosts: tuple[Sequence[str], Sequence[str]] | None = None
    ssh: SshSettings | None = None
    parallel: int = 0  # executor.parallel: members of a cluster at once, 0: all
    # The shared database (postgresql://... or sqlite:////ABSOLUTE), given together
    # with its migrations: the app serves GET /db from it, a smoke check reads it.
    database_url: str | None = None
    migrations_dir: Path | None = None
    # HTTPS on the balancer's listeners: (certificate, key, the CA the probe trusts).
    tls: tuple[Path, Path, Path] | None = None


def _free_ports(hosts: Sequence[str]) -> list[int]:
    """One ephemeral port per host that was free there a moment ago; all held at
    once, so they are distinct."""
    socks = []
    try:
        for host in hosts:
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_topology(root: Path, opts: DemoOptions) -> Path:
    """The demo site's changeover.toml; release commands drive the sample app's appctl."""
    n = opts.members_per_cluster
    hosts = opts.member_hosts or (["127.0.0.1"] * n, ["127.0.0.1"] * n)
    # Each member's port is checked free on the member's own address.
    ports = _free_ports(["127.0.0.1"] * 4 + [*hosts[0][:n], *hosts[1][:n]])
    listen, admin, qa_a, qa_b = ports[:4]
    member_ports = ports[4:]
    # Templates are split like a shell would; shlex.join quotes our own paths.
    # Absolute paths: over SSH the remote shell has its own PATH and HOME. The
    # members run at the priority of whoever starts them (here, the balancer's):
    # at nice 19 a member gets ~1.5% of a CPU against any other busy session
    # (stress-ng, another job), and requests to it time out though nothing in
    # the release went wrong.
    appctl = shlex.join([sys.executable, "-m", "changeover.demo.appctl"])
    common = (
        shlex.join(["--root", str(root / "apps")])
        + " --member {member} --host {host} --port {port} --route {route}"
    )
    if opts.database_url:
        common += " " + shlex.join(["--db", opts.database_url.removeprefix("sqlite:///")])
    lines = [
        "# Written by `changeover demo`.",
        "[site]",
        'name = "demo"',
        'state_dir = "state"',
        "",
    ]
    for c, (cluster, qa) in enumerate((("a", qa_a), ("b", qa_b))):
        lines += [
            "[[clusters]]",
            f'name = "{cluster}"',
            f'qa_host = "prod-{cluster}.example.com"',
            f"qa_port = {qa}",
            "members = [",
        ]
        for i in range(n):
            name = f"{cluster}{i + 1}"
            port = member_ports[c * n + i]
            lines.append(f'  {{ name = "{name}", host = "{hosts[c][i]}", port = {port} }},')
        lines += ["]", ""]
    lines += [
        "[balancer]",
        'driver = "builtin"',
        f'listen = "127.0.0.1:{listen}"',
        f'admin_listen = "127.0.0.1:{admin}"',
        f'admin_token_env = "{TOKEN_ENV}"',
        f"workers = {opts.workers}",
        f"close_spread = {opts.close_spread:g}",
        *(
            [
                f"tls_cert = {_toml_str(str(opts.tls[0]))}",
                f"tls_key = {_toml_str(str(opts.tls[1]))}",
            ]
            if opts.tls
            else []
        ),
        f"state_file = {_toml_str(str(root / 'state' / 'admissions.json'))}",
        "",
        "[balancer.health]",
        'interval = "250ms"',
        'timeout = "2s"',
        "rise = 2",
        "fall = 3",  # a busy 2-core demo box must not eject a whole cluster
        "",
        "[executor]",
        f'kind = "{"ssh" if opts.ssh else "local"}"',
        'timeout = "30s"',
        f"parallel = {opts.parallel}",
        "",
    ]
    if opts.ssh:
        lines.append("[executor.ssh]")
        # JSON strings, numbers and booleans are valid TOML values.
        lines += [
            f"{k} = {json.dumps(v)}" for k, v in opts.ssh.model_dump(exclude_none=True).items()
        ]
        lines.append("")
    lines += [
        "[release]",
        f"stop = {_toml_str(f'{appctl} stop {common}')}",
        f"deploy = {_toml_str(f'{appctl} deploy {common} --version {{version}}')}",
        f"start = {_toml_str(f'{appctl} start {common} --startup-delay {opts.startup_delay:g}')}",
        "",
        "[checks]",
        'smoke = [ { path = "/", status = 200, body_contains = "{version}" }'
        + (' , { path = "/db", status = 200 }' if opts.database_url else "")
        + " ]",
        "",
        "[policy]",
        f"drain_timeout = {opts.drain_timeout:g}",
        f"session_idle = {opts.session_idle:g}",
        f"health_timeout = {opts.health_timeout:g}",
        f"keep_previous = {opts.keep_previous:g}",
        "min_healthy = 1",
        f'strategy = "{opts.strategy}"',
        f'approval = "{opts.approval}"',
        f"bake = {opts.bake:g}",
        f"auto_rollback = {'true' if opts.auto_rollback else 'false'}",
        "",
    ]
    if opts.database_url:
        assert opts.migrations_dir is not None, "a database comes with its migrations"
        lines += [
            "[database]",
            f"url = {_toml_str(opts.database_url)}",
            f"migrations_dir = {_toml_str(str(opts.migrations_dir))}",
            "",
        ]
    path = root / "changeover.toml"
    path.write_text("\n".join(lines))
    return path


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed: {out.decode(errors='replace')}")


async def _appctl(topo: Topology, action: str, version: str | None = None) -> None:
    """Run one release command template on every member (used to set up v1)."""
    from changeover.executors.base import member_values, render_argv

    template = getattr(topo.release, action)
    await asyncio.gather(
        *(
            _run(*render_argv(template, member_values(c, m, version or "")))
            for c, m in topo.members()
        )
    )


async def _wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    async with aiohttp.ClientSession(headers=headers) as http:

        async def answered() -> bool:
            async with http.get(url) as resp:
                return resp.status == 200

        if not await poll_until(answered, timeout, not_yet=(aiohttp.ClientError,)):
            raise RuntimeError(f"{url} did not answer within {timeout:g}s")


@contextlib.asynccontextmanager
async def _process(
    argv: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=sink
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _all_healthy(topo: Topology, apps: Path, stall: float) -> None:
    """Wait until the balancer sees every member healthy. A big fleet booting on a
    busy box takes a while, so the wait goes on as long as more members keep
    turning healthy; it gives up after `stall` seconds without progress and names
    the members still down with the end of their logs."""
    balancer = make_balancer(topo)
    best, progress_at = -1, time.monotonic()
    try:
        while True:
            view = await balancer.read()
            down = [m.name for m in view.members if not m.healthy]
            if not down:
                return
            healthy = len(view.members) - len(down)
            if healthy > best:
                best, progress_at = healthy, time.monotonic()
            elif time.monotonic() - progress_at > stall:
                raise RuntimeError(
                    f"the balancer sees {len(down)} member(s) unhealthy after {stall:g}s "
                    "without progress:\n" + "\n".join(_log_tail(apps / m) for m in down)
                )
            await asyncio.sleep(0.05)
    finally:
        await balancer.close()


def _log_tail(member_dir: Path, lines: int = 5) -> str:
    try:
        tail = (member_dir / "app.log").read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        tail = [f"(no log: {e.strerror})"]
    return f"{member_dir.name}: " + "\n  ".join(tail or ["(empty log)"])


class DemoSite:
    """A running demo site: the sample app on every member and the embedded
    balancer in front, all on loopback under `root`. Used by the demo and the
    end-to-end tests."""

    def __init__(self, root: Path, opts: DemoOptions) -> None:
        self.root = root
        self.opts = opts
        self.token = secrets.token_urlsafe(24)
        self.env = os.environ | {TOKEN_ENV: self.token, "PYTHONUNBUFFERED": "1"}
        self.config = write_topology(root, opts)
        self.topo = load(self.config)
        listen, admin = self.topo.balancer.listen, self.topo.balancer.admin_listen
        self.public_url = f"{'https' if opts.tls else 'http'}://{listen.host}:{listen.port}"
        self.admin_url = f"http://{admin.host}:{admin.port}"

    @contextlib.asynccontextmanager
    async def running(self, fresh: bool = False) -> AsyncIterator[DemoSite]:
        """Every member on `from_version` and healthy behind the balancer; `fresh`:
        the balancer alone, no member deployed or started (a first deploy's site)."""
        # The engine's builtin driver, in this process, reads the token from here;
        # put back what was there after, or the next site in this process (a
        # test's) would meet this one's token.
        before = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = self.token
        try:
            if not fresh:
                await _appctl(self.topo, "deploy", self.opts.from_version)
                await _appctl(self.topo, "start")
            balancer_cmd = [sys.executable, "-m", "changeover.proxy", "-c", str(self.config)]
            async with _process(balancer_cmd, self.env, self.root / "balancer.log"):
                await _wait_http(f"{self.admin_url}/v1/healthz", 15)
                if not fresh:
                    await _all_healthy(self.topo, self.root / "apps", 30)
                yield self
        finally:
            with contextlib.suppress(Exception):
                await _appctl(self.topo, "stop")
            if before is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = before

    async def restart_members(self, version: str) -> None:
        """Stop, deploy `version` on and start every member, until the balancer
        sees them all healthy (a test putting the site back after a failure)."""
        await _appctl(self.topo, "stop")
        await _appctl(self.topo, "deploy", version)
        await _appctl(self.topo, "start")
        await _all_healthy(self.topo, self.root / "apps", 30)

    @contextlib.asynccontextmanager
    async def probe(
        self, rate: float, sticky_users: int, ws_users: int | None = None
    ) -> AsyncIterator[ProbeHandle]:
        """The probe in its own process (its schedule must not share our event loop);
        `ws_users` WebSocket users beside (default: the options')."""
        ws = self.opts.ws_users if ws_users is None else ws_users
        cmd = [
            sys.executable, "-m", "changeover.probe", self.public_url,
            "--rate", f"{rate:g}", "--duration", "600", "--sticky-users", str(sticky_users),
            "--ws-users", str(ws),
            "--session-mean", f"{self.opts.probe_session_mean:g}",
            "--session-max", f"{self.opts.probe_session_max:g}",
            "--json", "--watch-admin", self.admin_url, "--token-env", TOKEN_ENV,
            *(["--ca-file", str(self.opts.tls[2])] if self.opts.tls else []),
        ]  # fmt: skip
        async with _process(cmd, self.env, self.root / "probe.log") as proc:
            yield ProbeHandle(proc)


class ProbeHandle:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def finish(self) -> ProbeReport:
        """Stop the probe (SIGINT) and read its JSON report."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.read(), 30)
        await self.proc.wait()
        return ProbeReport.from_dict(json.loads(raw))


async def run_demo(opts: DemoOptions, console: Console) -> int:
    root = Path(tempfile.mkdtemp(prefix="changeover-demo-"))
    site = DemoSite(root, opts)
    n = opts.members_per_cluster
    console.print(
        f"[bold]changeover demo[/]: 2 clusters x {n} members of the sample app behind the "
        f"embedded balancer at {site.public_url}; files in {root}",
        highlight=False,
    )
    try:
        async with site.running(), site.probe(opts.rate, opts.sticky_users) as probe:
            console.print(
                f"v{opts.from_version} serving on every member; probe: {opts.rate:g} req/s, "
                f"{opts.sticky_users} sticky users, {opts.ws_users} WebSocket users",
                highlight=False,
            )
            await asyncio.sleep(1.0)  # let sticky sessions form before the release
            _, state = await with_releases(
                site.topo, lambda r: r.release(Begin(opts.to_version)), console
            )
            await asyncio.sleep(1.0)  # traffic after the release counts too
            report = await probe.finish()
        console.print()
        report.render(console)
        passed = state == "done" and report.passed
        verdict = (
            "[bold green]zero downtime: no failed request, no broken or cut session, "
            "no version flap, no WebSocket closed abnormally[/]"
            if passed
            else f"[bold red]FAILED[/]: release {state}, probe "
            + ("passed" if report.passed else "saw failures")
        )
        console.print(verdict)
        return 0 if passed else 1
    finally:
        if opts.keep:
            console.print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
