"""What the desk shows, as plain JSON-ready data built from the service's
answers: pure functions, so the API, the live stream and /metrics agree."""

from __future__ import annotations

from typing import Any

from changeover import journal as J
from changeover.checks import qa_entry
from changeover.config import Topology
from changeover.releases import ASKED, SiteStatus


def qa_url(topo: Topology, cluster: str) -> str | None:
    """Where QA opens the cluster: its own port, or its QA host name on the
    public listener's port; None when it has no QA entry point."""
    try:
        base, host = qa_entry(topo, topo.cluster(cluster))
    except ValueError:
        return None
    if host is None:
        return base
    scheme, _, rest = base.partition("://")
    port = rest.rpartition(":")[2]
    return f"{scheme}://{host}:{port}"


def under_test(topo: Topology, release: dict[str, Any] | None) -> str | None:
    """The cluster the release works on now: that of its running step, else of
    the last one done (steps are named `<what>-<cluster>`)."""
    if release is None:
        return None
    names = {c.name for c in topo.clusters}
    steps = release["steps"]
    current = [s for s in steps if s["state"] == J.STEP_RUNNING] or [
        s for s in steps if s["state"] == J.STEP_DONE
    ][-1:]
    found = [s["id"].rpartition("-")[2] for s in current]
    return next((name for name in found if name in names), None)


def approvals(release: dict[str, Any]) -> list[str]:
    """Who approved each cluster: the approve steps' own record."""
    return [
        f"{s['id']}: {s['detail']}"
        for s in release["steps"]
        if s["id"].startswith("approve-") and s["state"] == J.STEP_DONE and s["detail"]
    ]


def actions(release: dict[str, Any]) -> list[dict[str, Any]]:
    """The approve, abort and rollback asked of a release, with the time."""
    return [
        {"at": e["at"], "message": e["message"]}
        for e in release.get("events", [])
        if e["kind"] == ASKED
    ]


def site(topo: Topology, now: SiteStatus) -> dict[str, Any]:
    """The site at a glance and the release in progress (`GET /api/status`)."""
    members = now.view.members if now.view else ()
    release = now.release
    if release is not None:
        release = release | {
            "approved": approvals(release),
            "actions": actions(release),
            "cluster_under_test": under_test(topo, release),
        }
    return {
        "site": topo.site.name,
        "clusters": [
            {
                "name": c.name,
                "qa_url": qa_url(topo, c.name),
                "members": [
                    {
                        "name": m.name,
                        "admission": m.admission.value,
                        "healthy": m.healthy,
                        "in_flight": m.active,
                    }
                    for m in members
                    if m.cluster == c.name
                ],
            }
            for c in topo.clusters
        ],
        "balancer_error": now.balancer_error,
        "release": release,
        "lock": now.lock.describe() if now.lock else None,
        "kept_out": now.kept_out,
    }
