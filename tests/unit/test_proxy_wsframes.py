"""proxy/wsframes.py: frame boundaries of a relayed WebSocket stream and the Close frame a
stopping proxy sends (RFC 6455 §5.2, §5.5.1, §7.4.1). Frames are made by the `websockets`
library, an encoder independent of the tracker; streams are cut at every place and fed in
pieces, as TCP reads cut them."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from confedge.proxy.wsframes import GOING_AWAY, FrameBoundary, close_frame

_DATA_OPS = [Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG]


def _frame(op: Opcode, size: int, *, mask: bool, fin: bool = True) -> bytes:
    return Frame(op, b"\xa5" * size, fin=fin).serialize(mask=mask)


def _ends(frames: list[bytes]) -> set[int]:
    """The stream offsets where a frame ends (0: before the first)."""
    ends, at = {0}, 0
    for f in frames:
        at += len(f)
        ends.add(at)
    return ends


def test_every_length_form_ends_where_its_frame_ends() -> None:
    # 7-bit lengths (0, 125), 16-bit (126, 65535), 64-bit (65536): §5.2; masked and not.
    for mask in (False, True):
        frames = [_frame(Opcode.BINARY, n, mask=mask) for n in (0, 1, 125, 126, 65535, 65536)]
        stream = b"".join(frames)
        ends = _ends(frames)
        fb = FrameBoundary()
        for i in range(len(stream)):
            assert fb.at_boundary == (i in ends), (mask, i)
            fb.feed(stream[i : i + 1])
        assert fb.at_boundary


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_DATA_OPS), st.integers(0, 70_000), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.lists(st.integers(1, 5000), min_size=1, max_size=40),
)
def test_any_split_of_any_stream(
    spec: list[tuple[Opcode, int, bool]], mask: bool, cuts: list[int]
) -> None:
    control = (Opcode.PING, Opcode.PONG)  # §5.5: at most 125 bytes, never fragmented
    frames = [
        _frame(op, min(size, 125), mask=mask)
        if op in control
        else _frame(op, size, mask=mask, fin=fin)
        for op, size, fin in spec
    ]
    stream = b"".join(frames)
    ends = _ends(frames)
    fb = FrameBoundary()
    at, k = 0, 0
    while at < len(stream):
        step = cuts[k % len(cuts)]
        k += 1
        fb.feed(memoryview(stream)[at : at + step])
        at = min(at + step, len(stream))
        assert fb.at_boundary == (at in ends), (at, [len(f) for f in frames])


def test_nothing_after_a_close_frame_that_went_by() -> None:
    # §5.5.1: after a Close, no more frames; not even a second Close.
    fb = FrameBoundary()
    fb.feed(_frame(Opcode.TEXT, 5, mask=True))
    assert fb.at_boundary
    fb.feed(Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True))
    assert not fb.at_boundary
    fb.feed(_frame(Opcode.TEXT, 5, mask=True))  # (a peer that breaks the rule)
    assert not fb.at_boundary


def test_a_64_bit_length_with_its_top_bit_set_is_not_framing() -> None:
    fb = FrameBoundary()
    fb.feed(b"\x82\x7f" + struct.pack("!Q", 1 << 63))
    assert fb.lost and not fb.at_boundary
    fb.feed(_frame(Opcode.TEXT, 5, mask=False))
    assert not fb.at_boundary  # once lost, never at a boundary again


def test_a_stream_that_is_not_websocket_is_never_interrupted() -> None:
    # An HTTP/1.1 answer after a 101 that was not a WebSocket: the tracker reads whatever the
    # bytes imply and is at a boundary only where that arithmetic ends (it never raises).
    fb = FrameBoundary()
    fb.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    fb.feed(bytes(range(256)) * 50)


def test_close_frames_as_a_websocket_peer_reads_them() -> None:
    server = close_frame(masked=False)
    assert server == b"\x88\x02\x03\xe9"  # §5.1: a server never masks
    assert Close.parse(server[2:]).code == GOING_AWAY == 1001
    keys = set()
    for _ in range(20):
        client = close_frame(masked=True)
        assert client[0] == 0x88 and client[1] == 0x82 and len(client) == 8
        key, body = client[2:6], client[6:]
        keys.add(key)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(body))
        assert Close.parse(payload).code == 1001
        fb = FrameBoundary()
        fb.feed(client)  # the tracker itself reads it as one whole Close frame
        assert fb.closed and not fb.head and fb.left == 0
    assert len(keys) > 1  # §5.3: a fresh unpredictable key per frame
