"""Pure accounting for the probe: latency percentiles, the admission timeline,
session moves (broken or cut), version flaps, and how long a user stays.

Nothing here does I/O or reads a clock: callers pass times in, so every rule is
tested on synthetic sequences.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from changeover.model import Admission

ADMITTED = frozenset({Admission.LIVE, Admission.DRAINING})


class LatencyHistogram:
    """Latencies in log-spaced buckets: memory stays bounded at any rate and
    duration, percentiles are within `precision` (relative) or `floor_ms`
    (absolute) of the exact value, and the maximum is exact."""

    def __init__(self, precision: float = 0.01, floor_ms: float = 0.01) -> None:
        self._log_base = math.log1p(precision)
        self._growth = 1.0 + precision
        self._floor = floor_ms
        self._counts: Counter[int] = Counter()
        self.count = 0
        self.max_ms = 0.0

    def record(self, ms: float) -> None:
        # Bucket 0 holds [0, floor]; bucket b >= 1 holds (floor*g^(b-1), floor*g^b].
        bucket = 0 if ms <= self._floor else 1 + int(math.log(ms / self._floor) / self._log_base)
        self._counts[bucket] += 1
        self.count += 1
        self.max_ms = max(self.max_ms, ms)

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile (the smallest value with at least p% of the
        values at or below it), as its bucket's upper bound, capped at the max."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(p / 100.0 * self.count))
        seen = 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if seen >= rank:
                return min(self._floor * self._growth**bucket, self.max_ms)
        return self.max_ms


@dataclass(slots=True)
class Segment:
    """Consecutive successful reads that all saw the same admissions."""

    first: float
    last: float
    admissions: Mapping[str, Admission]


class Timeline:
    """Admission reads over time, run-length encoded so memory grows with
    changes, not with time. Failed reads are simply absent: the neighbouring
    reads answer for the gap."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def record(self, t: float, admissions: Mapping[str, Admission]) -> None:
        """A read that started at `t` (times must not go backwards)."""
        if self.segments and self.segments[-1].admissions == admissions:
            self.segments[-1].last = t
        else:
            self.segments.append(Segment(t, t, dict(admissions)))

    @property
    def last_read(self) -> float | None:
        return self.segments[-1].last if self.segments else None

    def at_or_before(self, t: float) -> Mapping[str, Admission] | None:
        """What the last read started at or before `t` saw."""
        i = bisect_right(self.segments, t, key=lambda s: s.first) - 1
        return self.segments[i].admissions if i >= 0 else None

    def at_or_after(self, t: float) -> Mapping[str, Admission] | None:
        """What the first read started at or after `t` saw."""
        i = bisect_left(self.segments, t, key=lambda s: s.last)
        return self.segments[i].admissions if i < len(self.segments) else None


def move_is_break(
    member: str,
    before: Mapping[str, Admission] | None,
    after: Mapping[str, Admission] | None,
) -> bool:
    """A user moved away from `member`: broken (moved while its member was still
    admitted) unless a read just before or just after the move shows the member
    not admitted (a member absent from the pool counts as not admitted): then the
    session was cut, its member having left the pool under it. Neither is excused.
    A missing read proves nothing: the move counts as broken."""
    return all(
        view is None or view.get(member, Admission.OUT) in ADMITTED for view in (before, after)
    )


@dataclass(frozen=True, slots=True)
class Move:
    """A user whose request carried `from_member`'s session was served by `to_member`."""

    user: int
    from_member: str
    to_member: str
    sent_at: float
    done_at: float


class BreakLedger:
    """Counts moves as broken or cut once the timeline brackets them.

    A move waits until a read has started after its response arrived; moves
    arrive in completion order, so only the head of the queue is ever checked.
    The queue is capped: past `max_pending` the oldest is judged with what is
    known, so memory stays bounded even when the watcher cannot read.
    """

    def __init__(self, timeline: Timeline | None, max_pending: int = 10_000) -> None:
        self._timeline = timeline
        self._pending: deque[Move] = deque()
        self._max_pending = max_pending
        self.breaks = 0  # moved while the member was admitted
        self.cuts = 0  # still active when the member left the pool

    def add(self, move: Move) -> None:
        self._pending.append(move)
        self.settle()

    def settle(self, *, final: bool = False) -> None:
        """Judge the moves that can be judged (all of them when `final`)."""
        timeline = self._timeline
        while self._pending:
            move = self._pending[0]
            last = timeline.last_read if timeline else None
            bracketed = timeline is None or (last is not None and last >= move.done_at)
            if not (bracketed or final or len(self._pending) > self._max_pending):
                return
            self._pending.popleft()
            before = timeline.at_or_before(move.sent_at) if timeline else None
            after = timeline.at_or_after(move.done_at) if timeline else None
            if move_is_break(move.from_member, before, after):
                self.breaks += 1
            else:
                self.cuts += 1

    @property
    def pending(self) -> int:
        return len(self._pending)


@dataclass(frozen=True, slots=True)
class SessionLengths:
    """How long a virtual user stays: exponential with `mean` seconds, never more
    than `maximum` (so a few stay long, most leave soon, as on a real site); then
    the user leaves, its cookies with it, and a new one takes its place. None for
    `mean`: users who never leave."""

    mean: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if self.mean is not None and not (0 < self.mean < math.inf):
            raise ValueError("the mean session length must be a positive number of seconds")
        if self.maximum is not None and not (
            self.mean is not None and self.mean <= self.maximum < math.inf
        ):
            raise ValueError("the longest session needs a mean, and is at least the mean")

    def draw(self, rng: random.Random) -> float:
        """One user's stay in seconds (math.inf: stays)."""
        if self.mean is None:
            return math.inf
        stay = rng.expovariate(1.0 / self.mean)
        return stay if self.maximum is None else min(stay, self.maximum)


