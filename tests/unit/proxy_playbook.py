"""A Playbook for the embedded balancer's protocol objects, without sockets.

Like mitmproxy's layer tests: the real `protocol.Client` and `protocol.Upstream`
run on in-memory transports; a test feeds byte chunks to either end and takes
the exact bytes the balancer wrote to the other. The worker's `connect` hands
out in-memory upstream connections instead of opening sockets, and says which
through `Playbook.upstream()`.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from changeover.config import Topology, parse
from changeover.proxy.protocol import Client, Upstream, Worker
from changeover.proxy.routing import PUBLIC
from changeover.proxy.state import SharedState

CLIENT_IP = "203.0.113.7"


def topology(**balancer: Any) -> Topology:
    """Members a1 (index 0, live) and b1 (index 1, out, as after a release)."""
    clusters = [
        {"name": c, "members": [{"name": f"{c}1", "port": p}]}
        for c, p in (("a", 9001), ("b", 9002))
    ]
    return parse({"balancer": balancer, "clusters": clusters})


class FakeTransport(asyncio.Transport):
    """Records what the balancer writes; close and abort end the connection at once."""

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True
        self.written_after_close = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.written_after_close = True
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            # As a real transport does: connection_lost comes from the loop, later.
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


class End:
    """One side of the balancer: a protocol object and its in-memory transport."""

    def __init__(self, protocol: asyncio.Protocol, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def feed(self, *chunks: bytes) -> None:
        """Deliver `chunks` as separate reads, as the network might split them."""
        for chunk in chunks:
            if self.transport.closing:
                return
            self.protocol.data_received(chunk)

    def take(self) -> bytes:
        """What the balancer wrote to this side since the last take()."""
        data = bytes(self.transport.written)
        self.transport.written.clear()
        return data

    def hang_up(self) -> None:
        """The peer closes its end."""
        if not self.transport.closing:
            self.transport.closing = True
            self.protocol.connection_lost(None)

    @property
    def closed(self) -> bool:
        return self.transport.closing


class PlaybookWorker(Worker):
    def __init__(self, topology: Topology, shared: SharedState) -> None:
        super().__init__(topology, shared, 0)
        self.connected: asyncio.Queue[End] = asyncio.Queue()

    async def connect(self, member: int) -> Upstream:
        upstream = Upstream(self, member)
        transport = FakeTransport(upstream)
        upstream.connection_made(transport)
        # Client._connect attaches it right after this returns, in the same step.
        self.connected.put_nowait(End(upstream, transport))
        return upstream


class Playbook:
    """A worker with in-memory connections; `close()` when done."""

    def __init__(self, topo: Topology | None = None) -> None:
        self.topology = topo or topology()
        members = sum(len(c.members) for c in self.topology.clusters)
        self.shared = SharedState(members, 1)
        self.shared.publish([0] + [2] * (members - 1), [True] * members)
        self.worker = PlaybookWorker(self.topology, self.shared)
        self._port = 50000

    def client(self, scope: int = PUBLIC) -> End:
        factory = partial(Client, self.worker, scope, False, b"127.0.0.1:8080")
        protocol = factory()
        self._port += 1
        transport = FakeTransport(protocol, (CLIENT_IP, self._port))
        protocol.connection_made(transport)
        return End(protocol, transport)

    async def upstream(self) -> End:
        """The next upstream connection the balancer opens."""
        return await asyncio.wait_for(self.worker.connected.get(), 5)

    def opened(self) -> int:
        """Upstream connections opened and not yet handed out by upstream()."""
        return self.worker.connected.qsize()

    async def settle(self) -> None:
        """Let the callbacks the loop holds (connection_lost, tasks) run."""
        for _ in range(3):
            await asyncio.sleep(0)

    def close(self) -> None:
        self.worker.close()
