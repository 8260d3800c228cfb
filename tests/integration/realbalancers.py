"""Real HAProxy, Apache httpd and nginx for the tests and the flip benchmark.

Each balancer runs as a private instance in a temporary directory, in the
foreground as our child process, on ephemeral loopback ports, with a config the
driver rendered: never the system service, never the system's files. The
members are the bundled sample app (`python -m changeover.demo.app`).

The probe runs in its own process (`python -m changeover.probe --watch-config`)
and watches the real balancer through its driver, configured by a changeover.toml
that names the instance and its run directory.

The members run at the test's own CPU priority, as in the demo site: below it,
any other busy session on a shared 2-core machine (stress-ng, another job)
starves them, and the probe reports their lateness as timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from changeover.balancers.factory import DRIVERS
from changeover.balancers.process import ConfiguredBalancer
from changeover.config import BalancerInstance, Topology, parse
from changeover.model import Admission
from tests.helpers import free_port, require_binary, toml_value

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRODUCTS = ("haproxy", "apache", "nginx")
BINARY = {"haproxy": "haproxy", "apache": "apache2", "nginx": "nginx"}
SBIN = {"haproxy": "/usr/sbin/haproxy", "apache": "/usr/sbin/apache2", "nginx": "/usr/sbin/nginx"}

# One value of each template broken on purpose: the product's checker rejects it.
BREAKAGE = {
    "haproxy": ("    balance {{", "    balanse {{"),
    "apache": ("    ProxySet stickysession", "    ProxySett stickysession"),
    "nginx": ("        keepalive 32;", "        keepalive thirty-two;"),
}


def need(product: str) -> Path:
    """The product's binary; skip without it, fail under CHANGEOVER_REQUIRE_REAL=1."""
    return require_binary(BINARY[product], SBIN[product])


def configured_driver(
    product: str,
    topology: Topology,
    instance: BalancerInstance,
    run_dir: Path,
    template_dir: Path | None = None,
) -> ConfiguredBalancer:
    """The driver table's entry for a config-driven `product`, typed as such."""
    driver = DRIVERS[product](topology, instance, run_dir=run_dir, template_dir=template_dir)
    assert isinstance(driver, ConfiguredBalancer), driver
    return driver


def broken_templates(product: str, where: Path) -> Path:
    """A template directory whose `product` template has one value broken."""
    from changeover.balancers.render import TEMPLATE_DIR

    old, new = BREAKAGE[product]
    text = (TEMPLATE_DIR / f"{product}.cfg.j2").read_text()
    assert old in text, f"the {product} template no longer has {old!r}"
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{product}.cfg.j2").write_text(text.replace(old, new, 1))
    return where


def site_data(
    product: str,
    members_per_cluster: int = 3,
    *,
    host: str = HOST,
    health_interval: str = "250ms",
) -> dict[str, Any]:
    """A two-cluster topology (as TOML would give it) on free loopback ports."""
    clusters = []
    for cluster in ("a", "b"):
        clusters.append(
            {
                "name": cluster,
                "qa_host": f"prod-{cluster}.example.com",
                "qa_port": free_port(host),
                "members": [
                    {"name": f"{cluster}{i}", "host": HOST, "port": free_port()}
                    for i in range(1, members_per_cluster + 1)
                ],
            }
        )
    return {
        "site": {"name": f"real-{product}"},
        "clusters": clusters,
        "balancer": {
            "driver": product,
            "listen": f"{host}:{free_port(host)}",
            "admin_listen": f"{host}:{free_port(host)}",
            "health": {"interval": health_interval, "timeout": "1s", "rise": 2, "fall": 1},
        },
    }


