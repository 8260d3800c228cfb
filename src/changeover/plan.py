"""Planning and interlocks: pure functions from a topology and a pool view to steps.

Nothing here does I/O. The plan is stored in the journal as plain data, so a
resumed release follows the plan it started with, not a new one.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

from changeover.config import Topology
from changeover.model import Admission, PoolView, cluster_admission
from changeover.steps import (
    Admit,
    Approve,
    Bake,
    CheckVersion,
    Migrate,
    Preflight,
    RunCommand,
    Smoke,
    Step,
    Upload,
    VerifyLive,
    WaitDrained,
    WaitHealthy,
)


class PlanRefused(Exception):
    """The plan would break an interlock with the pool as it is now."""


def _checks(cluster: str) -> list[Step]:
    """Health and version of each member, smoke through the QA entry point."""
    return [
        WaitHealthy(f"healthy-{cluster}", f"wait until {cluster} is healthy", cluster),
        CheckVersion(f"version-{cluster}", f"verify {cluster} reports the version", cluster),
        Smoke(f"smoke-{cluster}", f"smoke-test {cluster} through its QA entry point", cluster),
    ]


def _cluster_steps(topo: Topology, cluster: str) -> list[Step]:
    """Stop, deploy, start and check one cluster that is out of the live pool."""
    rel = topo.release
    stop, deploy, start = (
        [RunCommand(f"{what}-{cluster}", f"{verb} {cluster}", cluster, what)]
        if getattr(rel, what)
        else []
        for what, verb in (("stop", "stop"), ("deploy", "deploy to"), ("start", "start"))
    )
    upload: list[Step] = (
        [Upload(f"upload-{cluster}", f"upload artifacts to {cluster}", cluster)]
        if rel.upload
        else []
    )
    approve: list[Step] = (
        [Approve(f"approve-{cluster}", f"wait for approval of {cluster}", cluster)]
        if topo.policy.approval == "manual"
        else []
    )
    return [*stop, *upload, *deploy, *start, *_checks(cluster), *approve]


def _out(cluster: str) -> Step:
    return Admit(f"out-{cluster}", f"take {cluster} out of the live pool", {cluster: Admission.OUT})


def _drained(cluster: str) -> list[Step]:
    """Wait out the draining cluster's work, then take it out of the live pool."""
    return [
        WaitDrained(f"drained-{cluster}", f"wait until {cluster} is drained", cluster),
        _out(cluster),
    ]


def _bake(topo: Topology, promoted: str, fallback: list[str]) -> list[Step]:
    """Watch `promoted` after it went live (with `policy.bake`); the flip back
    an automatic rollback applies is possible only while `fallback` still runs
    the old release, i.e. is draining, not yet stopped."""
    if topo.policy.bake <= 0:
        return []
    flip = {c: Admission.LIVE for c in fallback} | {promoted: Admission.OUT}
    return [
        Bake(f"bake-{promoted}", f"bake: watch {promoted} in the live pool", promoted,
             flip if fallback else {})
    ]  # fmt: skip


def make_plan(
    topo: Topology,
    version: str,
    view: PoolView | None = None,
    strategy: str | None = None,
    migrate: bool = True,
    first: bool = False,
) -> list[Step]:
    """The steps of a release of `version` with the topology's strategy (or `strategy`);
    with the `[database]` migrations unless `migrate` is false (a rollback). `first`:
    the first deploy of a site that serves nothing yet (`_first_deploy`)."""
    if not version.strip():
        raise PlanRefused("the version is empty")
    chosen = strategy or topo.policy.strategy
    if first:
        body = _first_deploy(topo, view)
    else:
        body = _bluegreen(topo, view) if chosen == "bluegreen" else _rolling(topo, view)
    expand, contract = _migrations(topo, chosen) if migrate else ([], [])
    if first:  # no release serves yet whose checks could be verified on the new schema
        expand = [s for s in expand if not isinstance(s, VerifyLive)]
    steps = [_preflight(), *expand, *body, *contract]
    if view is not None:
        refusal = first_refusal(topo, view, steps)
        if refusal:
            raise PlanRefused(refusal)
    return steps


