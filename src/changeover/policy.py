"""The engine's decisions, as pure functions over plain data.

Whether a drain is over, whether a fan-out spent more than its failure budget,
whether a cluster may be swapped live, what a resume keeps of what was asked,
whether a bake saw a bad release, and what a rollback goes back to: no I/O
here, so each is a table of cases in tests/unit/test_policy.py. The engine
reads the world, asks these, and acts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from changeover.config import ANALYSIS_FIELD, AnalysisQuery, Cluster, Topology
from changeover.executors.base import CommandResult
from changeover.journal import STEP_DONE, ReleaseRow, StepRow
from changeover.model import (
    Admission,
    Approval,
    Ask,
    MemberState,
    PoolView,
    Sample,
    cluster_admission,
    total,
)
from changeover.plan import PlanRefused, flip_back_plan, make_plan
from changeover.steps import (
    GATES,
    Admit,
    Bake,
    CheckVersion,
    RunCommand,
    Step,
    StoredPlanError,
    Upload,
    WaitDrained,
    WaitHealthy,
    step_from_dict,
)

# --- draining ------------------------------------------------------------------------


class Drain(StrEnum):
    WAITING = "waiting"
    QUIET = "quiet"  # nothing left on the cluster that the balancer can see
    TIMED_OUT = "timed-out"  # at drain_timeout, or the balancer counts nothing at all


REPORT_EVERY = 5.0  # seconds between two progress lines of a drain


@dataclass(frozen=True, slots=True)
class DrainWatch:
    """What a drain remembers between two reads of the balancer."""

    started: float
    quiet_since: float
    last_total: int | None = None  # requests served by the cluster at the last read
    reported: float | None = None  # when the last progress line was due


@dataclass(frozen=True, slots=True)
class DrainRead:
    """One read of a drain, judged: the new watch, the verdict, what is left (a
    line for the timeline), and whether that line is due now."""

    watch: DrainWatch
    verdict: Drain
    line: str
    report: bool


def _left(sessions: int | None, active: int | None, tunnels: int | None) -> str:
    parts = [
        "sessions not counted" if sessions is None else f"{sessions} session(s)",
        "requests not counted" if active is None else f"{active} request(s) in flight",
    ]
    if tunnels is not None:
        parts.append(f"{tunnels} tunnel(s)")
    return ", ".join(parts)


def drain_progress(
    watch: DrainWatch, members: Sequence[MemberState], now: float, idle: float, timeout: float
) -> DrainRead:
    """Fold one read of the draining cluster's members into the watch.

    The cluster is quiet once nothing is in flight, no tunnel is open, no sticky
    session was seen within `idle` (policy.session_idle) where the balancer
    counts sessions, and its served count stood still for `idle` since the drain
    began where it counts requests (a draining member serves only sticky
    requests; and a session whose first answer was just setting its cookie is
    not in a session count yet, but its request was served). A balancer that
    counts neither cannot tell: the drain waits `timeout` by time alone. A
    counter the balancer does not keep never passes for 0."""
    sessions = total(members, "sessions")
    active = total(members, "active")
    tunnels = total(members, "tunnels")
    served = total(members, "requests")
    open_work = bool(active) or bool(tunnels)
    # Sessions are judged by their own clock (none seen within `idle`), so they
    # do not restart the served count's quiet window: that would add a whole
    # `idle` to every drain after its last session ended.
    busy = open_work or (served is not None and served != watch.last_total)
    quiet_since = now if busy else watch.quiet_since
    report = watch.reported is None or now - watch.reported >= REPORT_EVERY
    watch = DrainWatch(watch.started, quiet_since, served, now if report else watch.reported)
    left = max(0.0, timeout - (now - watch.started))
    line = f"{_left(sessions, active, tunnels)}; {left:.0f}s left"

    def judged(verdict: Drain, line: str) -> DrainRead:
        return DrainRead(watch, verdict, line, report)

    idle_long_enough = served is None or now - quiet_since >= idle
    if sessions is not None:
        if sessions == 0 and not open_work and idle_long_enough:
            return judged(
                Drain.QUIET, f"no session seen and no request for {idle:g}s, nothing in flight"
            )
    elif served is not None:
        if idle_long_enough:
            return judged(Drain.QUIET, f"no request for {idle:g}s (sessions not counted)")
    elif now - watch.started >= timeout:
        return judged(
            Drain.TIMED_OUT,
            f"the balancer counts neither sessions nor requests: waited drain_timeout "
            f"({timeout:g}s) by time alone",
        )
    else:
        return judged(
            Drain.WAITING, f"the balancer counts nothing: waiting by time; {left:.0f}s left"
        )
    if now - watch.started >= timeout:
        return judged(
            Drain.TIMED_OUT,
            f"drain timeout ({timeout:g}s) with {_left(sessions, active, tunnels)} still on "
            "the cluster: they are cut when it goes out",
        )
    return judged(Drain.WAITING, line)


# Past `balancer.close_spread`, how long the members' stop still waits for the
# WebSockets of a cluster gone OUT: the balancer gives the last ones 2 s to
# answer its close (proxy.tunnel.CLOSE_WAIT), then cuts them; and a read.
CLOSE_GRACE = 3.0


@dataclass(frozen=True, slots=True)
class ClosingRead:
    """One read of a cluster gone OUT whose WebSockets the balancer is closing."""

    done: bool  # its members may be stopped
    line: str  # for the step's detail (done) or the timeline
    cut: bool = False  # some are still open: the stop ends them


def closing_progress(tunnels: int | None, elapsed: float, spread: float) -> ClosingRead:
    """Whether the members of a cluster that just went OUT may be stopped.

    The embedded balancer closes the WebSockets still open there with 1001,
    spread evenly over `close_spread`, so that their users do not all come back
    at once; a stop before that would end the rest at once (an app server's own
    1001s at shutdown, or a cut). So the stop waits until the balancer counts
    none, for at most `spread + CLOSE_GRACE` seconds; a balancer that counts no
    tunnels (None) is not waited for."""
    if tunnels is None:
        return ClosingRead(True, "")
    if tunnels == 0:
        return ClosingRead(True, f"every WebSocket closed within {elapsed:.1f}s")
    if elapsed >= spread + CLOSE_GRACE:
        return ClosingRead(
            True,
            f"{tunnels} WebSocket(s) still open {elapsed:.0f}s after it went out "
            f"(close_spread {spread:g}s): the stop ends them",
            cut=True,
        )
    return ClosingRead(False, f"{tunnels} WebSocket(s) closing with 1001 over {spread:g}s")


# --- running on every member ---------------------------------------------------------


def may_start(failures: int, max_failed: int) -> bool:
    """A member's command starts only while the failure budget is not exceeded."""
    return failures <= max_failed


