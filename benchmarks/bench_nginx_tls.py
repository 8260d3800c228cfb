"""nginx loading its certificates at every handshake (tls_load = "handshake"):
what it costs per handshake, and what a renewal by rename does to handshakes.

1. Cost. nginx as the driver renders it (2 clusters x 3 sample-app members,
   `worker_processes auto`), once with tls_load = "config" and once with
   "handshake", each with an ECDSA P-256 and an RSA 2048 certificate (trustme);
   --handshakes full TLS handshakes from --clients concurrent clients (a new
   connection each, no session resumption, closed after the handshake). The
   figure is nginx's worker CPU time (user + system, from /proc) per handshake,
   which holds on a loaded machine; handshakes/s is wall clock with the client
   on the same cores and is noise under load.

2. Renewal. The link every handshake follows is renamed back and forth between
   two versions every millisecond (a new link renamed over the old one, as a
   renewal does) for --seconds while one client makes fresh handshakes back to
   back; then the same with the alternative the driver does not use: one PEM
   holding both certificate and key, replaced by rename (nginx opens it once for
   the certificate and again for the key). Handshakes that failed are counted.

    .venv/bin/python -m benchmarks nginx_tls
    .venv/bin/python benchmarks/bench_nginx_tls.py [--handshakes 1500] [--clients 4]
        [--seconds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import trustme

from benchmarks import DOCS, machine, write_section
from changeover.balancers.render import TEMPLATE_DIR
from changeover.config import BalancerInstance

KEYS = {"ECDSA P-256": trustme.KeyType.ECDSA, "RSA 2048": trustme.KeyType.RSA}


def client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's work is measured, not trust
    return context


async def handshake(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client())
    writer.close()


def worker_cpu(pid: int) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in psutil.Process(pid).children())


@asynccontextmanager
async def nginx(
    root: Path,
    tls_load: str,
    key: trustme.KeyType,
    template_dir: Path | None = None,
    state: Callable[[Path], None] | None = None,
    pair: Any = None,
) -> AsyncIterator[Any]:
    """nginx with its members serving `pair` (else a new one); `state` prepares
    its state directory first."""
    from tests.certs import issue
    from tests.integration.realbalancers import (
        HOST,
        instance_for,
        parse_site,
        running_balancer,
        running_members,
        searchable_dir,
        site_data,
    )

    data = site_data("nginx")
    pair = pair or issue(trustme.CA(), root / "certs", "site", HOST, key_type=key)
    data["balancer"] |= {"tls_cert": str(pair.cert), "tls_key": str(pair.key), "tls_load": tls_load}
    topology = parse_site(data, root)
    state_dir = searchable_dir("bench-nginx-tls-state-")
    if state:
        state(state_dir)
    settings = instance_for("nginx", root / "lb1", state_dir=state_dir)
    async with (
        running_members(topology, logs=root),
        running_balancer(
            "nginx",
            topology,
            root / "lb1",
            instance=BalancerInstance.model_validate(settings),
            template_dir=template_dir,
        ) as real,
    ):
        yield real


async def cost(
    tls_load: str, key: trustme.KeyType, count: int, clients: int
) -> tuple[float, float]:
    """(nginx worker CPU microseconds per handshake, handshakes per second)."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-tls-") as tmp:
        async with nginx(Path(tmp), tls_load, key) as real:
            port = real.topology.balancer.listen.port
            for _ in range(50):  # warm-up
                await handshake(port)

            async def some(n: int) -> None:
                for _ in range(n):
                    await handshake(port)

            before, started = worker_cpu(real.proc.pid), time.monotonic()
            await asyncio.gather(*(some(count // clients) for _ in range(clients)))
            wall = time.monotonic() - started
            cpu = worker_cpu(real.proc.pid) - before
    done = count // clients * clients
    return cpu / done * 1e6, done / wall


def resumptions(port: int, count: int) -> int:
    """`count` handshakes resuming one session (its TLS 1.3 ticket, read after
    a first full handshake); how many nginx resumed. Blocking: run in a thread."""
    context = client()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw) as first,
    ):
        first.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            first.recv(1)  # the tickets come after the handshake
        session = first.session
    reused = 0
    for _ in range(count):
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw, session=session) as again,
        ):
            reused += bool(again.session_reused)
    return reused


