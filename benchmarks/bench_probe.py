"""Probe throughput: can it keep a fixed schedule at 1000 and 2000 requests/s?

Runs one sample app and, for each rate, `python -m changeover.probe --json` for
10 s as its own process (as the demo runs it), then prints the achieved rate,
the worst schedule lag, latency and the CPU used by the probe and by the app.

    .venv/bin/python -m benchmarks probe     (or: benchmarks/bench_probe.py [--rates 1000,2000]
                                              [--duration 10])
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

import psutil

from changeover.probe import ProbeReport

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"sample app did not open port {port} within {timeout} s")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    url: str, rate: int, duration: float, app: psutil.Process
) -> tuple[ProbeReport, float, float]:
    """One probe run; returns the report and the probe's and the app's CPU in % of one core."""
    app_before = sum(app.cpu_times()[:2])
    cpu_before = children_cpu()
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "changeover.probe",
            url,
            f"--rate={rate}",
            f"--duration={duration}",
            "--sticky-users=100",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
    ).stdout
    wall = time.monotonic() - started
    probe_cpu = (children_cpu() - cpu_before) / wall * 100
    app_cpu = (sum(app.cpu_times()[:2]) - app_before) / wall * 100
    return ProbeReport.from_dict(json.loads(out)), probe_cpu, app_cpu


def main(argv: list[str] | None = None) -> int:
    """Print one line per rate; `python -m benchmarks` calls this with no arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,2000")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv or [])
    port = free_port()
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "changeover.demo.app",
            f"--port={port}",
            "--member=a1",
            "--version=v1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} CPUs,"
            f" {platform.platform()}, Python {platform.python_version()},"
            f" load average before {os.getloadavg()[0]:.2f}"
        )
        print("rate  sent   achieved  failed  max lag ms  p50 ms  p99 ms  probe CPU%  app CPU%")
        for rate in (int(r) for r in args.rates.split(",")):
            report, probe_cpu, app_cpu = run(
                f"http://{HOST}:{port}/", rate, args.duration, psutil.Process(app.pid)
            )
            lat = report.latency_ms
            print(
                f"{rate:<5} {report.sent:<6} {report.achieved_rate:<9.1f} {report.failed:<7}"
                f" {report.max_schedule_lag_ms:<11.1f} {lat['p50']:<7.2f} {lat['p99']:<7.2f}"
                f" {probe_cpu:<11.0f} {app_cpu:.0f}"
            )
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
    finally:
        app.terminate()
        app.wait(timeout=40)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