def excusable(failing: int, kept_out: int, members: int, max_failed: int) -> bool:
    """Whether `failing` members of a cluster, beside the `kept_out` ones that
    failed earlier steps of this release, may stay out of the live pool for the
    rest of it instead of failing the release: within the cluster's failure
    budget, and never the whole cluster."""
    total = failing + kept_out
    return total <= max_failed and total < members


@dataclass(frozen=True, slots=True)
class FanOut:
    over_budget: bool  # the step fails
    summary: str | None  # what failed (a warning when within the budget)
    detail: str  # the step's detail when it succeeds


def fan_out_outcome(
    members: int,
    failed: Sequence[CommandResult],
    skipped: Sequence[str],
    max_failed: int,
    kept_out: int = 0,
) -> FanOut:
    """The verdict on a command run on the `members` members not `kept_out`:
    more failures than the budget left fail the step; fewer are reported, the
    failed members are kept out, and the release goes on."""
    detail = f"{members - len(failed)}/{members} ok"
    if not failed:
        return FanOut(False, None, detail)
    first = failed[0]
    status = (
        "timed out or unreachable" if first.exit_status is None else f"exit {first.exit_status}"
    )
    tail = first.output.strip().splitlines()[-5:]
    summary = f"{len(failed)} member(s) failed, first {first.member} ({status}): " + " | ".join(
        tail
    )
    if skipped:
        summary += f"; not started on {len(skipped)} member(s): {', '.join(sorted(skipped))}"
    over = not excusable(len(failed), kept_out, members + kept_out, max_failed)
    return FanOut(over, summary, detail)


