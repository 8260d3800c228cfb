"""The embedded balancer's release lock: one lease, pure decisions."""

from __future__ import annotations

import pytest

from changeover.proxy.lease import Lease, claim, release

HELD = Lease("copy-1", "release #3 by ops@a (pid 7)", expires=100.0)


@pytest.mark.parametrize(
    ("current", "owner", "now", "refused"),
    [
        (None, "copy-2", 50.0, False),  # free
        (HELD, "copy-1", 50.0, False),  # its owner renews it
        (HELD, "copy-2", 50.0, True),  # another copy of the config
        (HELD, "copy-2", 100.0, False),  # not renewed in time: free again
    ],
)
def test_a_claim_is_refused_only_while_another_owner_holds_the_lease(
    current: Lease | None, owner: str, now: float, refused: bool
) -> None:
    after, why = claim(current, owner, "release #4 by ops@b (pid 9)", 60.0, now)
    if refused:
        assert after == current
        assert why == (
            "the release lock of this balancer is held by release #3 by ops@a (pid 7) "
            "(free in 50s unless renewed)"
        )
    else:
        assert why is None
        assert after == Lease(owner, "release #4 by ops@b (pid 9)", now + 60.0)


def test_only_its_owner_lets_go_of_a_lease_that_holds() -> None:
    after, why = release(HELD, "copy-2", 50.0)
    assert after == HELD and why is not None and "held by release #3" in why
    assert release(HELD, "copy-1", 50.0) == (None, None)
    assert release(HELD, "copy-2", 150.0) == (None, None)  # expired: nothing to keep