async def resumed_cost(tls_load: str, count: int) -> tuple[float, int]:
    """(nginx worker CPU microseconds per resumed handshake, resumed of `count`)."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-tls-") as tmp:
        async with nginx(Path(tmp), tls_load, trustme.KeyType.ECDSA) as real:
            port = real.topology.balancer.listen.port
            before = worker_cpu(real.proc.pid)
            reused = await asyncio.to_thread(resumptions, port, count)
            cpu = worker_cpu(real.proc.pid) - before
    return cpu / count * 1e6, reused


def single_file_template(where: Path) -> Path:
    """The nginx template with one PEM per pair (certificate and key) in place of
    the version link: what the driver does not do, for the comparison."""
    text = (TEMPLATE_DIR / "nginx.cfg.j2").read_text()
    old = (
        "        ssl_certificate $changeover_tls_dir/{{ pair.label }}.pem;\n"
        "        ssl_certificate_key $changeover_tls_dir/{{ pair.label }}.key;\n"
    )
    new = (
        "        ssl_certificate {{ tls.dir }}/single/{{ pair.label }}.pem$changeover_none;\n"
        "        ssl_certificate_key {{ tls.dir }}/single/{{ pair.label }}.pem$changeover_none;\n"
    )
    assert old in text, "the nginx template no longer names its certificates as expected"
    text = text.replace(old, new, 1).replace(
        "    map $ssl_server_name $changeover_tls_dir {",
        '    map $ssl_server_name $changeover_none {\n        default "";\n    }\n'
        "    map $ssl_server_name $changeover_tls_dir {",
        1,
    )
    where.mkdir(parents=True, exist_ok=True)
    (where / "nginx.cfg.j2").write_text(text)
    return where


def flipper(flip: Callable[[int], None], stop: threading.Event) -> int:
    flips = 0
    while not stop.is_set():
        flip(flips)
        flips += 1
        time.sleep(0.001)
    return flips


async def renewal(single: bool, seconds: float) -> tuple[int, int, int]:
    """(handshakes, failed, renames) while the served pair is renamed over."""
    from tests.certs import issue

    with tempfile.TemporaryDirectory(prefix="bench-nginx-tls-") as tmp:
        root = Path(tmp)
        ca = trustme.CA()
        pairs = [issue(ca, root / f"pair{n}", "site", "127.0.0.1") for n in range(2)]
        blobs = [p.cert.read_bytes() + p.key.read_bytes() for p in pairs]

        def single_pem(n: int, tls: Path) -> None:
            temporary = tls / "single" / f".default.pem.{n}"
            temporary.write_bytes(blobs[n % 2])
            temporary.chmod(0o644)
            temporary.replace(tls / "single" / "default.pem")

        def prepare(state_dir: Path) -> None:
            (state_dir / "tls" / "single").mkdir(parents=True, mode=0o755)
            (state_dir / "tls").chmod(0o755)
            single_pem(0, state_dir / "tls")

        templates = single_file_template(root / "templates") if single else None
        async with nginx(
            root,
            "handshake",
            trustme.KeyType.ECDSA,
            templates,
            prepare if single else None,
            pairs[0],
        ) as real:
            versions = Path(real.driver.certificates.root)
            if single:

                def flip(n: int) -> None:
                    single_pem(n, versions)

            else:
                link = versions / "current"
                second = versions / "second"
                second.mkdir(mode=0o755)
                for suffix, source in ((".pem", pairs[1].cert), (".key", pairs[1].key)):
                    (second / f"default{suffix}").write_bytes(source.read_bytes())
                    (second / f"default{suffix}").chmod(0o644)
                targets = [link.readlink(), Path("second")]

                def flip(n: int) -> None:
                    temporary = versions / f".current.{n}"
                    temporary.symlink_to(targets[n % 2])
                    temporary.replace(link)

            port = real.topology.balancer.listen.port
            stop = threading.Event()
            flips = asyncio.get_running_loop().run_in_executor(None, flipper, flip, stop)
            done = failed = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    await handshake(port)
                    done += 1
                except (ssl.SSLError, OSError):
                    failed += 1
            stop.set()
            renames = await flips
    return done + failed, failed, renames


def nginx_version() -> str:
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return result.stderr.strip().removeprefix("nginx version: nginx/")


async def amain(args: argparse.Namespace) -> str:
    rows = []
    for label, key in KEYS.items():
        figures = {}
        for tls_load in ("config", "handshake"):
            us, rate = await cost(tls_load, key, args.handshakes, args.clients)
            figures[tls_load] = (us, rate)
            print(f"-- {label}, tls_load {tls_load}: {us:.0f} us CPU/handshake, {rate:.0f}/s")
        (c_us, c_rate), (h_us, h_rate) = figures["config"], figures["handshake"]
        rows.append(
            f"| {label} | {c_us:.0f} us | {h_us:.0f} us | +{h_us - c_us:.0f} us "
            f"({h_us / c_us:.2f}x) | {c_rate:.0f} / {h_rate:.0f} |"
        )
    resumed = {}
    for tls_load in ("config", "handshake"):
        resumed[tls_load] = await resumed_cost(tls_load, args.handshakes)
        us, reused = resumed[tls_load]
        print(f"-- resumed, tls_load {tls_load}: {us:.0f} us CPU, {reused} resumed")
    (c_us, c_reused), (h_us, h_reused) = resumed["config"], resumed["handshake"]
    rows.append(
        f"| ECDSA P-256, resumed (ticket; {min(c_reused, h_reused)} of {args.handshakes}) "
        f"| {c_us:.0f} us | {h_us:.0f} us | {h_us - c_us:+.0f} us | sequential |"
    )
    races = []
    for single in (False, True):
        total, failed, renames = await renewal(single, args.seconds)
        what = "one PEM replaced by rename" if single else "the version link renamed (the driver)"
        print(f"-- {what}: {failed} of {total} handshakes failed, {renames} renames")
        races.append(f"| {what} | {renames} | {total} | {failed} |")
    load = os.getloadavg()[0]
    when = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    versions = f"nginx/{nginx_version()}, {ssl.OPENSSL_VERSION}, Python {platform.python_version()}"
    header = (
        '| Certificate | tls_load = "config" | "handshake" '
        "| cost of loading per handshake | handshakes/s (config / handshake) |"
    )
    return f"""`python -m benchmarks nginx_tls` ({when}) on {machine()}; {versions};
