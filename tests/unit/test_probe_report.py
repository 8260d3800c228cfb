"""The probe report (JSON both ways, verdict, rendering), failure kinds, the
admin API document and the admission watcher against an in-process fake."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest
from rich.console import Console

from changeover.balancers.base import BalancerError
from changeover.balancers.builtin import pool_from_json
from changeover.model import Admission, MemberState, PoolView
from changeover.probe import AdmissionWatcher, ProbeReport, failure_kind
from tests.helpers import wait_until


def sample_report() -> ProbeReport:
    return ProbeReport(
        url="http://127.0.0.1:8080/",
        target_rate=200.0,
        sticky_users=50,
        duration=10.0,
        sent=2000,
        completed=2000,
        ok=2000,
        failures={},
        latency_ms={"p50": 1.2, "p99": 4.5, "max": 9.0},
        session_moves=3,
        session_breaks=0,
        version_flaps=0,
        versions_seen={"v1": 1200, "v2": 800},
        members_seen={"a1": 1000, "b1": 1000},
        max_schedule_lag_ms=2.5,
        achieved_rate=200.0,
        watched=True,
        admission_reads=100,
    )


def test_json_round_trip() -> None:
    report = sample_report()
    text = json.dumps(report.to_dict())
    data = json.loads(text)
    assert data["passed"] is True
    assert ProbeReport.from_dict(data) == report


def test_from_dict_rejects_what_is_not_a_report() -> None:
    with pytest.raises(ValueError, match="not a probe report"):
        ProbeReport.from_dict({"sent": 1})


@pytest.mark.parametrize(
    "change",
    [
        {"failures": {"connect": 1}},
        {"session_breaks": 1},
        {"sessions_cut": 1},
        {"version_flaps": 1},
        {"sent": 0, "completed": 0, "ok": 0},
        {"ws_users": 10, "ws_echoed": 50, "ws_abnormal_closes": {"echo_timeout": 1}},
        {"ws_users": 10, "ws_echoed": 0},  # WebSocket users that never got an echo
    ],
)
def test_any_failure_break_flap_or_silence_fails(change: dict[str, object]) -> None:
    assert not replace(sample_report(), **change).passed  # type: ignore[arg-type]


def test_render_shows_the_verdict_and_figures() -> None:
    console = Console(record=True, width=120)
    failing = replace(
        sample_report(), failures={"http_5xx": 2}, failure_examples=["http_5xx: HTTP 502"]
    )
    failing.render(console)
    text = console.export_text()
    assert "FAILED" in text
    assert "http_5xx 2" in text
    assert "p99 4.5 ms" in text
    assert "v1 1200, v2 800" in text
    assert "HTTP 502" in text


def test_render_shows_cut_sessions_and_how_users_behave() -> None:
    console = Console(record=True, width=120)
    report = replace(
        sample_report(),
        session_moves=5,
        session_breaks=1,
        sessions_cut=4,
        users_arrived=130,
        think_time=0.25,
        session_mean=2.0,
        session_max=6.0,
    )
    report.render(console)
    text = console.export_text()
    assert "5 moved: 1 broken, 4 cut" in text
    assert "130 arrived, 0.25 s between requests, stay 2 s on average, 6 s at most" in text
    assert "FAILED" in text


def websocket_report() -> ProbeReport:
    return replace(
        sample_report(),
        ws_users=200,
        ws_interval=1.0,
        ws_opened=500,
        ws_echoed=11000,
        ws_normal_closes={"a1": 40, "b1": 260},
        ws_reconnects=300,
        ws_max_reconnects_per_second=67,
    )


def test_websocket_users_with_only_1001_closes_pass_and_round_trip() -> None:
    report = websocket_report()
    assert report.passed and report.ws_normal == 300 and report.ws_abnormal == 0
    assert ProbeReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    # A report written before WebSocket users existed reads as having none.
    old = {k: v for k, v in report.to_dict().items() if not k.startswith("ws_")}
    assert ProbeReport.from_dict(old).ws_users == 0


def test_render_shows_the_websocket_figures_and_abnormal_closes_by_kind() -> None:
    console = Console(record=True, width=160)
    websocket_report().render(console)
    text = console.export_text()
    assert "200 users, a message every 1 s: 11000 echoed, 500 connections opened" in text
    assert "300 normal (1001): b1 260, a1 40, 0 abnormal" in text
    assert "300, at most 67 begun in one second" in text
    console = Console(record=True, width=160)
    replace(
        websocket_report(), ws_abnormal_closes={"no_close_frame": 3}, ws_waiting_to_reconnect=2
    ).render(console)
    text = console.export_text()
    assert "3 abnormal: no_close_frame 3" in text and "FAILED" in text
    assert "2 not back at the end" in text
    console = Console(record=True, width=160)
    sample_report().render(console)  # no WebSocket users: no rows about them
    assert "websockets" not in console.export_text()


def test_failure_kinds() -> None:
    conn_key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(conn_key, ConnectionRefusedError(111, "refused"))
    assert failure_kind(refused) == "connect"
    assert failure_kind(TimeoutError()) == "timeout"
    assert failure_kind(aiohttp.ServerTimeoutError()) == "timeout"
    assert failure_kind(aiohttp.ServerDisconnectedError()) == "disconnect"
    assert failure_kind(aiohttp.ClientPayloadError("cut")) == "protocol"
    assert failure_kind(RuntimeError("bug")) == "other"


def test_pool_from_json() -> None:
    view = pool_from_json(
        {
            "members": [
                {
                    "name": "a1",
                    "cluster": "a",
                    "admission": "draining",
                    "healthy": True,
                    "active": 3,
                },
                {"name": "b1", "cluster": "b", "admission": "live", "healthy": False},
            ]
        }
    )
    assert view.admissions() == {"a1": Admission.DRAINING, "b1": Admission.LIVE}
    assert view.member("a1").active == 3
    # What an older balancer's document does not give is not counted, not 0.
    assert (view.member("a1").requests, view.member("b1").active) == (None, None)
    with pytest.raises(BalancerError):
        pool_from_json({"members": [{"name": "a1", "cluster": "a", "admission": "maybe"}]})
    with pytest.raises(BalancerError):
        pool_from_json([])


class FakeBalancer:
    """Serves a scripted sequence of admissions; None means the read fails."""

    def __init__(self, script: list[Admission | None]) -> None:
        self.script = script
        self.calls = 0

    async def read(self) -> PoolView:
        admission = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if admission is None:
            raise BalancerError("admin API unreachable")
        return PoolView((MemberState("a1", "a", admission, healthy=True),))


async def test_watcher_records_a_timeline_and_tolerates_failed_reads() -> None:
    fake = FakeBalancer([Admission.LIVE, None, Admission.DRAINING, Admission.OUT])
    async with AdmissionWatcher(fake, interval=0.01) as watcher:
        await wait_until(lambda: fake.calls >= 5, timeout=5, interval=0.005, what="5 reads")
    assert watcher.failures == 1
    assert watcher.last_error == "BalancerError: admin API unreachable"
    assert [dict(s.admissions) for s in watcher.timeline.segments] == [
        {"a1": Admission.LIVE},
        {"a1": Admission.DRAINING},
        {"a1": Admission.OUT},
    ]
    calls = fake.calls
    await asyncio.sleep(0.05)
    assert fake.calls == calls  # stopped means stopped (an absence can only be sampled)


def test_render_warns_when_the_probe_fell_behind() -> None:
    console = Console(record=True, width=120)
    replace(sample_report(), max_schedule_lag_ms=500.0).render(console)
    assert "the probe fell behind its schedule" in console.export_text()
    console = Console(record=True, width=120)
    sample_report().render(console)
    assert "fell behind" not in console.export_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["--session-mean", "5", "--session-max", "1"],
        ["--session-mean", "0"],
        ["--session-max", "nan"],
    ],
)
def test_probe_refuses_session_lengths_that_make_no_sense(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from changeover.probe.command import main

    with pytest.raises(SystemExit) as exited:
        main(["http://127.0.0.1:9/", *argv])
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
