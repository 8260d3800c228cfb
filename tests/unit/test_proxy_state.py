"""The balancer's shared pool state, persistence and health streaks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from changeover.config import Topology, parse
from changeover.model import Admission
from changeover.proxy.health import next_health
from changeover.proxy.routing import DRAINING, LIVE, OUT
from changeover.proxy.state import (
    SESSION_PROBE,
    SESSION_SLOTS,
    AdmissionError,
    PoolState,
    SharedState,
    load_admissions,
    now_ms,
    save_admissions,
)


def topology() -> Topology:
    return parse(
        {
            "clusters": [
                {
                    "name": "a",
                    "members": [{"name": "a1", "port": 9001}, {"name": "a2", "port": 9002}],
                },
                {"name": "b", "members": [{"name": "b1", "port": 9003}]},
            ]
        }
    )


def test_publish_makes_one_whole_picture_visible() -> None:
    shared = SharedState(members=3, workers=2)
    shared.publish([LIVE, DRAINING, OUT], [True, False, True])
    generation, admission, healthy = shared.snapshot()
    assert (admission, healthy) == (bytes([LIVE, DRAINING, OUT]), bytes([1, 0, 1]))
    shared.publish([OUT, OUT, LIVE], [True, True, True])
    assert shared.snapshot() == (generation + 1, bytes([OUT, OUT, LIVE]), bytes([1, 1, 1]))


def test_counters_are_per_worker_and_summed() -> None:
    shared = SharedState(members=3, workers=2)
    inflight0, requests0, failures0 = shared.counters(0)
    inflight1, requests1, _ = shared.counters(1)
    inflight0[1] += 2
    inflight1[1] += 3
    requests0[2] += 7
    requests1[2] += 1
    failures0[0] += 1
    assert shared.totals() == ([0, 5, 0], [0, 0, 8], [1, 0, 0])
    assert shared.failures(0) == 1


def test_shared_state_is_seen_by_a_forked_worker() -> None:
    shared = SharedState(members=2, workers=1)
    shared.publish([LIVE, LIVE], [True, True])
    pid = os.fork()
    if pid == 0:  # the child plays a worker: count a request, then exit
        shared.counters(0)[1][0] += 1
        os._exit(0)
    os.waitpid(pid, 0)
    assert shared.totals()[1] == [1, 0]


def test_admission_changes_are_all_or_nothing(tmp_path: Path) -> None:
    pool = PoolState(topology(), SharedState(3, 1), tmp_path / "state.json")
    with pytest.raises(AdmissionError, match="unknown member 'zz'"):
        pool.set_admissions({"a1": "out", "zz": "out"})
    with pytest.raises(AdmissionError, match="bad admission 'gone'"):
        pool.set_admissions({"a1": "out", "a2": "gone"})
    assert pool.admission == [LIVE, LIVE, LIVE]
    assert not (tmp_path / "state.json").exists()
    assert pool.set_admissions({"a1": "draining", "a2": "draining", "b1": "live"}) == [
        "a1: live -> draining",
        "a2: live -> draining",
    ]
    assert pool.shared.snapshot()[1] == bytes([DRAINING, DRAINING, LIVE])
    assert [m["admission"] for m in pool.view()["members"]] == ["draining", "draining", "live"]


def test_admissions_persist_and_load_at_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "balancer.json"
    PoolState(topology(), SharedState(3, 1), path).set_admissions({"b1": "out"})
    assert json.loads(path.read_text()) == {"admissions": {"a1": "live", "a2": "live", "b1": "out"}}
    again = PoolState(topology(), SharedState(3, 1), path)
    assert again.admission == [LIVE, LIVE, OUT]
    assert [p.name for p in path.parent.iterdir()] == ["balancer.json"]  # no temp file left


def test_state_file_absent_means_all_live_and_bad_one_is_an_error(tmp_path: Path) -> None:
    assert load_admissions(tmp_path / "none.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"admissions": {"a1": "maybe"}}')
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_admissions(bad)
    save_admissions(bad, {"a1": DRAINING})
    assert load_admissions(bad) == {"a1": Admission.DRAINING}


def test_pool_view_has_the_admin_contract_fields() -> None:
    pool = PoolState(topology(), SharedState(3, 2), None)
    pool.shared.counters(1)[0][2] += 1
    pool.shared.tunnels(0)[2] += 2
    pool.shared.tunnels(1)[2] += 1
    pool.shared.errors(0)[2] += 4
    pool.shared.errors(1)[2] += 1
    assert pool.shared.counters(0)[2][2] == 0  # tunnels have their own counters
    assert pool.shared.tunnels(0)[2] == 2  # and 5xx theirs
    member = pool.view()["members"][2]
    assert member == {
        "name": "b1",
        "cluster": "b",
        "host": "127.0.0.1",
        "port": 9003,
        "route": "b1",
        "admission": "live",
        "healthy": True,
        "active": 1,
        "requests": 0,
        "errors": 5,
        "tunnels": 3,
        "sessions": 0,
    }


def test_sessions_are_counted_per_member_within_session_idle_across_workers() -> None:
    pool = PoolState(topology(), SharedState(3, 2), None)
    w0, w1 = pool.shared.sessions(0), pool.shared.sessions(1)
    now = now_ms()
    w0.seen(11, 0, now - 500)  # a1: two sessions, one of them also seen by worker 1
    w0.seen(12, 0, now - 3_000)
    w1.seen(11, 0, now - 50)
    w1.seen(13, 1, now - 5_000)  # a2: its only session went quiet 5 s ago
    w0.seen(14, 2, now - 5_000)  # b1: one session seen by both workers...
    w1.seen(14, 2, now - 10)  # ...last just now: counted once, as recent
    assert pool.shared.session_totals(now, 4_000) == [2, 0, 1]
    assert [m["sessions"] for m in pool.view(session_idle=10)["members"]] == [2, 1, 1]
    assert [m["sessions"] for m in pool.view(session_idle=2)["members"]] == [1, 0, 1]


def test_a_session_table_is_bounded_and_forgets_the_oldest_first() -> None:
    """SESSION_SLOTS sessions per worker at most: one more session takes the slot of
    the one seen longest ago among the slots its hash may use, never another."""
    table = SharedState(1, 1).sessions(0)
    for key in range(1, SESSION_SLOTS + 1):
        table.seen(key, 0, 1_000 + key)
    assert len(table.entries()) == SESSION_SLOTS
    newcomer = 5 * SESSION_SLOTS + 3  # its slots hold sessions 3..3+SESSION_PROBE-1
    table.seen(newcomer, 0, 999_999)
    keys = {key for key, _, _ in table.entries()}
    assert len(keys) == SESSION_SLOTS
    assert newcomer in keys and 3 not in keys  # 3 was the oldest of its slots
    assert set(range(4, 3 + SESSION_PROBE)) <= keys
    table.seen(newcomer, 0, 1_000_000)  # seen again: updated in place, nothing evicted
    assert len({key for key, _, _ in table.entries()}) == SESSION_SLOTS


def test_health_needs_fall_failures_to_go_down_and_rise_successes_to_return() -> None:
    healthy, streak = True, 0
    healthy, streak = next_health(healthy, streak, False, rise=2, fall=3)
    healthy, streak = next_health(healthy, streak, False, rise=2, fall=3)
    assert healthy
    healthy, streak = next_health(healthy, streak, True, rise=2, fall=3)  # resets the streak
    for _ in range(3):
        healthy, streak = next_health(healthy, streak, False, rise=2, fall=3)
    assert not healthy
    healthy, streak = next_health(healthy, streak, True, rise=2, fall=3)
    assert not healthy
    healthy, streak = next_health(healthy, streak, True, rise=2, fall=3)
    assert healthy and streak == 0


def reloaded() -> Topology:
    """topology() after a reload: a2 removed, b2 added."""
    return parse(
        {
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 9001}]},
                {
                    "name": "b",
                    "members": [{"name": "b1", "port": 9003}, {"name": "b2", "port": 9004}],
                },
            ]
        }
    )


def test_a_reload_carries_members_by_name_and_counts_the_old_workers_until_they_exit() -> None:
    pool = PoolState(topology(), SharedState(3, 2), None)
    pool.expect_checks()
    for member in range(3):
        pool.checked(member)
    pool.set_admissions({"a1": "out", "a2": "draining"}, force=True)
    pool.set_healthy(2, False)
    old = pool.shared
    old.counters(0)[1][0] += 5  # a1: 5 requests, 1 still in flight in worker 0
    old.counters(0)[0][0] += 1
    old.counters(1)[1][1] += 7  # a2, removed by the reload
    now = now_ms()
    old.sessions(0).seen(21, 0, now - 10)  # a session on a1 and one on a2
    old.sessions(1).seen(22, 1, now - 10)

    new = SharedState(3, 2)
    assert pool.picture(reloaded()) == ([OUT, LIVE, LIVE], [True, False, False])
    assert pool.adopt(reloaded(), new) == ["+b2", "-a2"]
    assert pool.names == ["a1", "b1", "b2"]
    assert pool.admission == [OUT, LIVE, LIVE]
    assert pool.healthy == [True, False, False]  # b2 waits for its first good check
    assert pool.unchecked == {2}
    view = {m["name"]: m for m in pool.view()["members"]}
    assert (view["a1"]["requests"], view["a1"]["active"], view["a1"]["sessions"]) == (5, 1, 1)
    assert new.snapshot()[1] == bytes([OUT, LIVE, LIVE])

    pool.set_admissions({"b1": "out"}, force=True)  # the old workers see it too
    assert old.snapshot()[1] == bytes([OUT, OUT, OUT])  # a1, a2 (gone: out), b1

    new.counters(1)[1][0] += 2  # the new workers serve a1 too
    old.counters(0)[0][0] -= 1  # the old worker finished its request and exited
    old.counters(0)[1][0] += 1
    pool.retire_done(old)
    assert pool.retired == []
    view = {m["name"]: m for m in pool.view()["members"]}
    assert (view["a1"]["requests"], view["a1"]["active"], view["a1"]["sessions"]) == (8, 0, 1)


def test_a_new_master_restores_what_the_old_one_handed_over() -> None:
    old = PoolState(topology(), SharedState(3, 1), None)
    old.set_admissions({"a2": "out"}, force=True)
    old.shared.counters(0)[1][2] += 4
    old.shared.sessions(0).seen(31, 2, now_ms())
    state = json.loads(json.dumps(old.handover_state()))  # as it crosses the socket

    new = PoolState(reloaded(), SharedState(3, 2), None)
    assert new.restore(state) == {2}  # b2 is new to it
    assert new.admission == [LIVE, LIVE, LIVE] and new.healthy == [True, True, False]
    view = {m["name"]: m for m in new.view()["members"]}
    assert (view["b1"]["requests"], view["b1"]["sessions"]) == (4, 1)


def test_a_new_master_counts_the_old_workers_from_their_memory_until_they_exit() -> None:
    """The old master hands over the memory of its states whose workers still
    run (the current one and one draining after a reload): the new master
    maps it (another mapping of the same memory, as across processes), counts
    requests once (those of workers already gone from the settled figures, the
    others from that memory), sees in-flight requests and tunnels, reaches the
    old workers with admission changes, and folds the rest in once they exit."""
    old = PoolState(topology(), SharedState(3, 1), None)
    before_reload = old.shared
    before_reload.counters(0)[1][0] += 2  # a1: 2 requests by the oldest workers
    old.adopt(topology(), SharedState(3, 1))  # a reload: those workers still drain
    old.shared.counters(0)[1][0] += 3  # a1: 3 more by the current ones
    old.retire_done(before_reload)  # ... and the oldest have exited: 2 settled
    draining = SharedState(3, 1)
    old.adopt(topology(), draining)  # another reload: two states with running workers
    draining.counters(0)[1][2] += 4  # b1: 4 requests by the newest
    draining.counters(0)[0][2] += 1  # and one in flight
    draining.tunnels(0)[0] += 2  # two WebSockets on a1
    state = json.loads(json.dumps(old.handover_state()))
    running = [
        (SharedState(d["members"], d["workers"], os.dup(shared.fd)), json.loads(json.dumps(d)))
        for shared, d in old.live_states()
    ]
    assert len(running) == 2

    new = PoolState(reloaded(), SharedState(3, 2), None)
    new.restore(state, running)
    view = {m["name"]: m for m in new.view()["members"]}
    assert (view["a1"]["requests"], view["a1"]["tunnels"]) == (5, 2)  # once each, live
    assert (view["b1"]["requests"], view["b1"]["active"]) == (4, 1)

    new.set_admissions({"a1": "out"}, force=True)  # the old workers see it through
    assert draining.snapshot()[1][0] == OUT

    draining.counters(0)[0][2] -= 1  # the old worker's request ends after the take-over
    draining.counters(0)[1][2] += 1
    draining.tunnels(0)[0] -= 2
    view = {m["name"]: m for m in new.view()["members"]}
    assert (view["b1"]["requests"], view["b1"]["active"], view["a1"]["tunnels"]) == (5, 0, 0)
    for shared, _ in running:  # the old master has exited
        new.retire_done(shared)
    assert new.retired == []
    view = {m["name"]: m for m in new.view()["members"]}
    assert (view["a1"]["requests"], view["b1"]["requests"]) == (5, 5)


def test_a_pool_state_of_the_wrong_size_is_refused() -> None:
    shared = SharedState(3, 1)
    with pytest.raises(ValueError, match=r"not \d+ bytes"):
        SharedState(3, 2, shared.fd)