load average {load:.1f} at the end.

nginx as the driver renders it (`worker_processes auto`, TLS 1.3), {args.handshakes}
full handshakes per row from {args.clients} concurrent clients (a new connection each,
no session resumption, closed after the handshake). The figure is nginx's worker
CPU (user + system) per handshake, steady under load; handshakes/s is wall clock
with the clients on the same cores.

{header}
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

A resumed session (the last row: one client resuming one session ticket, one
handshake after the other) does not load the certificate: OpenSSL calls the
certificate callback only for a full handshake. Requests on a kept-alive
connection make no handshake at all.

A renewal's rename under fresh handshakes, one client back to back for
{args.seconds:g} s while the served pair is renamed over every millisecond:

| Renewed by | renames | handshakes | failed |
|---|---:|---:|---:|
{chr(10).join(races)}

nginx opens a certificate's file once for the certificate and again for the key,
so a handshake between two renames of a single file can get the certificate of
one pair and the key of the other (`SSL_use_PrivateKey ... key values mismatch`);
the version link is resolved once per handshake, so none can.
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks` calls this with no arguments."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true", help="print, leave docs alone")
    args = parser.parse_args(argv or [])
    body = asyncio.run(amain(args))
    print(body)
    if not args.no_write:
        write_section("## nginx: certificates loaded per handshake", body)
        print(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
