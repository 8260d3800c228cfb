"""Suite-wide: a cancelled run still cleans up after itself, and a leak fails the run.

Under pytest-xdist (`make pytest PYTEST_FLAGS="-n 2"`) the
controller does the sweeping: a worker's leftovers are its descendants too,
and only the controller's exit status is the run's.
"""

from __future__ import annotations

import atexit
import signal
import sys
from types import FrameType

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

from tests import reaper

_session: list[pytest.Session] = []


def _cancelled(signum: int, frame: FrameType | None) -> None:
    reason = f"signal {signal.Signals(signum).name}"
    # A test can turn the interrupt into its own failure (its cleanup raises
    # instead, or asyncio's runner cancels the test's task, which then fails):
    # the run still stops after that test instead of going on to the next.
    for session in _session:
        session.shouldstop = reason
    raise KeyboardInterrupt(reason)


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI job cancelled, `timeout`, `kill`) and SIGINT unwind like
    # Ctrl-C, so every fixture's teardown stops the balancers, members, probes
    # and servers it started instead of leaving them running.
    signal.signal(signal.SIGTERM, _cancelled)
    signal.signal(signal.SIGINT, _cancelled)
    # What a teardown cut short still leaves (a member whose `changeover`
    # parent died) is re-parented here and swept at the end.
    reaper.become_subreaper()
    if not _worker(config):
        atexit.register(_sweep_at_exit)


def _worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# Files whose tests time what they see (the probe keeping a 1,000-a-second
# schedule, WebSocket closes spread per second): beside a release on the other
# worker they measured that release (a 188 ms lag, 11 closes in a second instead
# of 10). They run last, alone, once every other test has finished.
TIMED_FILES = frozenset(
    {"tests/integration/test_probe.py", "tests/integration/test_proxy_websocket.py"}
)
ALONE = "run-alone-at-the-end"


class _WholeFilesTimedAlone(LoadScopeScheduling):  # type: ignore[misc]  # xdist ships no types
    """Workers take whole files (module-scoped sites are built once), in
    collection order (the end-to-end files first, the longest, so both workers
    start on them); the files of `TIMED_FILES` wait until nothing else runs.

    Not `--dist loadgroup`: xdist 3.8 marks a group by rewriting `Item._nodeid`,
    which pytest 9 no longer reads, so every test went wherever it fell (a
    module's site was built twice, and its tests found each other's states)."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return ALONE if path in TIMED_FILES else path

    def _assign_work_unit(self, node: WorkerController) -> None:
        scope = next((s for s in self.workqueue if s != ALONE), ALONE)
        if scope == ALONE:
            # The first worker out of other work runs them. A worker runs its
            # last test only once told to stop (it holds it back for the next
            # one's fixtures), so the others are stopped now and it waits for
            # them to exit (`remove_node`).
            others = [other for other in self.nodes if other is not node]
            for other in others:
                if not other.shutting_down:
                    other.shutdown()
            if others:
                return
        self.workqueue.move_to_end(scope, last=False)
        super()._assign_work_unit(node)

    def remove_node(self, node: WorkerController) -> str | None:
        crashed: str | None = super().remove_node(node)
        if crashed is None and list(self.workqueue) == [ALONE]:
            for waiting in self.nodes:
                self._reschedule(waiting)
        return crashed


@pytest.hookimpl(optionalhook=True)  # a run without xdist (`-p no:xdist`) has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadScopeScheduling:
    config.option.loadscopereorder = False  # collection order, not by size
    return _WholeFilesTimedAlone(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    _session.append(session)


def _sweep_at_exit() -> None:
    # A second signal can cut pytest's own unwinding before sessionfinish.
    left = reaper.leftovers()
    if left:
        print(f"stopping {len(left)} processes the tests left running", file=sys.stderr)
        reaper.stop(left)


@pytest.hookimpl(trylast=True)  # after xdist has stopped its workers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _worker(session.config):
        return
    left = reaper.leftovers()
    if not left:
        return
    names = [reaper.describe(p) for p in left]
    reaper.stop(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"processes left running, now stopped: {len(names)}", red=True)
        for name in names:
            reporter.write_line(f"  {name}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
