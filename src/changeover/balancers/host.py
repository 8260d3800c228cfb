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
listener, Apache's balancer-manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncssh

from changeover.balancers.base import BalancerError
from changeover.config import BalancerInstance, Topology
from changeover.executors.ssh import SshError, SshExecutor


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


class SshHost:
    """A host reached over SSH: one connection (reopened when it dropped), SFTP
    for files, commands as `shlex.join(argv)`, forwarding for sockets and URLs."""

    def __init__(self, executor: SshExecutor, host: str, port: int, user: str | None) -> None:
        self._executor = executor
        self._host = host
        self.label = f"{user + '@' if user else ''}{host}:{port}"
        self.where = f" on {self.label}"
        # (host, port) as the remote host sees it -> (connection, local listener)
        self._forwards: dict[tuple[str, int], tuple[object, asyncssh.SSHListener]] = {}
        self._forward_lock = asyncio.Lock()

    @classmethod
    def for_instance(cls, topology: Topology, instance: BalancerInstance) -> SshHost:
        """The host of `instance` (its `ssh_host`), with `[executor.ssh]`'s settings."""
        assert instance.ssh_host is not None
        base = SshExecutor.from_topology(topology)
        settings = topology.executor.ssh.model_copy(
            update={
                "port": instance.ssh_port or topology.executor.ssh.port,
                "user": instance.ssh_user or topology.executor.ssh.user,
            }
        )
        executor = SshExecutor(settings, known_hosts=base.known_hosts_path, key_file=base.key_path)
        return cls(executor, instance.ssh_host, settings.port, settings.user)

    async def _conn(self) -> asyncssh.SSHClientConnection:
        try:
            return await self._executor.connection(self._host)
        except SshError as exc:
            raise BalancerError(str(exc)) from None

    def _error(self, what: str, exc: BaseException) -> BalancerError:
        detail = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else exc
        return BalancerError(f"{what} on {self.label}: {detail or type(exc).__name__}")

    async def read_text(self, path: str) -> str | None:
        conn = await self._conn()
        try:
            async with conn.start_sftp_client() as sftp, sftp.open(path, "rb") as f:
                data = await f.read()
        except asyncssh.SFTPNoSuchFile:
            return None
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot read {path}", exc) from None
        return _text(data)

    async def replace(self, path: str, text: str) -> None:
        conn = await self._conn()
        temporary = temporary_beside(path)
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
                renamed = False
                try:
                    async with sftp.open(temporary, "wb") as f:
                        await f.write(text.encode())
                    await sftp.posix_rename(temporary, path)
                    renamed = True
                finally:
                    if not renamed:
                        with contextlib.suppress(asyncssh.Error, OSError):
                            await sftp.remove(temporary)
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot write {path}", exc) from None

    async def remove(self, path: str) -> None:
        conn = await self._conn()
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.remove(path)
        except asyncssh.SFTPNoSuchFile:
            return
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot remove {path}", exc) from None

    async def run(self, argv: Sequence[str], timeout: float) -> CommandOutput:
        if not argv:
            raise BalancerError("empty command")
        conn = await self._conn()
        command = shlex.join(argv)  # every item one literal word for the remote shell
        try:
            async with asyncio.timeout(timeout):
                done = await conn.run(command, check=False, stdin=asyncssh.DEVNULL)
        except TimeoutError:
            raise BalancerError(
                f"{command} did not finish within {timeout:g}s on {self.label}"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot run {argv[0]}", exc) from None
        code = done.exit_status if done.exit_status is not None else -1
        return CommandOutput(tuple(argv), code, _text(done.stdout), _text(done.stderr))

    async def open_unix(self, path: str) -> tuple[Reader, Writer]:
        conn = await self._conn()
        try:
            return await conn.open_unix_connection(path, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot open {path}", exc) from None

    async def open_tcp(self, host: str, port: int) -> tuple[Reader, Writer]:
        conn = await self._conn()
        try:
            return await conn.open_connection(host, port, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise self._error(f"cannot open {host}:{port}", exc) from None

    async def reachable_url(self, url: str) -> str:
        """`url` (as the remote host reaches it) through a local port forward."""
        parts = urlsplit(url)
        if parts.hostname is None:
            raise BalancerError(f"{url!r} names no host")
        target = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        conn = await self._conn()
        async with self._forward_lock:
            held = self._forwards.get(target)
            if held is None or held[0] is not conn:
                try:
                    listener = await conn.forward_local_port("127.0.0.1", 0, *target)
                except (asyncssh.Error, OSError) as exc:
                    raise self._error(f"cannot forward to {target[0]}:{target[1]}", exc) from None
                held = (conn, listener)
                self._forwards[target] = held
        netloc = f"127.0.0.1:{held[1].get_port()}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def close(self) -> None:
        for _, listener in self._forwards.values():
            listener.close()
        self._forwards.clear()
        await self._executor.close()


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def host_for(topology: Topology, instance: BalancerInstance) -> Host:
    """Where `instance` runs: over SSH when it names an `ssh_host`, else here."""
    if instance.ssh_host:
        return SshHost.for_instance(topology, instance)
    return LocalHost()