def _migrations(topo: Topology, strategy: str) -> tuple[list[Step], list[Step]]:
    """(before, after) the release's cluster steps. Expand goes right after the
    preflight, before any cluster leaves the live pool or is deployed, then the
    old release's checks on the expanded schema; contract once every cluster
    serves the new release. Bluegreen keeps the previous clusters on the old
    release, so it never contracts."""
    if topo.database is None:
        return [], []
    phases = topo.database.phases()
    expand: list[Step] = [
        Migrate("migrate-expand",
                "apply the expand migrations (the old release keeps working)", "expand"),
        VerifyLive("verify-live",
                   "check the release still serving (health, smoke through the live pool)"),
    ] if "expand" in phases else []  # fmt: skip
    contract: list[Step] = [
        Migrate("migrate-contract",
                "apply the contract migrations (every cluster serves the new release)",
                "contract"),
    ] if "contract" in phases and strategy != "bluegreen" else []  # fmt: skip
    return expand, contract


def _preflight() -> Step:
    return Preflight("preflight", "check the balancer, the pool and the interlocks")


def _rolling(topo: Topology, view: PoolView | None) -> list[Step]:
    """The seed's rolling-clusters release: one cluster out at a time, swapping
    the released cluster live and the next one draining in a single change.
    Clusters already out of the live pool (a failed release) go first."""
    admission = {
        c: (cluster_admission(view, c) if view else Admission.LIVE) for c in topo.cluster_order()
    }
    order = sorted(admission, key=lambda c: admission[c] is Admission.LIVE)
    first = order[0]
    if admission[first] is Admission.OUT:
        opening: list[Step] = [_out(first)]  # already out: nothing to drain
    else:
        drain = Admit(f"drain-{first}", f"drain {first}", {first: Admission.DRAINING})
        opening = [drain, *_drained(first)]
    steps = [*opening, *_cluster_steps(topo, first)]
    for previous, cluster in itertools.pairwise(order):
        swap = Admit(
            f"drain-{cluster}",
            f"swap: {previous} live, {cluster} draining",
            {previous: Admission.LIVE, cluster: Admission.DRAINING},
            promote=previous,
        )
        # The swap is the one balancer change between drain and drained: bake
        # right after it, while `cluster` still runs the old release.
        steps += [
            swap,
            *_bake(topo, previous, [cluster]),
            *_drained(cluster),
            *_cluster_steps(topo, cluster),
        ]
    last = order[-1]
    live = Admit(f"live-{last}", f"put {last} live", {last: Admission.LIVE}, promote=last)
    return [*steps, live, *_bake(topo, last, [])]


def _first_deploy(topo: Topology, view: PoolView | None) -> list[Step]:
    """A site that serves nothing yet: every cluster out of service, each
    deployed and checked, then put live one by one (each behind its own checks)."""
    live = view.members if view is not None else ()
    serving = [m.name for m in live if m.admission is Admission.LIVE and m.healthy]
    if serving:
        raise PlanRefused(
            "a first deploy takes every cluster out of service, but the site serves already "
            f"({', '.join(serving)} healthy in the live pool): release without --first"
        )
    order = topo.cluster_order()
    out = Admit(
        "out-all",
        "take every cluster out of service (first deploy: nothing serves yet)",
        dict.fromkeys(order, Admission.OUT),
    )
    deploys = [step for cluster in order for step in _cluster_steps(topo, cluster)]
    lives: list[Step] = [
        Admit(f"live-{c}", f"put {c} live", {c: Admission.LIVE}, promote=c) for c in order
    ]
    return [out, *deploys, *lives]


