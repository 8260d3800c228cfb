"""The embedded balancer's `/metrics` (on its admin listener), in Prometheus'
text format with the official client: one fresh registry per scrape, filled
from the same pool document `GET /v1/pool` serves, so the two never disagree.

Every series has the labels `cluster` and `member`:

- `changeover_balancer_requests_total`: requests forwarded to the member;
- `changeover_balancer_responses_5xx_total`: the member's own 5xx answers (not the
  balancer's 502/503 when it cannot reach it);
- `changeover_balancer_in_flight`: requests in flight to it now;
- `changeover_balancer_tunnels`: WebSocket tunnels open to it now;
- `changeover_balancer_sessions`: sticky sessions routed to it within `policy.session_idle`;
- `changeover_balancer_healthy`: 1 while its health checks pass;
- `changeover_balancer_admission`: 1 for its admission (label `admission`: live,
  draining, out), 0 for the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from changeover.model import Admission

LABELS = ("cluster", "member")


def render(members: Sequence[Mapping[str, Any]]) -> bytes:
    """The text exposition of the pool document's `members`."""
    registry = CollectorRegistry()

    def counter(name: str, doc: str) -> Counter:
        return Counter(name, doc, LABELS, registry=registry)

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, (*LABELS, *extra), registry=registry)

    requests = counter("changeover_balancer_requests", "Requests forwarded to the member")
    errors = counter("changeover_balancer_responses_5xx", "5xx responses the member answered")
    in_flight = gauge("changeover_balancer_in_flight", "Requests in flight to the member")
    tunnels = gauge("changeover_balancer_tunnels", "WebSocket tunnels open to the member")
    sessions = gauge(
        "changeover_balancer_sessions",
        "Sticky sessions routed to the member within policy.session_idle",
    )
    healthy = gauge("changeover_balancer_healthy", "1 while the member's health checks pass")
    admission = gauge(
        "changeover_balancer_admission", "1 for the member's admission", ("admission",)
    )
    for m in members:
        labels = (str(m["cluster"]), str(m["name"]))
        requests.labels(*labels).inc(m["requests"])
        errors.labels(*labels).inc(m["errors"])
        in_flight.labels(*labels).set(m["active"])
        tunnels.labels(*labels).set(m["tunnels"])
        sessions.labels(*labels).set(m["sessions"])
        healthy.labels(*labels).set(int(bool(m["healthy"])))
        for adm in Admission:
            admission.labels(*labels, adm.value).set(int(m["admission"] == adm.value))
    return generate_latest(registry)
