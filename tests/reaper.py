"""The suite's own processes: whatever a cut teardown left running is found and stopped.

The test run becomes a child subreaper, so a balancer or demo member whose
parent (a ``changeover`` command, a shell) died is re-parented to the run
instead of to init; at the end every process still below the run is a leak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux); False where the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


# Helpers that exit when this process does (their pipe closes): multiprocessing's
# resource tracker and pytest-xdist's workers (execnet's bootstrap line).
_OURS_TO_THE_END = (
    "from multiprocessing.resource_tracker import main",
    "import sys;exec(eval(sys.stdin.readline()))",
)


def leftovers(pid: int | None = None) -> list[psutil.Process]:
    """Every live process below ``pid`` (this process by default)."""
    try:
        below = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in below if _alive(p) and not _tracker(p)]


def _tracker(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(marker in cmdline for marker in _OURS_TO_THE_END)


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def stop(procs: list[psutil.Process], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace``."""
    for proc in procs:
        _signal(proc, terminate=True)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        _signal(proc, terminate=False)
    psutil.wait_procs(alive, timeout=grace)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, *, terminate: bool) -> None:
    with contextlib.suppress(psutil.Error):
        proc.terminate() if terminate else proc.kill()
