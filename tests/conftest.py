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


# Integration files whose tests time what they see (the probe keeping a
# 1,000-a-second schedule, WebSocket closes spread per second): beside a release
# on the other worker they measured that release (a 188 ms lag, 11 closes in
# a second instead of 10). They run on the end-to-end worker after its files,
# in collection order.
TIMED_FILES = frozenset(
    {"tests/integration/test_probe.py", "tests/integration/test_proxy_websocket.py"}
)


class _FilesAndEndToEnd(LoadScopeScheduling):  # type: ignore[misc]  # xdist ships no types
    """Workers take whole files (module-scoped sites are built once), and every
    end-to-end file (and every file of `TIMED_FILES`) goes to one worker, so two
    of them never run at once.

    Not `--dist loadgroup`: xdist 3.8 marks a group by rewriting `Item._nodeid`,
    which pytest 9 no longer reads, so every test went wherever it fell (a
    module's site was built twice, and its tests found each other's states)."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return "one-at-a-time" if path.startswith("tests/e2e/") or path in TIMED_FILES else path


@pytest.hookimpl(optionalhook=True)  # a run without xdist (`-p no:xdist`) has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadScopeScheduling:
    # In collection order (the end-to-end files come first, so the longest unit
    # starts at once), not reordered by size.
    config.option.loadscopereorder = False
    return _FilesAndEndToEnd(config, log)


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
