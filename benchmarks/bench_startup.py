"""CLI start-up: the CPU (user + sys) of `changeover --help`, `status` and `plan`,
side by side with `python -c pass`, and where it goes.

A demo site (the embedded balancer and 2 x 1 sample-app members on loopback) runs
so that `status` and `plan` read a real balancer and real members. Each command
runs `--runs` times as its own process (`python -m changeover.cli ...`, as the
console script does); the figure is the median of its user + sys CPU (from
wait4, the process alone). The issue's target: under 0.15 s for each. `--fresh`
starts the balancer alone (each member's version read is refused at once), for
a machine too busy to boot the members at nice 19.

"Where it goes" runs each command once more with `python -X importtime` and adds
up the import time (wall, self) by top-level package; what is left of the
command's wall time is the interpreter and the command's own work.

    .venv/bin/python -m benchmarks startup   (or: benchmarks/bench_startup.py [--runs 9]
                                              [--fresh] [--before PYTHON])
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from changeover.demo.scenario import DemoOptions, DemoSite

TARGET = 0.15
_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \|(\s*)(\S+)")


def commands(config: Path, python: str) -> dict[str, list[str]]:
    cli = [python, "-m", "changeover.cli"]
    return {
        "python -c pass": [python, "-c", "pass"],
        "changeover --help": [*cli, "--help"],
        "changeover status": [*cli, "status", "-c", str(config)],
        "changeover status --json": [*cli, "status", "--json", "-c", str(config)],
        "changeover plan 2.0": [*cli, "plan", "2.0", "-c", str(config)],
        "changeover plan 2.0 --offline": [*cli, "plan", "2.0", "--offline", "-c", str(config)],
    }


def cpu_of(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(user + sys CPU, wall, exit code) of one run of `argv`."""
    with tempfile.TemporaryFile() as errors:
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        code = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        if code not in (0, 1, 3):  # 1, 3: the site's answer (members down, an interlock)
            raise SystemExit(f"{' '.join(argv)} exited {code}: {errors.read().decode()}")
    return usage.ru_utime + usage.ru_stime, wall, code


def imports_by_package(argv: list[str], env: dict[str, str]) -> tuple[dict[str, float], float]:
    """Import time (self, wall seconds) summed by top-level package, and the run's wall."""
    started = time.monotonic()
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, capture_output=True)
    wall = time.monotonic() - started
    by: dict[str, float] = defaultdict(float)
    for line in done.stderr.decode().splitlines():
        m = _IMPORT.match(line)
        if m:
            top = m.group(3).split(".")[0]
            by[top if top in _NAMED else "other (stdlib, small packages)"] += int(m.group(1)) / 1e6
    return dict(by), wall


_NAMED = {
    "changeover", "typer", "rich", "pydantic", "pydantic_core", "aiohttp", "yarl",
    "multidict", "asyncio", "psutil", "jinja2", "cryptography", "sqlglot", "pglast",
}  # fmt: skip


async def measure(runs: int, fresh: bool, before: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="changeover-bench-startup-") as tmp:
        site = DemoSite(Path(tmp), DemoOptions(members_per_cluster=1))
        async with site.running(fresh=fresh):
            env = dict(site.env)
            print(
                f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} CPUs,"
                f" {platform.platform()}, Python {platform.python_version()},"
                f" load average before {os.getloadavg()[0]:.2f}; median of {runs} runs"
                + ("; members not started (--fresh)" if fresh else "")
            )
            table = commands(site.config, sys.executable)
            other = commands(site.config, before) if before else {}
            results: dict[str, tuple[float, float, float, int]] = {}
            earlier: dict[str, float] = {}
            for name, argv in table.items():
                samples, old = [], []
                for _ in range(runs):  # in turns, so both meet the same load
                    samples.append(await asyncio.to_thread(cpu_of, argv, env))
                    if other:
                        old.append((await asyncio.to_thread(cpu_of, other[name], env))[0])
                cpus = [c for c, _, _ in samples]
                walls = [w for _, w, _ in samples]
                results[name] = (
                    statistics.median(cpus),
                    min(cpus),
                    statistics.median(walls),
                    samples[-1][2],
                )
                if old:
                    earlier[name] = statistics.median(old)
            base = results["python -c pass"][0]
            print(
                f"{'command':32} {'CPU s':>7} {'min':>7} {'- pass':>7} {'wall s':>7} exit  "
                + ("before  " if earlier else "")
                + "target"
            )
            for name, (cpu, least, wall, code) in results.items():
                verdict = "" if name.startswith("python") else ("ok" if cpu < TARGET else "over")
                was = f"{earlier[name]:6.3f}  " if earlier else ""
                print(
                    f"{name:32} {cpu:7.3f} {least:7.3f} {cpu - base:7.3f} {wall:7.3f} "
                    f"{code:4}  {was}{verdict}"
                )
            print("\nwhere it goes: import time by package (wall ms, self times summed)")
            for name, argv in table.items():
                if name.startswith("python"):
                    continue
                by, wall = await asyncio.to_thread(imports_by_package, argv, env)
                parts = ", ".join(
                    f"{pkg} {1000 * secs:.0f}"
                    for pkg, secs in sorted(by.items(), key=lambda kv: -kv[1])
                    if secs >= 0.002
                )
                total = sum(by.values())
                print(f"{name}: imports {1000 * total:.0f} of {1000 * wall:.0f} ms wall: {parts}")
            print(f"\nload average after {os.getloadavg()[0]:.2f}")
            return 0  # a figure, not a gate: a loaded machine inflates it


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks` calls this with no arguments."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="the balancer alone, no member started (a box too busy to boot them)",
    )
    parser.add_argument(
        "--before",
        metavar="PYTHON",
        help="also run each command, in turns, with this interpreter (another checkout's "
        "venv, e.g. /work/main/.venv/bin/python): the 'before' column",
    )
    args = parser.parse_args(argv or [])
    return asyncio.run(measure(args.runs, args.fresh, args.before))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
