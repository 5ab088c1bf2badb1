"""Property-based tests: hostile bytes never raise anything but StunError; codecs round-trip.

Budget: the whole file runs in a few seconds (max_examples is kept moderate and deadlines off,
because the machine is shared).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confedge.stun import (
    Attr,
    MessageBuilder,
    StreamFramer,
    StunError,
    check_fingerprint,
    check_integrity,
    decode_address,
    decode_channel_number,
    decode_error_code,
    decode_even_port,
    decode_password_algorithm,
    decode_password_algorithms,
    decode_requested_address_family,
    decode_requested_transport,
    decode_reservation_token,
    decode_text,
    decode_u32,
    decode_u64,
    decode_unknown_attributes,
    decode_xor_address,
    encode_address,
    encode_channel_data,
    encode_error_code,
    encode_password_algorithms,
    encode_xor_address,
    next_frame_length,
    parse_channel_data,
    parse_message,
    unknown_comprehension_required,
)

FUZZ = settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
ROUND = settings(max_examples=300, deadline=None, database=None)

DECODERS: list[Callable[[bytes], object]] = [
    decode_address,
    lambda v: decode_xor_address(v, bytes(12)),
    decode_channel_number,
    decode_error_code,
    decode_even_port,
    decode_password_algorithm,
    decode_password_algorithms,
    decode_requested_address_family,
    decode_requested_transport,
    decode_reservation_token,
    decode_text,
    decode_u32,
    decode_u64,
    decode_unknown_attributes,
]

tids = st.binary(min_size=12, max_size=12)
attr_types = st.one_of(st.sampled_from([int(a) for a in Attr]), st.integers(0, 0xFFFF))
# Attributes the builder may add freely: everything but the three it places itself.
free_types = attr_types.filter(
    lambda t: t not in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT)
)
attr_lists = st.lists(st.tuples(free_types, st.binary(max_size=40)), max_size=12)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 0xFFFF)


def build_valid(
    method: int,
    cls: int,
    tid: bytes,
    attrs: list[tuple[int, bytes]],
    key: bytes | None,
    sha256: bool,
    fingerprint: bool,
) -> bytes:
    b = MessageBuilder(method, cls, tid)
    for t, v in attrs:
        b.add(t, v)
    return b.build(key=key, sha256=sha256, fingerprint=fingerprint)


def _valid_messages(max_method: int) -> st.SearchStrategy[bytes]:
    return st.builds(
        build_valid,
        st.integers(0, max_method),
        st.integers(0, 3),
        tids,
        attr_lists,
        st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
        st.booleans(),
        st.booleans(),
    )


valid_messages = _valid_messages(0xFFF)
#: What a TCP stream may carry: RFC 7983 §7 STUN first bytes 0-3, i.e. methods below 0x100.
stream_messages = _valid_messages(0xFF)


def parse_everything(data: bytes) -> None:
    """Run every entry point on ``data``; only StunError may come out."""
    try:
        msg = parse_message(data)
    except StunError as e:
        assert e.code in (None, 400)
    else:
        unknown_comprehension_required(msg)
        check_integrity(msg, b"key")
        check_fingerprint(msg)
        for t, v in msg.attributes:
            assert isinstance(t, int) and isinstance(v, bytes)
    try:
        parse_channel_data(data)
    except StunError as e:
        assert e.code is None
    try:
        next_frame_length(data)
    except StunError as e:
        assert e.code is None
    with contextlib.suppress(StunError):
        StreamFramer().feed(data)
    for dec in DECODERS:
        try:
            dec(data)
        except StunError as e:
            assert e.code == 400


# -- hostile input ----------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    parse_everything(data)


@FUZZ
@given(st.integers(0, 0x3FFF), tids, st.binary(max_size=200).map(lambda b: b[: len(b) & ~3]))
def test_random_body_with_valid_header(mtype: int, tid: bytes, body: bytes) -> None:
    """Past the header check, so the TLV walk itself is what gets fuzzed."""
    data = struct.pack("!HHI", mtype, len(body), 0x2112A442) + tid + body
    parse_everything(data)


@FUZZ
@given(valid_messages, st.data())
def test_mutated_valid_messages(data: bytes, draw: st.DataObject) -> None:
    msg = bytearray(data)
    kind = draw.draw(st.sampled_from(["flip", "truncate", "length", "attrlen", "extend"]))
    if kind == "flip":
        for _ in range(draw.draw(st.integers(1, 4))):
            i = draw.draw(st.integers(0, len(msg) * 8 - 1))
            msg[i // 8] ^= 0x80 >> (i % 8)
    elif kind == "truncate":
        del msg[draw.draw(st.integers(0, len(msg) - 1)) :]
    elif kind == "length":
        struct.pack_into("!H", msg, 2, draw.draw(st.integers(0, 0xFFFF)))
    elif kind == "attrlen" and len(msg) > 20:
        off = 20
        offsets = []
        while off + 4 <= len(msg):
            offsets.append(off)
            (alen,) = struct.unpack_from("!H", msg, off + 2)
            off += 4 + ((alen + 3) & ~3)
        target = draw.draw(st.sampled_from(offsets))
        struct.pack_into("!H", msg, target + 2, draw.draw(st.integers(0, 0xFFFF)))
    else:
        msg += draw.draw(st.binary(min_size=1, max_size=12))
    parse_everything(bytes(msg))


@FUZZ
@given(
    tids,
    attr_lists,
    st.binary(min_size=1, max_size=32),
    st.booleans(),
    st.booleans(),
    st.integers(0, 10**9),
)
def test_bit_flip_in_authenticated_part_is_caught(
    tid: bytes,
    attrs: list[tuple[int, bytes]],
    key: bytes,
    sha256: bool,
    fingerprint: bool,
    seed: int,
) -> None:
    """Any flip up to the end of the integrity attribute fails parsing or the integrity check."""
    data = build_valid(3, 0, tid, attrs, key, sha256, fingerprint)
    original = parse_message(data, max_attributes=100)
    off = max(original.integrity_offset, original.integrity_sha256_offset)
    covered = off + 4 + (32 if sha256 else 20)
    i = seed % (covered * 8)
    mutated = bytearray(data)
    mutated[i // 8] ^= 0x80 >> (i % 8)
    try:
        msg = parse_message(bytes(mutated), max_attributes=100)
    except StunError:
        return
    assert not check_integrity(msg, key), f"bit {i} of {covered * 8}"


# -- round trips ----------------------------------------------------------------------------------


@ROUND
@given(st.integers(0, 0xFFF), st.integers(0, 3), tids, attr_lists)
def test_build_parse_round_trip(
    method: int, cls: int, tid: bytes, attrs: list[tuple[int, bytes]]
) -> None:
    data = build_valid(method, cls, tid, attrs, None, False, False)
    assert len(data) % 4 == 0
    msg = parse_message(data, max_attributes=100)
    assert (msg.method, msg.msg_class, msg.transaction_id) == (method, cls, tid)
    assert msg.attributes == attrs
    assert msg.raw == data


@ROUND
@given(tids, attr_lists, st.binary(min_size=1, max_size=64), st.booleans(), st.booleans())
def test_integrity_round_trip(
    tid: bytes, attrs: list[tuple[int, bytes]], key: bytes, sha256: bool, fingerprint: bool
) -> None:
    data = build_valid(3, 0, tid, attrs, key, sha256, fingerprint)
    msg = parse_message(data, max_attributes=100)
    assert check_integrity(msg, key)
    assert not check_integrity(msg, key + b"!")
    assert check_fingerprint(msg) is fingerprint
    assert msg.attributes[: len(attrs)] == attrs


@ROUND
@given(st.one_of(ipv4, ipv6), ports, tids)
def test_address_round_trip(ip: str, port: int, tid: bytes) -> None:
    """Same address back. The text form is inet_ntop's (what recvfrom reports, so permission
    lookups keyed by text agree), which may differ from ipaddress's for IPv4-mapped forms."""
    for got_ip, got_port in (
        decode_address(encode_address(ip, port)),
        decode_xor_address(encode_xor_address(ip, port, tid), tid),
    ):
        assert ipaddress.ip_address(got_ip) == ipaddress.ip_address(ip)
        assert got_port == port
        assert got_ip == socket.inet_ntop(
            socket.AF_INET6 if ":" in ip else socket.AF_INET,
            ipaddress.ip_address(ip).packed,
        )


