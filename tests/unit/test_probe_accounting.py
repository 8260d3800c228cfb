"""The probe's accounting on synthetic sequences: percentiles, timeline, breaks, flaps,
and what its WebSocket users count (closes, reconnects, the busiest second)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from changeover.model import Admission
from changeover.probe.accounting import (
    BreakLedger,
    LatencyHistogram,
    Move,
    PeakRate,
    SessionLengths,
    Sessions,
    Timeline,
    WebSocketLedger,
    move_is_break,
    ws_close_failure,
)

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


@given(
    st.lists(st.floats(min_value=0, max_value=60_000, allow_nan=False), min_size=1, max_size=500),
    st.sampled_from([1.0, 50.0, 90.0, 99.0, 99.9, 100.0]),
)
def test_percentiles_are_within_the_histogram_precision(values: list[float], p: float) -> None:
    hist = LatencyHistogram(precision=0.01, floor_ms=0.01)
    for v in values:
        hist.record(v)
    exact = nearest_rank(values, p)
    assert abs(hist.percentile(p) - exact) <= max(exact * 0.01 * 1.000001, 0.01)
    assert hist.max_ms == max(values)
    assert hist.count == len(values)


def test_percentiles_of_a_known_sequence() -> None:
    hist = LatencyHistogram()
    for ms in range(1, 101):  # 1..100 ms
        hist.record(float(ms))
    assert math.isclose(hist.percentile(50), 50, rel_tol=0.01)
    assert math.isclose(hist.percentile(99), 99, rel_tol=0.01)
    assert hist.percentile(100) == 100.0
    assert LatencyHistogram().percentile(50) == 0.0


def test_histogram_memory_grows_with_distinct_buckets_not_samples() -> None:
    hist = LatencyHistogram()
    for i in range(60_000):
        hist.record(1.0 + (i % 1000) / 100)  # 1..11 ms
    assert len(hist._counts) < 300


def test_timeline_run_length_encodes_and_answers_before_and_after() -> None:
    tl = Timeline()
    assert tl.at_or_before(1.0) is None and tl.at_or_after(1.0) is None
    for t in (1.0, 1.1, 1.2):
        tl.record(t, {"a1": LIVE})
    tl.record(1.3, {"a1": DRAINING})
    tl.record(1.6, {"a1": OUT})  # reads at 1.4 and 1.5 failed: a gap
    assert len(tl.segments) == 3
    assert tl.last_read == 1.6
    assert tl.at_or_before(0.9) is None
    assert tl.at_or_before(1.15) == {"a1": LIVE}
    assert tl.at_or_before(1.3) == {"a1": DRAINING}
    assert tl.at_or_before(1.55) == {"a1": DRAINING}  # the last read before the gap
    assert tl.at_or_after(1.15) == {"a1": LIVE}  # the read at 1.2
    assert tl.at_or_after(1.25) == {"a1": DRAINING}
    assert tl.at_or_after(1.45) == {"a1": OUT}  # the first read after the gap
    assert tl.at_or_after(1.7) is None


def test_a_move_is_excused_only_when_a_bracketing_read_shows_the_member_not_admitted() -> None:
    assert move_is_break("a1", {"a1": LIVE}, {"a1": LIVE})
    assert move_is_break("a1", {"a1": DRAINING}, {"a1": DRAINING})
    assert not move_is_break("a1", {"a1": DRAINING}, {"a1": OUT})
    assert not move_is_break("a1", {"a1": OUT}, {"a1": LIVE})
    assert not move_is_break("a1", {"b1": LIVE}, {"b1": LIVE})  # not in the pool at all
    assert move_is_break("a1", None, None)  # no watcher: every move breaks
    assert move_is_break("a1", None, {"a1": LIVE})
    assert not move_is_break("a1", None, {"a1": OUT})


def _move(sent: float, done: float, frm: str = "a1") -> Move:
    return Move(user=0, from_member=frm, to_member="b1", sent_at=sent, done_at=done)


def test_ledger_without_timeline_counts_every_move() -> None:
    ledger = BreakLedger(None)
    ledger.add(_move(1.0, 1.01))
    ledger.add(_move(2.0, 2.01))
    assert ledger.breaks == 2 and ledger.pending == 0


def test_ledger_waits_for_a_read_after_the_move() -> None:
    tl = Timeline()
    tl.record(1.0, {"a1": LIVE})
    ledger = BreakLedger(tl)
    ledger.add(_move(1.05, 1.06))
    assert ledger.pending == 1 and ledger.breaks == 0
    tl.record(1.1, {"a1": LIVE})  # still admitted after the move: a real break
    ledger.settle()
    assert ledger.pending == 0 and ledger.breaks == 1


def test_ledger_counts_a_move_off_a_member_taken_out_as_cut_not_excused() -> None:
    tl = Timeline()
    tl.record(1.0, {"a1": DRAINING})
    ledger = BreakLedger(tl)
    ledger.add(_move(1.05, 1.06))
    tl.record(1.1, {"a1": OUT})
    ledger.settle()
    assert (ledger.breaks, ledger.cuts) == (0, 1)


def test_ledger_final_settle_judges_with_what_is_known() -> None:
    tl = Timeline()
    tl.record(1.0, {"a1": LIVE})
    ledger = BreakLedger(tl)
    ledger.add(_move(1.05, 1.06))
    ledger.settle(final=True)  # no read after it: not excused
    assert ledger.breaks == 1


def test_ledger_pending_queue_is_bounded() -> None:
    tl = Timeline()
    tl.record(0.0, {"a1": OUT})
    ledger = BreakLedger(tl, max_pending=10)
    for i in range(100):
        ledger.add(_move(1.0 + i, 1.5 + i))
    assert ledger.pending == 10
    assert (ledger.breaks, ledger.cuts) == (0, 90)  # judged early, by the read before


@pytest.mark.parametrize(
    ("mean", "maximum"), [(2.0, 6.0), (0.5, 0.5), (3.0, None)], ids=["capped", "fixed", "open"]
)
def test_session_lengths_have_the_mean_and_never_pass_the_maximum(
    mean: float, maximum: float | None
) -> None:
    lengths = SessionLengths(mean, maximum)
    rng = random.Random(7)
    stays = [lengths.draw(rng) for _ in range(20_000)]
    assert max(stays) <= (maximum or math.inf) and min(stays) >= 0
    # The exponential's mean, less what the cap takes off: mean * (1 - e^(-max/mean)).
    expected = mean * (1 - math.exp(-(maximum or math.inf) / mean))
    assert abs(statistics.fmean(stays) - expected) < 0.05 * expected
    assert SessionLengths().draw(rng) == math.inf  # no mean: users stay for good


@pytest.mark.parametrize(
    ("mean", "maximum"), [(0.0, None), (-1.0, None), (math.nan, None), (None, 3.0), (2.0, 1.0)]
)
def test_session_lengths_refuse_nonsense(mean: float | None, maximum: float | None) -> None:
    with pytest.raises(ValueError):
        SessionLengths(mean, maximum)


def test_a_user_who_leaves_is_replaced_by_one_with_no_history() -> None:
    sessions = Sessions(2)
    sessions.served(0, None, "a1", "v2", 0.0, 0.1)
    sessions.replace(0)
    # The newcomer's first answer is no move, and an older version no flap.
    assert sessions.served(0, None, "b1", "v1", 0.2, 0.3) is None
    assert (sessions.moves, sessions.flaps, sessions.arrived) == (0, 0, 3)


def test_sessions_count_moves_against_the_member_the_cookie_named() -> None:
    s = Sessions(users=2)
    assert s.served(0, None, "a1", "v1", 0.0, 0.1) is None  # first response: no session yet
    assert s.served(0, "a1", "a1", "v1", 1.0, 1.1) is None
    move = s.served(0, "a1", "b1", "v1", 2.0, 2.1)
    assert move == Move(0, "a1", "b1", 2.0, 2.1)
    # A response that left before the move carried a1's cookie and a1 served it: no move.
    assert s.served(0, "a1", "a1", "v1", 1.9, 2.2) is None
    assert s.users[0].member == "a1"
    assert s.moves == 1
    assert s.members_seen == {"a1": 3, "b1": 1}


def test_version_flap_is_a_return_to_an_earlier_version() -> None:
    s = Sessions(users=3)
    for version in ("v1", "v1", "v2", "v2"):  # a normal upgrade
        s.served(0, None, None, version, 0.0, 0.0)
    for version in ("v1", "v2", "v1", "v2", "v1"):  # flaps, counted once per user
        s.served(1, None, None, version, 0.0, 0.0)
    for version in ("v1", "v2", "v3"):
        s.served(2, None, None, version, 0.0, 0.0)
    assert s.flaps == 1
    assert [u.flapped for u in s.users] == [False, True, False]
    assert s.users[1].versions == ["v1", "v2"]
    assert s.versions_seen == {"v1": 6, "v2": 5, "v3": 1}


def test_responses_without_headers_are_not_tracked() -> None:
    s = Sessions(users=1)
    s.served(0, None, "a1", "v1", 0.0, 0.0)
    assert s.served(0, "a1", None, None, 1.0, 1.1) is None  # e.g. a balancer's own 503
    assert s.users[0].member == "a1" and s.users[0].version == "v1"


# --- WebSocket users ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1001, None),  # going away: the balancer at a drain, an app server at undeploy
        (1000, "close_code"),  # a normal closure by the server is not what a drain sends
        (1006, "close_code"),  # a code no close frame may carry is still not 1001
        (1011, "close_code"),
        (None, "no_close_frame"),  # closed or reset without a close frame
    ],
)
def test_only_a_1001_close_is_normal(code: int | None, kind: str | None) -> None:
    assert ws_close_failure(code) == kind


def most_in_a_window_by_brute_force(times: list[float], width: float) -> int:
    return max((sum(1 for u in times if t - width < u <= t) for t in times), default=0)


@given(st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=200))
def test_peak_rate_is_the_most_events_in_any_window(times: list[float]) -> None:
    times.sort()
    peak = PeakRate(1.0)
    for t in times:
        peak.record(t)
    assert peak.peak == most_in_a_window_by_brute_force(times, 1.0)
    assert peak.count == len(times)


def test_peak_rate_counts_a_burst_across_a_second_boundary_and_forgets_old_events() -> None:
    peak = PeakRate(1.0)
    for t in (0.5, 0.625, 0.75, 1.125, 1.25, 1.375):  # 3 in each calendar second, 6 in 0.875 s
        peak.record(t)
    assert peak.peak == 6
    peak.record(2.375)  # 1.375 is exactly 1 s before: not in (1.375, 2.375]
    assert peak.peak == 6 and len(peak._recent) == 1
    with pytest.raises(ValueError, match="backwards"):
        peak.record(2.0)
    with pytest.raises(ValueError, match="positive"):
        PeakRate(0)


def test_closes_spread_over_three_seconds_peak_at_the_configured_share() -> None:
    """200 reconnects evenly over 3 s, as the balancer spreads its 1001s: no
    second holds more than ceil(200 / 3); the same 200 at once hold all 200."""
    spread = PeakRate(1.0)
    for i in range(200):
        spread.record(3.0 * i / 200)
    assert spread.peak == math.ceil(200 / 3)
    burst = PeakRate(1.0)
    for _ in range(200):
        burst.record(5.0)
    assert burst.peak == 200


def test_a_reconnect_is_the_first_open_after_a_1001_timed_at_its_first_attempt() -> None:
    ws = WebSocketLedger(users=3)
    for user in range(3):
        ws.attempt(user, at=0.0)
        ws.open(user)  # first connections: not reconnects
    ws.echo()
    ws.going_away(0, "a1")
    ws.attempt(0, at=1.0)
    ws.open(0)  # straight back: a reconnect
    ws.going_away(1, "a2")
    ws.attempt(1, at=1.25)
    ws.failed("handshake")  # the first attempt failed: abnormal, not excused
    ws.attempt(1, at=2.5)  # the next one opens: still one reconnect, begun at 1.25
    ws.open(1)
    ws.failed("echo_timeout")  # user 2: abnormal, and its next open is no reconnect
    ws.attempt(2, at=2.5)
    ws.open(2)
    ws.going_away(2, None)  # the member was not told by the handshake
    assert ws.opened == 6 and ws.echoed == 1
    assert ws.normal == {"a1": 1, "a2": 1, "?": 1}
    assert ws.abnormal == {"handshake": 1, "echo_timeout": 1}
    assert ws.reconnects == 2
    assert (ws.reconnecting.count, ws.reconnecting.peak) == (2, 2)  # at 1.0 and 1.25
    assert ws.waiting_to_reconnect == 1  # user 2, closed with 1001, not back yet
