"""HTTP checks: health and version of each member directly, smoke checks through
a cluster's QA entry point, and an optional smoke command."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import Counter

from changeover.config import Checks, Cluster, Member, Topology
from changeover.executors.base import render_argv
from changeover.executors.local import run_local
from changeover.httpclient import Client, HttpError
from changeover.model import CheckResult


def _balancer_url(topo: Topology, port: int) -> str:
    bal = topo.balancer
    return bal.listen.url("https" if bal.tls_cert else "http", port)


def public_entry(topo: Topology) -> str:
    """Base URL of the public listener: the live pool, as users reach it."""
    return _balancer_url(topo, topo.balancer.listen.port)


def _unverified() -> ssl.SSLContext:
    """QA entry points commonly use self-signed certificates in front of a
    private cluster; smoke checks test the app, not the PKI."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def qa_entry(topo: Topology, cluster: Cluster) -> tuple[str, str | None]:
    """(base URL, Host header) of the cluster's QA entry point: its own port when
    it has one, else the public listener with the cluster's QA host name."""
    if cluster.qa_port:
        return _balancer_url(topo, cluster.qa_port), None
    if cluster.qa_host:
        return public_entry(topo), cluster.qa_host
    raise ValueError(f"cluster {cluster.name!r} has no QA entry point (qa_port or qa_host)")


class Checker:
    """One pooled HTTP client for all checks of a release (no connection until
    a check runs; certificates are not verified, see `_unverified`)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.cfg: Checks = topo.checks
        self._client = Client(timeout=self.cfg.timeout, tls=_unverified)

    async def close(self) -> None:
        await self._client.close()

    async def _get(
        self, url: str, method: str = "GET", host: str | None = None
    ) -> tuple[int, str] | str:
        headers = {"Host": host} if host else {}
        try:
            resp = await self._client.request(method, url, headers=headers)
        except HttpError as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": ")
        return resp.status, resp.text()

    async def health(self, member: Member) -> CheckResult:
        got = await self._get(self.topo.member_url(member) + self.cfg.health_path)
        if isinstance(got, str):
            return CheckResult(member.name, False, got)
        ok = got[0] == self.cfg.health_status
        return CheckResult(member.name, ok, f"HTTP {got[0]}")

    async def version(self, member: Member, version: str) -> CheckResult:
        got = await self._get(self.topo.member_url(member) + self.cfg.version_path)
        if isinstance(got, str):
            return CheckResult(member.name, False, got)
        want = self.cfg.version_contains.replace("{version}", version)
        body = got[1].strip()
        ok = got[0] == 200 and want in body
        return CheckResult(
            member.name, ok, f"reports {body[:80]!r}" + ("" if ok else f", expected {want!r}")
        )

    async def versions(self) -> dict[str, str | None]:
        """What each member's version endpoint answers now: a short one-line
        answer, else None (down, an error, or a page that is no version)."""
        members = [m for _, m in self.topo.members()]
        answers = await asyncio.gather(
            *(self._get(self.topo.member_url(m) + self.cfg.version_path) for m in members)
        )
        return {m.name: _short_answer(a) for m, a in zip(members, answers, strict=True)}

    async def served_version(self) -> str | None:
        """The version most members report now, for a site whose first release
        has no journal yet."""
        votes = Counter(v for v in (await self.versions()).values() if v is not None)
        return votes.most_common(1)[0][0] if votes else None

    async def smoke(self, cluster: Cluster, version: str) -> list[CheckResult]:
        return await self.smoke_via(*qa_entry(self.topo, cluster), version)

    async def smoke_via(self, base: str, host: str | None, version: str) -> list[CheckResult]:
        """The smoke checks sent to `base` (with `host` as the Host header)."""
        results = []
        for check in self.cfg.smoke:
            url = base + check.path
            got = await self._get(url, check.method, host)
            target = f"{check.method} {check.path} via {base}" + (
                f" (Host: {host})" if host else ""
            )
            if isinstance(got, str):
                results.append(CheckResult(target, False, got))
                continue
            status, body = got
            problems = []
            if status != check.status:
                problems.append(f"HTTP {status}, expected {check.status}")
            if check.body_contains:
                want = check.body_contains.replace("{version}", version)
                if want not in body:
                    problems.append(f"body lacks {want!r}")
            results.append(
                CheckResult(target, not problems, "; ".join(problems) or f"HTTP {status}")
            )
        if self.cfg.smoke_command:
            results.append(await self._smoke_command(base, host, version))
        return results

    async def live_smoke(self, version: str) -> CheckResult | None:
        """The smoke command against the public live pool (bake), if there is one."""
        if not self.cfg.smoke_command:
            return None
        return await self._smoke_command(public_entry(self.topo), None, version)

    async def _smoke_command(self, base: str, host: str | None, version: str) -> CheckResult:
        argv = render_argv(self.cfg.smoke_command or "", {"version": version})
        env = os.environ | {"CHANGEOVER_QA_URL": base, "CHANGEOVER_VERSION": version}
        if host:
            env["CHANGEOVER_QA_HOST"] = host
        done = await run_local(argv, self.topo.executor.timeout, env=env)
        if done.problem:
            return CheckResult("smoke command", False, done.problem)
        text = done.out.decode("utf-8", "replace")[-2000:].strip()
        return CheckResult(
            "smoke command", done.status == 0, f"exit {done.status}" + (f": {text}" if text else "")
        )


def _short_answer(answer: tuple[int, str] | str) -> str | None:
    if isinstance(answer, str) or answer[0] != 200:
        return None
    body = answer[1].strip()
    return body if body and len(body) <= 100 and "\n" not in body else None
