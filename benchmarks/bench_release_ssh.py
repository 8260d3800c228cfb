"""Release over SSH: wall time next to the irreducible time, at the seed's scale and beyond.

Two fleets, each member on its own loopback address behind a real OpenSSH server
(tests/integration/sshd.py) and the embedded balancer:

- 2 x 18 members of the sample app (appctl stop/deploy/start over SSH);
- 2 x 100 fake members: every release command is `/bin/true` over SSH and one
  process answers HTTP on all 200 member addresses (health, version, smoke).

The irreducible time of a release is, per cluster, the slowest member's stop +
deploy + start (the longest command of each step, from the journal's outputs)
+ health wait (from the start step's end until the slowest app logged that it
listens; 0 for the fake app, which always answers), plus the drain wait and the
QA (smoke) wait (those steps' times in the journal). Everything else - plan,
admissions, journal writes, dispatch, polling slack, version checks - is
orchestration overhead: wall / irreducible is the figure (goal < 1.10).

    .venv/bin/python -m benchmarks release_ssh   (or: benchmarks/bench_release_ssh.py
        [--real 18] [--fake 100] [--profile])
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import platform
import pstats
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from tests.integration.sshd import SshdServer, cluster_hosts, running_sshd

from benchmarks import machine
from changeover import journal as J
from changeover.config import load
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.releases import Begin
from changeover.runtime import open_journal, with_releases

COMMANDS = ("stop", "deploy", "start")
_LISTENING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ listening on ", re.M)


@dataclass
class Figures:
    label: str
    wall: float
    parts: dict[str, dict[str, float]]  # cluster -> drain, stop, deploy, start, health, smoke
    steps: dict[str, float]  # step id -> seconds in the journal
    journaled: float  # the release's own start to finish in the journal
    members: int  # in the whole site
    engine_cpu: float = 0.0  # CPU seconds of this process (the engine) during the release

    @property
    def irreducible(self) -> float:
        return sum(sum(p.values()) for p in self.parts.values())

    @property
    def ratio(self) -> float:
        return self.wall / self.irreducible


def ready_at(log: Path) -> float:
    """When the app last logged that it listens (epoch seconds, ms resolution)."""
    found = _LISTENING.findall(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"{log}: the app never listened")
    stamp, ms = found[-1]
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def figures(label: str, site: DemoSite, release_id: int, wall: float, real_app: bool) -> Figures:
    journal = open_journal(site.topo)
    try:
        row = journal.release(release_id)
        steps = {s.step_id: s for s in journal.steps(release_id)}
        outputs = journal.outputs(release_id)
    finally:
        journal.close()

    def took(step_id: str) -> float:
        s = steps[step_id]
        assert s.started is not None and s.finished is not None
        return s.finished - s.started

    parts: dict[str, dict[str, float]] = {}
    for cluster in site.topo.clusters:
        c = cluster.name
        part = {"drain": took(f"drained-{c}")}
        for cmd in COMMANDS:
            idx = steps[f"{cmd}-{c}"].idx
            part[cmd] = max(o.seconds for o in outputs if o.idx == idx)
        started = steps[f"start-{c}"].finished
        assert started is not None
        if real_app:
            logs = [site.root / "apps" / m.name / "app.log" for m in cluster.members]
            part["health"] = max(0.0, max(ready_at(log) for log in logs) - started)
        else:
            part["health"] = 0.0
        part["smoke"] = took(f"smoke-{c}")
        parts[c] = part
    assert row.state == J.DONE and row.finished is not None, row.error
    return Figures(
        label,
        wall,
        parts,
        {sid: took(sid) for sid in steps},
        row.finished - row.started,
        sum(len(c.members) for c in site.topo.clusters),
    )


def _serve_forever(config: Path, body: str) -> None:
    """The fake fast app: 200 OK with `body` on every member's address, keep-alive."""
    topo = load(config)
    payload = body.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:  # GETs only: no bodies
                self.buffer = self.buffer[end + 4 :]
                self.transport.write(response)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for _, m in topo.members():
            await loop.create_server(Responder, m.host, m.port, backlog=512)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


@contextlib.asynccontextmanager
async def fake_app(config: Path, version: str) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_release_ssh", "--responder", str(config), version,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError("the fake app did not start")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


def fake_commands(site: DemoSite) -> None:
    """Every release command of the site becomes `/bin/true`."""
    text = site.config.read_text()
    for cmd in COMMANDS:
        text = re.sub(rf"^{cmd} = .*$", f'{cmd} = "/bin/true"', text, flags=re.M)
    site.config.write_text(text)
    site.topo = load(site.config)


