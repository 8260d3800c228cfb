"""Suite-wide: a cancelled run still cleans up after itself."""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def _cancelled(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI job cancelled, `timeout`, `kill`) unwinds like Ctrl-C, so
    # every fixture's teardown stops the balancers, members, probes and
    # servers it started instead of leaving them running.
    signal.signal(signal.SIGTERM, _cancelled)