@dataclass(frozen=True, slots=True)
class DoneWith:
    """A cluster whose members the rest of the plan runs no command on."""

    cluster: str
    at_next_drain: bool  # a drain wait follows (idle time): close then, else at once


def done_with(plan: Sequence[Step], idx: int) -> DoneWith | None:
    """Whether `plan[idx]` is its cluster's last command step of the plan (a
    release command or an upload), and when the connections it used may close."""
    step = plan[idx]
    if not isinstance(step, (RunCommand, Upload)):
        return None
    later = plan[idx + 1 :]
    if any(isinstance(s, (RunCommand, Upload)) and s.cluster == step.cluster for s in later):
        return None
    return DoneWith(step.cluster, any(isinstance(s, WaitDrained) for s in later))


@dataclass(frozen=True, slots=True)
class ChecksAhead:
    """What a command step's members are checked for in the steps right after it."""

    health: bool  # the next step waits until they are healthy
    version: bool  # and the one after checks their version


def checks_ahead(plan: Sequence[Step], idx: int) -> ChecksAhead:
    """Whether `plan[idx]`, a command on a cluster's members, is followed by the
    wait for their health (and then their version check): each member can then
    be checked as soon as its own command succeeded."""
    step = plan[idx]
    nxt = plan[idx + 1 : idx + 3]
    if not isinstance(step, RunCommand) or not nxt:
        return ChecksAhead(False, False)
    health = isinstance(nxt[0], WaitHealthy) and nxt[0].cluster == step.cluster
    version = (
        health
        and len(nxt) > 1
        and isinstance(nxt[1], CheckVersion)
        and nxt[1].cluster == step.cluster
    )
    return ChecksAhead(health, version)


# --- the swap gate ---------------------------------------------------------------------


def swap_refusal(plan: Sequence[Step], step_states: Mapping[str, str], cluster: str) -> str | None:
    """Why `cluster` must not be put live: a check of this release planned for it
    that is not done (failed, skipped, not reached), or no check planned at all."""
    needed = [s.id for s in plan if isinstance(s, GATES) and s.cluster == cluster]
    missing = [s for s in needed if step_states.get(s) != STEP_DONE]
    if needed and not missing:
        return None
    return f"refusing to put {cluster} live: check(s) not passed: {missing or 'none planned'}"


# --- a take-over -------------------------------------------------------------------------


def kept_at_take_over(ask: Ask | None, steps: Sequence[StepRow]) -> Approval | None:
    """What `resume` keeps of what was asked of a release before it took it over:
    an approval of the step it resumes at (the first of `steps`, in plan order,
    not done), that is of the cluster the release waited for when its process
    went away (approved while nothing ran, or just before the holder died).
    Nothing else: an approval of another step is not this one's, and an abort
    was asked of the process that is gone (`resume` is asked to go on)."""
    resumes_at = next((s.step_id for s in steps if s.state != STEP_DONE), None)
    if isinstance(ask, Approval) and ask.step_id == resumes_at:
        return ask
    return None


# --- the bake ------------------------------------------------------------------------------


def bake_problem(
    view: PoolView,
    cluster: str,
    base_requests: int | None,
    base_errors: int | None,
    max_error_ratio: float,
) -> str | None:
    """Why a freshly promoted cluster looks bad, from the balancer's own figures
    since the bake began, or None. A ratio needs a few requests to mean anything,
    and counts on both sides: a balancer that does not count 5xx (or requests)
    cannot break the rule, which `bake_blind_spot` says."""
    members = view.in_cluster(cluster)
    sick = [m.name for m in members if not m.healthy]
    if sick:
        return f"the balancer sees {', '.join(sick)} unhealthy"
    served, failed = total(members, "requests"), total(members, "errors")
    if None in (served, failed, base_requests, base_errors):
        return None
    assert served is not None and failed is not None  # for mypy: checked just above
    requests = served - (base_requests or 0)
    errors = failed - (base_errors or 0)
    if requests >= 20 and errors / requests > max_error_ratio:
        return (
            f"{errors} of {requests} responses were 5xx ({errors / requests:.1%} > "
            f"max_error_ratio {max_error_ratio:.1%})"
        )
    return None