def searchable_dir(prefix: str) -> Path:
    """A new directory nginx's workers (user nobody) can search: pytest's own
    temporary directories are private to root. `stop_balancer` removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def instance_for(
    product: str, run_dir: Path, name: str = "lb1", *, state_dir: Path | None = None
) -> dict[str, Any]:
    """A BalancerInstance (as TOML) whose every file lives in `run_dir`, but for
    nginx's flag files (`state_dir`, else a new `searchable_dir`)."""
    config = run_dir / f"{product}.conf"
    data: dict[str, Any] = {"name": name, "config_path": str(config)}
    if product == "haproxy":
        pid = run_dir / "haproxy.pid"
        data |= {
            "stats_socket": str(run_dir / "admin.sock"),
            "state_file": str(run_dir / "server-state"),
            # master-worker: USR2 to the master is a seamless reload.
            "reload_command": ["sh", "-c", f"exec kill -USR2 $(cat {shlex.quote(str(pid))})"],
        }
    elif product == "nginx":
        data |= {
            "state_dir": str(state_dir or searchable_dir("changeover-nginx-state-")),
            "check_command": ["nginx", "-t", "-q", "-p", str(run_dir), "-c", "{config}"],
            "reload_command": ["nginx", "-s", "reload", "-p", str(run_dir), "-c", "{config}"],
        }
    return data


def command_line(product: str, run_dir: Path, config: Path) -> list[str]:
    """The product in the foreground, as our child process."""
    if product == "haproxy":
        return ["haproxy", "-W", "-db", "-p", str(run_dir / "haproxy.pid"), "-f", str(config)]
    if product == "apache":
        return ["apache2", "-f", str(config), "-DFOREGROUND"]
    return ["nginx", "-p", str(run_dir), "-c", str(config), "-g", "daemon off;"]


@dataclass
class RealBalancer:
    product: str
    topology: Topology
    run_dir: Path
    driver: ConfiguredBalancer
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        balancer = self.topology.balancer
        scheme = "https" if balancer.tls_cert else "http"
        return f"{scheme}://{balancer.listen.host}:{balancer.listen.port}"

    def qa_url(self, cluster: str) -> str:
        c = self.topology.cluster(cluster)
        return f"http://{self.topology.balancer.listen.host}:{c.qa_port}"

    def config_text(self) -> str:
        return self.driver.config.path.read_text()

    def alive(self) -> bool:
        return self.proc.returncode is None

    def workers(self) -> list[int]:
        """The product's worker processes (a reload replaces them)."""
        return sorted(p.pid for p in psutil.Process(self.proc.pid).children())


