"""Pure routing decisions: which member serves a request.

Everything here is a function of plain data (tuples, bytes, ints) so it can be
tested alone and called per request without I/O. The hot path calls
`sticky_route`, `qa_cluster` and `pick`; `eligible` runs only when the shared
admission/health state changes.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from changeover.config import Topology
from changeover.model import Admission

# Admission codes as stored in shared memory, one byte per member.
LIVE, DRAINING, OUT = 0, 1, 2
CODES: Mapping[Admission, int] = {
    Admission.LIVE: LIVE,
    Admission.DRAINING: DRAINING,
    Admission.OUT: OUT,
}
ADMISSIONS: tuple[Admission, ...] = (Admission.LIVE, Admission.DRAINING, Admission.OUT)

NO_MEMBER = -1
PUBLIC = -1  # scope of the public listener: the live pool across every cluster


@dataclass(frozen=True, slots=True)
class Table:
    """The static shape of the pool, indexed by member position in topology order."""

    names: tuple[str, ...]
    cluster_of: tuple[int, ...]  # member -> cluster index
    clusters: tuple[tuple[int, ...], ...]  # cluster -> member indices
    routes: Mapping[bytes, int]  # sticky route -> member
    qa_hosts: Mapping[bytes, int]  # lower-case QA host name -> cluster

    @classmethod
    def from_topology(cls, topology: Topology) -> Table:
        names: list[str] = []
        cluster_of: list[int] = []
        clusters: list[tuple[int, ...]] = []
        routes: dict[bytes, int] = {}
        qa_hosts: dict[bytes, int] = {}
        for ci, cluster in enumerate(topology.clusters):
            start = len(names)
            for member in cluster.members:
                routes[member.route_id.encode()] = len(names)
                names.append(member.name)
                cluster_of.append(ci)
            clusters.append(tuple(range(start, len(names))))
            if cluster.qa_host:
                qa_hosts[host_name(cluster.qa_host.encode())] = ci
        return cls(tuple(names), tuple(cluster_of), tuple(clusters), routes, qa_hosts)


@dataclass(frozen=True, slots=True)
class Eligible:
    """Candidates for a new session, computed once per state change.

    `live`: LIVE healthy members of the live pool; `fallback`: DRAINING healthy
    members, used only when `live` is empty; `qa[c]`: healthy members of cluster
    c whatever their admission.
    """

    live: tuple[int, ...]
    fallback: tuple[int, ...]
    qa: tuple[tuple[int, ...], ...]


def eligible(table: Table, admission: Sequence[int], healthy: Sequence[int]) -> Eligible:
    members = range(len(table.names))
    return Eligible(
        live=tuple(m for m in members if healthy[m] and admission[m] == LIVE),
        fallback=tuple(m for m in members if healthy[m] and admission[m] == DRAINING),
        qa=tuple(tuple(m for m in c if healthy[m]) for c in table.clusters),
    )


def host_name(host: bytes) -> bytes:
    """The lower-case host of a Host header value, without any port suffix."""
    if host.startswith(b"["):  # IPv6 literal: [::1]:8080
        return host.partition(b"]")[0][1:].lower()
    return host.partition(b":")[0].lower()


def qa_cluster(table: Table, host: bytes | None) -> int:
    """The cluster whose QA host name the Host header names, else PUBLIC."""
    if host is None or not table.qa_hosts:
        return PUBLIC
    return table.qa_hosts.get(host_name(host), PUBLIC)


def sticky_route(cookies: bytes, sticky: bytes, inserted: bytes) -> tuple[bytes, bytes] | None:
    """(route, session) that a Cookie header asks for, the Apache way.

    `sticky` and `inserted` are cookie names followed by "=". The application's
    session cookie carries the route after its first "." (JSESSIONID=abc.a1 -> a1,
    JSESSIONID=abc.rack.1 -> rack.1, as Apache, HAProxy and nginx read it); the
    balancer-inserted cookie carries the route itself. The session cookie wins.
    The session is the cookie's whole value: one per user with the application's
    cookie, one per member with the inserted one (it names only the route).
    """
    found: tuple[bytes, bytes] | None = None
    for part in cookies.split(b";"):
        part = part.strip()
        if part.startswith(sticky):
            dot = part.find(b".", len(sticky))
            if dot >= 0:
                return part[dot + 1 :], part[len(sticky) :]
        elif found is None and part.startswith(inserted):
            route = part[len(inserted) :]
            found = route, part
    return found


class Load(Protocol):
    """In-flight requests by member index (a list will do)."""

    def __getitem__(self, member: int, /) -> int: ...


def pick(
    table: Table,
    candidates: Eligible,
    admission: Sequence[int],
    healthy: Sequence[int],
    scope: int,
    sticky: int,
    turn: int,
    load: Load | None = None,
    exclude: Container[int] = (),
) -> int:
    """The member for one request, or NO_MEMBER (answer 503).

    scope: PUBLIC or a cluster index (QA entry point). sticky: the member the
    request's route names, or NO_MEMBER. turn: a counter the caller advances per
    request (round-robin, and the tie-break of least-conn). load: in-flight
    requests per member for least-conn, None for round-robin. exclude: members
    already tried for this request.
    """
    if sticky >= 0 and healthy[sticky] and sticky not in exclude:
        if scope == PUBLIC:
            if admission[sticky] != OUT:  # DRAINING members keep their sticky users
                return sticky
        elif table.cluster_of[sticky] == scope:
            return sticky
    if scope == PUBLIC:
        chosen = _choose(candidates.live, turn, load, exclude)
        if chosen == NO_MEMBER:
            chosen = _choose(candidates.fallback, turn, load, exclude)
        return chosen
    return _choose(candidates.qa[scope], turn, load, exclude)


def _choose(members: tuple[int, ...], turn: int, load: Load | None, exclude: Container[int]) -> int:
    n = len(members)
    if n == 0:
        return NO_MEMBER
    if load is None:
        for k in range(n):
            m = members[(turn + k) % n]
            if m not in exclude:
                return m
        return NO_MEMBER
    best, best_load = NO_MEMBER, -1
    for k in range(n):  # least-conn; equal loads rotate with `turn`
        m = members[(turn + k) % n]
        if m not in exclude and (best == NO_MEMBER or load[m] < best_load):
            best, best_load = m, load[m]
    return best
