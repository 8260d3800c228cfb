"""`/metrics` in Prometheus' text format, with the official client: one fresh
registry per scrape, filled from the same data the API serves."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from changeover import journal as J

STATES = (J.RUNNING, J.AWAITING_APPROVAL, J.INTERRUPTED, J.FAILED, J.ABORTED, J.ROLLED_BACK, J.DONE)


def render(newest: dict[str, Any] | None) -> bytes:
    """The newest release's state (one series per state, 1 for its own), its
    steps' durations, and whether an approval waits."""
    registry = CollectorRegistry()
    state = Gauge(
        "changeover_release_state",
        "1 for the state of the newest release",
        ["state"],
        registry=registry,
    )
    release = Gauge("changeover_release_id", "Number of the newest release", registry=registry)
    durations = Gauge(
        "changeover_step_duration_seconds",
        "How long each finished step of the newest release took",
        ["step"],
        registry=registry,
    )
    waiting = Gauge(
        "changeover_approvals_waiting",
        "Releases waiting for a person's approval (0 or 1)",
        registry=registry,
    )
    for name in STATES:
        state.labels(name).set(int(newest is not None and newest["state"] == name))
    if newest is not None:
        release.set(newest["id"])
        for s in newest["steps"]:
            if s["started"] is not None and s["finished"] is not None:
                durations.labels(s["id"]).set(s["finished"] - s["started"])
    waiting.set(int(newest is not None and newest["state"] == J.AWAITING_APPROVAL))
    return generate_latest(registry)
