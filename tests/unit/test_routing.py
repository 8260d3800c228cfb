"""Routing decisions of the embedded balancer, as pure functions."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from changeover.config import parse
from changeover.proxy.routing import (
    DRAINING,
    LIVE,
    NO_MEMBER,
    OUT,
    PUBLIC,
    Table,
    eligible,
    host_name,
    pick,
    qa_cluster,
    sticky_route,
)

# Members in topology order: a1=0 a2=1 (cluster a), b1=2 b2=3 (cluster b).
A1, A2, B1, B2 = range(4)
CLUSTER_A, CLUSTER_B = 0, 1
HEALTHY = bytes([1, 1, 1, 1])


def table() -> Table:
    return Table.from_topology(
        parse(
            {
                "clusters": [
                    {
                        "name": "a",
                        "qa_host": "Prod-A.example.com",
                        "members": [{"name": "a1", "port": 9001}, {"name": "a2", "port": 9002}],
                    },
                    {
                        "name": "b",
                        "members": [
                            {"name": "b1", "port": 9003, "route": "rb1"},
                            {"name": "b2", "port": 9004},
                        ],
                    },
                ]
            }
        )
    )


def route(
    admission: bytes,
    healthy: bytes = HEALTHY,
    scope: int = PUBLIC,
    sticky: int = NO_MEMBER,
    turn: int = 0,
    load: list[int] | None = None,
    exclude: tuple[int, ...] = (),
) -> int:
    t = table()
    return pick(
        t, eligible(t, admission, healthy), admission, healthy, scope, sticky, turn, load, exclude
    )


def spread(admission: bytes, healthy: bytes = HEALTHY, scope: int = PUBLIC) -> Counter[int]:
    return Counter(route(admission, healthy, scope, turn=turn) for turn in range(120))


def test_table_follows_topology_order_and_routes() -> None:
    t = table()
    assert t.names == ("a1", "a2", "b1", "b2")
    assert t.routes == {b"a1": A1, b"a2": A2, b"rb1": B1, b"b2": B2}
    assert t.clusters == ((A1, A2), (B1, B2))
    assert t.qa_hosts == {b"prod-a.example.com": CLUSTER_A}


def test_round_robin_spreads_evenly_over_live_members() -> None:
    assert spread(bytes([LIVE] * 4)) == {A1: 30, A2: 30, B1: 30, B2: 30}


def test_round_robin_skips_out_and_draining_members_evenly() -> None:
    # Evenly: skipping must not hand the next member the skipped one's turns.
    assert spread(bytes([OUT, DRAINING, LIVE, LIVE])) == {B1: 60, B2: 60}


def test_sticky_route_wins_over_round_robin() -> None:
    live = bytes([LIVE] * 4)
    assert {route(live, sticky=B2, turn=turn) for turn in range(10)} == {B2}


def test_draining_member_keeps_sticky_users_but_gets_no_new_ones() -> None:
    admission = bytes([DRAINING, DRAINING, LIVE, LIVE])
    assert route(admission, sticky=A1) == A1
    assert set(spread(admission)) == {B1, B2}


def test_out_member_loses_its_sticky_users_to_live_members() -> None:
    admission = bytes([OUT, LIVE, OUT, OUT])
    assert route(admission, sticky=B1) == A2


def test_unhealthy_sticky_member_is_rerouted_like_a_new_session() -> None:
    assert route(bytes([LIVE] * 4), healthy=bytes([1, 1, 0, 1]), sticky=B1) != B1


def test_fallback_to_draining_members_when_no_live_member_is_healthy() -> None:
    admission = bytes([DRAINING, DRAINING, LIVE, LIVE])
    assert set(spread(admission, healthy=bytes([1, 1, 0, 0]))) == {A1, A2}


def test_no_member_when_nothing_is_live_or_draining_and_healthy() -> None:
    assert route(bytes([OUT, OUT, LIVE, LIVE]), healthy=bytes([1, 1, 0, 0])) == NO_MEMBER
    assert route(bytes([OUT] * 4)) == NO_MEMBER


def test_qa_scope_reaches_its_cluster_whatever_the_admission() -> None:
    admission = bytes([OUT, DRAINING, LIVE, LIVE])
    assert set(spread(admission, scope=CLUSTER_A)) == {A1, A2}
    assert set(spread(admission, scope=CLUSTER_B)) == {B1, B2}


def test_qa_scope_honours_sticky_routes_of_its_own_cluster_only() -> None:
    admission = bytes([OUT, OUT, LIVE, LIVE])
    assert route(admission, scope=CLUSTER_A, sticky=A2) == A2
    assert route(admission, scope=CLUSTER_A, sticky=B1) in (A1, A2)


def test_qa_scope_skips_unhealthy_members_and_has_no_fallback() -> None:
    assert set(spread(bytes([OUT] * 4), healthy=bytes([0, 1, 1, 1]), scope=CLUSTER_A)) == {A2}
    assert route(bytes([LIVE] * 4), healthy=bytes([0, 0, 1, 1]), scope=CLUSTER_A) == NO_MEMBER


def test_least_conn_picks_the_least_loaded_live_member() -> None:
    admission = bytes([LIVE, LIVE, LIVE, OUT])
    assert route(admission, load=[5, 2, 7, 0]) == A2  # b2 is idle but OUT


def test_least_conn_rotates_between_equal_loads() -> None:
    live = bytes([LIVE] * 4)
    chosen = Counter(route(live, load=[0, 0, 0, 0], turn=turn) for turn in range(40))
    assert chosen == {A1: 10, A2: 10, B1: 10, B2: 10}


def test_retry_excludes_members_already_tried() -> None:
    live = bytes([LIVE] * 4)
    assert route(live, sticky=A1, exclude=(A1,)) != A1
    assert route(live, exclude=(A1, A2, B1)) == B2
    assert route(live, exclude=(A1, A2, B1, B2)) == NO_MEMBER
    assert route(live, load=[0, 1, 1, 1], exclude=(A1,)) in (A2, B1, B2)


def test_sticky_route_is_what_follows_the_first_dot_of_the_session_cookie() -> None:
    s, ins = b"JSESSIONID=", b"CHANGEOVER_ROUTE="
    assert sticky_route(b"JSESSIONID=abc123.a1", s, ins) == (b"a1", b"abc123.a1")
    # A route with a dot in it: the first dot ends the id, as on the other three.
    assert sticky_route(b"x=1; JSESSIONID=abc.rack.1 ; y=2", s, ins) == (
        b"rack.1",
        b"abc.rack.1",
    )
    assert sticky_route(b"JSESSIONID=noroute", s, ins) is None
    assert sticky_route(b"MYJSESSIONID=abc.a1", s, ins) is None


def test_sticky_route_from_inserted_cookie_when_session_has_none() -> None:
    s, ins = b"JSESSIONID=", b"CHANGEOVER_ROUTE="
    assert sticky_route(b"CHANGEOVER_ROUTE=b2", s, ins) == (b"b2", b"CHANGEOVER_ROUTE=b2")
    assert sticky_route(b"CHANGEOVER_ROUTE=b2; JSESSIONID=abc.a1", s, ins) == (
        b"a1",
        b"abc.a1",
    )
    assert sticky_route(b"JSESSIONID=plain; CHANGEOVER_ROUTE=a2", s, ins)[0] == b"a2"  # type: ignore[index]


def test_qa_host_matches_without_port_and_case() -> None:
    t = table()
    assert qa_cluster(t, b"PROD-A.example.com:8080") == CLUSTER_A
    assert qa_cluster(t, b"prod-a.example.com") == CLUSTER_A
    assert qa_cluster(t, b"www.example.com") == PUBLIC
    assert qa_cluster(t, None) == PUBLIC
    assert host_name(b"[::1]:8080") == b"::1"


@given(
    admission=st.lists(st.sampled_from([LIVE, DRAINING, OUT]), min_size=4, max_size=4),
    healthy=st.lists(st.sampled_from([0, 1]), min_size=4, max_size=4),
    sticky=st.sampled_from([NO_MEMBER, A1, A2, B1, B2]),
    turn=st.integers(0, 1000),
    least_conn=st.booleans(),
)
def test_public_choice_is_always_allowed(
    admission: list[int], healthy: list[int], sticky: int, turn: int, least_conn: bool
) -> None:
    load = [3, 1, 4, 1] if least_conn else None
    chosen = route(bytes(admission), bytes(healthy), sticky=sticky, turn=turn, load=load)
    if chosen == NO_MEMBER:
        assert not any(h and a != OUT for a, h in zip(admission, healthy, strict=True))
        return
    assert healthy[chosen] and admission[chosen] != OUT
    if admission[chosen] == DRAINING and chosen != sticky:
        assert not any(h and a == LIVE for a, h in zip(admission, healthy, strict=True))
