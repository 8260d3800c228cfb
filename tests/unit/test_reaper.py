"""The suite's sweep finds a grandchild whose parent is gone, and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests import reaper

REPO = Path(__file__).resolve().parents[2]

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


# The first test turns the interrupt into a failure of its own, as a test whose
# cleanup raises does; the second must never start.
CANCELLED_RUN = """
import pathlib, subprocess, sys, time

HERE = pathlib.Path(__file__).parent

def test_first():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (HERE / "sleeper").write_text(str(sleeper.pid))
    try:
        time.sleep(60)
    except BaseException:
        raise AssertionError("the test's own cleanup failed")

def test_second():
    (HERE / "second-ran").touch()
"""


def _inner_run(tmp_path: Path, tests: str | dict[str, str], *extra: str) -> subprocess.Popen[str]:
    """`pytest` with the suite's conftest on a throwaway test file (or files, by path)."""
    for name, text in (tests if isinstance(tests, dict) else {"test_inner.py": tests}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    ini = str(tmp_path / "pytest.ini")
    argv = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "-c", ini, *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *argv, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_cancelled_run_stops_after_the_test_it_interrupted_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    run = _inner_run(tmp_path, CANCELLED_RUN)
    marker = tmp_path / "sleeper"
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.05)  # polling a file another process writes: nothing to await
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, out
    assert "the test's own cleanup failed" in out, out
    assert not (tmp_path / "second-ran").exists(), out
    assert _gone(int(marker.read_text())), out


# A test on an xdist worker leaves an orphan behind (its parent exits at once).
LEAKING_RUN = f"""
import pathlib, subprocess, sys

ORPHAN = {ORPHAN!r}

def test_leaks():
    out = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True)
    (pathlib.Path(__file__).parent / "orphan").write_text(out.stdout)

def test_other():
    pass
"""


def test_a_process_left_by_a_test_on_an_xdist_worker_fails_the_run_and_is_stopped(
    tmp_path: Path,
) -> None:
    run = _inner_run(tmp_path, LEAKING_RUN, "-n", "2")
    try:
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    orphan = int((tmp_path / "orphan").read_text())
    assert "2 passed" in out, out
    assert run.returncode != 0, out
    assert "processes left running, now stopped: 1" in out, out
    assert _gone(orphan), out


# Each test writes down the worker that ran it and when it began and ended (a
# little work in between, so that tests of two workers would overlap).
RECORDING_TEST = """
import os, pathlib, time

def test_{n}():
    began = time.monotonic()
    time.sleep(0.05)
    name = pathlib.Path(__file__).stem + "-{n}-" + os.environ["PYTEST_XDIST_WORKER"]
    (pathlib.Path({out!r}) / name).write_text(f"{{began}} {{time.monotonic()}}")
"""


def test_under_xdist_files_stay_whole_and_timed_files_run_alone_after_the_rest(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ran"
    out.mkdir()
    stems = [f"{kind}/test_{kind[0]}{n}.py" for kind in ("e2e", "unit") for n in (1, 2, 3)]
    stems.insert(3, "integration/test_probe.py")  # a timed file, collected mid-run
    test = "".join(RECORDING_TEST.format(n=n, out=str(out)) for n in range(4))
    run = _inner_run(tmp_path / "site", {f"tests/{stem}": test for stem in stems}, "-n", "2")
    try:
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert "28 passed" in output, output
    workers: dict[str, set[str]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for mark in out.iterdir():
        stem, _, worker = mark.name.split("-")
        workers.setdefault(stem, set()).add(worker)
        began, ended = map(float, mark.read_text().split())
        spans.setdefault(stem, []).append((began, ended))
    assert len(workers) == 7, workers
    assert all(len(w) == 1 for w in workers.values()), workers  # whole files
    # The end-to-end files are shared out: both workers start on one.
    assert len(set().union(*(workers[f"test_e{n}"] for n in (1, 2, 3)))) == 2, workers
    last_other = max(end for stem, s in spans.items() if stem != "test_probe" for _, end in s)
    assert min(began for began, _ in spans["test_probe"]) >= last_other, spans
