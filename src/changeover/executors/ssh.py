"""Run release commands on members over SSH (asyncssh).

One connection per member host, opened on first use and reused by every later
step of the release; concurrent callers for the same host wait on one connect.
Host keys are checked against known_hosts unless the topology opts out.

A command is sent as ``echo changeover-pid:$$; exec <shlex.join(argv)>``: the
quoting keeps every argument one literal word through the remote POSIX shell,
and the announced pid is the session leader sshd created with setsid(), so a
timed-out command is killed with its whole process group over a second channel.
(The SSH "signal" request would be simpler, but OpenSSH refuses it for root
logins and servers without privilege separation.) The marker line is removed
from the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import asyncssh

from changeover.config import Cluster, Member, SshSettings, Topology
from changeover.executors.base import CommandResult

OUTPUT_LIMIT = 64 * 1024  # bytes of output kept per command: the last ones
KILL_TIMEOUT = 5.0  # seconds allowed for killing a timed-out command
KEEPALIVE_INTERVAL = 15.0  # detect a dead pooled connection between steps
# Handshakes at once while a drain waits: sshd's default MaxStartups (10:30:100)
# starts dropping unauthenticated connections beyond 10.
WARM_AT_ONCE = 10
CLOSE_AT_ONCE = 10  # connections closed at once in the background (`close_cluster`)
_READ_SIZE = 64 * 1024
_PID_LINE = re.compile(rb"(^|\n)changeover-pid:(\d+)\n")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SshError(Exception):
    """A member that cannot be reached; the message names the host and the cause."""


def parse_jump_host(value: str) -> tuple[str | None, str, int]:
    """(user, host, port) from "[user@]host[:port]"; IPv6 hosts go in brackets."""
    user, at, rest = value.rpartition("@")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"jump host {value!r}: expected [user@]host[:port]")
        port_text = tail[1:]
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""  # a bare host, or a bare IPv6 address
    if not host or (at and not user):
        raise ValueError(f"jump host {value!r}: expected [user@]host[:port]")
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"jump host {value!r}: port must be 1..65535")
    return (user or None), host, int(port_text) if port_text else 22


def remote_command(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """The command line sent to the remote shell; every argv item stays one word.

    `env` is exported by the shell itself: sshd passes few client variables on.
    """
    if not argv:
        raise ValueError("empty argv")
    exports = ""
    for name, value in (env or {}).items():
        if not name.isidentifier() or not name.isascii():
            raise ValueError(f"not an environment variable name: {name!r}")
        exports += f"export {name}={shlex.quote(value)}; "
    return f"echo changeover-pid:$$; {exports}exec {shlex.join(argv)}"


def parse_sha256sum(output: str) -> str | None:
    """The digest printed by `sha256sum -- FILE`, or None if it printed none."""
    first = output.strip().splitlines()[0] if output.strip() else ""
    # sha256sum prefixes the line with a backslash when it escapes the file name.
    digest = first.removeprefix("\\").split(" ", 1)[0].lower()
    return digest if _SHA256.match(digest) else None


class OutputTail:
    """Keeps the last `limit` bytes of a stream and counts what it dropped."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self._limit = limit
        self._buf = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]
            self.dropped += excess

    def text(self) -> str:
        body = self._buf.decode("utf-8", errors="replace")
        if self.dropped:
            return f"[changeover: {self.dropped} earlier bytes of output omitted]\n{body}"
        return body


class _PidFilter:
    """Finds the pid marker at the start of stdout and passes everything else on.

    Output a login script prints before the marker is kept; a shell that prints
    no marker within `limit` bytes leaves the pid unknown (the command is then
    only abandoned on timeout, not killed).
    """

    def __init__(self, sink: OutputTail, limit: int = OUTPUT_LIMIT) -> None:
        self._sink = sink
        self._limit = limit
        self._head: bytearray | None = bytearray()
        self.pid: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self._head is None:
            self._sink.add(chunk)
            return
        self._head += chunk
        match = _PID_LINE.search(self._head)
        if match:
            self.pid = int(match[2])
            self._sink.add(bytes(self._head[: match.end(1)]))
            self._sink.add(bytes(self._head[match.end() :]))
            self._head = None
        elif len(self._head) > self._limit:
            self.flush()

    def flush(self) -> None:
        if self._head is not None:
            self._sink.add(bytes(self._head))
            self._head = None


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's wording
    return str(exc) or type(exc).__name__