async def timed_release(site: DemoSite, version: str, profile: cProfile.Profile | None) -> int:
    if profile:
        profile.enable()
    try:
        release_id, state = await with_releases(
            site.topo, lambda r: r.release(Begin(version)), Console(quiet=True)
        )
    finally:
        if profile:
            profile.disable()
    if state != J.DONE:
        raise RuntimeError(f"release #{release_id} ended {state}")
    return release_id


async def measure(size: int, real_app: bool, profile: cProfile.Profile | None) -> Figures:
    a, b = cluster_hosts(1, size), cluster_hosts(2, size)
    with tempfile.TemporaryDirectory(prefix="bench-release-ssh-") as tmp:
        async with running_sshd(a + b) as server:
            site = DemoSite(Path(tmp), options(size, a, b, server))
            async with contextlib.AsyncExitStack() as stack:
                if not real_app:
                    fake_commands(site)
                    # One body for both releases: it holds both versions the checks look for.
                    await stack.enter_async_context(fake_app(site.config, "2.0 3.0"))
                await stack.enter_async_context(site.running())
                # Measure a site's usual release: one after another. (The first one on
                # a fresh journal also asks every member which version it serves.)
                await timed_release(site, "2.0", None)
                cpu, started = time.process_time(), time.monotonic()
                release_id = await timed_release(site, "3.0", profile)
                wall = time.monotonic() - started
                label = f"2 x {size} " + ("sample app" if real_app else "fake fast app")
                result = figures(label, site, release_id, wall, real_app)
                result.engine_cpu = time.process_time() - cpu
                return result


def options(size: int, a: list[str], b: list[str], server: SshdServer) -> DemoOptions:
    return DemoOptions(
        members_per_cluster=size, startup_delay=0.2, member_hosts=(a, b), ssh=server.settings()
    )


def report(f: Figures) -> None:
    print(
        f"\n{f.label}: wall {f.wall:.2f} s, irreducible {f.irreducible:.2f} s, "
        f"ratio {f.ratio:.3f}; engine CPU {f.engine_cpu:.2f} s"
    )
    for cluster, part in f.parts.items():
        print(f"  {cluster}: " + ", ".join(f"{k} {v:.2f}" for k, v in part.items()))
    members = f.members
    print(
        f"  engine CPU per member per step: {1000 * f.engine_cpu / (members * len(f.steps)):.2f} ms"
        f" ({members} members, {len(f.steps)} steps)"
    )
    overhead = {
        sid: secs
        for sid, secs in f.steps.items()
        if not sid.startswith(("drained-", "smoke-", *(f"{c}-" for c in COMMANDS)))
    }
    between = f.journaled - sum(f.steps.values())
    print(
        f"  outside the journaled release (begin, connections closed) {f.wall - f.journaled:.2f},"
        f" between steps {between:.2f}"
    )
    print("  other steps: " + ", ".join(f"{k} {v:.2f}" for k, v in overhead.items()))
    for cluster, part in f.parts.items():
        gaps = [f.steps[f"{cmd}-{cluster}"] - part[cmd] for cmd in COMMANDS]
        print(
            f"  {cluster}: step time beyond its slowest command (dispatch, journal): "
            + ", ".join(f"{cmd} {g:.2f}" for cmd, g in zip(COMMANDS, gaps, strict=True))
        )


async def amain(fleets: list[tuple[int, bool]], profile_on: bool) -> int:
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, Python "
        f"{platform.python_version()}; load average before {os.getloadavg()[0]:.1f}"
    )
    results = []
    for size, real_app in fleets:
        profile = cProfile.Profile() if profile_on else None
        results.append(await measure(size, real_app, profile))
        report(results[-1])
        if profile:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    print(f"\n# load average after {os.getloadavg()[0]:.1f}")
    print("\n| fleet | wall | irreducible | ratio |\n|---|---:|---:|---:|")
    for f in results:
        print(f"| {f.label} | {f.wall:.2f} s | {f.irreducible:.2f} s | {f.ratio:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks release_ssh")
    parser.add_argument("--real", type=int, default=18, help="sample apps per cluster (0: skip)")
    parser.add_argument("--fake", type=int, default=100, help="fake members per cluster (0: skip)")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine's process")
    parser.add_argument("--responder", nargs=2, metavar=("CONFIG", "BODY"), help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.responder:
        _serve_forever(Path(args.responder[0]), args.responder[1])
        return 0
    fleets = [(n, real) for n, real in ((args.real, True), (args.fake, False)) if n]
    return asyncio.run(amain(fleets, args.profile))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
