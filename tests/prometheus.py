"""A throwaway Prometheus server for tests: Debian's /usr/bin/prometheus with
its own config, its TSDB in a temporary directory, on an ephemeral loopback
port, scraping what the test names every second; never a system service.

`running_prometheus` waits on conditions (the server ready, then each target
scraped and up, read from /api/v1/targets), never on sleeps, and always kills
the server's process group, even when the test fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import free_port, require_binary, wait_until

HOST = "127.0.0.1"
SCRAPE_INTERVAL = "1s"


@dataclass(frozen=True)
class Target:
    """One scrape job: `host:port` serving `path`, with a bearer token when set."""

    job: str
    address: str
    path: str = "/metrics"
    token: str | None = None


@dataclass(frozen=True)
class Prometheus:
    url: str
    root: Path

    async def targets(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(self.url + "/api/v1/targets") as resp,
        ):
            document = await resp.json()
        active: list[dict[str, Any]] = document["data"]["activeTargets"]
        return active

    async def scraped(self, job: str) -> bool:
        """Whether `job`'s target was scraped and found up."""
        return any(
            t["labels"].get("job") == job and t["health"] == "up" for t in await self.targets()
        )

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(self.url + "/api/v1/query", data={"query": promql}) as resp,
        ):
            document = await resp.json()
        assert document["status"] == "success", document
        result: list[dict[str, Any]] = document["data"]["result"]
        return result


def config_text(targets: Sequence[Target], root: Path) -> str:
    """prometheus.yml (JSON is YAML): one job per target, tokens in files."""
    jobs = []
    for t in targets:
        job: dict[str, Any] = {
            "job_name": t.job,
            "metrics_path": t.path,
            "static_configs": [{"targets": [t.address]}],
        }
        if t.token is not None:
            secret = root / f"{t.job}.token"
            secret.write_text(t.token)
            secret.chmod(0o600)
            job["authorization"] = {"type": "Bearer", "credentials_file": str(secret)}
        jobs.append(job)
    document = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": jobs,
    }
    return json.dumps(document, indent=2)


async def _ready(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(url + "/-/ready") as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@contextlib.asynccontextmanager
async def running_prometheus(
    root: Path, targets: Sequence[Target], timeout: float = 60.0
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping `targets`, ready and with every target scraped up."""
    binary = require_binary("prometheus", "/usr/bin/prometheus")
    config = root / "prometheus.yml"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(config_text(targets, root))

    await asyncio.to_thread(prepare)
    port = free_port(HOST)
    url = f"http://{HOST}:{port}"
    log = root / "prometheus.log"
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            str(binary), f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=1h",
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
            start_new_session=True,  # its own process group, killed whole below
        )  # fmt: skip
    try:

        async def up() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}: {log.read_text()}")
            return await _ready(url)

        await wait_until(up, timeout=timeout, interval=0.1, what="prometheus ready")
        server = Prometheus(url, root)
        for t in targets:
            await wait_until(
                lambda job=t.job: server.scraped(job),
                timeout=timeout,
                interval=0.2,
                what=f"prometheus scraped {t.job} ({t.address}{t.path}): {log}",
            )
        yield server
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
