"""The engine's decisions, as pure functions over plain data.

Whether a drain is over, whether a fan-out spent more than its failure budget,
whether a cluster may be swapped live, whether a bake saw a bad release, and
what a rollback goes back to: no I/O here, so each is a table of cases in
tests/unit/test_policy.py. The engine reads the world, asks these, and acts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from changeover.config import Topology
from changeover.executors.base import CommandResult
from changeover.journal import STEP_DONE, ReleaseRow
from changeover.model import Admission, MemberState, PoolView, cluster_admission
from changeover.plan import PlanRefused, flip_back_plan, make_plan
from changeover.steps import GATES, Admit, Bake, Step, StoredPlanError, step_from_dict

# --- draining ------------------------------------------------------------------------


class Drain(StrEnum):
    WAITING = "waiting"
    QUIET = "quiet"  # no request in flight and none served for `drain_idle`
    TIMED_OUT = "timed-out"


@dataclass(frozen=True, slots=True)
class DrainWatch:
    """What a drain remembers between two reads of the balancer."""

    started: float
    quiet_since: float
    last_total: int | None = None  # requests served by the cluster at the last read


def drain_progress(
    watch: DrainWatch, members: Sequence[MemberState], now: float, idle: float, timeout: float
) -> tuple[DrainWatch, Drain]:
    """Fold one read of the draining cluster's members into the watch. Quiet
    means nothing in flight and the served count unchanged for `idle` seconds."""
    active = sum(m.active for m in members)
    total = sum(m.requests for m in members)
    busy = active > 0 or total != watch.last_total
    quiet_since = now if busy else watch.quiet_since
    watch = DrainWatch(watch.started, quiet_since, total)
    if now - quiet_since >= idle:
        return watch, Drain.QUIET
    if now - watch.started >= timeout:
        return watch, Drain.TIMED_OUT
    return watch, Drain.WAITING


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


# --- the swap gate ---------------------------------------------------------------------


def swap_refusal(plan: Sequence[Step], step_states: Mapping[str, str], cluster: str) -> str | None:
    """Why `cluster` must not be put live: a check of this release planned for it
    that is not done (failed, skipped, not reached), or no check planned at all."""
    needed = [s.id for s in plan if isinstance(s, GATES) and s.cluster == cluster]
    missing = [s for s in needed if step_states.get(s) != STEP_DONE]
    if needed and not missing:
        return None
    return f"refusing to put {cluster} live: check(s) not passed: {missing or 'none planned'}"


# --- the bake ------------------------------------------------------------------------------


def bake_problem(
    view: PoolView, cluster: str, base_requests: int, base_errors: int, max_error_ratio: float
) -> str | None:
    """Why a freshly promoted cluster looks bad, from the balancer's own figures
    since the bake began, or None. A ratio needs a few requests to mean anything."""
    members = view.in_cluster(cluster)
    sick = [m.name for m in members if not m.healthy]
    if sick:
        return f"the balancer sees {', '.join(sick)} unhealthy"
    requests = sum(m.requests for m in members) - base_requests
    errors = sum(m.errors for m in members) - base_errors
    if requests >= 20 and errors / requests > max_error_ratio:
        return (
            f"{errors} of {requests} responses were 5xx ({errors / requests:.1%} > "
            f"max_error_ratio {max_error_ratio:.1%})"
        )
    return None


def flip_back(auto_rollback: bool, step: Bake) -> Mapping[str, Admission] | None:
    """The admissions a failed bake flips back to, or None when it may not: the
    policy says no, or nothing is left on the old release (the last cluster)."""
    return step.admissions if auto_rollback and step.admissions else None


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
