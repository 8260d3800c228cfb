"""Pool state shared by the master and its worker processes.

`SharedState` is shared memory (a memfd, mapped MAP_SHARED) created before
the workers fork; its descriptor lets a new master map it too (a take-over):

    [generation: int64]
    [slot 0: admission byte x N | healthy byte x N]   (padded to 8 bytes)
    [slot 1: same]
    [per worker: in-flight int64 x N | requests int64 x N | connect failures int64 x N
                 | open tunnels int64 x N | 5xx responses int64 x N]
    [per worker: sticky sessions, SESSION_SLOTS x (key, member, last seen ms) int64]
    [the master's carried sessions: the same, sessions a reload or upgrade took over]

Only the master writes the slots: it fills the slot the next generation
selects, then bumps the generation, so a worker that copies a slot sees one
whole admission change or none (a seqlock with one writer). Each worker writes
only its own counters and its own session table; the master sums the counters
and merges the tables (a session that reached two workers counts once).

A session table is bounded: SESSION_SLOTS sessions per worker, an open-addressed
table where a session's key may sit in one of SESSION_PROBE slots from its hash;
a new session whose slots are all taken replaces the one seen longest ago. Past
that bound the oldest sessions are forgotten, so a count can fall short only
when more than SESSION_SLOTS sessions per worker were seen within session_idle.

`PoolState` is the master's authority over admissions and health: it
validates admin changes, publishes them to the shared slots and persists the
admissions to `balancer.state_file`.

A reload (see `server.py`) gives the new workers a new `SharedState` sized for
the new members; `PoolState.adopt` carries every member that still exists
across by name (admission, health, request and error counts, sessions) and
keeps the old `SharedState` as *retired* while the old workers drain: their
requests in flight, tunnels and sessions still count, and admission changes
still reach them. `retire_done` folds a retired state's last counts in once
its workers have exited. A take-over (`handover.py`) hands the memory of
every state whose workers still run to the new master, which keeps each as
retired in the same way (`PoolState.restore`) until the old master exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import reprlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from changeover.config import Topology
from changeover.model import Admission, MemberState, PoolView
from changeover.plan import admissions_refusal
from changeover.proxy.routing import ADMISSIONS, CODES, LIVE, OUT

log = logging.getLogger("changeover.proxy")

_WORD = 8
_COUNTERS = 5  # int64 arrays per worker: in-flight, requests, connect failures, tunnels, 5xx
SESSION_SLOTS = 8192  # sessions each worker remembers (24 bytes each: 192 KiB)
SESSION_PROBE = 8  # slots a session's key may occupy, from its hash on


def _padded(n: int) -> int:
    return (n + _WORD - 1) // _WORD * _WORD


class SharedState:
    def __init__(self, members: int, workers: int, fd: int | None = None) -> None:
        """A new state for `members` and `workers`, or with `fd` the one another
        master made with the same figures (handed over with its workers)."""
        self.members = members
        self.workers = workers
        self._slot_size = _padded(2 * members)
        self._counters_at = _WORD + 2 * self._slot_size
        self._sessions_at = self._counters_at + workers * _COUNTERS * members * _WORD
        # One table per worker, then the master's (sessions carried over a reload).
        size = self._sessions_at + (workers + 1) * 3 * SESSION_SLOTS * _WORD
        if fd is None:  # memory with a descriptor, so a take-over can map it too
            fd = os.memfd_create("changeover-pool")
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:  # the caller still owns `fd`
            raise ValueError(f"a handed-over pool state is not {size} bytes")
        self.fd = fd
        self._map = mmap.mmap(fd, size)  # MAP_SHARED: inherited by fork
        self._view = memoryview(self._map)
        self._generation = self._view[:_WORD].cast("q")

    def close(self) -> None:
        """Its workers are gone: the descriptor is no longer needed (the memory
        goes with the last view of it)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _slot(self, generation: int) -> memoryview:
        start = _WORD + (generation % 2) * self._slot_size
        return self._view[start : start + 2 * self.members]

    def generation(self) -> int:
        return int(self._generation[0])

    def generation_view(self) -> memoryview:
        """The generation counter itself, for a worker to poll per request."""
        return self._generation

    def publish(self, admission: Sequence[int], healthy: Sequence[bool]) -> None:
        """Master only: make a new admission/health picture visible to every worker."""
        following = self.generation() + 1
        slot = self._slot(following)
        slot[: self.members] = bytes(admission)
        slot[self.members :] = bytes(int(h) for h in healthy)
        self._generation[0] = following

    def snapshot(self) -> tuple[int, bytes, bytes]:
        """(generation, admission bytes, healthy bytes) as of one publish."""
        while True:
            generation = self.generation()
            data = bytes(self._slot(generation))
            if self.generation() == generation:
                return generation, data[: self.members], data[self.members :]

    def counters(self, worker: int) -> tuple[memoryview, memoryview, memoryview]:
        """One worker's (in-flight, requests, connect failures) arrays, int64 per member."""
        whole = self._worker_view(worker)
        n = self.members
        return whole[:n], whole[n : 2 * n], whole[2 * n : 3 * n]

    def tunnels(self, worker: int) -> memoryview:
        """One worker's open tunnels (WebSockets) per member, int64 each."""
        return self._worker_view(worker)[3 * self.members : 4 * self.members]

    def errors(self, worker: int) -> memoryview:
        """One worker's 5xx responses from each member, int64 each."""
        return self._worker_view(worker)[4 * self.members :]

    def _worker_view(self, worker: int) -> memoryview:
        size = _COUNTERS * self.members * _WORD
        start = self._counters_at + worker * size
        return self._view[start : start + size].cast("q")

    def sessions(self, worker: int) -> SessionTable:
        """One worker's table of sticky sessions, which only that worker writes."""
        size = 3 * SESSION_SLOTS * _WORD
        start = self._sessions_at + worker * size
        return SessionTable(self._view[start : start + size].cast("q"))

    def carried(self) -> SessionTable:
        """The master's table: sessions a reload or an upgrade carried over."""
        return self.sessions(self.workers)

    def session_entries(self) -> list[tuple[int, int, int]]:
        """(key, member, last seen) over every worker's table and the carried one."""
        return [e for w in range(self.workers + 1) for e in self.sessions(w).entries()]

    def session_totals(self, now_ms: int, idle_ms: int) -> list[int]:
        """Sessions per member seen within `idle_ms` before `now_ms`, over every
        worker; a session two workers saw belongs to the member that saw it last."""
        return count_sessions([self.session_entries()], self.members, now_ms, idle_ms)

    def tunnel_totals(self) -> list[int]:
        """Open tunnels per member, summed over workers."""
        return self._summed(self.tunnels)

    def error_totals(self) -> list[int]:
        """5xx responses from each member, summed over workers."""
        return self._summed(self.errors)

    def _summed(self, per_worker: Callable[[int], memoryview]) -> list[int]:
        views = [per_worker(w) for w in range(self.workers)]
        return [sum(int(v[m]) for v in views) for m in range(self.members)]

    def failures(self, member: int) -> int:
        """Connect failures to one member, summed over workers."""
        return sum(int(self.counters(w)[2][member]) for w in range(self.workers))

    def totals(self) -> tuple[list[int], list[int], list[int]]:
        """In-flight, requests and connect failures per member, summed over workers."""
        sums = ([0] * self.members, [0] * self.members, [0] * self.members)
        for w in range(self.workers):
            for total, part in zip(sums, self.counters(w), strict=True):
                for m in range(self.members):
                    total[m] += part[m]
        return sums


