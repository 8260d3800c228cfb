"""WebSocket tunnels: a client and a member connection joined after a 101.

Bytes are relayed both ways as they arrive. wsproto's frame decoder follows
the frames in each direction without rewriting them (an extension such as
permessage-deflate passes through), so that the balancer can end a tunnel as
RFC 6455 7.1 says: a close frame with code 1001 (going away) sent to each
side between two frames, never inside one. A member set OUT has its tunnels
ended that way, spread evenly over `balancer.close_spread` (close_offsets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from wsproto.extensions import Extension
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

GOING_AWAY = 1001
CLOSE_WAIT = 2.0  # for the peers to finish their frame and answer the close, then cut


def close_offsets(count: int, spread: float) -> list[float]:
    """When each of `count` tunnels is closed, in seconds from now: evenly over
    `spread`, the first at once, so no second sees more than count/spread."""
    return [spread * i / count for i in range(count)]


def close_frame(masked: bool) -> bytes:
    """A close frame with code 1001: masked as a client sends it, else as a server."""
    return bytes(FrameProtocol(client=masked, extensions=[]).close(GOING_AWAY, "going away"))


class _PassThrough(Extension):
    """Whatever extension the two ends agreed on (permessage-deflate sets RSV1):
    frames are relayed, never decoded, so every reserved bit is accepted."""

    name = "changeover-pass-through"

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        return RsvBits(True, True, True)


class Frames:
    """Where the frames of one direction begin and end."""

    __slots__ = ("broken", "closed", "decoder")

    def __init__(self, masked: bool) -> None:
        # A client's frames are masked; wsproto's client side reads unmasked ones.
        self.decoder = FrameDecoder(client=not masked, extensions=[_PassThrough()])
        self.closed = False  # a close frame went by
        self.broken = False  # not WebSocket frames: no edge is known

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.decoder.receive_bytes(data)
        try:
            while (frame := self.decoder.process_buffer()) is not None:
                if frame.opcode is Opcode.CLOSE:
                    self.closed = True
        except ParseFailed:
            self.broken = True

    @property
    def at_edge(self) -> bool:
        """Whether what went by ends with a whole frame."""
        decoder = self.decoder
        return not self.broken and decoder.header is None and not len(decoder.buffer)

    def edge_in(self, data: bytes) -> int | None:
        """Feed `data` up to the end of the frame under way: how many bytes that
        took (0: none was under way), or None when it goes on past `data`."""
        pos = 0
        decoder = self.decoder
        while not self.at_edge:
            if self.broken or pos >= len(data):
                return None
            header = decoder.header
            # A header arrives byte by byte (at most 14); then the payload's rest.
            step = 1
            if header is not None:
                step = header.payload_len - decoder.payload_consumed - len(decoder.buffer)
            self.feed(data[pos : pos + max(step, 1)])
            pos += max(step, 1)
        return min(pos, len(data))


class Side(Protocol):
    transport: asyncio.Transport | None


class Tunnel:
    """One open WebSocket: the client's connection and the member's."""

    __slots__ = (
        "client",
        "down",
        "ended",
        "leaving",
        "member",
        "on_end",
        "scheduled",
        "told_client",
        "told_member",
        "up",
        "upstream",
    )

    def __init__(
        self, client: Side, upstream: Side, member: int, on_end: Callable[[Tunnel], None]
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.member = member
        self.on_end = on_end
        self.up = Frames(masked=True)  # client -> member
        self.down = Frames(masked=False)  # member -> client
        self.scheduled = False  # a close is planned (its member is out)
        self.leaving = False  # the balancer is closing it
        self.told_client = self.told_member = False  # our close frame went there
        self.ended = False

    def from_client(self, data: bytes) -> None:
        if self.leaving and not self.told_member:
            edge = self.up.edge_in(data)
            if edge is None:
                _write(self.upstream, data)
                return
            _write(self.upstream, data[:edge])
            self._tell_member()
            data = data[edge:]
        if self.told_member:
            # The client's own frames now only say when it has answered our close.
            self.up.feed(data)
            if self.up.closed and self.told_client:
                _close(self.client)
            return
        self.up.feed(data)
        _write(self.upstream, data)

    def from_member(self, data: bytes) -> None:
        if self.told_client:
            return  # the member has been told to go: nothing more for the client
        if self.leaving:
            edge = self.down.edge_in(data)
            _write(self.client, data if edge is None else data[:edge])
            if edge is not None:
                self._tell_client()
            return
        self.down.feed(data)
        _write(self.client, data)

    def go_away(self) -> None:
        """Close with 1001 to both sides, each at the end of the frame under way."""
        if self.leaving or self.ended:
            return
        self.leaving = True
        if self.down.at_edge:
            self._tell_client()
        if self.up.at_edge:
            self._tell_member()
        asyncio.get_running_loop().call_later(CLOSE_WAIT, self._cut)

    def _tell_client(self) -> None:
        self.told_client = True
        _write(self.client, close_frame(masked=False))
        if self.up.closed:  # the client had already begun to close
            _close(self.client)

    def _tell_member(self) -> None:
        self.told_member = True
        _write(self.upstream, close_frame(masked=True))
        _close(self.upstream)

    def _cut(self) -> None:
        """A peer did not finish its frame or answer the close in time."""
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()

    def lost(self, side: Side) -> None:
        """One connection closed: the tunnel ends, the other one closes."""
        if self.ended:
            return
        self.ended = True
        _close(self.upstream if side is self.client else self.client)
        self.on_end(self)


def _write(side: Side, data: bytes) -> None:
    if data and side.transport is not None:
        side.transport.write(data)


def _close(side: Side) -> None:
    if side.transport is not None:
        side.transport.close()
