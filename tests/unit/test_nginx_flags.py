"""nginx's cluster admission flags: which flips need no reload, how nginx's
answer reads back, and the order the files change in."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover.balancers.base import BalancerError
from changeover.balancers.host import LocalHost
from changeover.balancers.nginx import canonical, cluster_flags, flag_admission, write_flags
from changeover.model import Admission

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT
CLUSTER_OF = {"a1": "a", "a2": "a", "b1": "b"}
ALL_LIVE = {"a1": LIVE, "a2": LIVE, "b1": LIVE}


def test_whole_cluster_flips_are_flags_over_an_all_live_rendering() -> None:
    for admission in (LIVE, DRAINING, OUT):
        target = {"a1": admission, "a2": admission, "b1": LIVE}
        assert cluster_flags(target, ALL_LIVE, CLUSTER_OF) == {"a": admission, "b": LIVE}


def test_members_of_one_cluster_apart_need_a_new_rendering() -> None:
    assert cluster_flags({"a1": DRAINING, "a2": LIVE, "b1": LIVE}, ALL_LIVE, CLUSTER_OF) is None


def test_a_rendered_exception_is_kept_while_flags_can_narrow_it() -> None:
    rendered = {"a1": LIVE, "a2": OUT, "b1": LIVE}
    # The whole cluster narrowed further: flags alone.
    assert cluster_flags({"a1": OUT, "a2": OUT, "b1": LIVE}, rendered, CLUSTER_OF) == {
        "a": OUT,
        "b": LIVE,
    }
    assert cluster_flags({"a1": DRAINING, "a2": OUT, "b1": LIVE}, rendered, CLUSTER_OF) == {
        "a": DRAINING,
        "b": LIVE,
    }
    # a2 wider than rendered: only a new rendering admits it.
    assert cluster_flags({"a1": LIVE, "a2": LIVE, "b1": LIVE}, rendered, CLUSTER_OF) is None
    assert cluster_flags({"a1": DRAINING, "a2": DRAINING, "b1": LIVE}, rendered, CLUSTER_OF) is None


def test_what_nginx_read_back_maps_to_an_admission() -> None:
    assert flag_admission("a", 1, 1) is LIVE
    assert flag_admission("a", 0, 1) is DRAINING
    assert flag_admission("a", 0, 0) is OUT
    with pytest.raises(BalancerError, match=r"'a\.out' without 'a\.no-new'"):
        flag_admission("a", 1, 0)


class RecordingHost(LocalHost):
    """This machine, logging every create (+name) and remove (-name), in order."""

    def __init__(self) -> None:
        self.log: list[str] = []

    async def replace(self, path: str, text: str) -> None:
        self.log.append(f"+{Path(path).name}")
        await super().replace(path, text)

    async def remove(self, path: str) -> None:
        self.log.append(f"-{Path(path).name}")
        await super().remove(path)


def names(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()]


async def test_files_change_so_a_cluster_never_takes_new_sessions_it_would_not_keep(
    tmp_path: Path,
) -> None:
    host = RecordingHost()
    await write_flags(host, str(tmp_path), [("a", OUT)])
    assert host.log == ["+a.no-new", "+a.out"]
    assert sorted(names(tmp_path)) == ["a.no-new", "a.out"]
    host.log.clear()
    await write_flags(host, str(tmp_path), [("a", LIVE)])
    assert host.log == ["-a.out", "-a.no-new"]
    assert names(tmp_path) == []
    host.log.clear()
    await write_flags(host, str(tmp_path), [("b", LIVE), ("a", DRAINING)])
    assert host.log == ["-b.out", "-b.no-new", "+a.no-new", "-a.out"]
    assert names(tmp_path) == ["a.no-new"]


def test_canonical_leaves_whole_clusters_to_the_flags() -> None:
    target = {"a1": DRAINING, "a2": OUT, "b1": OUT}
    rendered, flags = canonical(target, CLUSTER_OF)
    assert rendered == {"a1": DRAINING, "a2": OUT, "b1": LIVE}
    assert flags == {"a": LIVE, "b": OUT}
    # Whatever canonical renders, the flags then express the next whole-cluster flip.
    assert cluster_flags({"a1": LIVE, "a2": LIVE, "b1": LIVE}, rendered, CLUSTER_OF) is None
    assert cluster_flags({"a1": OUT, "a2": OUT, "b1": LIVE}, rendered, CLUSTER_OF) == {
        "a": OUT,
        "b": LIVE,
    }
    all_out, _ = canonical(dict.fromkeys(CLUSTER_OF, OUT), CLUSTER_OF)
    assert all_out == ALL_LIVE