def bake_summary(view: PoolView, cluster: str, base_requests: int | None, seconds: float) -> str:
    """The detail of a bake that found nothing, saying what it could not see."""
    members = view.in_cluster(cluster)
    served = total(members, "requests")
    if served is None or base_requests is None:
        what = f"{cluster} stayed healthy for {seconds:g}s (the balancer counts no requests)"
    else:
        what = f"{cluster} served {served - base_requests} request(s) cleanly for {seconds:g}s"
    if total(members, "errors") is None:
        what += "; 5xx not counted by the balancer: max_error_ratio not judged"
    return what


def flip_back(auto_rollback: bool, step: Bake) -> Mapping[str, Admission] | None:
    """The admissions a failed bake flips back to, or None when it may not: the
    policy says no, or nothing is left on the old release (the last cluster)."""
    return step.admissions if auto_rollback and step.admissions else None


# --- the bake's analysis: PromQL queries against their thresholds -------------------

_COMPARE = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def promql(query: AnalysisQuery, cluster: Cluster) -> str:
    """The query with `{{cluster}}` (the promoted cluster's name) and `{{members}}`
    (its members' names as a PromQL regex alternation, for `=~`) filled in. Names
    are letters, digits, `_`, `.` and `-` (config.Name): only the dot needs escaping,
    written `\\.` because it sits inside a PromQL string."""
    names = "|".join(m.name.replace(".", "\\\\.") for m in cluster.members)
    values = {"cluster": cluster.name, "members": names}
    return ANALYSIS_FIELD.sub(lambda m: values[m.group(1)], query.query)


class Measured(StrEnum):
    PASSED = "passed"
    FAILED = "failed"  # a value broke the condition
    NO_VALUE = "no value"  # the query failed, returned no series, or NaN (Argo: Error)


def _labels(sample: Sample) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return "{" + inner + "}" if inner else ""


