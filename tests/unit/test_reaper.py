"""The suite's sweep finds a grandchild whose parent is gone, and stops it."""

from __future__ import annotations

import subprocess
import sys

import psutil

from tests import reaper

# A child that starts a long sleeper in its own session and exits at once:
# the sleeper is orphaned, as a demo member is when its `changeover` dies.
ORPHAN = (
    "import subprocess, sys;"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
    " start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
    "print(p.pid)"
)


def test_an_orphaned_grandchild_is_adopted_and_stopped() -> None:
    assert reaper.become_subreaper()
    out = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, check=True)
    orphan = int(out.stdout)
    try:
        assert orphan in {p.pid for p in reaper.leftovers()}
        reaper.stop([p for p in reaper.leftovers() if p.pid == orphan])
        assert orphan not in {p.pid for p in reaper.leftovers()}
    finally:
        if psutil.pid_exists(orphan):
            psutil.Process(orphan).kill()
