"""The steps of a plan: one frozen dataclass per kind, a tagged union.

A plan is stored in the journal as a list of dicts, each tagged with its
`kind` (the discriminator), so a resumed release follows the plan it started
with. `step_from_dict` reads what `to_dict` wrote, and also plans journaled
before the steps were typed (one shape for every kind, unused fields None).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from changeover.migrations import Phase
from changeover.model import Admission


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


class StoredPlanError(ValueError):
    """A journaled step this version cannot read."""


def _admissions(value: Mapping[str, str]) -> dict[str, Admission]:
    return {cluster: Admission(adm) for cluster, adm in value.items()}


@dataclass(frozen=True, slots=True)
class _Step:
    id: str
    description: str

    kind: ClassVar[StepKind]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind.value}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = _admission_values(value) if isinstance(value, dict) else value
        return data


def _admission_values(value: Mapping[str, Admission]) -> dict[str, str]:
    return {cluster: adm.value for cluster, adm in value.items()}


@dataclass(frozen=True, slots=True)
class _OnCluster(_Step):
    cluster: str


@dataclass(frozen=True, slots=True)
class Preflight(_Step):
    kind = StepKind.PREFLIGHT


@dataclass(frozen=True, slots=True)
class Admit(_Step):
    """Cluster admissions in one balancer change. `promote` names the cluster put
    LIVE, which must have passed its checks and be healthy as the balancer sees it."""

    admissions: dict[str, Admission]
    promote: str | None = None
    kind = StepKind.ADMIT


@dataclass(frozen=True, slots=True)
class WaitDrained(_OnCluster):
    kind = StepKind.WAIT_DRAINED


@dataclass(frozen=True, slots=True)
class RunCommand(_OnCluster):
    command: str  # "stop", "deploy" or "start": a `[release]` template
    kind = StepKind.RUN


@dataclass(frozen=True, slots=True)
class Upload(_OnCluster):
    kind = StepKind.UPLOAD


@dataclass(frozen=True, slots=True)
class WaitHealthy(_OnCluster):
    kind = StepKind.WAIT_HEALTHY


@dataclass(frozen=True, slots=True)
class CheckVersion(_OnCluster):
    kind = StepKind.VERIFY_VERSION


@dataclass(frozen=True, slots=True)
class Smoke(_OnCluster):
    kind = StepKind.SMOKE


@dataclass(frozen=True, slots=True)
class Approve(_OnCluster):
    kind = StepKind.APPROVE


@dataclass(frozen=True, slots=True)
class Bake(_OnCluster):
    """Watch `cluster` after it went live; `admissions` is the flip back an
    automatic rollback applies (empty when nothing is left on the old release)."""

    admissions: dict[str, Admission] = field(default_factory=dict)
    kind = StepKind.BAKE


@dataclass(frozen=True, slots=True)
class Migrate(_Step):
    phase: Phase
    kind = StepKind.MIGRATE


@dataclass(frozen=True, slots=True)
class VerifyLive(_Step):
    kind = StepKind.VERIFY_LIVE


Step = (
    Preflight
    | Admit
    | WaitDrained
    | RunCommand
    | Upload
    | WaitHealthy
    | CheckVersion
    | Smoke
    | Approve
    | Bake
    | Migrate
    | VerifyLive
)

# The checks a cluster must pass in a release before it may be put live.
GATES = (WaitHealthy, CheckVersion, Smoke, Approve)

_BY_KIND: dict[str, type[Step]] = {
    cls.kind.value: cls
    for cls in (
        Preflight,
        Admit,
        WaitDrained,
        RunCommand,
        Upload,
        WaitHealthy,
        CheckVersion,
        Smoke,
        Approve,
        Bake,
        Migrate,
        VerifyLive,
    )
}


def step_from_dict(data: Mapping[str, Any]) -> Step:
    """The step `to_dict` wrote. Keys a kind does not have are ignored (the
    older one-shape format wrote them as None); a missing one is an error."""
    cls = _BY_KIND.get(data.get("kind", ""))
    if cls is None:
        raise StoredPlanError(f"step {data.get('id')!r}: unknown kind {data.get('kind')!r}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value = data[f.name]
        values[f.name] = _admissions(value) if f.name == "admissions" else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise StoredPlanError(f"step {data.get('id')!r} ({cls.kind.value}): {exc}") from None
