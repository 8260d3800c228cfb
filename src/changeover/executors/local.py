"""Run release commands as local subprocesses (the demo, and single-host sites)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from changeover.config import Cluster, Member
from changeover.executors.base import CommandResult

OUTPUT_LIMIT = 64 * 1024  # keep the tail: the end of a failing command says why


def _tail(data: bytes) -> str:
    text = data[-OUTPUT_LIMIT:].decode("utf-8", "replace")
    return text if len(data) <= OUTPUT_LIMIT else "[... output truncated ...]\n" + text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class LocalRun:
    status: int | None  # None: it could not start, or was killed at the timeout
    out: bytes  # stdout, with stderr unless kept apart
    err: bytes
    problem: str | None  # why status is None


async def run_local(
    argv: list[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    merge_stderr: bool = True,
) -> LocalRun:
    """argv executed without a shell, in its own process group so a timeout
    kills everything the command started in the foreground."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            # Its own process group (a timeout kills all of it) but our session:
            # a new session would be a new CPU autogroup, as heavy as this one.
            process_group=0,
        )
    except OSError as exc:
        return LocalRun(None, b"", b"", f"cannot start {argv[0]!r}: {exc.strerror or exc}")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return LocalRun(None, b"", b"", f"timed out after {timeout:g}s")
    return LocalRun(proc.returncode, out, err or b"", None)


class LocalExecutor:
    """Release commands on this host (see `run_local`)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env or {}

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        start = time.monotonic()
        env = os.environ | self._env
        env |= {"CHANGEOVER_CLUSTER": cluster.name, "CHANGEOVER_MEMBER": member.name}
        done = await run_local(argv, timeout, env=env)
        output = done.problem if done.problem else _tail(done.out)
        return CommandResult(
            member.name, tuple(argv), done.status, output, time.monotonic() - start
        )

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        start = time.monotonic()
        argv = ("copy", str(src), dest)

        def copy_and_verify() -> tuple[int, str]:
            target = Path(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            want, got = _sha256(src), _sha256(target)
            if want != got:
                return 1, f"checksum mismatch: {want} sent, {got} on disk"
            return 0, f"sha256 {got} verified"

        try:
            status, text = await asyncio.wait_for(asyncio.to_thread(copy_and_verify), timeout)
        except (OSError, TimeoutError) as exc:
            return CommandResult(
                member.name, argv, None, f"upload failed: {exc!r}", time.monotonic() - start
            )
        return CommandResult(member.name, argv, status, text, time.monotonic() - start)

    async def warm(self, cluster: Cluster) -> None:
        return None  # nothing to open ahead on this host

    async def close_cluster(self, cluster: Cluster) -> None:
        return None

    async def close(self) -> None:
        return None
