"""The bake's [policy.analysis] against a real Prometheus, under the probe.

A release promotes cluster a; during its bake a starts answering 500 to every
request of the new version (the sample app's `errors` fault file). The
analysis, an error-ratio PromQL query over what Prometheus scraped, fails and
the engine flips back: b live on the previous release, a out.

The balancer's own 5xx rule is switched off in these sites
(`max_error_ratio = 1`, a ratio that can never be exceeded), so the rollback is
the analysis' doing alone.

What the probe counts as failed: every request that got no complete answer
(refused, timed out, cut, malformed), a 5xx, an unexpected 4xx, or was not sent
for overload. The tests hold it to this: every failed request is a 5xx, and
their number is exactly the number of 5xx cluster a answered between the moment
the fault was switched on and the flip back (the balancer's own per-member 5xx
count); after the flip back cluster a answers nothing more, so no request fails
beyond the analysis window.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from changeover import journal as J
from changeover.balancers.base import Balancer
from changeover.balancers.factory import make_balancer
from changeover.demo.appctl import Member as AppMember
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.engine import Engine, Event
from changeover.model import Admission, cluster_admission, total
from changeover.probe import ProbeReport
from changeover.runtime import close_ports, make_ports, open_journal
from tests.e2e import support as S
from tests.helpers import free_port, require_binary, wait_until
from tests.integration.realbalancers import (
    finish_probe,
    need,
    parse_site,
    probe_process,
    running_balancer,
    write_probe_site,
)
from tests.integration.test_driver_release import members_up, release_site, run_on_members
from tests.prometheus import Prometheus, Target, running_prometheus

RATE = 100.0
USERS = 50
OLD, NEW = "1.0", "2.0"
METRICS_ENV = "CHANGEOVER_METRICS_TOKEN"
METRICS_TOKEN = "prometheus-scrape-token"
LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT

pytestmark = [pytest.mark.slow, pytest.mark.real]


def analysis_toml(query: str) -> str:
    """[policy.analysis] on `PROMETHEUS_URL`: the error ratio of the promoted
    cluster over the last 4 s below 5 %, measured every second; two failed
    measurements fail the bake; up to 10 in a row without a value are waited out
    (right after the swap the cluster has no rate yet)."""
    return (
        "\n[policy.analysis]\n"
        'prometheus = "PROMETHEUS_URL"\n'
        "\n[[policy.analysis.queries]]\n"
        'name = "error-ratio"\n'
        f"query = '{query}'\n"
        'succeed_if = "<"\n'
        "threshold = 0.05\n"
        'interval = "1s"\n'
        "failure_limit = 1\n"
        "error_limit = 10\n"
    )


def baking(text: str, prometheus: str, query: str) -> str:
    """A site's policy with a 60 s bake, automatic rollback, the balancer's 5xx
    rule off and the analysis on."""
    for old, new in (
        ("bake = 0\n", "bake = 60\nmax_error_ratio = 1\n"),
        ("auto_rollback = false\n", "auto_rollback = true\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text + analysis_toml(query).replace("PROMETHEUS_URL", prometheus)


async def cluster_errors(balancer: Balancer, cluster: str) -> int:
    """The 5xx the members of `cluster` answered, as the balancer counts them."""
    errors = total((await balancer.read()).in_cluster(cluster), "errors")
    assert errors is not None, "this balancer counts 5xx"
    return errors


async def nothing_in_flight(balancer: Balancer, cluster: str) -> bool:
    return total((await balancer.read()).in_cluster(cluster), "active") == 0


async def traffic_seen(prometheus: Prometheus, query: str) -> bool:
    """Prometheus has a rate of requests for cluster a: the analysis can measure."""
    return any(float(s["value"][1]) > 0 for s in await prometheus.query(query))


@dataclass(frozen=True)
class Window:
    """The 5xx the promoted cluster answered from the fault to the flip back, and
    after it; how long the analysis took to act (seconds)."""

    in_window: int
    after_flip: int
    seconds: float


def assert_failures_are_the_windows_5xx(report: ProbeReport, window: Window) -> None:
    assert report.sent >= RATE, report
    failed = {kind: n for kind, n in report.failures.items() if n}
    assert set(failed) == {"http_5xx"}, (failed, window, report.failure_log)
    assert failed["http_5xx"] == window.in_window, (failed, window, report.failure_log)
    assert window.after_flip == 0  # nothing failed beyond the analysis window


BUILTIN_RATIO = (
    'sum(rate(changeover_balancer_responses_5xx_total{cluster="{{cluster}}"}[4s]))'
    ' / sum(rate(changeover_balancer_requests_total{cluster="{{cluster}}"}[4s]))'
)
BUILTIN_TRAFFIC = 'sum(rate(changeover_balancer_requests_total{cluster="a"}[4s]))'


async def test_embedded_balancer_metrics_roll_back_a_cluster_answering_500s(
    tmp_path: Path,
) -> None:
    require_binary("prometheus", "/usr/bin/prometheus")
    (tmp_path / "site").mkdir()
    opts = DemoOptions(members_per_cluster=2, startup_delay=0.1, health_timeout=90.0)
    site = DemoSite(tmp_path / "site", opts)
    site.env = site.env | {METRICS_ENV: METRICS_TOKEN}  # the balancer's read-only scrape token
    admin = site.topo.balancer.admin_listen
    scrape = Target("changeover", f"{admin.host}:{admin.port}", "/metrics", METRICS_TOKEN)
    markers = [S.app_member(site, m.name).dir / "errors" for m in site.topo.cluster("a").members]
    async with (
        site.running(),
        running_prometheus(tmp_path / "prometheus", [scrape]) as prometheus,
    ):
        config = site.root / "analysis.toml"
        config.write_text(baking(site.config.read_text(), prometheus.url, BUILTIN_RATIO))
        balancer = make_balancer(site.topo)
        try:
            async with site.probe(RATE, sticky_users=USERS) as probe:
                await S.traffic_flows(site)
                window = await rolled_back_by_the_analysis(
                    site, str(config), markers, balancer, prometheus, BUILTIN_TRAFFIC
                )
                report = await probe.finish()
            assert set(S.running_versions(site, "b").values()) == {OLD}
        finally:
            await balancer.close()
            for marker in markers:
                marker.unlink(missing_ok=True)
    assert_failures_are_the_windows_5xx(report, window)
    print(f"embedded: {window}, probe failures {report.failures}")


async def rolled_back_by_the_analysis(
    site: DemoSite,
    config: str,
    markers: list[Path],
    balancer: Balancer,
    prometheus: Prometheus,
    traffic: str,
) -> Window:
    """Release NEW with `config` (in a CLI process), break a during its bake,
    and hold the result to a rollback by the analysis. What a answered in 5xx
    between the fault and the flip back, and after it."""
    release = await S.start_cli(site, "release", NEW, config=config)
    try:
        bake = asyncio.create_task(S.step_running(site, "bake-a", timeout=150))
        await asyncio.wait(
            [bake, asyncio.create_task(release.wait())], return_when="FIRST_COMPLETED"
        )
        if not bake.done():
            bake.cancel()
            raise AssertionError(
                f"the release ended before its bake: {(await S.finish(release)).output}"
            )
        await bake
        assert await S.admissions(site) == {"a": LIVE, "b": DRAINING}  # promoted
        await wait_until(
            lambda: traffic_seen(prometheus, traffic), timeout=30, what="a's traffic in Prometheus"
        )
        assert S.unfinished(site) is not None  # the analysis passed a clean a so far
        before = await cluster_errors(balancer, "a")
        fault = time.monotonic()
        for marker in markers:  # the new release goes bad in production
            marker.write_text(NEW)
        run = await S.finish(release)
        back = time.monotonic()
    finally:
        if release.returncode is None:
            release.kill()
            await release.wait()
    # Requests a took before the flip back may still be answered after it: once
    # nothing is in flight to a, its 5xx count is final (a is out: nothing new).
    await wait_until(lambda: nothing_in_flight(balancer, "a"), timeout=30, what="a idle")
    at_flip = await cluster_errors(balancer, "a")
    await S.traffic_flows(site, at_least=int(2 * RATE))  # two more seconds of traffic
    after = await cluster_errors(balancer, "a")
    assert run.code == 1, run.output
    row = S.newest(site)
    assert (row.version, row.state) == (NEW, J.ROLLED_BACK)
    assert row.error is not None and row.error.startswith("analysis error-ratio: "), row.error
    assert "flipped back: b live on the previous release, a out" in row.error
    assert "rolled back" in run.text and "analysis error-ratio" in run.text
    assert await S.admissions(site) == {"a": OUT, "b": LIVE}
    return Window(at_flip - before, after - at_flip, back - fault)


# --- HAProxy, its own counters through its Prometheus exporter ---------------------------

HAPROXY_RATIO = (
    'sum(rate(haproxy_server_http_responses_total{proxy="live",server=~"{{members}}",code="5xx"}[4s]))'
    ' / sum(rate(haproxy_server_http_responses_total{proxy="live",server=~"{{members}}"}[4s]))'
)
HAPROXY_TRAFFIC = 'sum(rate(haproxy_server_http_responses_total{proxy="live",server=~"a.*"}[4s]))'


def exporter_templates(where: Path, port: int) -> Path:
    """The bundled HAProxy template with one frontend more: HAProxy's built-in
    Prometheus exporter (`http-request use-service prometheus-exporter`) on
    127.0.0.1:`port`, as docs/drivers.md shows."""
    from changeover.balancers.render import TEMPLATE_DIR

    where.mkdir(parents=True, exist_ok=True)
    text = (TEMPLATE_DIR / "haproxy.cfg.j2").read_text()
    (where / "haproxy.cfg.j2").write_text(text + EXPORTER_FRONTEND.format(port=port))
    return where


EXPORTER_FRONTEND = """
# --- HAProxy's own counters for Prometheus (USE_PROMEX builds) ------------------
frontend prometheus
    bind 127.0.0.1:{port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
"""


async def test_haproxy_counters_roll_back_a_cluster_answering_500s(tmp_path: Path) -> None:
    need("haproxy")
    require_binary("prometheus", "/usr/bin/prometheus")
    data = release_site("haproxy", tmp_path)
    exporter = free_port()
    templates = exporter_templates(tmp_path / "templates", exporter)
    data["balancer"]["template_dir"] = str(templates)  # the engine's driver renders it too
    for cluster in data["clusters"]:  # 2 x 2 members: enough to flip, light on the box
        cluster["members"] = cluster["members"][:2]
    data["policy"] |= {"bake": "60s", "auto_rollback": True, "max_error_ratio": 1.0}
    data["policy"]["health_timeout"] = "90s"  # Python members starting on a loaded box
    # As the demo site: a busy 2-core box must not eject a whole cluster.
    data["balancer"]["health"] = {"interval": "250ms", "timeout": "2s", "rise": 2, "fall": 3}
    topology = parse_site(data, tmp_path)
    markers = [AppMember(tmp_path / "apps", m.name).dir / "errors"
               for m in topology.cluster("a").members]  # fmt: skip
    events: list[Event] = []
    await run_on_members(topology, "deploy", OLD)
    await run_on_members(topology, "start")
    try:
        await wait_until(lambda: members_up(topology), timeout=90, what="members listening")
        async with (
            running_balancer("haproxy", topology, tmp_path / "lb1", template_dir=templates) as real,
            running_prometheus(
                tmp_path / "prometheus", [Target("haproxy", f"127.0.0.1:{exporter}")]
            ) as prometheus,
        ):
            analysis = tomllib.loads(
                analysis_toml(HAPROXY_RATIO).replace("PROMETHEUS_URL", prometheus.url)
            )["policy"]["analysis"]
            baking = parse_site(
                data | {"policy": data["policy"] | {"analysis": analysis}}, tmp_path
            )
            site_file = write_probe_site(tmp_path / "probe-site.toml", real, data)
            async with probe_process(
                site_file, real.url, rate=RATE, sticky_users=USERS, log=tmp_path / "probe.log"
            ) as probe:
                await wait_until(
                    lambda: traffic_seen(prometheus, HAPROXY_TRAFFIC.replace("a.*", ".*")),
                    timeout=30, what="probe traffic in Prometheus",
                )  # fmt: skip
                await wait_until(lambda: all_healthy(real.driver), timeout=60, what="all healthy")
                journal = open_journal(baking)
                ports = make_ports(baking, journal)
                assert ports.metrics is not None  # runtime wires [policy.analysis]
                try:
                    engine = Engine(baking, ports, on_event=events.append)
                    release_id = await engine.begin(NEW)
                    running = asyncio.create_task(engine.run(release_id))

                    def baking_a() -> bool:
                        if running.done():
                            raise AssertionError(f"the release ended before its bake: {events}")
                        return any(e.kind == "step-start" and e.step is not None
                                   and e.step.id == "bake-a" for e in events)  # fmt: skip

                    await wait_until(baking_a, timeout=150, what="step bake-a")
                    await wait_until(
                        lambda: traffic_seen(prometheus, HAPROXY_TRAFFIC),
                        timeout=30, what="a's traffic in Prometheus",
                    )  # fmt: skip
                    assert not running.done()  # the analysis passed a clean a so far
                    before = await cluster_errors(real.driver, "a")
                    fault = time.monotonic()
                    for marker in markers:
                        marker.write_text(NEW)
                    state = await running
                    back = time.monotonic()
                    row = journal.release(release_id)
                finally:
                    await close_ports(ports)
                    journal.close()
                await wait_until(
                    lambda: nothing_in_flight(real.driver, "a"), timeout=30, what="a idle"
                )
                at_flip = await cluster_errors(real.driver, "a")
                await wait_until(
                    lambda: traffic_seen(prometheus, HAPROXY_TRAFFIC.replace("a.*", "b.*")),
                    timeout=30, what="b serving",
                )  # fmt: skip
                served_b = await served_by(real.driver, "b")
                await wait_until(
                    lambda: more_served(real.driver, "b", served_b + int(2 * RATE)),
                    timeout=30, what="two more seconds of traffic",
                )  # fmt: skip
                after = await cluster_errors(real.driver, "a")
                report = await finish_probe(probe)
            final = await real.driver.read()
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
        await run_on_members(topology, "stop")
    messages = "\n".join(f"{e.kind}: {e.message}" for e in events)
    assert state == J.ROLLED_BACK, messages
    assert row.error is not None and row.error.startswith("analysis error-ratio: "), row.error
    assert "flipped back: b live on the previous release, a out" in row.error
    assert {c: cluster_admission(final, c) for c in ("a", "b")} == {"a": OUT, "b": LIVE}
    window = Window(at_flip - before, after - at_flip, back - fault)
    assert_failures_are_the_windows_5xx(report, window)
    print(f"haproxy: {window}, probe failures {report.failures}")


async def served_by(balancer: Balancer, cluster: str) -> int:
    served = total((await balancer.read()).in_cluster(cluster), "requests")
    assert served is not None
    return served


async def more_served(balancer: Balancer, cluster: str, at_least: int) -> bool:
    return await served_by(balancer, cluster) >= at_least


async def all_healthy(balancer: Balancer) -> bool:
    return all(m.healthy for m in (await balancer.read()).members)
