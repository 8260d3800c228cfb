"""End to end on the embedded balancer: a release with 200 open WebSockets.

The probe's WebSocket users hold 200 WebSockets to the sample app's echo
(beside the usual HTTP users) through a whole release: each cluster drains
(its WebSockets stay open), goes out (the balancer closes them with 1001,
spread over `close_spread`) and every user reconnects to the live cluster.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from changeover import journal as J
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.model import PoolView
from changeover.polling import poll_until
from changeover.releases import Begin
from changeover.runtime import with_releases
from tests.e2e import support as S
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

WS_USERS = 200
CLOSE_SPREAD = 3.0
# The balancer closes its N tunnels at i * close_spread / N (a timer each) and
# the probe times a reconnect when it begins, as the 1001 arrives. On a busy
# 2-core box the balancer's timers and the probe's loop run late now and then
# (each is one process among many); a reconnect begun up to this much later
# than planned lets a window of one second hold the closes planned over
# 1 + SCHEDULING s: ceil(N * (1 + SCHEDULING) / close_spread), where closing
# them all at once would put all N in one second.
SCHEDULING = 0.25


def tunnels_by_cluster(view: PoolView) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in view.members:
        out[m.cluster] = out.get(m.cluster, 0) + (m.tunnels or 0)
    return out


async def test_a_release_with_200_websockets_closes_each_1001_spread_and_reconnects_it(
    tmp_path: Path,
) -> None:
    opts = DemoOptions(
        members_per_cluster=3,
        startup_delay=0.3,
        close_spread=CLOSE_SPREAD,
        # The WebSockets keep each drain open to its timeout; the HTTP sessions
        # (2 s at most, 2 s idle) are over by then.
        drain_timeout=5.0,
    )
    demo = DemoSite(tmp_path, opts)
    async with demo.running() as site, site.probe(200.0, 40, ws_users=WS_USERS) as probe:

        async def all_open() -> bool:
            return sum(tunnels_by_cluster(await S.pool(site)).values()) == WS_USERS

        await wait_until(all_open, timeout=60, interval=0.1, what=f"{WS_USERS} WebSockets open")
        before = tunnels_by_cluster(await S.pool(site))
        console = Console(record=True, width=200)
        _, state = await with_releases(site.topo, lambda r: r.release(Begin("2.0")), console)

        async def all_back_on_a() -> bool:  # b was drained last: every user is on a
            return tunnels_by_cluster(await S.pool(site)) == {"a": WS_USERS, "b": 0}

        back = await poll_until(all_back_on_a, 30, interval=0.1)
        after = tunnels_by_cluster(await S.pool(site))
        report = await probe.finish()
    timeline = console.export_text()
    assert state == J.DONE, timeline
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert report.session_breaks == 0 and report.sessions_cut == 0
    assert report.version_flaps == 0
    assert report.ws_users == WS_USERS
    assert report.ws_abnormal_closes == {}, (report.failure_examples, report.failure_log)
    assert back, after
    assert 0 < before["a"] < WS_USERS, before  # both clusters held WebSockets
    # Every WebSocket on a drained cluster was closed with 1001: a's own at its
    # drain, then all of them on b (b's own and a's reconnected) at b's.
    cluster_of = {m.name: c.name for c, m in site.topo.members()}
    by_cluster = {c.name: 0 for c in site.topo.clusters}
    for member, closes in report.ws_normal_closes.items():
        by_cluster[cluster_of[member]] += closes
    assert by_cluster == {"a": before["a"], "b": WS_USERS}, report.ws_normal_closes
    assert report.ws_reconnects == report.ws_normal == before["a"] + WS_USERS
    assert report.ws_waiting_to_reconnect == 0
    assert report.ws_echoed > WS_USERS  # they talked all along
    # Spread, not at once: one worker closes its N tunnels at i * spread / N, so
    # no second holds more than ceil(N / spread); the biggest batch is b's 200.
    bound = math.ceil(WS_USERS * (1 + SCHEDULING) / CLOSE_SPREAD)
    assert site.topo.balancer.workers == 1
    assert report.ws_max_reconnects_per_second <= bound, report.ws_max_reconnects_per_second
    assert report.passed
    # The stop of each cluster waited for the balancer's closes, and said so.
    assert timeline.count("every WebSocket closed within") == 2, timeline
