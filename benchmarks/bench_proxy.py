"""The embedded balancer against HAProxy, in front of the same nginx, in one run.

nginx answers `return 200` on two loopback ports (one member per cluster);
HAProxy and the embedded balancer (1 and 2 workers) each balance over both
with round-robin and an inserted route cookie; `wrk -t2 -c50 -d10s` measures
each after a short warm-up. Every server runs from its own temporary config on
ephemeral loopback ports and is stopped at the end. The figures are printed
and written to the "Embedded balancer" section of docs/benchmarks.md.
"""

from __future__ import annotations

import cProfile
import dataclasses
import datetime
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import uvloop

from benchmarks import DOCS, machine, write_section
from changeover.config import parse
from changeover.proxy.protocol import Client, Upstream, Worker
from changeover.proxy.routing import PUBLIC
from changeover.proxy.state import PoolState, SharedState

SECTION = "## Embedded balancer"
DURATION = "10s"
WARMUP = "2s"
ROUNDS = 3  # each balancer measured this often, in turns; the median run is kept
TOKEN = "bench-token"


@dataclass(frozen=True)
class Figures:
    name: str
    requests_per_s: float
    p99_ms: float
    errors: int
    cpu_us: float  # CPU time of the balancer's processes per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    name: str, port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


@contextmanager
def running(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(args[0], port, process, log)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nginx_config(tmp: Path, ports: tuple[int, int]) -> Path:
    config = tmp / "nginx.conf"
    config.write_text(
        f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{ports[0]};
        listen 127.0.0.1:{ports[1]};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    return config


def haproxy_config(tmp: Path, port: int, upstreams: tuple[int, int]) -> Path:
    config = tmp / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend public
    bind 127.0.0.1:{port}
    default_backend pool
backend pool
    balance roundrobin
    option forwardfor
    option httpchk GET /health
    cookie CHANGEOVER_ROUTE insert indirect httponly
    server a1 127.0.0.1:{upstreams[0]} cookie a1 check inter 1s
    server b1 127.0.0.1:{upstreams[1]} cookie b1 check inter 1s
"""
    )
    return config


def changeover_config(tmp: Path, port: int, upstreams: tuple[int, int]) -> Path:
    config = tmp / "changeover.toml"
    config.write_text(
        f"""[balancer]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{free_port()}"
admin_token = "{TOKEN}"

[[clusters]]
name = "a"
members = [{{ name = "a1", port = {upstreams[0]} }}]

[[clusters]]
name = "b"
members = [{{ name = "b1", port = {upstreams[1]} }}]
"""
    )
    return config


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (threads included)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


# wrk repeats one request; this script gives every request a path of its own, so no
# request head is the same as the one before it on its connection.
NEW_PATHS = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/item/" .. counter)
end
"""


def wrk(port: int, duration: str, script: Path | None) -> str:
    args = ["wrk", "-t2", "-c50", f"-d{duration}", "--latency", f"http://127.0.0.1:{port}/"]
    args += ["-s", str(script)] if script else []
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout


def measure(name: str, port: int, pid: int, script: Path | None) -> Figures:
    wrk(port, WARMUP, script)  # fill keep-alive pools and caches first
    cpu_before = cpu_seconds(pid)
    out = wrk(port, DURATION, script)
    cpu = cpu_seconds(pid) - cpu_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if rate is None or p99 is None or total is None:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    figures = Figures(
        name,
        float(rate.group(1)),
        float(p99.group(1)) * _UNITS[p99.group(2)],
        errors,
        cpu / max(int(total.group(1)), 1) * 1e6,
    )
    print(
        f"  {name:<24} {figures.requests_per_s:>8.0f} req/s  p99 {figures.p99_ms:>6.2f} ms  "
        f"errors {figures.errors}  CPU {figures.cpu_us:.1f} us/request",
        flush=True,
    )
    return figures


class _NullTransport:
    """Stands in for a socket so only the balancer's Python is timed."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


_REQUEST = b"GET /%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 20:00:0%d GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\n"
    b"Connection: keep-alive\r\n\r\nok\n"
)


async def _hot_path(requests: int, profile: cProfile.Profile | None, heads: int) -> float:
    """CPU seconds for `requests` wrk-like exchanges through Client and Upstream,
    taking turns among `heads` distinct request heads and response heads (1: every
    head repeats the last one, as wrk's and nginx's do within a second)."""
    request_heads = [_REQUEST % i for i in range(heads)]
    response_heads = [_RESPONSE % i for i in range(heads)]
    topology = parse(
        {
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 9001}]},
                {"name": "b", "members": [{"name": "b1", "port": 9002}]},
            ]
        }
    )
    shared = SharedState(2, 1)
    PoolState(topology, shared, None)
    worker = Worker(topology, shared, 0)
    for member in (0, 1):
        upstream = Upstream(worker, member)
        upstream.connection_made(_NullTransport())  # type: ignore[arg-type]
        worker.idle[member].append(upstream)
    client = Client(worker, PUBLIC, False, b"127.0.0.1:8080")
    client.connection_made(_NullTransport())  # type: ignore[arg-type]
    if profile is not None:
        profile.enable()
    started = time.process_time()
    for i in range(requests):
        client.data_received(request_heads[i % heads])
        assert client.active is not None and client.active.upstream is not None
        client.active.upstream.data_received(response_heads[i % heads])
    elapsed = time.process_time() - started
    if profile is not None:
        profile.disable()
    return elapsed


def hot_path(heads: int) -> tuple[float, str]:
    """(Python microseconds per request, the top of its profile as markdown)."""
    runs = [uvloop.run(_hot_path(100_000, None, heads)) for _ in range(3)]
    us = min(runs) / 100_000 * 1e6
    profile = cProfile.Profile()
    uvloop.run(_hot_path(20_000, profile, heads))
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:8]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    lines = ["| function | share of own time |", "|---|---:|"]
    for (path, line, name), values in rows:
        where = f"{Path(path).name}:{line} {name}" if line else name
        lines.append(f"| `{where}` | {values[2] / total:.0%} |")
    return us, "\n".join(lines)


def balancers(tmp: Path, upstreams: tuple[int, int]) -> Iterator[tuple[str, list[str], int]]:
    """(name, command, port) of HAProxy and the embedded balancer with 1 and 2 workers."""
    port = free_port()
    yield "HAProxy", ["haproxy", "-db", "-f", str(haproxy_config(tmp, port, upstreams))], port
    for workers in (1, 2):
        port = free_port()
        config = changeover_config(tmp, port, upstreams)
        command = [sys.executable, "-m", "changeover.proxy", "-c", str(config)]
        command += ["--workers", str(workers)]
        yield f"changeover, {workers} worker{'s' if workers > 1 else ''}", command, port


def median(runs: list[Figures]) -> Figures:
    """The run with the median req/s (its own p99 and CPU go with it); errors summed."""
    middle = sorted(runs, key=lambda f: f.requests_per_s)[len(runs) // 2]
    return dataclasses.replace(middle, errors=sum(f.errors for f in runs))


def versions() -> str:
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    python = platform.python_version()
    return f"HAProxy {haproxy}, {nginx.split(': ')[-1]}, wrk {wrk_v}, Python {python}"


def report(results: list[Figures]) -> str:
    """A table; each row is compared with the HAProxy row of the same request mix."""
    bases = {r.name.removeprefix("HAProxy"): r for r in results if r.name.startswith("HAProxy")}
    rows = [
        "| Balancer | req/s | p99 latency | errors | req/s vs HAProxy | p99 vs HAProxy "
        "| balancer CPU per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = bases[", new path each" if r.name.endswith(", new path each") else ""]
        rows.append(
            f"| {r.name} | {r.requests_per_s:,.0f} | {r.p99_ms:.2f} ms | {r.errors} "
            f"| {r.requests_per_s / base.requests_per_s:.2f}x | {r.p99_ms / base.p99_ms:.2f}x "
            f"| {r.cpu_us:.1f} us |"
        )
    return "\n".join(rows)


def main() -> int:
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench_proxy: {tool} is not installed (make system-deps)")
            return 2
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin"
    with tempfile.TemporaryDirectory(prefix="changeover-bench-") as name:
        tmp = Path(name)
        upstreams = (free_port(), free_port())
        nginx = ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log")]
        nginx += ["-c", str(nginx_config(tmp, upstreams))]
        with running(nginx, upstreams[1], tmp / "nginx.out"):
            print(
                f"wrk -t2 -c50 -d{DURATION} (after a {WARMUP} warm-up), nginx `return 200` "
                f"upstream, {ROUNDS} rounds taking turns"
            )
            script = tmp / "new-paths.lua"
            script.write_text(NEW_PATHS)
            rounds: dict[str, list[Figures]] = {}
            for _ in range(ROUNDS):
                for name, command, port in balancers(tmp, upstreams):
                    with running(command, port, tmp / "balancer.out") as process:
                        for label, lua in ((name, None), (f"{name}, new path each", script)):
                            figures = measure(label, port, process.pid, lua)
                            rounds.setdefault(label, []).append(figures)
            results = [median(runs) for runs in rounds.values()]
    load = os.getloadavg()[0]
    table = report(results)
    python_us, profile = hot_path(1)
    fresh_us, fresh_profile = hot_path(2)
    print(f"hot path without syscalls: {python_us:.1f} us of Python per request")
    print(profile)
    print(f"with heads that differ from the last: {fresh_us:.1f} us")
    print(fresh_profile)
    print(table)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    write_section(
        SECTION,
        f"""`python -m benchmarks proxy` ({when}) on {machine()}; {versions()}.

`wrk -t2 -c50 -d{DURATION} --latency` on loopback after a {WARMUP} warm-up, each balancer
measured {ROUNDS} times in turns (the run with the median req/s is shown, errors of all
runs summed), in front of the same nginx (`return 200`, one worker process, two ports =
two members), round-robin with an inserted route cookie. HAProxy runs with its default
threads. wrk sends one request over and over; the "new path each" rows give every
request a path of its own (a wrk Lua script), so no request head repeats the last one
on its connection and the balancer parses each in full (see the hot path figures below).
wrk, nginx and the balancer share the machine's cores; the ratios are what the target
is about (>= 0.8x HAProxy req/s, p99 <= 2x). Load average at the end of the run:
{load:.1f} (anything well above 2 on this machine means other work competed and the
req/s figures are noise; "balancer CPU per request" is the steadier figure).

{table}

Python per request on the hot path without any syscall (Client and Upstream driven
in-process with null transports, wrk's request and nginx's response), best of
3 x 100,000 (the issue's target is about 8 us):

- {python_us:.1f} us when each head repeats the last one on its connection, byte for
  byte, as wrk's do and nginx's do until its Date header ticks: a whole request or
  response in one read that equals the last one is not parsed again (llhttp would end
  where it already is, between two messages);
- {fresh_us:.1f} us when every head differs from the last (a browser's path changes,
  say): the full path, llhttp and the header scan.

Where the time goes (cProfile, own time), repeated heads:

{profile}

Heads that differ:

{fresh_profile}
""",
    )
    print(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
