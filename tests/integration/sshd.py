"""A real OpenSSH server on loopback addresses, for tests that must cross a real SSH hop.

Usage (any test, including end-to-end ones)::

    async with running_sshd(cluster_hosts(1, 3) + cluster_hosts(2, 3)) as server:
        executor = SshExecutor(server.settings())
        ...

The server runs from a temporary directory with its own host key, an authorized
client key and a `known_hosts` file listing every host it listens on; the system
sshd and its configuration are never touched. Linux routes all of 127.0.0.0/8 to
`lo`, but a socket bound to 127.0.0.1 only answers 127.0.0.1, so sshd gets one
`ListenAddress` per member address: each member is a distinct host, as on a fleet.
One sshd listens on at most 16 addresses, so larger fleets get one sshd process
per 16 hosts, all on the same port with the same host key and authorized key.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import psutil

from changeover.config import SshSettings
from tests.helpers import free_port, require_binary

PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it
START_TIMEOUT = 10.0
MAX_LISTEN = 16  # sshd's MAX_LISTEN_SOCKS: "Too many listen sockets" beyond it


def cluster_hosts(cluster: int, count: int) -> list[str]:
    """Distinct loopback addresses for a cluster: 127.0.<cluster>.1 ... .<count>."""
    if not 1 <= cluster <= 254 or not 1 <= count <= 254:
        raise ValueError("cluster and count must be within 1..254")
    return [f"127.0.{cluster}.{i}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class SshdServer:
    """What a client needs to reach the running sshd."""

    hosts: tuple[str, ...]
    port: int
    user: str
    key_file: Path  # the authorized client's private key
    known_hosts: Path  # one line per host, "[host]:port key"
    host_key_line: str  # "ssh-ed25519 AAAA..." of the server
    log_file: Path  # sshd's own log (LogLevel VERBOSE)
    directory: Path

    def settings(self, **overrides: Any) -> SshSettings:
        """SshSettings that reach this server with strict host key checking."""
        values: dict[str, Any] = {
            "user": self.user,
            "port": self.port,
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
        }
        values.update(overrides)
        return SshSettings(**values)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def accepted(self, host: str | None = None) -> int:
        """How many connections sshd accepted (authenticated), on `host` or on any."""
        # VERBOSE logs "Connection from A port P on HOST port N" before authentication
        # and "Accepted publickey for USER from A port P" after it. One client port
        # can connect to two member addresses at once, so (A, P) is not unique: each
        # acceptance goes with the earliest connection from (A, P) not yet accepted.
        waiting: dict[tuple[str, str], deque[str]] = {}
        count = 0
        for m in _LOG_EVENT.finditer(self.log()):
            if m["dst"] is not None:
                waiting.setdefault((m["src"], m["sport"]), deque()).append(m["dst"])
                continue
            on = waiting.get((m["asrc"], m["asport"]))
            dst = on.popleft() if on else None
            if host is None or dst == host:
                count += 1
        return count


_LOG_EVENT = re.compile(
    r"Connection from (?P<src>\S+) port (?P<sport>\d+) on (?P<dst>\S+) port"
    r"|Accepted publickey for \S+ from (?P<asrc>\S+) port (?P<asport>\d+)"
)


def _write_keys(directory: Path, client_key: Path | None) -> tuple[Path, Path, Path, str]:
    """Host key, client key and authorized_keys, as `ssh-keygen -t ed25519 -N ''` would.

    Returns (host key, client key, authorized_keys, host public key line).
    """
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    (directory / "home").mkdir(exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519", comment="changeover-test-host")
    host_key_path = directory / "ssh_host_ed25519_key"
    host_key.write_private_key(str(host_key_path))
    if client_key is None:
        client_key = directory / "id_ed25519"
        asyncssh.generate_private_key("ssh-ed25519", comment="changeover-test-client")\
            .write_private_key(str(client_key))  # fmt: skip
        client_key.chmod(0o600)
    authorized = directory / "authorized_keys"
    asyncssh.read_private_key(str(client_key)).write_public_key(str(authorized))
    for path in (host_key_path, authorized):
        path.chmod(0o600)  # sshd ignores a host key that others can read
    line = host_key.export_public_key().decode().split()
    return host_key_path, client_key, authorized, f"{line[0]} {line[1]}"


def _config(
    directory: Path,
    index: int,
    hosts: Sequence[str],
    port: int,
    host_key: Path,
    authorized: Path,
    extra: Mapping[str, str],
) -> Path:
    options = {
        "Port": str(port),
        "HostKey": str(host_key),
        "PidFile": str(directory / f"sshd.{index}.pid"),
        "AuthorizedKeysFile": str(authorized),
        "StrictModes": "no",
        "UsePAM": "no",
        "PermitRootLogin": "yes",
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "Subsystem": "sftp internal-sftp",
        "LogLevel": "VERBOSE",
        # A release opens one connection per member at once; the default
        # MaxStartups 10:30:100 would randomly drop some of 36 concurrent handshakes.
        "MaxStartups": "1000",
        "MaxSessions": "100",
        "PrintMotd": "no",
        "AcceptEnv": "none",
        # Sessions get a home of their own: the test host stays hermetic and the
        # local user's ~/.bashrc (bash reads it under sshd) adds no cost per command.
        "SetEnv": f"HOME={directory / 'home'}",
        **extra,
    }
    lines = [f"ListenAddress {host}" for host in hosts]
    lines += [f"{key} {value}" for key, value in options.items()]
    path = directory / f"sshd_config.{index}"
    path.write_text("\n".join(lines) + "\n")
    return path


def _kill_tree(pid: int) -> None:
    """Kill sshd and the per-connection sshd processes it forked.

    Killed processes whose parent is gone become zombies until init reaps them,
    which can take seconds; a zombie holds no socket, so it counts as gone here.
    sshd itself is asyncio's child to reap.
    """
    try:
        parent = psutil.Process(pid)
        forked = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in [*reversed(forked), parent]:
        with suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in forked):
        time.sleep(0.01)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _wait_listening(
    procs: Sequence[asyncio.subprocess.Process], log_file: Path, hosts: Sequence[str], port: int
) -> bool:
    """True once sshd listens on every host; False if a bind failed (port taken)."""
    wanted = {f"Server listening on {host} port {port}." for host in hosts}
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(log_file.read_text, errors="replace")
        if "Address already in use" in text:
            return False
        if all(line in text for line in wanted):
            return True
        for proc in procs:
            if proc.returncode is not None:
                raise RuntimeError(f"sshd exited with {proc.returncode}:\n{text}")
        await asyncio.sleep(0.02)
    raise RuntimeError(f"sshd did not listen within {START_TIMEOUT}s:\n{text}")


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        await asyncio.to_thread(_kill_tree, proc.pid)
        await proc.wait()
    procs.clear()


@asynccontextmanager
async def running_sshd(
    hosts: Sequence[str],
    *,
    extra_config: Mapping[str, str] | None = None,
    client_key: Path | None = None,
    directory: Path | None = None,
    niceness: int = 0,
) -> AsyncIterator[SshdServer]:
    """Start sshd listening on `hosts` (loopback addresses), yield it, kill it.

    `extra_config` adds or overrides sshd_config options (e.g. AllowTcpForwarding).
    `client_key` authorizes that private key instead of a new one (several servers,
    one client). `directory` keeps the files there instead of a removed temp dir.
    `niceness` lowers the priority of sshd and all it runs (hosts that stand for
    other machines must not take this one's CPU from the balancer and the probe).
    Skips the test without an sshd binary, fails instead with CHANGEOVER_REQUIRE_REAL=1.
    """
    sshd = require_binary("sshd", "/usr/sbin/sshd")
    if not hosts:
        raise ValueError("running_sshd needs at least one host address")
    owned = directory is None
    workdir = directory or Path(
        await asyncio.to_thread(tempfile.mkdtemp, prefix="changeover-sshd-")
    )
    procs: list[asyncio.subprocess.Process] = []
    try:
        host_key, key_file, authorized, host_key_line = await asyncio.to_thread(
            _write_keys, workdir, client_key
        )
        log_file = workdir / "sshd.log"
        groups = [hosts[i : i + MAX_LISTEN] for i in range(0, len(hosts), MAX_LISTEN)]
        for _attempt in range(5):  # the free port may be taken on another address
            port = free_port(hosts[0])
            log_file.write_bytes(b"")
            for index, group in enumerate(groups):
                config = await asyncio.to_thread(
                    _config, workdir, index, group, port, host_key, authorized, extra_config or {}
                )
                with log_file.open("ab") as log:  # every instance appends to one log
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            str(sshd), "-D", "-e", "-f", str(config),
                            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
                        )
                    )  # fmt: skip
            if await _wait_listening(procs, log_file, hosts, port):
                break
            await _stop(procs)
        else:
            raise RuntimeError(f"sshd found no free port:\n{log_file.read_text()}")
        known_hosts = workdir / "known_hosts"
        lines = "".join(f"[{h}]:{port} {host_key_line}\n" for h in hosts)
        await asyncio.to_thread(known_hosts.write_text, lines)
        yield SshdServer(
            hosts=tuple(hosts),
            port=port,
            user=getpass.getuser(),
            key_file=key_file,
            known_hosts=known_hosts,
            host_key_line=host_key_line,
            log_file=log_file,
            directory=workdir,
        )
    finally:
        await _stop(procs)
        if owned:
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
