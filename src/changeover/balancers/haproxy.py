"""HAProxy (2.2 or later) through its runtime API, the stats socket.

Admissions change at run time, without a reload: LIVE is `set server live/<m>
state ready` (and weight 1, since a config rendered DRAINING says `weight 0`),
DRAINING is `state drain`, OUT is `state maint`. The rendered config is kept in
step (checked with `haproxy -c` first) so a cold start serves the same pool.
A reload (topology change) first saves `show servers state` into the
server-state-file, which the new process loads, then waits for the new worker.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from changeover.balancers.base import BalancerError
from changeover.balancers.process import ConfiguredBalancer, ordered_changes
from changeover.balancers.render import runtime_paths
from changeover.config import parse_hostport
from changeover.model import Admission, MemberState, PoolView
from changeover.polling import poll_until

LIVE_BACKEND = "live"
SESSIONS_TABLE = "sessions"  # the stick table of sticky sessions (haproxy.cfg.j2)

# srv_admin_state bits of `show servers state` (HAProxy's enum srv_admin):
# any forced, inherited or resolution maintenance (FMAINT|IMAINT|RMAINT, not the
# informational CMAINT "disabled in the config") is OUT; FDRAIN|IDRAIN is DRAINING.
_MAINT = 0x01 | 0x02 | 0x20
_DRAIN = 0x08 | 0x10

_COMMAND = {
    Admission.LIVE: ("set server {b}/{s} state ready", "set weight {b}/{s} 1"),
    Admission.DRAINING: ("set server {b}/{s} state drain",),
    Admission.OUT: ("set server {b}/{s} state maint",),
}


def qa_backend(cluster: str) -> str:
    return "qa_" + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in cluster)


def parse_servers_state(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """Rows of `show servers state`, keyed by (backend, server)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line[1:].split() for line in lines if line.startswith("#")), None)
    if header is None:
        raise BalancerError(f"unexpected answer to 'show servers state': {text[:200]!r}")
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines:
        if line.startswith("#") or len(line.split()) < len(header) - 1:
            continue
        row = dict(zip(header, line.split(), strict=False))
        rows[row["be_name"], row["srv_name"]] = row
    return rows


