"""Planning and interlocks: pure functions from a topology and a pool view to steps.

Nothing here does I/O. The plan is stored in the journal as plain data, so a
resumed release follows the plan it started with, not a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from changeover.config import Topology
from changeover.model import Admission, PoolView, cluster_admission


class StepKind(StrEnum):
    PREFLIGHT = "preflight"  # balancer reachable, every member known, interlock holds
    ADMIT = "admit"  # set cluster admissions in one balancer change
    WAIT_DRAINED = "wait-drained"  # in-flight work on a draining cluster goes quiet
    RUN = "run"  # a release command on every member of a cluster
    UPLOAD = "upload"  # artifacts to every member of a cluster
    WAIT_HEALTHY = "wait-healthy"  # every member answers its health check directly
    VERIFY_VERSION = "verify-version"  # every member reports the new version
    SMOKE = "smoke"  # smoke checks through the cluster's QA entry point
    APPROVE = "approve"  # a person approves the cluster (approval = "manual")
    BAKE = "bake"  # watch the live pool after a swap; flip back when it goes bad
    MIGRATE = "migrate"  # apply one phase of the database migrations
    VERIFY_LIVE = "verify-live"  # after expand: the old release still passes its checks


@dataclass(frozen=True, slots=True)
class Step:
    id: str
    kind: StepKind
    description: str
    cluster: str | None = None
    # ADMIT: cluster -> admission. `promote` names the cluster put LIVE, which
    # must have passed its checks and be healthy as the balancer sees it.
    admissions: dict[str, Admission] = field(default_factory=dict)
    promote: str | None = None
    command: str | None = None  # RUN: "stop", "deploy" or "start"
    phase: str | None = None  # MIGRATE: "expand" or "contract"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["admissions"] = {k: v.value for k, v in self.admissions.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        return cls(
            id=data["id"],
            kind=StepKind(data["kind"]),
            description=data["description"],
            cluster=data.get("cluster"),
            admissions={k: Admission(v) for k, v in (data.get("admissions") or {}).items()},
            promote=data.get("promote"),
            command=data.get("command"),
            phase=data.get("phase"),
        )


class PlanRefused(Exception):
    """The plan would break an interlock with the pool as it is now."""


def _cluster_steps(topo: Topology, cluster: str) -> list[Step]:
    """Stop, deploy, start and check one cluster that is out of the live pool."""
    steps: list[Step] = []
    rel = topo.release
    if rel.stop:
        steps.append(
            Step(f"stop-{cluster}", StepKind.RUN, f"stop {cluster}", cluster, command="stop")
        )
    if rel.upload:
        steps.append(
            Step(f"upload-{cluster}", StepKind.UPLOAD, f"upload artifacts to {cluster}", cluster)
        )
    if rel.deploy:
        steps.append(
            Step(
                f"deploy-{cluster}", StepKind.RUN, f"deploy to {cluster}", cluster, command="deploy"
            )
        )
    if rel.start:
        steps.append(
            Step(f"start-{cluster}", StepKind.RUN, f"start {cluster}", cluster, command="start")
        )
    steps += [
        Step(
            f"healthy-{cluster}", StepKind.WAIT_HEALTHY, f"wait until {cluster} is healthy", cluster
        ),
        Step(
            f"version-{cluster}",
            StepKind.VERIFY_VERSION,
            f"verify {cluster} reports the version",
            cluster,
        ),
        Step(
            f"smoke-{cluster}",
            StepKind.SMOKE,
            f"smoke-test {cluster} through its QA entry point",
            cluster,
        ),
    ]
    if topo.policy.approval == "manual":
        steps.append(
            Step(f"approve-{cluster}", StepKind.APPROVE, f"wait for approval of {cluster}", cluster)
        )
    return steps


def _take_out(
    cluster: str, admissions: dict[str, Admission], promote: str | None, what: str
) -> list[Step]:
    return [
        Step(f"drain-{cluster}", StepKind.ADMIT, what, admissions=admissions, promote=promote),
        Step(
            f"drained-{cluster}", StepKind.WAIT_DRAINED, f"wait until {cluster} is drained", cluster
        ),
        Step(
            f"out-{cluster}",
            StepKind.ADMIT,
            f"take {cluster} out of the live pool",
            admissions={cluster: Admission.OUT},
        ),
    ]


def _bake(promoted: str, fallback: list[str]) -> list[Step]:
    """Watch `promoted` after it went live; `admissions` is the flip back that an
    automatic rollback applies (only possible while `fallback` still runs the
    old release, i.e. is draining, not yet stopped)."""
    flip = {c: Admission.LIVE for c in fallback} | {promoted: Admission.OUT}
    return [
        Step(f"bake-{promoted}", StepKind.BAKE, f"bake: watch {promoted} in the live pool",
             promoted, admissions=flip if fallback else {})
    ]  # fmt: skip


def make_plan(
    topo: Topology,
    version: str,
    view: PoolView | None = None,
    strategy: str | None = None,
    migrate: bool = True,
) -> list[Step]:
    """The steps of a release of `version` with the topology's strategy (or `strategy`);
    with the `[database]` migrations unless `migrate` is false (a rollback)."""
    if not version.strip():
        raise PlanRefused("the version is empty")
    if (strategy or topo.policy.strategy) == "bluegreen":
        steps = _bluegreen(topo, view)
    else:
        steps = _rolling(topo, view)
    if migrate:
        steps = _with_migrations(topo, steps, strategy or topo.policy.strategy)
    if view is not None:
        refusal = first_refusal(topo, view, steps)
        if refusal:
            raise PlanRefused(refusal)
    return steps


def _with_migrations(topo: Topology, steps: list[Step], strategy: str) -> list[Step]:
    """Expand right after the preflight, before any cluster leaves the live pool
    or is deployed, then the old release's checks on the expanded schema;
    contract once every cluster serves the new release. Bluegreen keeps the
    previous clusters on the old release, so it never contracts."""
    if topo.database is None:
        return steps
    phases = topo.database.phases()
    head, tail = steps[:1], steps[1:]
    if "expand" in phases:
        head += [
            Step("migrate-expand", StepKind.MIGRATE,
                 "apply the expand migrations (the old release keeps working)", phase="expand"),
            Step("verify-live", StepKind.VERIFY_LIVE,
                 "check the release still serving (health, smoke through the live pool)"),
        ]  # fmt: skip
    if "contract" in phases and strategy != "bluegreen":
        tail.append(
            Step("migrate-contract", StepKind.MIGRATE,
                 "apply the contract migrations (every cluster serves the new release)",
                 phase="contract")
        )  # fmt: skip
    return head + tail


def _preflight() -> Step:
    return Step("preflight", StepKind.PREFLIGHT, "check the balancer, the pool and the interlocks")


def _rolling(topo: Topology, view: PoolView | None) -> list[Step]:
    """The seed's rolling-clusters release: one cluster out at a time, swapping
    the released cluster live and the next one draining in a single change.
    Clusters already out of the live pool (a failed release) go first."""
    bake = topo.policy.bake > 0
    admission = {
        c: (cluster_admission(view, c) if view else Admission.LIVE) for c in topo.cluster_order()
    }
    steps = [_preflight()]
    previous: str | None = None
    for cluster in sorted(admission, key=lambda c: admission[c] is Admission.LIVE):
        if previous is None:
            steps += _take_out(cluster, {cluster: Admission.DRAINING}, None, f"drain {cluster}")
            if admission[cluster] is Admission.OUT:
                steps = steps[:-3] + steps[-1:]  # already out: nothing to drain
        else:
            swap = {previous: Admission.LIVE, cluster: Admission.DRAINING}
            steps += _take_out(
                cluster, swap, previous, f"swap: {previous} live, {cluster} draining"
            )
            # The swap is the one balancer change between drain and drained:
            # bake right after it, while `cluster` still runs the old release.
            if bake:
                steps[-2:-2] = _bake(previous, [cluster])
        steps += _cluster_steps(topo, cluster)
        previous = cluster
    assert previous is not None
    steps.append(
        Step(f"live-{previous}", StepKind.ADMIT, f"put {previous} live",
             admissions={previous: Admission.LIVE}, promote=previous)
    )  # fmt: skip
    if bake:
        steps += _bake(previous, [])
    return steps


def _bluegreen(topo: Topology, view: PoolView | None) -> list[Step]:
    """Release only the idle cluster and swap it live; the clusters that served
    until now stay draining on the old release (`keep_previous`), ready for an
    instant flip back by `changeover rollback`."""
    order = topo.cluster_order()
    admission = {c: (cluster_admission(view, c) if view else Admission.LIVE) for c in order}
    idle = [c for c in order if admission[c] is not Admission.LIVE]
    target = idle[0] if idle else order[0]
    serving = [c for c in order if c != target and admission[c] is Admission.LIVE]
    steps = [_preflight()]
    if admission[target] is Admission.LIVE:
        steps += _take_out(target, {target: Admission.DRAINING}, None, f"drain {target}")
    elif admission[target] is not Admission.OUT:
        steps += _take_out(target, {target: Admission.OUT}, None, f"take {target} out")[1:]
    steps += _cluster_steps(topo, target)
    swap = {target: Admission.LIVE} | {c: Admission.DRAINING for c in serving}
    previous = ", ".join(serving) or "nothing"
    steps.append(
        Step(f"swap-{target}", StepKind.ADMIT, f"swap: {target} live, {previous} draining (kept)",
             admissions=swap, promote=target)
    )  # fmt: skip
    if topo.policy.bake > 0:
        steps += _bake(target, serving)
    return steps


def flip_back_plan(topo: Topology, current: str, previous: list[str]) -> list[Step]:
    """An instant rollback: the kept clusters (still on the old release) are
    checked and put live in one change, the current one drained and taken out."""
    steps = [_preflight()]
    for cluster in previous:
        steps += [s for s in _cluster_steps(topo, cluster) if s.kind in _CHECK_KINDS]
    flip = {c: Admission.LIVE for c in previous} | {current: Admission.DRAINING}
    steps.append(
        Step(f"flip-{current}", StepKind.ADMIT,
             f"flip back: {', '.join(previous)} live, {current} draining",
             admissions=flip, promote=previous[0])
    )  # fmt: skip
    steps += _take_out(current, {}, None, "")[1:]
    return steps


_CHECK_KINDS = (StepKind.WAIT_HEALTHY, StepKind.VERIFY_VERSION, StepKind.SMOKE)


# --- interlocks ---------------------------------------------------------------


def member_admissions(topo: Topology, clusters: Mapping[str, Admission]) -> dict[str, Admission]:
    """Per-member admissions for cluster-level ones."""
    return {m.name: clusters[c.name] for c, m in topo.members() if c.name in clusters}


def admit_refusal(topo: Topology, view: PoolView, clusters: Mapping[str, Admission]) -> str | None:
    """Why applying `clusters` to `view` must not happen, or None when it is safe.

    The clusters left LIVE must together keep at least `policy.min_healthy`
    members that the balancer sees healthy: the last healthy cluster is never
    taken out of the live pool.
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
    need = topo.policy.min_healthy
    if len(healthy_live) < need:
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
        if step.kind is StepKind.ADMIT and step.promote is None:
            return admit_refusal(topo, view, step.admissions)
    return None


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


def describe(steps: list[Step]) -> list[str]:
    return [f"{i + 1:>2}. {s.description}" for i, s in enumerate(steps)]
