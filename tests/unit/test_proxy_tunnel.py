"""The pieces of a WebSocket tunnel: where frames end, close frames, the close schedule."""

from __future__ import annotations

from wsproto.frame_protocol import FrameProtocol

from changeover.proxy.tunnel import Frames, close_frame, close_offsets


def frames(masked: bool, *payloads: bytes) -> list[bytes]:
    sender = FrameProtocol(client=masked, extensions=[])
    return [bytes(sender.send_data(p, fin=True)) for p in payloads]


def test_close_offsets_spread_evenly_and_never_at_once() -> None:
    offsets = close_offsets(20, 2.0)
    assert offsets[0] == 0.0 and offsets[-1] < 2.0
    for t in offsets:  # no second holds more than 20 / 2
        assert sum(1 for u in offsets if t <= u < t + 1) <= 10
    assert close_offsets(0, 30.0) == []


def test_close_frames_say_1001_masked_for_the_member_only() -> None:
    for masked in (True, False):
        reader = FrameProtocol(client=not masked, extensions=[])
        reader.receive_bytes(close_frame(masked))
        (frame,) = list(reader.received_frames())
        assert frame.payload[0] == 1001
    assert close_frame(False)[1] & 0x80 == 0 and close_frame(True)[1] & 0x80


def test_an_edge_is_found_inside_a_read_at_any_split() -> None:
    first, second = frames(True, b"x" * 300, b"yz")
    stream = first + second
    for split in range(1, len(stream)):
        edges = Frames(masked=True)
        edges.feed(stream[:split])
        if split == len(first):
            assert edges.at_edge
            continue
        assert not edges.at_edge
        rest = stream[split:]
        taken = edges.edge_in(rest)
        # The frame under way ends where the first frame or the second does.
        assert taken == (len(first) - split if split < len(first) else len(rest)), split
        assert edges.at_edge


def test_compressed_frames_pass_and_a_close_is_seen() -> None:
    edges = Frames(masked=False)
    deflated = bytearray(frames(False, b"abc")[0])
    deflated[0] |= 0x40  # RSV1, as permessage-deflate sets it
    edges.feed(bytes(deflated))
    assert edges.at_edge and not edges.broken and not edges.closed
    edges.feed(close_frame(False))
    assert edges.closed


def test_bytes_that_are_not_frames_have_no_edge() -> None:
    edges = Frames(masked=True)
    edges.feed(b"GET / HTTP/1.1\r\n")
    assert edges.broken and not edges.at_edge and edges.edge_in(b"more") is None
