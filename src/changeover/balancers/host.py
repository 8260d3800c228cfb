"""Where a config-driven balancer instance runs: this machine, or a host over SSH.

A driver (HAProxy, Apache, nginx) touches its instance only through a `Host`:
read a file, replace one atomically (a temporary file in the same directory,
then a rename), remove one, run a command (an argument list, never a shell
string), open a stream to a unix socket or a TCP port, and turn a URL as the
host sees it into one this process can reach. `LocalHost` does all of that
here; `SshHost` does it on `[[balancer.instances]] ssh_host` through one
asyncssh connection, opened with the executor's settings and code
(`executors.ssh.SshExecutor`: known_hosts and strict host keys, the key file,
the jump host): SFTP for the files, `shlex.join(argv)` for commands,
streamlocal forwarding for a unix socket (HAProxy's stats socket), a direct
TCP channel for a port, and a local port forward for HTTP (nginx's control
listener, Apache's balancer-manager). `SshHost` lives in `sshhost.py`, imported
only for an instance that has an `ssh_host` (asyncssh costs a local one a
third of a second of start-up).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from changeover.balancers.base import BalancerError
from changeover.config import BalancerInstance, Topology


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandOutput:
    """What a check or reload command did."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        """What the program said, stderr first (where the products put errors)."""
        text = "\n".join(part.strip() for part in (self.stderr, self.stdout) if part.strip())
        return text or f"exit status {self.returncode}"


class Host(Protocol):
    """The operations a driver needs on the machine its balancer runs on."""

    label: str  # "this host" or "user@host:port", for messages
    where: str  # "" here, " on user@host:port" over SSH: what messages append

    async def read_text(self, path: str) -> str | None: ...
    async def replace(self, path: str, text: str) -> None: ...
    async def remove(self, path: str) -> None: ...
    async def run(self, argv: Sequence[str], timeout: float) -> CommandOutput: ...
    async def open_unix(self, path: str) -> tuple[Reader, Writer]: ...
    async def open_tcp(self, host: str, port: int) -> tuple[Reader, Writer]: ...
    async def reachable_url(self, url: str) -> str: ...
    async def close(self) -> None: ...


def temporary_beside(path: str) -> str:
    """A fresh temporary name in `path`'s directory, so a rename replaces it atomically."""
    p = PurePosixPath(path)
    return str(p.with_name(f".{p.name}.changeover-{uuid.uuid4().hex[:12]}"))


class LocalHost:
    """This machine: files, subprocesses and sockets directly."""

    label = "this host"
    where = ""

    async def read_text(self, path: str) -> str | None:
        try:
            return await asyncio.to_thread(Path(path).read_text)
        except FileNotFoundError:
            return None

    async def replace(self, path: str, text: str) -> None:
        def write() -> None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(temporary_beside(path))
            try:
                temporary.write_text(text)
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)

        await asyncio.to_thread(write)

    async def remove(self, path: str) -> None:
        await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    async def run(self, argv: Sequence[str], timeout: float) -> CommandOutput:
        if not argv:
            raise BalancerError("empty command")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise BalancerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BalancerError(f"{shlex.join(argv)} did not finish within {timeout:g}s") from None
        code = proc.returncode if proc.returncode is not None else -1
        return CommandOutput(
            tuple(argv), code, out.decode(errors="replace"), err.decode(errors="replace")
        )

    async def open_unix(self, path: str) -> tuple[Reader, Writer]:
        return await asyncio.open_unix_connection(path)

    async def open_tcp(self, host: str, port: int) -> tuple[Reader, Writer]:
        return await asyncio.open_connection(host, port)

    async def reachable_url(self, url: str) -> str:
        return url

    async def close(self) -> None:
        """Nothing is held open here."""


def host_for(topology: Topology, instance: BalancerInstance) -> Host:
    """Where `instance` runs: over SSH when it names an `ssh_host`, else here."""
    if instance.ssh_host:
        from changeover.balancers.sshhost import SshHost  # asyncssh: only for one

        return SshHost.for_instance(topology, instance)
    return LocalHost()
