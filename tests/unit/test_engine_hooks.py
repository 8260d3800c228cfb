"""The events the engine hands the `[[hooks]]` (the Notifier port), driven on
the in-memory fakes of tests/unit/engine_fakes.py."""

from __future__ import annotations

from pathlib import Path

from changeover import journal as J
from changeover.engine import Engine
from changeover.model import AbortAsked, encode_ask
from tests.unit.engine_fakes import Site
from tests.unit.test_engine_playbook import approve_when_asked, release


async def test_a_rolling_release_tells_each_event_in_order(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    assert await release(site) == J.DONE

    assert site.notifier.names() == [
        ("pre-release", None),
        ("started", None),
        ("qa-ready", "a"),
        ("swapped", "a"),
        ("qa-ready", "b"),
        ("swapped", "b"),
        ("done", None),
    ]
    first = site.notifier.events[0]
    assert (first.site, first.kind, first.version, first.previous_version) == (
        "t",
        "release",
        "2.0",
        "1.0",
    )
    assert {e.release for e in site.notifier.events} == {first.release}
    assert site.notifier.settled == 1  # the engine waited for the last deliveries


async def test_manual_approval_tells_that_each_cluster_awaits_it(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy={"approval": "manual", "session_idle": 1})
    approve_when_asked(site)
    assert await release(site) == J.DONE

    names = site.notifier.names()
    assert names.index(("qa-ready", "a")) < names.index(("awaiting-approval", "a"))
    assert names.index(("awaiting-approval", "a")) < names.index(("swapped", "a"))
    assert ("awaiting-approval", "b") in names


async def test_a_refusing_pre_release_hook_stops_the_release_before_any_change(
    tmp_path: Path,
) -> None:
    site = Site.build(tmp_path)
    site.notifier.refuse = "pre-release hook freeze (command) failed: exit 1: change freeze"
    assert await release(site) == J.FAILED

    assert site.balancer.changes == []
    assert site.executor.calls == []
    row = site.journal.newest("t")
    assert row is not None and row.state == J.FAILED
    assert row.error is not None and "change freeze" in row.error
    assert "refused before any change" in row.error
    assert {s.state for s in site.journal.steps(row.id)} == {J.STEP_PENDING}
    assert site.notifier.names() == [("pre-release", None), ("failed", None)]
    assert "change freeze" in site.notifier.events[-1].message
    assert site.journal.lock_holder("t") is None

    # `resume` runs the pre-release hooks again (no step ran yet), then the release.
    site.notifier.refuse = None
    site.notifier.events.clear()
    engine = Engine(site.topo, site.ports(), poll=0.05)
    assert await engine.run(await engine.take_over()) == J.DONE
    assert site.notifier.names()[:2] == [("pre-release", None), ("started", None)]


async def test_a_failed_step_and_an_abort_are_told(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    site.checks.smoke_fails.add("a")
    assert await release(site) == J.FAILED
    failed = site.notifier.events[-1]
    assert failed.event == "failed" and "smoke" in failed.message

    other = Site.build(tmp_path / "other")

    def abort() -> None:
        row = other.journal.unfinished("t")
        if row is not None:
            other.journal.request(row.id, encode_ask(AbortAsked("ops@desk")))

    other.clock.on_sleep.append(abort)
    assert await release(other) == J.ABORTED
    assert other.notifier.names()[-1] == ("aborted", None)

    # A resume after steps ran: no pre-release check, `started` says it resumed.
    other.clock.on_sleep.clear()
    other.notifier.events.clear()
    engine = Engine(other.topo, other.ports(), poll=0.05)
    assert await engine.run(await engine.take_over()) == J.DONE
    assert other.notifier.names()[0] == ("started", None)
    assert other.notifier.events[0].message == "resumed"
    assert "pre-release" not in [e.event for e in other.notifier.events]


async def test_a_bake_that_flips_back_and_an_interruption_are_told(tmp_path: Path) -> None:
    site = Site.build(tmp_path, policy={"bake": 4, "auto_rollback": True})
    site.checks.live_smoke_fails = True  # the live pool fails its smoke command once a is in
    assert await release(site) == J.ROLLED_BACK
    told = site.notifier.events[-1]
    assert told.event == "rolled-back" and "flipped back" in told.message

    other = Site.build(tmp_path / "other")
    engine = Engine(other.topo, other.ports(), poll=0.05)
    other.clock.on_sleep.append(engine.interrupt)
    assert await engine.run(await engine.begin("2.0")) == J.INTERRUPTED
    assert other.notifier.names()[-1] == ("interrupted", None)


async def test_a_hook_that_fails_is_journaled_and_fails_nothing(tmp_path: Path) -> None:
    site = Site.build(tmp_path)
    site.notifier.failing = "(webhook) failed after 3 attempts: HTTP 500"
    assert await release(site) == J.DONE

    row = site.journal.newest("t")
    assert row is not None and row.state == J.DONE
    warned = [e.message for e in site.journal.events(row.id) if e.kind == "warn"]
    assert "done hook fake (webhook) failed after 3 attempts: HTTP 500" in warned
    assert len(warned) == 6  # every event but the pre-release check
