"""`SshHost`: a balancer instance's host reached over SSH (see `host.py`, whose
`host_for` imports this module only for an instance with an `ssh_host`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import Sequence
from pathlib import PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import asyncssh

from changeover.balancers.base import BalancerError
from changeover.balancers.host import CommandOutput, Reader, Writer, temporary_beside
from changeover.config import BalancerInstance, Topology
from changeover.executors.ssh import SshError, SshExecutor


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
