"""Run release commands as local subprocesses (the demo, and single-host sites)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import time
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


class LocalExecutor:
    """argv executed without a shell, in its own process group so a timeout
    kills everything the command started in the foreground."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env or {}

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        start = time.monotonic()
        env = (
            os.environ
            | self._env
            | {
                "CHANGEOVER_CLUSTER": cluster.name,
                "CHANGEOVER_MEMBER": member.name,
            }
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return CommandResult(
                member.name,
                tuple(argv),
                None,
                f"cannot start {argv[0]!r}: {exc}",
                time.monotonic() - start,
            )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return CommandResult(
                member.name,
                tuple(argv),
                None,
                f"timed out after {timeout:g}s",
                time.monotonic() - start,
            )
        return CommandResult(
            member.name, tuple(argv), proc.returncode, _tail(out), time.monotonic() - start
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

    async def close(self) -> None:
        return None