def parse_stat(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """Rows of `show stat` (CSV), keyed by (pxname, svname)."""
    body = text.lstrip()
    if not body.startswith("# "):
        raise BalancerError(f"unexpected answer to 'show stat': {text[:200]!r}")
    reader = csv.DictReader(io.StringIO(body[2:]))
    return {(row["pxname"], row["svname"]): row for row in reader}


def parse_table_keys(text: str) -> list[str] | None:
    """The keys of `show table <t>` (one `0x...: key=<k> use=... exp=...` line
    each), or None when HAProxy has no such table (a config rendered before it)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# table:"):
        return None
    return [match.group(1) for line in lines[1:] if (match := re.search(r"\bkey=(\S+)", line))]


def sessions_per_member(keys: Sequence[str], members: Mapping[str, str]) -> Counter[str]:
    """Sessions per member from the session cookies in the table: the route is what
    follows the cookie's first dot; `members` maps routes to member names."""
    return Counter(members[route] for key in keys if (route := key.partition(".")[2]) in members)


def admission_of(row: Mapping[str, str]) -> Admission:
    admin = int(row["srv_admin_state"])
    if admin & _MAINT:
        return Admission.OUT
    if admin & _DRAIN or row.get("srv_uweight") == "0":
        return Admission.DRAINING
    return Admission.LIVE


def healthy_status(row: Mapping[str, str]) -> bool:
    """A `show stat` row of a server that takes traffic when admitted. HAProxy
    starts servers UP before any check ran ("INI"): that is not health yet."""
    status = row.get("status", "")
    if status == "no check":
        return True
    return status.startswith(("UP", "DRAIN", "NOLB")) and row.get("check_status") not in ("INI", "")


class HAProxyBalancer(ConfiguredBalancer):
    product = "haproxy"
    # show stat: scur, stot, hrsp_5xx; show table sessions (the rendered stick table)
    fills = frozenset({"active", "requests", "errors", "sessions"})
    default_config = "/etc/haproxy/haproxy.cfg"
    default_check = ("haproxy", "-c", "-f", "{config}")
    # Debian's unit runs HAProxy in master-worker mode: reload = seamless USR2.
    default_reload = ("systemctl", "reload", "haproxy")

    @functools.cached_property
    def socket(self) -> str:
        # Worked out once: every runtime API request names it (a release makes hundreds).
        return runtime_paths("haproxy", self.options)["stats_socket"]

    @functools.cached_property
    def state_file(self) -> Path:
        return Path(runtime_paths("haproxy", self.options)["state_file"])

    async def command(self, line: str) -> str:
        """One runtime API request (commands may be joined with ';'), its whole answer."""
        try:
            async with asyncio.timeout(self.timeout):
                # On a remote instance, through the SSH connection (streamlocal or
                # a direct TCP channel): the socket stays private to its host.
                if self.socket.startswith("/"):
                    reader, writer = await self.host.open_unix(self.socket)
                else:
                    host, port = parse_hostport(self.socket)
                    reader, writer = await self.host.open_tcp(host, port)
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    # Non-interactive mode: HAProxy answers, then closes.
                    return (await reader.read()).decode(errors="replace")
                finally:
                    writer.close()
        except (OSError, TimeoutError, BalancerError) as exc:
            raise BalancerError(
                f"{self.name}: cannot reach the HAProxy stats socket {self.socket}"
                f"{self.host.where}: {exc}"
            ) from None

    async def read(self) -> PoolView:
        state_text, stat_text, table_text = await asyncio.gather(
            self.command(f"show servers state {LIVE_BACKEND}"),
            self.command("show stat -1 4 -1"),
            self.command(f"show table {SESSIONS_TABLE}"),
        )
        state, stat = parse_servers_state(state_text), parse_stat(stat_text)
        keys = parse_table_keys(table_text)
        routes = {m.route_id: m.name for _, m in self.topology.members()}
        sessions = None if keys is None else sessions_per_member(keys, routes)
        members = []
        for cluster, member in self.topology.members():
            row = state.get((LIVE_BACKEND, member.name))
            if row is None:
                raise BalancerError(
                    f"{self.name}: HAProxy has no server {LIVE_BACKEND}/{member.name}"
                )
            live = stat.get((LIVE_BACKEND, member.name), {})
            # The QA backend's copy of the server is never put in maintenance, so
            # its check tells the health even while the member is OUT of the pool.
            qa = stat.get((qa_backend(cluster.name), member.name), live)
            members.append(
                MemberState(
                    name=member.name,
                    cluster=cluster.name,
                    admission=admission_of(row),
                    healthy=healthy_status(qa),
                    active=int(live.get("scur") or 0),
                    requests=int(live.get("stot") or 0),
                    errors=int(live.get("hrsp_5xx") or 0),
                    sessions=None if sessions is None else sessions[member.name],
                )
            )
        return PoolView(tuple(members))

    async def _enact(self, current: PoolView, target: Mapping[str, Admission]) -> None:
        commands = [
            template.format(b=LIVE_BACKEND, s=name)
            for name, admission in ordered_changes(current.admissions(), target)
            for template in _COMMAND[admission]
        ]
        if not commands:
            return
        # One request: HAProxy runs the commands back to back in one CLI session.
        answer = await self.command("; ".join(commands))
        if answer.strip():
            raise BalancerError(
                f"{self.name}: HAProxy refused {'; '.join(commands)!r}: {answer.strip()}"
            )

    async def _worker_pid(self) -> str:
        for line in (await self.command("show info")).splitlines():
            if line.startswith("Pid:"):
                return line.split(":", 1)[1].strip()
        raise BalancerError(f"{self.name}: 'show info' did not show the worker's Pid")

    async def _reload(self, admissions: Mapping[str, Admission]) -> None:
        # Management Guide, "server-state-file": save the running state just before
        # the reload; the new process loads it (load-server-state-from-file).
        saved = await self.command("show servers state")
        await self.host.replace(str(self.state_file), saved)
        old_pid = await self._worker_pid()
        await self.config.reload()

        async def replaced() -> bool:
            return await self._worker_pid() != old_pid

        # The socket is briefly absent while the new worker binds it.
        if not await poll_until(replaced, self.timeout, not_yet=(BalancerError,)):
            raise BalancerError(f"{self.name}: no new HAProxy worker within {self.timeout:g}s")
