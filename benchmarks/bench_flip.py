"""Balancer flips: how long from `apply` called to requests seeing the new pool,
and how many requests fail over 20 consecutive flips under 500 requests/s.

For each driver (HAProxy, Apache httpd, nginx, and the embedded balancer) on
2 clusters x 3 sample-app members: the probe runs in its own process at 500
requests/s with sticky users; we flip "a live, b out" <-> "a out, b live" 20
times, 1 s apart. A separate poller sends a cookieless request (a new session)
every 10 ms; the flip time is from `apply` called to the start of the first such
request answered by the new cluster and followed only by answers from it (5 in
a row), so it is known to about 10 ms. (The poller used to send back to back:
on a 2-core machine that closed loop alone took as much CPU as the probe and the
members together, and the starved probe reported its own lateness as timeouts.)

The probe watches the balancer through its driver (`--watch-config`), so a user
moved off a member that the flip took out is not counted as a broken session.

    .venv/bin/python -m benchmarks flip   (or: benchmarks/bench_flip.py [--flips 20]
                                           [--rate 500] [--drivers haproxy,apache,nginx,builtin])
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from changeover.model import Admission, PoolView
from changeover.probe import ProbeReport

CONFIRM = 5  # consecutive answers from the new cluster that make a flip "seen"
POLL_EVERY = 0.01  # seconds between the poller's new-session requests


class Flippable(Protocol):
    async def apply(self, desired: dict[str, Admission]) -> PoolView: ...


@dataclass
class FlipResult:
    driver: str
    flip_ms: list[float]
    apply_ms: list[float]
    report: ProbeReport


def pool(live: str, out: str) -> dict[str, Admission]:
    return {
        f"{c}{i}": (Admission.LIVE if c == live else Admission.OUT)
        for c in (live, out)
        for i in (1, 2, 3)
    }


async def poll_members(url: str, stop: asyncio.Event, seen: list[tuple[float, str]]) -> None:
    """A new-session request every POLL_EVERY s (never a burst to catch up, never
    two at once); (start time, cluster) of each answer."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=2), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        while not stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as resp:
                    await resp.read()
                    seen.append((started, resp.headers.get("X-Changeover-Member", "?")[:1]))
            await asyncio.sleep(max(0.0, started + POLL_EVERY - time.monotonic()))


def flip_seen_at(seen: list[tuple[float, str]], since: float, cluster: str) -> float | None:
    """Start time of the first request after `since` from `cluster`, followed only by it."""
    after = [(t, c) for t, c in seen if t >= since]
    for i, (t, c) in enumerate(after):
        window = after[i : i + CONFIRM]
        if c == cluster and len(window) == CONFIRM and all(w == cluster for _, w in window):
            return t
    return None


async def flips(balancer: Flippable, url: str, count: int) -> tuple[list[float], list[float]]:
    seen: list[tuple[float, str]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_members(url, stop, seen))
    flip_ms, apply_ms = [], []
    try:
        await balancer.apply(pool("b", "a"))
        await asyncio.sleep(1.0)
        for n in range(count):
            live, out = ("a", "b") if n % 2 == 0 else ("b", "a")
            called = time.monotonic()
            await balancer.apply(pool(live, out))
            apply_ms.append((time.monotonic() - called) * 1000)
            await asyncio.sleep(1.0)
            at = flip_seen_at(seen, called, live)
            flip_ms.append((at - called) * 1000 if at is not None else float("nan"))
        await balancer.apply({name: Admission.LIVE for name in pool("a", "b")})
    finally:
        stop.set()
        await poller
    return flip_ms, apply_ms


@contextlib.asynccontextmanager
async def real_site(product: str, root: Path) -> AsyncIterator[tuple[Any, Path, dict[str, Any]]]:
    from tests.integration.realbalancers import (
        parse_site,
        running_balancer,
        running_members,
        site_data,
        write_probe_site,
    )

    data = site_data(product)
    topology = parse_site(data, root)
    async with (
        running_members(topology, logs=root),
        running_balancer(product, topology, root / "lb1") as real,
    ):
        yield real, write_probe_site(root / "probe-site.toml", real, data), data


async def run_real(product: str, count: int, rate: float) -> FlipResult:
    from tests.integration.realbalancers import finish_probe, probe_process

    with tempfile.TemporaryDirectory(prefix=f"bench-flip-{product}-") as tmp:
        root = Path(tmp)
        async with (
            real_site(product, root) as (real, site_file, _),
            probe_process(
                site_file, real.url, rate=rate, sticky_users=40, log=root / "probe.log"
            ) as probe,
        ):
            await asyncio.sleep(1.0)
            flip_ms, apply_ms = await flips(real.driver, real.url, count)
            report = await finish_probe(probe)
    return FlipResult(product, flip_ms, apply_ms, report)


async def run_builtin(count: int, rate: float) -> FlipResult:
    from changeover.balancers.factory import make_balancer
    from changeover.demo.scenario import DemoOptions, DemoSite

    with tempfile.TemporaryDirectory(prefix="bench-flip-builtin-") as tmp:
        site = DemoSite(Path(tmp), DemoOptions(members_per_cluster=3, startup_delay=0.2))
        async with site.running(), site.probe(rate, sticky_users=40) as probe:
            balancer = make_balancer(site.topo)
            try:
                await asyncio.sleep(1.0)
                flip_ms, apply_ms = await flips(balancer, site.public_url, count)
            finally:
                await balancer.close()
            report = await probe.finish()
    return FlipResult("builtin", flip_ms, apply_ms, report)


def fmt(values: list[float]) -> str:
    good = [v for v in values if v == v]  # NaN: never seen
    if not good:
        return "never"
    return f"{statistics.median(good):.0f} / {max(good):.0f}"


async def amain(drivers: list[str], count: int, rate: float) -> int:
    results = []
    for driver in drivers:
        print(f"-- {driver}: {count} flips under {rate:g} req/s", flush=True)
        result = await (
            run_builtin(count, rate) if driver == "builtin" else run_real(driver, count, rate)
        )
        results.append(result)
        r = result.report
        print(
            f"   flip ms median/max {fmt(result.flip_ms)}; "
            f"apply ms median/max {fmt(result.apply_ms)}; "
            f"sent {r.sent}, failed {r.failed} {dict(r.failures) if r.failed else ''}, "
            f"session breaks {r.session_breaks}, achieved {r.achieved_rate:.0f} req/s",
            flush=True,
        )
    load = os.getloadavg()[0]
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores, "
        f"{platform.platform()}, Python {platform.python_version()}; load average {load:.1f}\n"
    )
    print(
        "| Driver | flip time median / max (ms) | apply() median / max (ms) "
        "| requests | failed | session breaks |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for result in results:
        r = result.report
        print(
            f"| {result.driver} | {fmt(result.flip_ms)} | {fmt(result.apply_ms)} | {r.sent} | "
            f"{r.failed} | {r.session_breaks} |"
        )
    never = sum(v != v for res in results for v in res.flip_ms)
    return 1 if never or any(res.report.failed for res in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Print one line per driver and a Markdown table for docs/benchmarks.md."""
    parser = argparse.ArgumentParser(prog="bench_flip")
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--drivers", default="haproxy,apache,nginx,builtin")
    args = parser.parse_args(argv or [])  # `python -m benchmarks` passes none
    return asyncio.run(amain(args.drivers.split(","), args.flips, args.rate))


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