def count_sessions(
    sources: Sequence[Sequence[tuple[int, int, int]]], members: int, now_ms: int, idle_ms: int
) -> list[int]:
    """Sessions per member seen within `idle_ms`; a key in several entries
    belongs to the member that saw it last."""
    latest: dict[int, tuple[int, int]] = {}
    for entries in sources:
        for key, member, seen in entries:
            if seen > latest.get(key, (-1, 0))[0]:
                latest[key] = (seen, member)
    counts = [0] * members
    for seen, member in latest.values():
        if now_ms - seen <= idle_ms and 0 <= member < members:
            counts[member] += 1
    return counts


def now_ms() -> int:
    """CLOCK_MONOTONIC in ms: one clock for every process of the machine, so the
    master can age what the workers wrote."""
    return time.monotonic_ns() // 1_000_000


class SessionTable:
    """SESSION_SLOTS entries of (key, member, last seen in ms); key 0 is a free slot.

    The writer updates an entry's time and member before its key, so a reader
    never credits a new key with another session's time; a read that races a
    write may see one entry half-written, which only moves one count by one."""

    def __init__(self, words: memoryview) -> None:
        self._words = words

    def seen(self, session: int, member: int, now_ms: int) -> None:
        """The worker routed a request of `session` (a hash; never 0) to its member."""
        words = self._words
        start = session % SESSION_SLOTS
        target, oldest = -1, None
        for k in range(SESSION_PROBE):
            slot = (start + k) % SESSION_SLOTS
            key = words[3 * slot]
            if key == session or key == 0:
                target = slot
                break
            seen = words[3 * slot + 2]
            if oldest is None or seen < oldest:
                target, oldest = slot, seen
        at = 3 * target
        if words[at] != session:
            words[at] = 0  # free while it changes hands
        words[at + 1] = member
        words[at + 2] = now_ms
        words[at] = session

    def entries(self) -> list[tuple[int, int, int]]:
        """(key, member, last seen) of every taken slot."""
        words = self._words.tolist()  # one copy, then plain ints
        return [
            (words[i], words[i + 1], words[i + 2]) for i in range(0, len(words), 3) if words[i] != 0
        ]


