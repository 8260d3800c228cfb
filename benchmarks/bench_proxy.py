"""The embedded balancer against HAProxy, in front of the same nginx, in one run.

nginx answers `return 200` on two loopback ports (one member per cluster);
HAProxy and the embedded balancer (1 and 2 workers) each balance over both
with round-robin and an inserted route cookie; `wrk -t2 -c50 -d10s` measures
each after a short warm-up. Every server runs from its own temporary config on
ephemeral loopback ports and is stopped at the end. The figures are printed
and written to the "Embedded balancer" section of docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import os
import platform
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

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Embedded balancer"
DURATION = "10s"
WARMUP = "2s"
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


def wrk(port: int, duration: str = DURATION) -> str:
    args = ["wrk", "-t2", "-c50", f"-d{duration}", "--latency", f"http://127.0.0.1:{port}/"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout


def measure(name: str, port: int, pid: int) -> Figures:
    wrk(port, WARMUP)  # fill keep-alive pools and caches first
    cpu_before = cpu_seconds(pid)
    out = wrk(port)
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


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"


def versions() -> str:
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    python = platform.python_version()
    return f"HAProxy {haproxy}, {nginx.split(': ')[-1]}, wrk {wrk_v}, Python {python}"


def report(results: list[Figures]) -> str:
    base = results[0]
    rows = [
        "| Balancer | req/s | p99 latency | errors | req/s vs HAProxy | p99 vs HAProxy "
        "| balancer CPU per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.name} | {r.requests_per_s:,.0f} | {r.p99_ms:.2f} ms | {r.errors} "
            f"| {r.requests_per_s / base.requests_per_s:.2f}x | {r.p99_ms / base.p99_ms:.2f}x "
            f"| {r.cpu_us:.1f} us |"
        )
    return "\n".join(rows)


def write_section(body: str) -> None:
    text = (
        DOCS.read_text()
        if DOCS.exists()
        else "# Benchmarks\n\nFigures measured by `make bench` (`python -m benchmarks`).\n"
    )
    section = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def main() -> int:
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench_proxy: {tool} is not installed (make system-deps)")
            return 2
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin"
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="changeover-bench-") as name:
        tmp = Path(name)
        upstreams = (free_port(), free_port())
        nginx = ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log")]
        nginx += ["-c", str(nginx_config(tmp, upstreams))]
        with running(nginx, upstreams[1], tmp / "nginx.out"):
            print(
                f"wrk -t2 -c50 -d{DURATION} (after a {WARMUP} warm-up), nginx `return 200` upstream"
            )
            port = free_port()
            haproxy = ["haproxy", "-db", "-f", str(haproxy_config(tmp, port, upstreams))]
            with running(haproxy, port, tmp / "haproxy.out") as process:
                results.append(measure("HAProxy", port, process.pid))
            for workers in (1, 2):
                port = free_port()
                config = changeover_config(tmp, port, upstreams)
                balancer = [sys.executable, "-m", "changeover.proxy", "-c", str(config)]
                command = [*balancer, "--workers", str(workers)]
                with running(command, port, tmp / "balancer.out") as process:
                    label = f"changeover, {workers} worker{'s' if workers > 1 else ''}"
                    results.append(measure(label, port, process.pid))
    load = os.getloadavg()[0]
    table = report(results)
    print(table)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    write_section(
        f"""`python -m benchmarks proxy` ({when}) on {machine()}; {versions()}.

`wrk -t2 -c50 -d{DURATION} --latency` on loopback after a {WARMUP} warm-up, each balancer
in front of the same nginx (`return 200`, one worker process, two ports = two members),
round-robin with an inserted route cookie. HAProxy runs with its default threads.
wrk, nginx and the balancer share the machine's cores; the ratios are what the target
is about (>= 0.8x HAProxy req/s, p99 <= 2x). Load average at the end of the run:
{load:.1f} (anything well above 2 on this machine means other work competed and the
req/s figures are noise; "balancer CPU per request" is the steadier figure).

{table}
"""
    )
    print(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
