"""What the suite itself relies on: `make system-deps` installs every real
server a test requires, and the port helper hands out ports outside the
kernel's ephemeral range, one slice per xdist worker, never twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import free_port
from tests.integration.realbalancers import BINARY

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_ports_are_outside_the_ephemeral_range_and_never_repeated() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    ephemeral = _ephemeral_range()
    assert not [p for p in ports if p in ephemeral]


def _ports_of(worker: str, count: str) -> set[int]:
    env = {**os.environ, "PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": count}
    code = "from tests.helpers import free_port; print(*(free_port() for _ in range(300)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout
    return {int(p) for p in out.split()}


def test_two_workers_hand_out_disjoint_ports() -> None:
    gw0, gw1 = _ports_of("gw0", "2"), _ports_of("gw1", "2")
    assert len(gw0) == len(gw1) == 300
    assert not gw0 & gw1
    assert max(gw0) < min(gw1)


def test_the_install_script_checks_for_every_binary_a_test_requires() -> None:
    required = set(BINARY.values())
    for source in (ROOT / "tests").rglob("*.py"):
        required |= set(re.findall(r'require_binary\(\s*"([\w.-]+)"', source.read_text()))
    assert {"prometheus", "sshd", "initdb", "nginx"} <= required
    checks = [
        line
        for line in (ROOT / "scripts/install-system-deps.sh").read_text().splitlines()
        if 'need="$need' in line
    ]
    unchecked = {
        name
        for name in required
        if not any(re.search(rf"(/|command -v ){re.escape(name)}\b", line) for line in checks)
    }
    assert not unchecked, f"scripts/install-system-deps.sh never checks for {sorted(unchecked)}"
