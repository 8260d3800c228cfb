"""Ctrl-C while release commands run, with an in-memory balancer and executor:
a command the signal killed (it reached it before the command left our
process group) is an interruption, not a failure of the step."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from pathlib import Path

from changeover import journal as J
from changeover.config import Cluster, Member, Topology, parse
from changeover.engine import Engine
from changeover.executors.base import CommandResult
from changeover.journal import Journal
from changeover.model import Admission, MemberState, PoolView


def topology(tmp_path: Path) -> Topology:
    return parse(
        {
            "site": {"name": "t", "state_dir": str(tmp_path)},
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 1}, {"name": "a2", "port": 2}]},
                {"name": "b", "members": [{"name": "b1", "port": 3}, {"name": "b2", "port": 4}]},
            ],
            "release": {"stop": "ctl stop {member}", "start": "ctl start {member}"},
            "policy": {"drain_idle": 0, "drain_timeout": 1},
            "checks": {"timeout": 0.2},
        },
        tmp_path / "changeover.toml",
    )


class MemoryBalancer:
    name = "memory"

    def __init__(self, topo: Topology) -> None:
        self.admissions = {m.name: Admission.LIVE for _, m in topo.members()}
        self.cluster = {m.name: c.name for c, m in topo.members()}

    async def read(self) -> PoolView:
        return PoolView(
            tuple(MemberState(n, self.cluster[n], a, True) for n, a in self.admissions.items())
        )

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        self.admissions |= desired
        return await self.read()

    async def close(self) -> None:
        return None


class CtrlCDuringStop:
    """`stop` on a1 is killed by the SIGINT that Ctrl-C also sends the engine."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.calls: list[tuple[str, ...]] = []

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        self.calls.append(tuple(argv))
        if argv[1] == "stop" and member.name == "a1":
            assert self.engine is not None
            self.engine.interrupt()  # the terminal's Ctrl-C reaches the engine and
            # the command that was still in our process group when it came:
            return CommandResult(member.name, tuple(argv), -signal.SIGINT, "", 0.01)
        return CommandResult(member.name, tuple(argv), 0, "ok", 0.01)

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        raise AssertionError("no uploads in this plan")

    async def close(self) -> None:
        return None


async def test_a_command_killed_by_ctrl_c_interrupts_instead_of_failing(tmp_path: Path) -> None:
    topo = topology(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite")
    executor = CtrlCDuringStop()
    engine = Engine(topo, MemoryBalancer(topo), executor, journal, poll=0.01)
    executor.engine = engine

    release_id = await engine.begin("2.0")
    state = await engine.run(release_id)

    assert state == J.INTERRUPTED  # resumable, like any Ctrl-C; not "failed"
    steps = {s.step_id: s for s in journal.steps(release_id)}
    assert steps["stop-a"].state == J.STEP_PENDING  # runs again on resume
    assert steps["start-a"].state == J.STEP_PENDING
    assert journal.release(release_id).state == J.INTERRUPTED
    assert ("ctl", "start", "a1") not in executor.calls  # nothing ran after the stop


async def test_a_command_failing_on_its_own_still_fails_the_step(tmp_path: Path) -> None:
    topo = topology(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite")

    class Broken(CtrlCDuringStop):
        async def run(
            self, cluster: Cluster, member: Member, argv: list[str], timeout: float
        ) -> CommandResult:
            if argv[1] == "stop" and member.name == "a1":
                return CommandResult(member.name, tuple(argv), -signal.SIGINT, "", 0.01)
            return CommandResult(member.name, tuple(argv), 0, "ok", 0.01)

    engine = Engine(topo, MemoryBalancer(topo), Broken(), journal, poll=0.01)
    state = await engine.run(await engine.begin("2.0"))
    assert state == J.FAILED  # no Ctrl-C was pressed: a killed command is a failure