@ROUND
@given(st.integers(300, 699), st.text(max_size=60))
def test_error_code_round_trip(code: int, reason: str) -> None:
    assert decode_error_code(encode_error_code(code, reason)) == (code, reason)


@ROUND
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=20)), max_size=6))
def test_password_algorithms_round_trip(algs: list[tuple[int, bytes]]) -> None:
    assert decode_password_algorithms(encode_password_algorithms(algs)) == algs


@ROUND
@given(st.integers(0x4000, 0x4FFF), st.binary(max_size=300), st.booleans())
def test_channel_data_round_trip(ch: int, payload: bytes, pad: bool) -> None:
    data = encode_channel_data(ch, payload, pad=pad)
    got_ch, got = parse_channel_data(data)
    assert (got_ch, bytes(got)) == (ch, payload)
    if pad:
        assert next_frame_length(data) == len(data)


channel_frames = st.tuples(st.integers(0x4000, 0x4FFF), st.binary(max_size=50)).map(
    lambda t: encode_channel_data(t[0], t[1], pad=True)
)


@ROUND
@given(
    st.lists(st.one_of(stream_messages, channel_frames), max_size=8),
    st.lists(st.integers(1, 80), min_size=1, max_size=20),
)
def test_stream_framer_any_chunking(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    framer = StreamFramer()
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += framer.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == frames
    assert framer.buffered == 0
