"""ChannelData and TCP stream framing (RFC 8656 §12, §12.5; RFC 8489 §6.2.2)."""

from __future__ import annotations

import pytest

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    StreamFramer,
    StunError,
    encode_channel_data,
    is_channel_data,
    next_frame_length,
    parse_channel_data,
    parse_message,
)

TID = bytes(12)


def test_encode_layout() -> None:
    assert encode_channel_data(0x4001, b"abc") == b"\x40\x01\x00\x03abc"
    assert encode_channel_data(0x4001, b"abc", pad=True) == b"\x40\x01\x00\x03abc\x00"
    assert encode_channel_data(0x4FFF, b"", pad=True) == b"\x4f\xff\x00\x00"
    assert encode_channel_data(0x4000, b"abcd", pad=True) == b"\x40\x00\x00\x04abcd"


def test_encode_accepts_memoryview_payload() -> None:
    _, payload = parse_channel_data(b"\x40\x01\x00\x02hi")
    assert encode_channel_data(0x4002, payload) == b"\x40\x02\x00\x02hi"


def test_encode_too_long() -> None:
    with pytest.raises(ValueError):
        encode_channel_data(0x4000, b"x" * 0x10000)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 1200, 0xFFFF])
@pytest.mark.parametrize("pad", [False, True])
def test_round_trip(n: int, pad: bool) -> None:
    payload = bytes(i & 0xFF for i in range(n))
    data = encode_channel_data(0x4ABC, payload, pad=pad)
    assert is_channel_data(data)
    ch, got = parse_channel_data(data)
    assert ch == 0x4ABC
    assert bytes(got) == payload
    if pad:
        assert len(data) % 4 == 0
        assert next_frame_length(data) == len(data)


def test_parse_returns_zero_copy_view() -> None:
    data = b"\x40\x00\x00\x03xyz"
    _, payload = parse_channel_data(data)
    assert isinstance(payload, memoryview)
    assert payload.obj is data


def test_udp_trailing_bytes_ignored() -> None:
    ch, payload = parse_channel_data(b"\x40\x00\x00\x02ab\x00\x00junk")
    assert (ch, bytes(payload)) == (0x4000, b"ab")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40\x00\x00",
        b"\x40\x00\x00\x05abcd",  # length exceeds the datagram
        b"\x50\x00\x00\x00",  # reserved channel range
        b"\x3f\xff\x00\x00",
        b"\x00\x01\x00\x00",
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(StunError) as ei:
        parse_channel_data(data)
    assert ei.value.code is None


def test_is_channel_data() -> None:
    assert is_channel_data(b"\x40\x00\x00\x00")
    assert is_channel_data(b"\x4f\xff\x00\x00")
    assert not is_channel_data(b"\x50\x00\x00\x00")
    assert not is_channel_data(b"\x00\x01\x00\x00")
    assert not is_channel_data(b"\x40\x00\x00")


def test_next_frame_length() -> None:
    stun = MessageBuilder(Method.BINDING, MsgClass.REQUEST, TID).add(Attr.SOFTWARE, b"x").build()
    assert next_frame_length(stun) == len(stun) == 28
    assert next_frame_length(stun[:4]) == 28
    assert next_frame_length(stun[:3]) is None
    assert next_frame_length(b"") is None
    assert next_frame_length(b"\x40\x00\x00\x05") == 12
    assert next_frame_length(bytearray(b"\x40\x00\x00\x08")) == 12
    assert next_frame_length(memoryview(b"\x40\x00\x00\x00")) == 4
    for garbage in (b"POST", b"\x16\x03\x01\x02", b"\x80\x00\x00\x00", b"\x50\x00\x00\x00"):
        with pytest.raises(StunError) as ei:
            next_frame_length(garbage)
        assert ei.value.code is None
    with pytest.raises(StunError):
        next_frame_length(b"\x00\x01\x00\x03")  # STUN length not a multiple of 4


def test_stream_framer_reassembles_any_split() -> None:
    stun = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, TID)
        .add(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")
        .build(fingerprint=True)
    )
    cd1 = encode_channel_data(0x4000, b"hello", pad=True)
    cd2 = encode_channel_data(0x4001, b"", pad=True)
    stream = stun + cd1 + stun + cd2 + cd1
    expected = [stun, cd1, stun, cd2, cd1]
    for chunk in (1, 2, 3, 5, 7, 16, 64, len(stream)):
        framer = StreamFramer()
        frames: list[bytes] = []
        for i in range(0, len(stream), chunk):
            frames += framer.feed(stream[i : i + chunk])
        assert frames == expected, chunk
        assert framer.buffered == 0
    parse_message(frames[0])
    assert bytes(parse_channel_data(frames[1])[1]) == b"hello"


def test_stream_framer_garbage_and_limit() -> None:
    framer = StreamFramer()
    with pytest.raises(StunError):
        framer.feed(b"POST / HTTP/1.1\r\n")
    with pytest.raises(StunError):
        StreamFramer().feed(b"\x16\x03\x01\x02\x00\x01\x00")  # a TLS ClientHello
    framer = StreamFramer(max_buffer=100)
    framer.feed(b"\x40\x00\x01\x00" + b"x" * 90)  # waiting for a 260-byte frame
    with pytest.raises(StunError):
        framer.feed(b"x" * 20)
