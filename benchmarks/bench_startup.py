"""CLI start-up: the CPU (user + sys) of `changeover --help`, `status` and `plan`,
side by side with `python -c pass`, and where it goes.

A demo site (the embedded balancer and 2 x 1 sample-app members on loopback) runs
so that `status` and `plan` read a real balancer and real members. Each command
runs `--runs` times as its own process (`python -m changeover.cli ...`, as the
console script does); the figure is the median of its user + sys CPU (from
wait4, the process alone). The issue's target: under 0.15 s for each. `--fresh`
starts the balancer alone (each member's version read is refused at once), for
a machine too busy to boot the members at nice 19.

Bytecode: the package's modules are compiled first (`compileall`, as `pip
install` does for an installed package), since an environment with
PYTHONDONTWRITEBYTECODE=1 would otherwise compile every changeover module from
source in every run; `--no-bytecode` measures that case instead (a copy of the
package with no bytecode).

"Where it goes": the floor first, what any command with a parameter pays before
changeover's own code runs (typer, and the pydantic TypeAdapters typer 0.29
coerces every non-flag parameter through; the config models; asyncio and Rich),
as the CPU of importing each set; then each command once more with
`python -X importtime`, its import time (wall, self) added up by top-level
package.

    .venv/bin/python -m benchmarks startup   (or: benchmarks/bench_startup.py [--runs 9]
                                   [--fresh] [--no-bytecode] [--before PYTHON|CHECKOUT])
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import changeover
from benchmarks import compile_package
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


# What every command with a parameter imports before changeover's own code runs,
# each set including the ones above it.
FLOOR = {
    "import typer": "import typer",
    "+ typer's pydantic coercion": "import typer, typer._adapters",
    "+ the config models": "import typer, typer._adapters, changeover.config",
    "+ asyncio, Rich's tables": (
        "import typer, typer._adapters, changeover.config, asyncio, rich.console, rich.table"
    ),
}


def package_copy(source: Path, into: Path, bytecode: bool) -> Path:
    """A copy of the `changeover` package in `source` (a checkout's src/) under
    `into`, compiled or not: the directory to put first on PYTHONPATH."""
    shutil.copytree(
        source / "changeover", into / "changeover", ignore=shutil.ignore_patterns("__pycache__")
    )
    if bytecode:
        compileall.compile_dir(into / "changeover", quiet=1)
    return into


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


Env = dict[str, str]


def prepare(tmp: Path, before: str | None, bytecode: bool) -> tuple[Env, str | None, Env]:
    """(environment of this checkout's runs, the 'before' interpreter, its
    environment): the bytecode compiled, or a copy of the package without it;
    a 'before' checkout's package copied (and compiled alike) for this venv."""
    mine: Env = {}
    if bytecode:
        compile_package()
    else:
        here = Path(changeover.__file__).resolve().parent.parent
        mine["PYTHONPATH"] = str(package_copy(here, tmp / "this", bytecode=False))
    if before and Path(before).is_dir():
        theirs = {"PYTHONPATH": str(package_copy(Path(before) / "src", tmp / "before", bytecode))}
        return mine, sys.executable, theirs
    return mine, before, {}


async def measure(runs: int, fresh: bool, before: str | None, bytecode: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="changeover-bench-startup-") as tmp:
        mine, before_python, theirs = await asyncio.to_thread(prepare, Path(tmp), before, bytecode)
        site = DemoSite(Path(tmp), DemoOptions(members_per_cluster=1))
        async with site.running(fresh=fresh):
            quiet = dict(site.env) | {"PYTHONDONTWRITEBYTECODE": "1"}  # nothing written meanwhile
            env, before_env = quiet | mine, quiet | theirs
            print(
                f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} CPUs,"
                f" {platform.platform()}, Python {platform.python_version()},"
                f" load average before {os.getloadavg()[0]:.2f}; median of {runs} runs"
                + ("; members not started (--fresh)" if fresh else "")
                + ("; changeover's bytecode compiled" if bytecode else "; no bytecode")
            )
            table = commands(site.config, sys.executable)
            other = commands(site.config, before_python) if before_python else {}
            results: dict[str, tuple[float, float, float, int]] = {}
            earlier: dict[str, float] = {}
            for name, argv in table.items():
                samples, old = [], []
                for _ in range(runs):  # in turns, so both meet the same load
                    samples.append(await asyncio.to_thread(cpu_of, argv, env))
                    if other:
                        old.append((await asyncio.to_thread(cpu_of, other[name], before_env))[0])
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
            print("\nthe floor: CPU s of importing what any command with a parameter needs")
            for label, imports in FLOOR.items():
                cpus = [
                    (await asyncio.to_thread(cpu_of, [sys.executable, "-c", imports], env))[0]
                    for _ in range(runs)
                ]
                print(f"  {label:34} {statistics.median(cpus):.3f}")
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
        metavar="PYTHON|CHECKOUT",
        help="also run each command, in turns, with this interpreter (another checkout's "
        "venv), or this checkout's package with this venv (compiled as this one is): "
        "the 'before' column",
    )
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="run the package from source, as with PYTHONDONTWRITEBYTECODE=1 and no .pyc",
    )
    args = parser.parse_args(argv or [])
    return asyncio.run(measure(args.runs, args.fresh, args.before, not args.no_bytecode))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
