"""The migration check's speed: a 5 MiB file, whatever it contains, in under 3 s
and 150 MiB (issue 13).

Each case is a generated 5 MiB file, checked by `changeover.migrations.analyse`
in a fresh process of its own so that the peak memory (ru_maxrss) is that
case's alone. The target is judged on the CPU seconds of that process (on a
shared machine the wall-clock time also counts other people's work; both are
printed, with the load average). Cases: no findings, a finding in every statement, a mix of the
statements real migrations hold, for PostgreSQL and MySQL.

`--runs N` runs each case N times and judges the fastest (CPU time on a shared
machine only ever comes out too high); `--before PYTHON` runs the same cases,
in turns, with another checkout's interpreter (e.g. /work/main/.venv/bin/python)
for a "before" column measured in the same minutes.

    .venv/bin/python -m benchmarks migrations
    benchmarks/bench_migrations.py [--mib 5] [--runs 3] [--before PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

TARGET_SECONDS = 3.0
TARGET_MIB = 150.0

# (name, dialect, the statements repeated until the file is big enough)
CASES: list[tuple[str, str, str]] = [
    ("postgres, no findings", "postgres", "INSERT INTO t (a, b) VALUES (1, 'padding text');\n"),
    ("postgres, a finding each", "postgres", "ALTER TABLE users DROP COLUMN nickname;\n"),
    (
        "postgres, mixed",
        "postgres",
        "SET lock_timeout = '2s';\n"
        "CREATE TABLE IF NOT EXISTS audit (id bigint PRIMARY KEY, note text);\n"
        "ALTER TABLE users ADD COLUMN nick text;\n"
        "UPDATE users SET nick = name WHERE id < 100;\n"
        "CREATE INDEX CONCURRENTLY users_nick ON users (nick);\n"
        "COMMENT ON COLUMN users.nick IS 'shown name';\n",
    ),
    ("mysql, no findings", "mysql", "INSERT INTO t (a, b) VALUES (1, 'padding text');\n"),
    ("mysql, a finding each", "mysql", "ALTER TABLE users DROP COLUMN nickname;\n"),
    (
        "mysql, mixed",
        "mysql",
        "SET SESSION lock_wait_timeout = 5;\n"
        "CREATE TABLE IF NOT EXISTS audit (id bigint PRIMARY KEY, note text);\n"
        "ALTER TABLE users ADD COLUMN nick varchar(40), ALGORITHM=INPLACE, LOCK=NONE;\n"
        "UPDATE users SET nick = name WHERE id < 100;\n"
        "CREATE INDEX users_nick ON users (nick);\n"
        "INSERT INTO audit (id, note) VALUES (1, 'nick added');\n",
    ),
]

# Runs in the child: generate, check, report seconds, findings and peak memory.
_CHILD = """
import json, resource, sys, time
from changeover.migrations import analyse
dialect, unit, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
sql = unit * (size // len(unit))
started, cpu = time.perf_counter(), time.process_time()
findings = analyse(sql, dialect=dialect, phase="expand")
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(
    {"seconds": seconds, "cpu": cpu, "findings": len(findings), "mib": peak, "bytes": len(sql)}
))
"""


def run_case(python: str, dialect: str, unit: str, size: int) -> dict[str, float]:
    done = subprocess.run(
        [python, "-c", _CHILD, dialect, unit, str(size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def fastest(results: list[dict[str, float]]) -> dict[str, float]:
    """The run with the least CPU time, with the highest peak memory of all runs."""
    best = dict(min(results, key=lambda r: r["cpu"]))
    best["mib"] = max(r["mib"] for r in results)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table for docs/benchmarks.md; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(prog="bench_migrations")
    parser.add_argument("--mib", type=float, default=5.0, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=1, help="runs per case; the fastest counts")
    parser.add_argument("--before", metavar="PYTHON", help="another checkout's interpreter")
    args = parser.parse_args(argv or [])  # `python -m benchmarks` passes none
    size = int(args.mib * 1024 * 1024)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = f"the fastest of {args.runs} runs" if args.runs > 1 else "one run"
    print(
        f"`python -m benchmarks migrations` ({stamp}) on {os.cpu_count()} cores ({cpu_model()}), "
        f"Python {platform.python_version()}; {args.mib:g} MiB per file, {runs} per case, "
        f"target < {TARGET_SECONDS:g} s CPU and < {TARGET_MIB:g} MiB peak; "
        f"load average at the start: {os.getloadavg()[0]:.1f}."
    )
    print()
    before = " before CPU s | before MiB |" if args.before else ""
    print(f"| file | statements | findings | CPU s | wall s | peak MiB |{before} target |")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.before else "") + "---|")
    missed = 0
    for name, dialect, unit in CASES:
        results: list[dict[str, float]] = []
        earlier: list[dict[str, float]] = []
        for _ in range(args.runs):  # in turns, so both see the same load
            results.append(run_case(sys.executable, dialect, unit, size))
            if args.before:
                earlier.append(run_case(args.before, dialect, unit, size))
        result = fastest(results)
        statements = int(result["bytes"]) // len(unit) * unit.count(";")
        met = result["cpu"] < TARGET_SECONDS and result["mib"] < TARGET_MIB
        missed += not met
        was = ""
        if earlier:
            old = fastest(earlier)
            same = (
                ""
                if old["findings"] == result["findings"]
                else f" ({int(old['findings'])} findings)"
            )
            was = f" {old['cpu']:.2f}{same} | {old['mib']:.0f} |"
        print(
            f"| {name} | {statements:,} | {int(result['findings']):,} | {result['cpu']:.2f} | "
            f"{result['seconds']:.2f} | {result['mib']:.0f} |{was} {'met' if met else 'MISSED'} |",
            flush=True,
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
