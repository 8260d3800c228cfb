"""The `Metrics` port on a Prometheus server: instant queries over its HTTP API
(`GET /api/v1/query`), for `[policy.analysis]`. What a measurement means is
decided in policy.py; this only asks and reads the answer."""

from __future__ import annotations

from typing import Any

from changeover.config import Analysis
from changeover.httpclient import Client, HttpError
from changeover.model import Sample
from changeover.ports import MetricsError


def samples(document: Any) -> list[Sample]:
    """The series of an instant query's answer (`vector` or `scalar`); MetricsError
    for an error document, a range vector, or a shape this does not know."""
    if not isinstance(document, dict):
        raise MetricsError("the answer is not a JSON object")
    if document.get("status") != "success":
        kind, error = document.get("errorType", "error"), document.get("error", "no reason given")
        raise MetricsError(f"Prometheus answered {kind}: {str(error)[:300]}")
    data: Any = document.get("data")
    try:
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        if kind == "vector":
            return [
                Sample({str(k): str(v) for k, v in s["metric"].items()}, float(s["value"][1]))
                for s in result
            ]
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # float() reads "NaN", "+Inf"
        raise MetricsError(f"unexpected answer from Prometheus: {exc!r}") from None
    raise MetricsError(f"the query gives a {kind}, expected an instant vector or a scalar")


class PrometheusMetrics:
    """Instant queries against `analysis.prometheus`, each within `analysis.timeout`."""

    def __init__(self, analysis: Analysis) -> None:
        self.url = analysis.prometheus + "/api/v1/query"
        token = analysis.token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = Client(timeout=analysis.timeout, headers=headers)

    async def query(self, promql: str) -> list[Sample]:
        try:
            resp = await self._client.request("POST", self.url, form={"query": promql})
            if resp.status in (401, 403):
                raise MetricsError(f"Prometheus refused the query (HTTP {resp.status})")
            # 400 and 422 carry an error document that says what is wrong.
            document = resp.json()
        except (HttpError, ValueError) as exc:
            raise MetricsError(f"cannot query {self.url}: {exc!r}"[:400]) from None
        return samples(document)

    async def close(self) -> None:
        await self._client.close()
