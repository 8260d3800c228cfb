"""A binary upgrade: the listening sockets and the pool state of a running
balancer handed to a new master process over a unix socket (SCM_RIGHTS).

The master listens on its control socket (`balancer.control_socket`, default
`$TMPDIR/changeover-<uid>/balancer-<admin port>.sock`, in a 0700 directory).
A new master started with `--take-over` connects (both ends check that the
other runs as the same user) and asks; the old master stops its admin API,
then sends, in one SOCK_SEQPACKET message, every listening socket (public, QA,
redirect, one per worker slot, and the admin one) with a header naming each,
and the shared memory of each of its pool states whose workers still run;
then the state document (admissions, health, sessions, counts, the release
lease, and how to read those states) in chunks. The new master starts its
workers on those very sockets (never closed, never bound again: no
connection is refused meanwhile) and says "ready"; the old master then
drains its workers and exits. A master that itself took over refuses to hand
over again until the workers of the one before it have exited (it alone
knows when they do, so a third master could not count them). Until the old
master has exited (its end of the control connection closes) the new master
counts the old workers' requests in flight, tunnels and sessions from their
shared memory, as a reload counts its old workers'. If the new master goes
away before "ready", the old one takes its admin API back and serves on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.config import Topology

ASK = b"changeover take-over 1"
READY = b"ready"
CHUNK = 32 * 1024  # state document bytes per message
MAX_FDS = 4096
Address = tuple[str, int]


class HandoverError(Exception):
    """The take-over did not happen; the message says why."""


def control_path(topology: Topology) -> Path:
    balancer = topology.balancer
    if balancer.control_socket:
        return topology.resolve_path(balancer.control_socket)
    base = Path(tempfile.gettempdir()) / f"changeover-{os.getuid()}"
    return base / f"balancer-{balancer.admin_listen.port}.sock"


def listen_control(path: Path) -> socket.socket:
    """The old master's end; a socket file left by a killed master is replaced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with suppress(FileNotFoundError):
            path.unlink()
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def same_user(sock: socket.socket) -> bool:
    """Whether the peer runs as this process's user (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", raw)
    return bool(uid == os.getuid())


def give(
    conn: socket.socket,
    named: list[tuple[Address, socket.socket]],
    admin: socket.socket,
    state: dict[str, Any],
    running: Sequence[tuple[int, dict[str, Any]]] = (),
) -> None:
    """Old master (blocking: run it off the event loop): send sockets and state;
    `running`: each pool state whose workers still run, its memory's descriptor
    and how to read it (`PoolState.live_states`)."""
    body = json.dumps(state | {"running": [described for _, described in running]}).encode()
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
    header = json.dumps(
        {
            "listeners": [list(address) for address, _ in named],
            "chunks": len(chunks),
            "running": len(running),
        }
    ).encode()
    # The admin socket last, the states between: a taker that knows no states
    # still finds the listeners first and the admin socket at the end.
    fds = [s.fileno() for _, s in named] + [fd for fd, _ in running] + [admin.fileno()]
    socket.send_fds(conn, [header], fds)
    for chunk in chunks:
        conn.sendall(chunk)


def refuse(conn: socket.socket, why: str) -> None:
    """Old master (blocking): decline a take-over, saying why."""
    socket.send_fds(conn, [json.dumps({"refused": why}).encode()], [])


def wait_ready(conn: socket.socket) -> bool:
    """Old master (blocking): whether the new master said it serves."""
    try:
        return conn.recv(len(READY)) == READY
    except OSError:
        return False


@dataclass
class Handed:
    """What the new master received; `conn` stays open after `ready()`: the old
    master's end closes when it exits."""

    sockets: dict[Address, list[socket.socket]]  # per address, one per worker slot
    admin: socket.socket
    state: dict[str, Any]
    conn: socket.socket
    # The old master's pool states whose workers still run: (memory, description).
    running: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def ready(self) -> None:
        with suppress(OSError):
            self.conn.sendall(READY)

    def close(self) -> None:
        """Give up (the old master serves on); the sockets are closed here only."""
        self.conn.close()
        for group in self.sockets.values():
            for sock in group:
                sock.close()
        self.admin.close()
        for fd, _ in self.running:
            with suppress(OSError):
                os.close(fd)


def take(path: Path, timeout: float) -> Handed:
    """New master (blocking, before its event loop): ask the old one for everything."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
        if not same_user(conn):
            raise HandoverError(f"{path}: the balancer there runs as another user")
        conn.sendall(ASK)
        header, fds, flags, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        if not header:
            raise HandoverError(f"{path}: the running balancer refused to hand over")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"{path}: the hand-over message was cut short")
        described = json.loads(header)
        if "refused" in described:
            conn.close()
            why = described["refused"]
            raise HandoverError(f"{path}: the running balancer refused to hand over: {why}")
        body = b"".join(conn.recv(CHUNK) for _ in range(int(described["chunks"])))
        state = json.loads(body)
    except OSError as exc:
        conn.close()
        raise HandoverError(f"cannot take over from {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        conn.close()
        raise HandoverError(f"{path}: a hand-over this version cannot read: {exc}") from None
    sockets: dict[Address, list[socket.socket]] = {}
    listening = len(described["listeners"])
    for (host, port), fd in zip(described["listeners"], fds, strict=False):
        sockets.setdefault((str(host), int(port)), []).append(socket.socket(fileno=fd))
    memories = fds[listening : listening + int(described.get("running", 0))]
    running = list(zip(memories, state.pop("running", []), strict=False))
    admin = socket.socket(fileno=fds[-1])
    return Handed(sockets, admin, state, conn, running)
