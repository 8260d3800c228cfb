"""Plain data shared by every layer: admissions and what a balancer reports.

Nothing here does I/O; planning and interlocks are pure functions over these types.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Admission(StrEnum):
    """Whether a member may receive traffic from the live pool.

    LIVE: new and sticky sessions. DRAINING: only requests whose sticky route
    names the member. OUT: nothing from the live pool (QA entry points still reach it).
    """

    LIVE = "live"
    DRAINING = "draining"
    OUT = "out"


@dataclass(frozen=True, slots=True)
class Reach:
    """What an admission lets through from the live pool. The one encoding of
    admissions: every driver and template derives its own vocabulary (weights,
    status flags, flag files, the order of changes) from it."""

    new: bool  # new sessions may be sent to the member
    sticky: bool  # requests whose sticky route names the member reach it

    @property
    def width(self) -> int:
        """OUT 0 < DRAINING 1 < LIVE 2: how much of the traffic gets through."""
        return int(self.new) + int(self.sticky)


REACH: Mapping[Admission, Reach] = {
    Admission.LIVE: Reach(new=True, sticky=True),
    Admission.DRAINING: Reach(new=False, sticky=True),
    Admission.OUT: Reach(new=False, sticky=False),
}


def admission_reaching(new: bool, sticky: bool) -> Admission | None:
    """The admission with this reach; None for new sessions whose later sticky
    requests would be refused, which no admission means."""
    wanted = Reach(new=new, sticky=sticky)
    return next((admission for admission, reach in REACH.items() if reach == wanted), None)


@dataclass(frozen=True, slots=True)
class MemberState:
    """One member as a balancer sees it."""

    name: str
    cluster: str
    admission: Admission
    healthy: bool
    # The counters: None where this balancer does not count it, never a made-up 0.
    active: int | None = None  # requests (or connections, per driver) in flight
    requests: int | None = None  # total served (drain idleness, the bake's ratio)
    errors: int | None = None  # 5xx responses served (the bake)
    sessions: int | None = None  # sticky sessions seen within policy.session_idle
    tunnels: int | None = None  # open WebSocket tunnels


Counter = Literal["active", "requests", "errors", "sessions", "tunnels"]
COUNTERS: tuple[Counter, ...] = ("active", "requests", "errors", "sessions", "tunnels")


def total(members: Iterable[MemberState], counter: Counter) -> int | None:
    """The sum of one counter over `members`; None (unknown) if any member does
    not count it: a partial sum would pass for the whole."""
    values: list[int | None] = [getattr(m, counter) for m in members]
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


@dataclass(frozen=True, slots=True)
class PoolView:
    """The live pool as read from a balancer (or a group of them)."""

    members: tuple[MemberState, ...]

    def member(self, name: str) -> MemberState:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def in_cluster(self, cluster: str) -> tuple[MemberState, ...]:
        return tuple(m for m in self.members if m.cluster == cluster)

    def admissions(self) -> dict[str, Admission]:
        return {m.name: m.admission for m in self.members}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One health, version or smoke check: what was checked, and what it saw."""

    target: str
    ok: bool
    detail: str


def cluster_admission(view: PoolView, cluster: str) -> Admission | None:
    """The cluster's admission when all its members agree, else None (mixed)."""
    seen = {m.admission for m in view.in_cluster(cluster)}
    return seen.pop() if len(seen) == 1 else None


def differs(view: PoolView, desired: Mapping[str, Admission]) -> dict[str, Admission]:
    """The subset of `desired` that the view does not show yet."""
    current = view.admissions()
    return {name: adm for name, adm in desired.items() if current.get(name) != adm}


# --- what another shell asks of a running release (the journal's `request`) --------


@dataclass(frozen=True, slots=True)
class Approval:
    """A person approved the cluster that the step `step_id` waits for."""

    step_id: str
    who: str


@dataclass(frozen=True, slots=True)
class AbortAsked:
    """Stop the release at its next safe point."""

    who: str


Ask = Approval | AbortAsked


def encode_ask(ask: Ask) -> str:
    if isinstance(ask, Approval):
        return json.dumps({"kind": "approve", "step": ask.step_id, "who": ask.who})
    return json.dumps({"kind": "abort", "who": ask.who})


def decode_ask(text: str | None) -> Ask | None:
    """The request stored by `encode_ask`, or by releases before it
    (`approve:<step>:<who>`, `abort`); None for none or one not understood."""
    if not text:
        return None
    if text == "abort":
        return AbortAsked("")
    if text.startswith("approve:"):
        _, step, who = [*text.split(":", 2), ""][:3]
        return Approval(step, who)
    try:
        data = json.loads(text)
    except ValueError:
        return None
    match data:
        case {"kind": "approve", "step": str(step), "who": str(who)}:
            return Approval(step, who)
        case {"kind": "abort", "who": str(who)}:
            return AbortAsked(who)
    return None


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of a metrics query's answer: its labels and its value now."""

    labels: Mapping[str, str]
    value: float