@dataclass(slots=True)
class UserHistory:
    """What one virtual user has been served, kept small: O(distinct versions)."""

    member: str | None = None  # the member that served the latest response
    version: str | None = None
    versions: list[str] = field(default_factory=list)  # distinct, in the order first served
    flapped: bool = False


class Sessions:
    """Per-user member and version history, in the order responses arrive."""

    def __init__(self, users: int) -> None:
        self.users = [UserHistory() for _ in range(users)]
        self.arrived = users  # every user ever served, those who left included
        self.moves = 0
        self.flaps = 0  # users who returned to an earlier version
        self.members_seen: Counter[str] = Counter()
        self.versions_seen: Counter[str] = Counter()

    def seen(self, member: str | None, version: str | None) -> None:
        """Count a response in the totals (also one for a user who has left)."""
        if member is not None:
            self.members_seen[member] += 1
        if version is not None:
            self.versions_seen[version] += 1

    def replace(self, user: int) -> None:
        """The user left; a new one, with no history, takes its place."""
        self.users[user] = UserHistory()
        self.arrived += 1

    def served(
        self,
        user: int,
        sent_member: str | None,
        member: str | None,
        version: str | None,
        sent_at: float,
        done_at: float,
    ) -> Move | None:
        """Record a response; `sent_member` is the user's member when the request
        left (whose session its cookies carried). Returns the move, if any."""
        self.seen(member, version)
        history = self.users[user]
        move = None
        if member is not None:
            if sent_member is not None and member != sent_member:
                self.moves += 1
                move = Move(user, sent_member, member, sent_at, done_at)
            history.member = member
        if version is not None and version != history.version:
            if version in history.versions:
                self.flaps += not history.flapped
                history.flapped = True
            else:
                history.versions.append(version)
            history.version = version
        return move


# --- WebSocket users ---------------------------------------------------------------

GOING_AWAY = 1001  # RFC 6455 7.4.1: the balancer ending a tunnel at a drain


def ws_close_failure(code: int | None) -> str | None:
    """How a WebSocket that the far end closed counts: None for a normal close
    (a close frame with 1001, going away: the balancer ending its tunnels at a
    drain, or an app server at undeploy), else its abnormal kind: `close_code`
    for a close frame with any other code, `no_close_frame` for a connection that
    ended without one (1006: closed or reset under the user)."""
    if code is None:
        return "no_close_frame"
    return None if code == GOING_AWAY else "close_code"


class PeakRate:
    """The most events within any `width` seconds (a sliding window, so two
    halves of a burst straddling a second boundary still count together),
    keeping only the events of the last window. Times must not go backwards."""

    def __init__(self, width: float = 1.0) -> None:
        if not width > 0:
            raise ValueError("the window must be positive")
        self.width = width
        self._recent: deque[float] = deque()
        self.count = 0
        self.peak = 0

    def record(self, t: float) -> None:
        recent = self._recent
        if recent and t < recent[-1]:
            raise ValueError(f"time went backwards: {t} after {recent[-1]}")
        recent.append(t)
        while recent[0] <= t - self.width:  # the window is (t - width, t]
            recent.popleft()
        self.count += 1
        self.peak = max(self.peak, len(recent))


class WebSocketLedger:
    """What the probe's WebSocket users went through.

    A user's connection ends normally (`going_away`: a 1001 close) or abnormally
    (`failed`: any other end, a failed handshake included). After a normal close
    the user reconnects at once: its first attempt is timed (`attempt`) and the
    busiest second of those is kept, since that is when the balancer's 1001s
    send users back; the first connection it then opens is a reconnect, even
    when failed attempts came between (those count as abnormal). Times are
    passed in and must not go backwards."""

    def __init__(self, users: int, window: float = 1.0) -> None:
        self.users = users
        self.opened = 0  # connections opened, reconnects included
        self.echoed = 0  # messages whose echo came back as sent
        self.normal: Counter[str] = Counter()  # 1001 closes, by the member that was closed
        self.abnormal: Counter[str] = Counter()  # by kind
        self.reconnects = 0  # connections opened after a 1001
        self.reconnecting = PeakRate(window)  # the first attempts after a 1001
        self._going_away = [False] * users  # closed with 1001, not reconnected yet
        self._attempted = [False] * users  # and its first attempt is timed

    def attempt(self, user: int, at: float) -> None:
        """The user starts to connect."""
        if self._going_away[user] and not self._attempted[user]:
            self._attempted[user] = True
            self.reconnecting.record(at)

    def open(self, user: int) -> None:
        self.opened += 1
        if self._going_away[user]:
            self._going_away[user] = self._attempted[user] = False
            self.reconnects += 1

    def echo(self) -> None:
        self.echoed += 1

    def going_away(self, user: int, member: str | None) -> None:
        self.normal[member or "?"] += 1
        self._going_away[user] = True

    def failed(self, kind: str) -> None:
        self.abnormal[kind] += 1

    @property
    def waiting_to_reconnect(self) -> int:
        """Users closed with 1001 that have not opened a connection since."""
        return sum(self._going_away)