class AdmissionError(ValueError):
    """An admin request named an unknown member or an unknown admission."""


class InterlockError(Exception):
    """A change the engine's interlock refuses: it would leave the live pool with
    fewer than `policy.min_healthy` healthy members (see `plan.admit_refusal`)."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60  # a request may send anything: quote a little of it


class Retired:
    """A state whose workers drain (after a reload, or a take-over's old master's):
    where each of its members is now (None: removed), and the requests and
    errors it had served when counted elsewhere already (a take-over's totals)."""

    __slots__ = ("counted_errors", "counted_requests", "shared", "where")

    def __init__(
        self,
        shared: SharedState,
        where: list[int | None],
        counted_requests: list[int] | None = None,
        counted_errors: list[int] | None = None,
    ) -> None:
        self.shared = shared
        self.where = where
        self.counted_requests = counted_requests or [0] * shared.members
        self.counted_errors = counted_errors or [0] * shared.members

    def served(self) -> tuple[list[int], list[int]]:
        """(requests, errors) per member of this state, less what was counted already."""
        requests = self.shared.totals()[1]
        errors = self.shared.error_totals()
        return (
            [n - c for n, c in zip(requests, self.counted_requests, strict=True)],
            [n - c for n, c in zip(errors, self.counted_errors, strict=True)],
        )


class PoolState:
    """The master's view: admissions (persisted) and health (from the checker)."""

    def __init__(self, topology: Topology, shared: SharedState, state_file: Path | None) -> None:
        self.topology = topology
        self.shared = shared
        self.state_file = state_file
        self.names = [m.name for _, m in topology.members()]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.admission = [LIVE] * len(self.names)
        # Requests go to every member until the checker says otherwise (a restarted
        # balancer serves at once), but the admin API reports a member healthy only
        # once a check has seen it: see expect_checks().
        self.healthy = [True] * len(self.names)
        self.unchecked: set[int] = set()
        self._verdicts: asyncio.Event | None = None
        # Old workers' states while they drain after a reload or a take-over;
        # counts of states whose workers are gone.
        self.retired: list[Retired] = []
        self.base_requests = [0] * len(self.names)
        self.base_errors = [0] * len(self.names)
        if state_file is not None:
            for name, adm in load_admissions(state_file).items():
                if name in self.index:
                    self.admission[self.index[name]] = CODES[adm]
                else:
                    log.warning("state file %s names unknown member %r: ignored", state_file, name)
        shared.publish(self.admission, self.healthy)

    def _publish(self) -> None:
        self.shared.publish(self.admission, self.healthy)
        for old in self.retired:  # draining workers still route their last requests
            old.shared.publish(
                [OUT if j is None else self.admission[j] for j in old.where],
                [j is not None and self.healthy[j] for j in old.where],
            )

    def adopt(self, topology: Topology, shared: SharedState) -> list[str]:
        """A reload: serve `topology` from `shared` (the new workers' state). A
        member that still exists (by name) keeps its admission, health, counts
        and sessions; a new one starts LIVE but unhealthy until its first good
        check; a removed one vanishes. Returns the names added and removed, as
        "+name" and "-name"."""
        names = [m.name for _, m in topology.members()]
        where = [names.index(n) if n in names else None for n in self.names]
        changes = [f"+{n}" for n in names if n not in self.index]
        changes += [f"-{n}" for n in self.names if n not in names]
        admission, healthy = [LIVE] * len(names), [False] * len(names)
        base_requests, base_errors = [0] * len(names), [0] * len(names)
        unchecked = set(range(len(names)))
        for i, j in enumerate(where):
            if j is not None:
                admission[j], healthy[j] = self.admission[i], self.healthy[i]
                base_requests[j], base_errors[j] = self.base_requests[i], self.base_errors[i]
                if i not in self.unchecked:
                    unchecked.discard(j)
        carried = [
            (key, where[member], seen)
            for key, member, seen in self.shared.session_entries()
            if 0 <= member < len(where) and where[member] is not None
        ]
        table = shared.carried()
        for key, member, seen in sorted(carried, key=lambda e: e[2]):
            assert member is not None
            table.seen(key, member, seen)
        for old in self.retired:
            old.where = [None if j is None else where[j] for j in old.where]
        self.retired.append(Retired(self.shared, where))
        self.topology, self.shared, self.names = topology, shared, names
        self.index = {name: i for i, name in enumerate(names)}
        self.admission, self.healthy = admission, healthy
        self.base_requests, self.base_errors = base_requests, base_errors
        self.unchecked = unchecked if self._verdicts is not None else set()
        if self.state_file is not None and changes:
            save_admissions(self.state_file, dict(zip(self.names, self.admission, strict=True)))
        self._publish()
        return changes

    def retire_done(self, old: SharedState) -> None:
        """The workers of a retired state have exited: fold its counts in, forget it."""
        for gone in self.retired:
            if gone.shared is old:
                requests, errors = gone.served()
                for i, j in enumerate(gone.where):
                    if j is not None:
                        self.base_requests[j] += requests[i]
                        self.base_errors[j] += errors[i]
                table = self.shared.carried()
                for key, member, seen in sorted(old.session_entries(), key=lambda e: e[2]):
                    if 0 <= member < len(gone.where) and (j := gone.where[member]) is not None:
                        table.seen(key, j, seen)
        self.retired = [r for r in self.retired if r.shared is not old]
        old.close()

    def _mapped(self, current: list[int], retired: Callable[[Retired], list[int]]) -> list[int]:
        """A per-member figure of the current state plus every retired one's."""
        total = list(current)
        for old in self.retired:
            for i, value in enumerate(retired(old)):
                if (j := old.where[i]) is not None:
                    total[j] += value
        return total

    def counts(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """(in flight, requests, tunnels, errors) per member, draining workers included."""
        shared = self.shared
        active = self._mapped(shared.totals()[0], lambda r: r.shared.totals()[0])
        requests = self._mapped(shared.totals()[1], lambda r: r.served()[0])
        tunnels = self._mapped(shared.tunnel_totals(), lambda r: r.shared.tunnel_totals())
        errors = self._mapped(shared.error_totals(), lambda r: r.served()[1])
        requests = [r + b for r, b in zip(requests, self.base_requests, strict=True)]
        errors = [e + b for e, b in zip(errors, self.base_errors, strict=True)]
        return active, requests, tunnels, errors

    def _session_sources(self) -> list[list[tuple[int, int, int]]]:
        """Session entries of the current state and every retired one, in today's members."""
        sources = [self.shared.session_entries()]
        for old in self.retired:
            sources.append(
                [
                    (key, j, seen)
                    for key, m, seen in old.shared.session_entries()
                    if 0 <= m < len(old.where) and (j := old.where[m]) is not None
                ]
            )
        return sources

    def session_counts(self, idle_ms: int) -> list[int]:
        return count_sessions(self._session_sources(), len(self.names), now_ms(), idle_ms)

    def live_states(self) -> list[tuple[SharedState, dict[str, Any]]]:
        """The states whose workers still run (the current one and those draining
        after a reload), each described for a new master to map and count on
        (see `handover.py`): its size, whose members by name (None: removed),
        and what of its requests and errors was counted elsewhere already. With
        `handover_state`'s `settled` figures (the workers already gone), the new
        master's totals go on from exactly this master's."""
        states = [Retired(self.shared, list(range(len(self.names)))), *self.retired]
        return [
            (
                state.shared,
                {
                    "members": state.shared.members,
                    "workers": state.shared.workers,
                    "names": [None if j is None else self.names[j] for j in state.where],
                    "requests": state.counted_requests,
                    "errors": state.counted_errors,
                },
            )
            for state in states
        ]

    def handover_state(self) -> dict[str, Any]:
        """What a new master takes over (see `handover.py`), members by name."""
        _, requests, _, errors = self.counts()
        names = self.names
        admissions = [str(ADMISSIONS[a]) for a in self.admission]
        return {
            "admissions": dict(zip(names, admissions, strict=True)),
            "healthy": dict(zip(names, self.healthy, strict=True)),
            "unchecked": [names[i] for i in sorted(self.unchecked)],
            "requests": dict(zip(names, requests, strict=True)),
            "errors": dict(zip(names, errors, strict=True)),
            # Of those, what workers already gone served: a new master that maps
            # the running states (`live_states`) counts the rest from their memory.
            "settled": {
                "requests": dict(zip(names, self.base_requests, strict=True)),
                "errors": dict(zip(names, self.base_errors, strict=True)),
            },
            "sessions": [
                [key, names[m], seen]
                for entries in self._session_sources()
                for key, m, seen in entries
                if 0 <= m < len(names)
            ],
        }

    def restore(
        self,
        state: Mapping[str, Any],
        running: Sequence[tuple[SharedState, Mapping[str, Any]]] = (),
    ) -> set[int]:
        """Take over an old master's `handover_state`; returns the members it did
        not know (they start LIVE, unhealthy until their first good check).
        `running`: the old master's states whose workers still run, as
        `live_states` described them: they count as retired until those
        workers are gone (`retire_done`), and the totals start from what the
        workers already gone served (`settled`)."""
        known = state.get("admissions", {})
        figures = state.get("settled", state) if running else state
        fresh = {i for i, n in enumerate(self.names) if n not in known}
        for i, name in enumerate(self.names):
            if i in fresh:
                self.admission[i], self.healthy[i] = LIVE, False
                continue
            self.admission[i] = CODES[Admission(known[name])]
            self.healthy[i] = bool(state.get("healthy", {}).get(name, True))
            self.base_requests[i] = int(figures.get("requests", {}).get(name, 0))
            self.base_errors[i] = int(figures.get("errors", {}).get(name, 0))
        unchecked = fresh | {self.index[n] for n in state.get("unchecked", []) if n in self.index}
        for shared, described in running:
            where = [self.index.get(n) if n is not None else None for n in described["names"]]
            counted = (list(described["requests"]), list(described["errors"]))
            self.retired.append(Retired(shared, where, *counted))
        table = self.shared.carried()
        for key, name, seen in sorted(state.get("sessions", []), key=lambda e: int(e[2])):
            if name in self.index and int(key) != 0:
                table.seen(int(key), self.index[name], int(seen))
        self._publish()
        return unchecked

    def picture(self, topology: Topology) -> tuple[list[int], list[bool]]:
        """(admission, healthy) of `topology`'s members as `adopt` would carry them."""
        names = [m.name for _, m in topology.members()]
        admission = [self.admission[self.index[n]] if n in self.index else LIVE for n in names]
        healthy = [n in self.index and self.healthy[self.index[n]] for n in names]
        return admission, healthy

    def set_admissions(self, changes: Mapping[str, Any], force: bool = False) -> list[str]:
        """Apply every change or none; return 'member: old -> new' for each real change.

        Unless `force`, a change the engine's interlock would refuse (fewer than
        `policy.min_healthy` healthy LIVE members left, as the admin API reports
        health) raises InterlockError and changes nothing.
        """
        parsed: dict[int, int] = {}
        for name, value in changes.items():
            if name not in self.index:
                raise AdmissionError(f"unknown member {_short.repr(name)}")
            try:
                if not isinstance(value, str):
                    raise TypeError(value)
                parsed[self.index[name]] = CODES[Admission(value)]
            except (ValueError, TypeError):
                raise AdmissionError(
                    f"bad admission {_short.repr(value)} for {name!r}: "
                    "expected live, draining or out"
                ) from None
        if not force:
            desired = {self.names[i]: ADMISSIONS[code] for i, code in parsed.items()}
            refusal = admissions_refusal(self.topology, self.pool_view(), desired)
            if refusal is not None:
                raise InterlockError(refusal)
        done = [
            f"{self.names[i]}: {ADMISSIONS[self.admission[i]]} -> {ADMISSIONS[code]}"
            for i, code in parsed.items()
            if self.admission[i] != code
        ]
        if done:
            following = list(self.admission)
            for i, code in parsed.items():
                following[i] = code
            if self.state_file is not None:  # persist first: a failed write changes nothing
                save_admissions(self.state_file, dict(zip(self.names, following, strict=True)))
            self.admission = following
            self._publish()
        return done

    def expect_checks(self, members: set[int] | None = None) -> None:
        """A health checker runs: until its first verdict on a member, that member's
        health is a start-up guess, which the admin API never reports as healthy
        (see first_verdicts). Otherwise a caller that waits for health (a release,
        a test, a benchmark) could go ahead at start-up while every member is in
        fact still down."""
        self.unchecked = set(range(len(self.names))) if members is None else members
        self._verdicts = asyncio.Event()
        if not self.unchecked:
            self._verdicts.set()

    def checked(self, member: int) -> None:
        """A probe has agreed with `member`'s health: its `healthy` flag is now real."""
        self.unchecked.discard(member)
        if not self.unchecked and self._verdicts is not None:
            self._verdicts.set()

    async def first_verdicts(self, timeout: float) -> None:
        """Wait (at most `timeout` s, at start-up) for a verdict on every member; a
        member still without one is then reported unhealthy."""
        if self.unchecked and self._verdicts is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._verdicts.wait(), timeout)

    def set_healthy(self, member: int, healthy: bool) -> None:
        self.healthy[member] = healthy
        self._publish()

    def pool_view(self) -> PoolView:
        """The pool as the admin API reports it, for the interlock: a member is
        healthy once a check has seen it so (see expect_checks)."""
        active, requests, _, _ = self.counts()
        return PoolView(
            tuple(
                MemberState(
                    name=member.name,
                    cluster=cluster.name,
                    admission=ADMISSIONS[self.admission[i]],
                    healthy=self.healthy[i] and i not in self.unchecked,
                    active=active[i],
                    requests=requests[i],
                )
                for i, (cluster, member) in enumerate(self.topology.members())
            )
        )

    def view(self, session_idle: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """The admin API's pool document, members in topology order. `active`
        counts requests in flight; a WebSocket is one request until its 101,
        then one of `tunnels` until it closes. `errors` counts the member's 5xx
        responses (not the balancer's own 502/503 when it cannot reach one).
        `sessions` counts the sticky
        sessions routed to the member within `session_idle` seconds (default
        the balancer's policy.session_idle)."""
        active, requests, tunnels, errors = self.counts()
        idle = self.topology.policy.session_idle if session_idle is None else session_idle
        sessions = self.session_counts(int(idle * 1000))
        members = []
        for i, (cluster, member) in enumerate(self.topology.members()):
            members.append(
                {
                    "name": member.name,
                    "cluster": cluster.name,
                    "host": member.host,
                    "port": member.port,
                    "route": member.route_id,
                    "admission": str(ADMISSIONS[self.admission[i]]),
                    "healthy": self.healthy[i] and i not in self.unchecked,
                    "active": active[i],
                    "requests": requests[i],
                    "errors": errors[i],
                    "tunnels": tunnels[i],
                    "sessions": sessions[i],
                }
            )
        return {"members": members}


def load_admissions(path: Path) -> dict[str, Admission]:
    """Admissions saved by `save_admissions`; an absent file means all LIVE."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the balancer state: {exc}") from None
    saved = data.get("admissions") if isinstance(data, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object with an 'admissions' object")
    try:
        return {str(name): Admission(value) for name, value in saved.items()}
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def save_admissions(path: Path, admissions: Mapping[str, int]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half."""
    document = {"admissions": {name: str(ADMISSIONS[code]) for name, code in admissions.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
