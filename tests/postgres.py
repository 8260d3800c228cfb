"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory,
its own socket directory, an ephemeral loopback port; never the system cluster.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
user (created by Debian's package) through `runuser`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port, require_binary

SERVER_USER = "postgres"


def _bin_dir() -> Path:
    # Debian keeps the server binaries off PATH, one directory per major version.
    candidates = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return require_binary("initdb", *candidates).parent


class Postgres:
    """One running cluster; `database()` makes a fresh database per test."""

    def __init__(self, bin_dir: Path, root: Path, port: int, as_user: list[str]) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.port = port
        self.as_user = as_user
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin_dir / tool), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace")
            raise RuntimeError(f"{tool} exited {done.returncode}: {output}")

    def start(self) -> None:
        data, sockets = self.root / "data", self.root / "sockets"
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = (
            f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database; its URL. Dropped afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
        finally:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    bin_dir = _bin_dir()
    # Not under pytest's tmp_path: its parents are private to root, and the
    # server user must reach the data directory.
    root = Path(tempfile.mkdtemp(prefix="changeover-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = require_binary("runuser")
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.fail(f"running as root needs the {SERVER_USER!r} user to run PostgreSQL")
        for path in (root, root / "sockets"):
            path.mkdir(exist_ok=True)
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = [str(runuser), "-u", SERVER_USER, "--"]
    else:
        (root / "sockets").mkdir()
    server = Postgres(bin_dir, root, free_port(), as_user)
    try:
        server.start()
        yield server
    finally:
        # Also after a start that timed out: the server may still be coming up.
        if (root / "data" / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