def measure(query: AnalysisQuery, result: Sequence[Sample] | str) -> tuple[Measured, str]:
    """One measurement of `query`: its answer (every series; a string when the
    query itself failed) against `succeed_if threshold`."""
    want = f"{query.succeed_if} {query.threshold:g}"
    if isinstance(result, str):
        return Measured.NO_VALUE, f"query failed: {result}"
    if not result:
        return Measured.NO_VALUE, "no series in the answer"
    if any(math.isnan(s.value) for s in result):
        return Measured.NO_VALUE, "no value (NaN) in the answer"
    compare = _COMPARE[query.succeed_if]
    bad = [s for s in result if not compare(s.value, query.threshold)]
    if bad:
        shown = ", ".join(f"{_labels(s)} {s.value:g}".strip() for s in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        return Measured.FAILED, f"{shown}{more}, expected {want}"
    shown = ", ".join(f"{s.value:g}" for s in result[:3])
    return Measured.PASSED, f"{shown} {want}"


@dataclass(frozen=True, slots=True)
class QueryWatch:
    """What the bake remembers of one query between two measurements."""

    due: float  # when the next measurement is due (the engine's monotonic clock)
    taken: int = 0
    failed: int = 0
    no_value_in_a_row: int = 0
    last: str = ""


def analysis_start(queries: Sequence[AnalysisQuery], now: float) -> dict[str, QueryWatch]:
    return {q.name: QueryWatch(due=now + q.initial_delay) for q in queries}


def analysis_read(
    query: AnalysisQuery, watch: QueryWatch, result: Sequence[Sample] | str, now: float
) -> tuple[QueryWatch, str | None]:
    """Fold one measurement into the watch; the problem that fails the bake, or None.

    As Argo Rollouts' `failureLimit` and `consecutiveErrorLimit`: the bake fails at
    the `failure_limit + 1`th failed measurement, or at the `error_limit + 1`th in a
    row without a value (an analysis that cannot see is not a passing one)."""
    outcome, detail = measure(query, result)
    failed = watch.failed + (outcome is Measured.FAILED)
    in_a_row = watch.no_value_in_a_row + 1 if outcome is Measured.NO_VALUE else 0
    after = QueryWatch(now + query.interval, watch.taken + 1, failed, in_a_row, detail)
    if outcome is Measured.FAILED and failed > query.failure_limit:
        return after, (
            f"analysis {query.name}: {detail} ({failed} failed measurement(s), "
            f"failure_limit {query.failure_limit})"
        )
    if in_a_row > query.error_limit:
        return after, (
            f"analysis {query.name}: {in_a_row} measurement(s) in a row without a value "
            f"(error_limit {query.error_limit}), last: {detail}"
        )
    return after, None


def analysis_summary(queries: Sequence[AnalysisQuery], watches: Mapping[str, QueryWatch]) -> str:
    """The bake's detail about its analysis when it found nothing."""
    parts = []
    for q in queries:
        w = watches[q.name]
        parts.append(
            f"{q.name}: {w.taken} measurement(s), {w.failed} failed"
            + (f", last {w.last}" if w.last else "")
        )
    return "analysis " + "; ".join(parts)


def error_ratio_refusal(topo: Topology, fills: frozenset[str]) -> str | None:
    """Why `check` refuses the topology's `policy.max_error_ratio`: it is set in
    the file, the driver counts no 5xx per member (`fills`: the counters it fills)
    and no `[policy.analysis]` measures errors instead; else None."""
    policy = topo.policy
    if "max_error_ratio" not in policy.model_fields_set or "errors" in fills:
        return None
    if policy.analysis is not None:
        return None
    return (
        f"policy.max_error_ratio: the {topo.balancer.driver} driver counts no 5xx responses "
        "per member, so the bake could never judge it; remove it, or configure "
        "[policy.analysis] with a query on your metrics (docs/configuration.md)"
    )


# --- rolling back ------------------------------------------------------------------------


def kept_clusters(
    topo: Topology, last: ReleaseRow, view: PoolView, now: float
) -> tuple[str, list[str]] | None:
    """(current, kept) when the last release was bluegreen, its bake window is
    still open and the clusters it swapped out are still draining (running the
    old release); None when only a re-release can roll back."""
    if last.strategy != "bluegreen" or last.finished is None:
        return None
    if now > last.finished + topo.policy.keep_previous:
        return None
    try:
        plan = [step_from_dict(s) for s in last.plan]
    except StoredPlanError:
        return None  # a plan this version cannot read: roll back by a release
    # The swap is the bluegreen plan's one change that puts a cluster live.
    swaps = [s for s in plan if isinstance(s, Admit) and s.promote is not None]
    if not swaps or swaps[-1].promote is None:
        return None
    kept = [c for c, adm in swaps[-1].admissions.items() if adm is Admission.DRAINING]
    if not kept or any(cluster_admission(view, c) is not Admission.DRAINING for c in kept):
        return None
    return swaps[-1].promote, kept


def rollback_plan(
    topo: Topology,
    pending: ReleaseRow | None,
    last: ReleaseRow | None,
    view: PoolView,
    now: float,
) -> tuple[str, list[Step]]:
    """(version, steps) of a rollback. `pending` is the newest release when it did
    not finish (failed, interrupted, aborted): it is the one undone, back to what
    it replaced. Otherwise back to the version before the last finished release:
    an instant flip to the clusters a bluegreen release kept on it, or a release
    of it through the same safe steps. The old release runs on the expanded
    schema, so a rollback migrates nothing."""
    if pending is not None:
        if pending.previous_version is None:
            raise PlanRefused(f"release #{pending.id} recorded no previous version")
        return pending.previous_version, make_plan(
            topo, pending.previous_version, view, migrate=False
        )
    if last is None or last.previous_version is None:
        raise PlanRefused("nothing to roll back to: no finished release with a predecessor")
    kept = kept_clusters(topo, last, view, now)
    if kept is not None:
        current, previous = kept
        return last.previous_version, flip_back_plan(topo, current, previous)
    return last.previous_version, make_plan(topo, last.previous_version, view, migrate=False)