def _bluegreen(topo: Topology, view: PoolView | None) -> list[Step]:
    """Release only the idle cluster and swap it live; the clusters that served
    until now stay draining on the old release (`keep_previous`), ready for an
    instant flip back by `changeover rollback`."""
    order = topo.cluster_order()
    admission = {c: (cluster_admission(view, c) if view else Admission.LIVE) for c in order}
    idle = [c for c in order if admission[c] is not Admission.LIVE]
    target = idle[0] if idle else order[0]
    serving = [c for c in order if c != target and admission[c] is Admission.LIVE]
    if admission[target] is Admission.LIVE:
        drain = Admit(f"drain-{target}", f"drain {target}", {target: Admission.DRAINING})
        opening: list[Step] = [drain, *_drained(target)]
    elif admission[target] is Admission.OUT:
        opening = []
    else:  # draining or mixed: let its work finish, then out
        opening = _drained(target)
    swap = {target: Admission.LIVE} | {c: Admission.DRAINING for c in serving}
    previous = ", ".join(serving) or "nothing"
    swapped = Admit(
        f"swap-{target}",
        f"swap: {target} live, {previous} draining (kept)",
        swap,
        promote=target,
    )
    return [*opening, *_cluster_steps(topo, target), swapped, *_bake(topo, target, serving)]


def flip_back_plan(topo: Topology, current: str, previous: list[str]) -> list[Step]:
    """An instant rollback: the kept clusters (still on the old release) are
    checked and put live in one change, the current one drained and taken out."""
    flip = {c: Admission.LIVE for c in previous} | {current: Admission.DRAINING}
    back = Admit(
        f"flip-{current}",
        f"flip back: {', '.join(previous)} live, {current} draining",
        flip,
        promote=previous[0],
    )
    checks = [step for cluster in previous for step in _checks(cluster)]
    return [_preflight(), *checks, back, *_drained(current)]


# --- interlocks ---------------------------------------------------------------


def member_admissions(
    topo: Topology, clusters: Mapping[str, Admission], kept_out: Collection[str] = ()
) -> dict[str, Admission]:
    """Per-member admissions for cluster-level ones; members `kept_out` (they
    failed a step of this release within its failure budget) stay OUT."""
    return {
        m.name: Admission.OUT if m.name in kept_out else clusters[c.name]
        for c, m in topo.members()
        if c.name in clusters
    }


def admit_refusal(topo: Topology, view: PoolView, clusters: Mapping[str, Admission]) -> str | None:
    """Why applying `clusters` to `view` must not happen, or None when it is safe.

    The clusters left LIVE must together keep at least `policy.min_healthy`
    members that the balancer sees healthy: the last healthy cluster is never
    taken out of the live pool. A change that leaves no fewer healthy live
    members than there are now passes (nothing is lost where nothing serves).
    """
    return admissions_refusal(topo, view, member_admissions(topo, clusters))


def admissions_refusal(
    topo: Topology, view: PoolView, members: Mapping[str, Admission]
) -> str | None:
    """`admit_refusal` for per-member admissions (the embedded balancer's admin
    API checks each change it is asked for with it)."""
    after = view.admissions() | dict(members)
    healthy_live = [
        m.name for m in view.members if after.get(m.name) is Admission.LIVE and m.healthy
    ]
    before = [m.name for m in view.members if m.admission is Admission.LIVE and m.healthy]
    need = topo.policy.min_healthy
    # A change that takes no healthy member out of service loses nothing: a site
    # that serves nothing yet (a first deploy) may be rearranged.
    if len(healthy_live) < need and len(healthy_live) < len(before):
        live_clusters = sorted(
            {m.cluster for m in view.members if after.get(m.name) is Admission.LIVE}
        )
        return (
            f"interlock: after this change the live pool ({', '.join(live_clusters) or 'nothing'}) "
            f"would have {len(healthy_live)} healthy member(s); policy.min_healthy is {need}"
        )
    return None


def first_refusal(topo: Topology, view: PoolView, steps: list[Step]) -> str | None:
    """Check the first change that takes capacity away against today's pool.

    Later changes depend on clusters released by then, so the engine checks
    each one again, against a fresh view, right before applying it.
    """
    for step in steps:
        if isinstance(step, Admit) and step.promote is None:
            return admit_refusal(topo, view, step.admissions)
    return None


def describe(steps: list[Step]) -> list[str]:
    return [f"{i + 1:>2}. {s.description}" for i, s in enumerate(steps)]
