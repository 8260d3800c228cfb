"""What a release costs the site: the orchestrator's CPU and the site's p99.

A 2 x 3 site on a real HAProxy sharing this box with everything else: the
probe sends 200 requests/s through it, the members are one fast fake app
process (bench_release_ssh's), every release command is `/bin/true` and the
drain does not wait (`drain_timeout = 0`), so what is left is the orchestrator
itself. `changeover release` runs as a child process; its CPU with its children
(the `haproxy -c` checks included) is measured from the kernel's accounting
(getrusage of the reaped child), next to:

- `python -c pass` and `changeover --help` (interpreter and CLI start-up);
- where the release's CPU goes: the `haproxy -c` runs it made (counted by a
  wrapper) times the CPU of one run measured alone; its release commands (one
  per member and command) times one `/bin/true`; the imports, the CPU of a
  process that imports exactly the modules a release left loaded; the rest is
  the engine at work (the stats socket, the checks, the journal, the screen);
- the site's p99 over a window with no release and over the release.

changeover's bytecode is compiled first (as an installed package has it; see
bench_startup).

    .venv/bin/python -m benchmarks release_cpu   (or: benchmarks/bench_release_cpu.py
        [--releases 3])
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.helpers import wait_until
from tests.integration.realbalancers import (
    RealBalancer,
    finish_probe,
    need,
    parse_site,
    probe_process,
    running_balancer,
    toml_document,
    write_probe_site,
)
from tests.integration.test_driver_release import release_site

from benchmarks import compile_package, machine
from benchmarks.bench_release_ssh import fake_app
from changeover.config import BalancerInstance
from changeover.model import total

RATE = 200.0
COMMANDS = ("stop", "deploy", "start")
CLI = (sys.executable, "-m", "changeover.cli")


@dataclass
class Cost:
    wall: float
    cpu: float  # user + system, the child and every child it waited for


async def cost(argv: list[str] | tuple[str, ...]) -> Cost:
    """Run `argv` to its end; its wall time and CPU (children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {out.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Cost(wall, cpu)


async def median_cpu(argv: list[str] | tuple[str, ...], runs: int = 5) -> float:
    return statistics.median([(await cost(argv)).cpu for _ in range(runs)])


def recording_modules(argv: list[str], into: Path) -> list[str]:
    """`changeover argv` run in-process (as the console script does), writing the
    modules it left loaded to `into` (one per line) before it exits."""
    code = (
        "import sys\n"
        "from changeover.cli import main\n"
        f"sys.argv = ['changeover', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code\n"
        f"open({str(into)!r}, 'w').write('\\n'.join(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    return [sys.executable, "-c", code]


def importing(modules: list[str]) -> list[str]:
    """A process that imports `modules` (those that import) and does nothing else."""
    wanted = [m for m in modules if not m.startswith(("__main__", "_distutils"))]
    code = (
        "import importlib\n"
        f"for name in {wanted!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        pass\n"
    )
    return [sys.executable, "-c", code]


def bench_site(root: Path) -> dict[str, Any]:
    data = release_site("haproxy", root)
    for cmd in COMMANDS:
        data["release"][cmd] = "/bin/true"
    data["policy"] |= {"drain_timeout": "0s", "session_idle": "100ms"}
    # Every `haproxy -c` the drivers run leaves a line in checks.log.
    log = shlex.quote(str(root / "checks.log"))
    counted = f'echo >>{log}; exec haproxy -c -q -f "$1"'
    instance = data["balancer"]["instances"][0]
    instance["check_command"] = ["sh", "-c", counted, "check", "{config}"]
    return data


@contextlib.asynccontextmanager
async def haproxy_with_fake_members(root: Path) -> AsyncIterator[tuple[Path, RealBalancer]]:
    need("haproxy")
    data = bench_site(root)
    members = root / "members.toml"
    members.write_text(toml_document(data))
    topology = parse_site(data, root)
    instance = BalancerInstance.model_validate(data["balancer"]["instances"][0])
    # One body for every release: it holds each version the checks look for.
    versions = " ".join(f"{n}.0" for n in range(1, 20))
    async with (
        fake_app(members, versions),
        running_balancer("haproxy", topology, root / "lb1", instance=instance) as real,
    ):
        yield write_probe_site(root / "changeover.toml", real, data), real


async def p99_over(config: Path, real: RealBalancer, root: Path, argv: list[str] | None) -> Any:
    """The probe's report over 3 s of traffic (argv None) or over `argv` running."""
    async with probe_process(
        config, real.url, rate=RATE, sticky_users=40, log=root / "probe.log"
    ) as probe:

        async def flowing() -> bool:
            return (total((await real.driver.read()).members, "requests") or 0) >= 50

        await wait_until(flowing, timeout=30, what="probe traffic")
        spent = await cost(argv) if argv else None
        if argv is None:
            await asyncio.sleep(3.0)  # a fixed idle window is what is measured
        return await finish_probe(probe), spent


async def amain(releases: int) -> int:
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, Python "
        f"{platform.python_version()}; load average before {os.getloadavg()[0]:.1f}"
    )
    await asyncio.to_thread(compile_package)
    with tempfile.TemporaryDirectory(prefix="bench-release-cpu-") as tmp:
        root = Path(tmp)
        async with haproxy_with_fake_members(root) as (config, real):
            idle, _ = await p99_over(config, real, root, None)
            start_pass = await median_cpu((sys.executable, "-c", "pass"))
            start_help = await median_cpu((*CLI, "--help"))
            check_one = await median_cpu(
                ("haproxy", "-c", "-q", "-f", str(real.driver.config.path))
            )
            command_one = await median_cpu(("/bin/true",))
            loaded = root / "modules.txt"  # the journal's first release, unmeasured
            await cost(recording_modules(["release", "1.0", "-c", str(config)], loaded))
            imports = await median_cpu(importing(loaded.read_text().split()))
            commands = len(COMMANDS) * sum(len(c["members"]) for c in bench_site(root)["clusters"])
            log = root / "checks.log"
            rows = []
            for n in range(2, 2 + releases):
                checks_before = len(log.read_text().splitlines()) if log.exists() else 0
                argv = [*CLI, "release", f"{n}.0", "-c", str(config)]
                report, spent = await p99_over(config, real, root, argv)
                checks = len(log.read_text().splitlines()) - checks_before
                rows.append((spent, checks, report))
    print(
        f"\nstart-up CPU: python -c pass {start_pass:.3f} s, changeover --help {start_help:.3f} s"
    )
    print(
        f"one `haproxy -c` alone: {check_one:.3f} s CPU; one release command (/bin/true): "
        f"{command_one:.4f} s; importing what a release imports: {imports:.3f} s"
    )
    print(f"site idle (3 s at {RATE:g} req/s): p99 {idle.latency_ms['p99']:.1f} ms\n")
    print(
        "| release | wall | CPU (with children) | haproxy -c runs | their CPU "
        f"| {commands} release commands | imports | the engine (the rest) "
        "| failed | p99 in the window |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for i, (spent, checks, report) in enumerate(rows, start=1):
        their, ran = checks * check_one, commands * command_one
        rest = spent.cpu - their - ran - imports
        print(
            f"| {i} | {spent.wall:.2f} s | {spent.cpu:.2f} s | {checks} | {their:.2f} s "
            f"| {ran:.2f} s | {imports:.2f} s | {rest:.2f} s "
            f"| {report.failed} | {report.latency_ms['p99']:.1f} ms |"
        )
    print(f"\n# load average after {os.getloadavg()[0]:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks release_cpu")
    parser.add_argument("--releases", type=int, default=3, help="measured releases")
    args = parser.parse_args([] if argv is None else argv)
    return asyncio.run(amain(args.releases))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