async def start_balancer(
    product: str,
    topology: Topology,
    run_dir: Path,
    *,
    instance: BalancerInstance | None = None,
    admissions: Mapping[str, Admission] | None = None,
    template_dir: Path | None = None,
    timeout: float = 15.0,
) -> RealBalancer:
    await asyncio.to_thread((run_dir / "tmp").mkdir, parents=True, exist_ok=True)
    instance = instance or BalancerInstance.model_validate(instance_for(product, run_dir))
    driver = configured_driver(product, topology, instance, run_dir, template_dir)
    await driver.config.install(driver.render(admissions or {}))
    log = run_dir / "process.log"
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            *command_line(product, run_dir, driver.config.path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    real = RealBalancer(product, topology, run_dir, driver, proc, log)
    deadline = time.monotonic() + timeout
    while True:  # up when the driver can read it and sees every member healthy
        if proc.returncode is not None:
            raise RuntimeError(f"{product} exited {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            view = await driver.read()
            if all(m.healthy for m in view.members):
                break
        if time.monotonic() > deadline:
            await stop_balancer(real)
            raise RuntimeError(f"{product} not ready in {timeout:g}s: {log.read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    if topology.balancer.tls_load == "handshake":
        # nginx loads certificates only from a version its driver installed:
        # the first change through the driver installs one (as a first release does).
        try:
            await driver.apply({})
        except BaseException:
            await stop_balancer(real)
            raise
    return real


async def stop_balancer(real: RealBalancer) -> None:
    await real.driver.close()
    if real.proc.returncode is None:
        real.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(real.proc.wait(), 10)
        except TimeoutError:
            real.proc.kill()
            await real.proc.wait()
    state_dir = real.driver.instance.state_dir
    if state_dir and Path(state_dir).parent == Path(tempfile.gettempdir()):  # searchable_dir's
        await asyncio.to_thread(shutil.rmtree, state_dir, True)


@contextlib.asynccontextmanager
async def running_balancer(
    product: str, topology: Topology, run_dir: Path, **kwargs: Any
) -> AsyncIterator[RealBalancer]:
    real = await start_balancer(product, topology, run_dir, **kwargs)
    try:
        yield real
    finally:
        await stop_balancer(real)


# --- members: the sample app -----------------------------------------------


@dataclass
class Members:
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def running_members(
    topology: Topology, version: str = "1.0", logs: Path | None = None
) -> AsyncIterator[Members]:
    """Every member of `topology` as a sample-app process, listening."""
    members = Members()
    sink = (logs / "members.log").open("ab") if logs else None
    try:
        for _, m in topology.members():
            members.procs[m.name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "changeover.demo.app", "--host", m.host,
                "--port", str(m.port), "--member", m.name, "--route", m.route_id,
                "--version", version,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink or asyncio.subprocess.DEVNULL,
                stderr=sink or asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        for _, m in topology.members():
            while not await _port_open(m.host, m.port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"member {m.name} did not open {m.port}")
                await asyncio.sleep(0.05)
        yield members
    finally:
        for proc in members.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in members.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if sink:
            sink.close()


async def served_by(
    http: aiohttp.ClientSession, url: str, *, cookie: str | None = None, host: str | None = None
) -> tuple[str, str | None, dict[str, Any]]:
    """(member, new JSESSIONID or None, JSON body) of one GET through a balancer."""
    headers = {}
    if cookie:
        headers["Cookie"] = f"JSESSIONID={cookie}"
    if host:
        headers["Host"] = host
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, f"{url}: HTTP {resp.status}"
        body = await resp.json(content_type=None)
        morsel = resp.cookies.get("JSESSIONID")
        return resp.headers["X-Changeover-Member"], morsel.value if morsel else None, body


def parse_site(data: dict[str, Any], root: Path) -> Topology:
    return parse(data, root / "changeover.toml")


# --- the probe, in its own process, watching a real balancer -----------------


def toml_document(data: Mapping[str, Any]) -> str:
    """`data` (tables of plain values, as site_data gives) as a TOML document."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [
                f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None
            ]
        else:
            lines.insert(0, f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_probe_site(path: Path, real: RealBalancer, data: dict[str, Any]) -> Path:
    """A changeover.toml naming `real` (instance and run directory) for `--watch-config`."""
    balancer = dict(data["balancer"])
    instance = real.driver.instance.model_dump(exclude_none=True)
    balancer["instances"] = [instance | {"run_dir": str(real.run_dir)}]
    path.write_text(toml_document(data | {"balancer": balancer}))
    return path


@contextlib.asynccontextmanager
async def probe_process(
    site: Path,
    url: str,
    *,
    rate: float,
    sticky_users: int,
    log: Path,
    ca: Path | None = None,
    session_mean: float = 0.5,
    session_max: float = 1.5,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m changeover.probe` against `url` until the context ends (SIGINT),
    watching the balancer that the changeover.toml `site` names (trusting the CA
    file `ca` for HTTPS); stdout is its report. Its users stay `session_mean`
    seconds on average, `session_max` at most."""
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "changeover.probe", url,
            "--rate", f"{rate:g}", "--duration", "3600", "--sticky-users", str(sticky_users),
            "--session-mean", f"{session_mean:g}", "--session-max", f"{session_max:g}",
            "--json", "--watch-config", str(site), *(["--ca-file", str(ca)] if ca else []),
            cwd=str(PROJECT_ROOT),
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=sink,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish_probe(proc: asyncio.subprocess.Process) -> Any:
    from changeover.probe import ProbeReport

    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.read(), 60)
    await proc.wait()
    return ProbeReport.from_dict(json.loads(raw))