class SshExecutor:
    """The Executor for members reached over SSH.

    `known_hosts` and `key_file` override the settings' paths (the CLI passes
    them resolved against the config file; see `from_topology`).
    """

    def __init__(
        self,
        settings: SshSettings,
        *,
        known_hosts: Path | None = None,
        key_file: Path | None = None,
        output_limit: int = OUTPUT_LIMIT,
    ) -> None:
        self._settings = settings
        self._jump = parse_jump_host(settings.jump_host) if settings.jump_host else None
        self._known_hosts_path = (
            known_hosts or Path(settings.known_hosts or "~/.ssh/known_hosts").expanduser()
        )
        self._key_path = key_file or (
            Path(settings.key_file).expanduser() if settings.key_file else None
        )
        self._output_limit = output_limit
        self._prepared = False
        self._prepare_lock = asyncio.Lock()
        self._trusted: asyncssh.SSHKnownHosts | None = None
        self._client_keys: list[asyncssh.SSHKey] | None = None
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._jump_conn: asyncssh.SSHClientConnection | None = None
        self._jump_lock = asyncio.Lock()

    @classmethod
    def from_topology(cls, topology: Topology) -> SshExecutor:
        """An executor for `[executor.ssh]`, relative paths taken from the config's folder."""
        ssh = topology.executor.ssh

        def resolve(value: str | None) -> Path | None:
            return topology.resolve_path(str(Path(value).expanduser())) if value else None

        return cls(ssh, known_hosts=resolve(ssh.known_hosts), key_file=resolve(ssh.key_file))

    @property
    def known_hosts_path(self) -> Path:
        return self._known_hosts_path

    @property
    def key_path(self) -> Path | None:
        return self._key_path

    async def connection(self, host: str) -> asyncssh.SSHClientConnection:
        """The pooled connection to `host`, opened (or reopened) on demand; SshError
        if it cannot be reached. For other users of the same settings (a balancer
        instance on that host)."""
        return await self._pooled(host, self._settings.port, self._settings.user)

    # --- the Executor protocol ---------------------------------------------

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult:
        started = time.monotonic()
        try:
            conn = await self._connection(member)
        except SshError as exc:
            return CommandResult(member.name, tuple(argv), None, str(exc), _since(started))
        return await self._execute(conn, cluster, member, argv, timeout, started)

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        """SFTP `src` to a temporary name beside `dest`, check its SHA-256 there, rename.

        `dest` is replaced atomically and only by a verified copy.
        """
        started = time.monotonic()
        argv = ("upload", str(src), dest)

        def result(status: int | None, output: str) -> CommandResult:
            return CommandResult(member.name, argv, status, output, _since(started))

        try:
            conn = await self._connection(member)
        except SshError as exc:
            return result(None, str(exc))
        where = f"{member.host}:{dest}"
        temp = f"{dest}.changeover-{uuid.uuid4().hex[:12]}.tmp"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline), conn.start_sftp_client() as sftp:
                try:
                    local, size = await asyncio.to_thread(_sha256_file, src)
                except OSError as exc:
                    return result(1, f"cannot read {src}: {_describe(exc)}")
                renamed = False
                try:
                    await self._put(sftp, src, temp)
                    check = await self._execute(
                        conn, cluster, member, ["sha256sum", "--", temp], deadline - loop.time()
                    )
                    if not check.ok:
                        status = None if check.exit_status is None else 1
                        return result(status, f"cannot verify {where}: {check.output.strip()}")
                    remote = parse_sha256sum(check.output)
                    if remote != local:
                        return result(
                            1,
                            f"checksum mismatch for {where}: local sha256 {local}, "
                            f"remote {remote or check.output.strip()!r}; {dest} left unchanged",
                        )
                    await sftp.posix_rename(temp, dest)
                    renamed = True
                finally:
                    if not renamed:
                        await _remove_quietly(sftp, temp)
        except TimeoutError:
            return result(None, f"upload to {where} timed out after {timeout:g}s")
        except (asyncssh.Error, OSError) as exc:
            if conn.is_closed():
                self._forget(self._key(member), conn)
            return result(1, f"upload to {where} failed: {_describe(exc)}")
        return result(0, f"uploaded {src} to {where} ({size} bytes, sha256 {local} verified)")

    async def warm(self, cluster: Cluster) -> None:
        limit = asyncio.Semaphore(WARM_AT_ONCE)

        async def one(member: Member) -> None:
            async with limit:
                with contextlib.suppress(SshError):
                    await self._connection(member)

        logins = {self._key(m): m for m in cluster.members}  # one member per connection
        await asyncio.gather(*(one(m) for m in logins.values()))

    async def close_cluster(self, cluster: Cluster) -> None:
        # Out of the pool first: whoever asks for one of these hosts meanwhile
        # (a member of another cluster on the same login) gets a new connection.
        keys = {self._key(m) for m in cluster.members}
        conns = [conn for key in keys if (conn := self._conns.pop(key, None)) is not None]
        try:  # a few at a time: the release goes on meanwhile
            while conns:
                batch, conns = conns[:CLOSE_AT_ONCE], conns[CLOSE_AT_ONCE:]
                for conn in batch:
                    conn.close()
                await asyncio.gather(*(conn.wait_closed() for conn in batch))
        finally:
            for conn in conns:  # cancelled: the rest close without being waited for
                conn.close()

    async def close(self) -> None:
        conns, jump = list(self._conns.values()), self._jump_conn
        self._conns.clear()
        self._jump_conn = None
        # All at once: one after another, 200 closes cost a round trip each.
        await asyncio.gather(*(_closed(conn) for conn in conns))
        if jump is not None:  # last: the others may be tunnelled through it
            await _closed(jump)

    # --- internals -----------------------------------------------------------

    async def _put(self, sftp: asyncssh.SFTPClient, src: Path, remote: str) -> None:
        await sftp.put(str(src), remote, preserve=True)

    async def _execute(
        self,
        conn: asyncssh.SSHClientConnection,
        cluster: Cluster,
        member: Member,
        argv: list[str],
        timeout: float,
        started: float | None = None,
    ) -> CommandResult:
        started = time.monotonic() if started is None else started
        tail = OutputTail(self._output_limit)
        stdout = _PidFilter(tail, self._output_limit)

        def result(status: int | None, note: str = "") -> CommandResult:
            text = tail.text()
            if note:
                text += ("\n" if text and not text.endswith("\n") else "") + f"[changeover: {note}]"
            return CommandResult(member.name, tuple(argv), status, text, _since(started))

        # The same variables the local executor sets, so scripts work with either.
        command = remote_command(
            argv, {"CHANGEOVER_CLUSTER": cluster.name, "CHANGEOVER_MEMBER": member.name}
        )
        proc: asyncssh.SSHClientProcess[bytes] | None = None
        try:
            # Opening the channel counts too: a silently dead connection hangs there.
            async with asyncio.timeout(max(timeout, 0.0)):
                proc = await conn.create_process(command, stdin=asyncssh.DEVNULL, encoding=None)
                await asyncio.gather(_pump(proc.stdout, stdout.feed), _pump(proc.stderr, tail.add))
                await proc.wait_closed()
        except TimeoutError:
            stdout.flush()
            if proc is None:
                self._forget(self._key(member), conn)
                return result(None, f"no session opened on {member.host} within {timeout:g}s")
            killed = await self._kill(conn, self._key(member), stdout.pid)
            return result(None, f"timed out after {timeout:g}s on {member.host}; {killed}")
        except (asyncssh.Error, OSError) as exc:
            stdout.flush()
            if conn.is_closed():
                self._forget(self._key(member), conn)
            what = "cannot start the command on" if proc is None else "lost the command on"
            return result(None, f"{what} {member.host}: {_describe(exc)}")
        finally:
            if proc is not None:
                proc.close()
        stdout.flush()
        code = proc.returncode
        if code is None:
            return result(None, f"{member.host} closed the session without an exit status")
        if code < 0:  # killed by a signal: report it the way a shell does
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return result(128 - code, f"killed by signal {name}")
        return result(code)

    async def _kill(self, conn: asyncssh.SSHClientConnection, key: str, pid: int | None) -> str:
        if pid is None:
            return "its pid was never announced, so it may still be running"
        # The pid is the session leader: -pid names its process group.
        command = f"kill -KILL -- -{pid} 2>/dev/null || kill -KILL -- {pid}"
        try:
            async with asyncio.timeout(KILL_TIMEOUT):
                done = await conn.run(command, check=False, stdin=asyncssh.DEVNULL)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            self._forget(key, conn)  # it could not even run `kill`: reconnect next time
            return f"could not kill process group {pid}: {_describe(exc)}"
        if done.exit_status != 0:
            return f"could not kill process group {pid} (kill exited {done.exit_status})"
        return f"killed its process group {pid}"

    def _login(self, member: Member) -> tuple[str, int, str | None]:
        """(host, port, user) of a member: its own ssh_port/ssh_user over the settings'."""
        port = member.ssh_port or self._settings.port
        return member.host, port, member.ssh_user or self._settings.user

    def _key(self, member: Member) -> str:
        """The pooled connection a member uses: one per host, port and user."""
        return _login_key(*self._login(member))

    async def _connection(self, member: Member) -> asyncssh.SSHClientConnection:
        return await self._pooled(*self._login(member))

    async def _pooled(self, host: str, port: int, user: str | None) -> asyncssh.SSHClientConnection:
        key = _login_key(host, port, user)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is None or conn.is_closed():
                conn = await self._connect(host, port, user)
                self._conns[key] = conn
            return conn

    def _forget(self, key: str, conn: asyncssh.SSHClientConnection) -> None:
        """Drop a broken pooled connection so the next command reconnects.

        Only for a connection that is closed or unresponsive: others on the same
        host may be running commands on it.
        """
        if self._conns.get(key) is conn:
            del self._conns[key]
            conn.abort()

    async def _prepare(self) -> None:
        """Read known_hosts and the key file once, off the event loop."""
        async with self._prepare_lock:
            if self._prepared:
                return
            if not self._settings.insecure_ignore_host_keys:
                path = self._known_hosts_path
                try:
                    self._trusted = await asyncio.to_thread(asyncssh.read_known_hosts, str(path))
                except OSError as exc:
                    raise SshError(
                        f"cannot read known_hosts file {path}: {_describe(exc)}; add the members' "
                        "host keys (ssh-keyscan, then verify the fingerprints) or, in a lab only, "
                        "set insecure_ignore_host_keys = true"
                    ) from None
            if self._key_path is not None:
                path = self._key_path
                try:
                    key = await asyncio.to_thread(asyncssh.read_private_key, str(path))
                except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                    raise SshError(
                        f"cannot use key file {path}: {_describe(exc)} (a key with a "
                        "passphrase must be loaded into an SSH agent instead)"
                    ) from None
                self._client_keys = [key]
            self._prepared = True

    async def _jump_connection(self) -> asyncssh.SSHClientConnection | None:
        if self._jump is None:
            return None
        async with self._jump_lock:
            if self._jump_conn is None or self._jump_conn.is_closed():
                user, host, port = self._jump
                self._jump_conn = await self._connect(
                    host, port, user or self._settings.user, jump=False
                )
            return self._jump_conn

    async def _connect(
        self, host: str, port: int, user: str | None, *, jump: bool = True
    ) -> asyncssh.SSHClientConnection:
        await self._prepare()
        tunnel = await self._jump_connection() if jump else None
        label = f"{user + '@' if user else ''}{host}:{port}"
        via = f" via jump host {self._settings.jump_host}" if tunnel else ""
        options = asyncssh.SSHClientConnectionOptions(
            username=user or (),
            known_hosts=self._trusted,  # None: no checking (insecure opt-out)
            client_keys=self._client_keys or (),
            agent_path=None if self._client_keys else (),  # an explicit key: no agent
            connect_timeout=self._settings.connect_timeout,
            keepalive_interval=KEEPALIVE_INTERVAL,
        )
        try:
            # config=None: ~/.ssh/config is not read, the topology is the whole truth.
            return await asyncssh.connect(
                host, port, tunnel=tunnel or (), config=None, options=options
            )
        except asyncssh.HostKeyNotVerifiable:
            raise SshError(self._host_key_problem(host, port, label)) from None
        except asyncssh.PermissionDenied:
            raise SshError(
                f"SSH authentication failed for {label}{via}: "
                f"{'key ' + str(self._key_path) if self._key_path else 'agent/default keys'} "
                "not accepted"
            ) from None
        except TimeoutError:
            raise SshError(
                f"cannot connect to {label}{via}: no answer within "
                f"{self._settings.connect_timeout:g}s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"cannot connect to {label}{via}: {_describe(exc)}") from None

    def _host_key_problem(self, host: str, port: int, label: str) -> str:
        assert self._trusted is not None  # verification only fails when checking is on
        known = asyncssh.match_known_hosts(self._trusted, host, host, port if port != 22 else None)
        if known[0]:
            return (
                f"HOST KEY MISMATCH for {label}: the key it presented differs from the one in "
                f"{self._known_hosts_path}; refusing to connect (a reinstalled host, or someone "
                "in the middle: check before replacing the entry)"
            )
        return (
            f"unknown host key for {label}: no entry in {self._known_hosts_path}; refusing to "
            f"connect (add it with `ssh-keyscan -p {port} {host}` after verifying the fingerprint)"
        )


def _login_key(host: str, port: int, user: str | None) -> str:
    return f"{user or ''}@{host}:{port}"


async def _closed(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await conn.wait_closed()


async def _pump(stream: asyncssh.SSHReader[bytes], sink: Callable[[bytes], None]) -> None:
    while chunk := await stream.read(_READ_SIZE):
        sink(chunk)


async def _remove_quietly(sftp: asyncssh.SFTPClient, path: str) -> None:
    """Remove a temporary upload; a failure to do so must not hide the real error."""
    with contextlib.suppress(asyncssh.SFTPError, OSError):
        await sftp.remove(path)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
