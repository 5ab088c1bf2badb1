"""Message header/TLV parsing and building (RFC 8489 §5, §6, §14)."""

from __future__ import annotations

import struct
import zlib

import pytest

from confedge.stun import (
    DEFAULT_MAX_ATTRIBUTES,
    KNOWN_ATTRIBUTES,
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    StunError,
    check_fingerprint,
    check_integrity,
    decode_error_code,
    decode_message_type,
    encode_message_type,
    is_stun,
    new_transaction_id,
    parse_message,
    unknown_comprehension_required,
)

TID = bytes(range(12))
KEY = b"0123456789abcdef"


def raw_message(
    attrs: list[tuple[int, bytes]],
    *,
    method: int = Method.ALLOCATE,
    cls: int = MsgClass.REQUEST,
    tid: bytes = TID,
    length: int | None = None,
    pad: bytes = b"\x00",
) -> bytes:
    """Hand-assemble a message without any of the builder's checks."""
    body = b""
    for t, v in attrs:
        body += struct.pack("!HH", t, len(v)) + v + pad * (-len(v) % 4)
    if length is None:
        length = len(body)
    return struct.pack("!HHI", encode_message_type(method, cls), length, 0x2112A442) + tid + body


def with_fingerprint(msg: bytes) -> bytes:
    """Append a correct FINGERPRINT to a hand-made message."""
    length = struct.unpack_from("!H", msg, 2)[0] + 8
    msg = msg[:2] + struct.pack("!H", length) + msg[4:]
    crc = zlib.crc32(msg) ^ 0x5354554E
    return msg + struct.pack("!HHI", 0x8028, 4, crc)


# -- message type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("cls", list(MsgClass))
def test_message_type_round_trip(method: int, cls: int) -> None:
    mtype = encode_message_type(method, cls)
    assert mtype < 0x4000
    assert decode_message_type(mtype) == (method, cls)


def test_message_type_known_values() -> None:
    # RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111; indication 0x0011.
    assert encode_message_type(Method.BINDING, MsgClass.REQUEST) == 0x0001
    assert encode_message_type(Method.BINDING, MsgClass.SUCCESS) == 0x0101
    assert encode_message_type(Method.BINDING, MsgClass.ERROR) == 0x0111
    assert encode_message_type(Method.BINDING, MsgClass.INDICATION) == 0x0011
    # RFC 8656: Allocate request 0x0003, Send indication 0x0016, Data indication 0x0017.
    assert encode_message_type(Method.ALLOCATE, MsgClass.REQUEST) == 0x0003
    assert encode_message_type(Method.SEND, MsgClass.INDICATION) == 0x0016
    assert encode_message_type(Method.DATA, MsgClass.INDICATION) == 0x0017
    for m in range(0x1000):  # every 12-bit method survives
        assert decode_message_type(encode_message_type(m, 3)) == (m, 3)


# -- is_stun --------------------------------------------------------------------------------------


def test_is_stun() -> None:
    msg = raw_message([])
    assert is_stun(msg)
    assert not is_stun(msg[:19])
    assert not is_stun(b"\x40" + msg[1:])  # ChannelData range
    assert not is_stun(msg[:4] + b"\x21\x12\xa4\x43" + msg[8:])
    assert not is_stun(msg[:3] + b"\x02" + msg[4:])  # length not a multiple of 4


# -- header validation: not STUN -> code None ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        raw_message([])[:19],
        b"\x80" + raw_message([])[1:],  # top bits 10
        b"\x40" + raw_message([])[1:],  # top bits 01
        raw_message([])[:4] + b"\x00\x00\x00\x00" + raw_message([])[8:],  # RFC 3489 no cookie
        raw_message([(Attr.LIFETIME, b"\0\0\0\1")], length=4),  # length < actual
        raw_message([(Attr.LIFETIME, b"\0\0\0\1")], length=12),  # length > actual
        raw_message([(Attr.LIFETIME, b"\0\0\0\1")]) + b"\0",  # trailing byte
        raw_message([], length=2) + b"\0\0",  # length not multiple of 4
    ],
)
def test_not_stun_is_unanswerable(data: bytes) -> None:
    with pytest.raises(StunError) as ei:
        parse_message(data)
    assert ei.value.code is None
    assert ei.value.reason


def test_empty_message_parses() -> None:
    msg = parse_message(raw_message([], method=Method.BINDING))
    assert msg.method == Method.BINDING
    assert msg.msg_class == MsgClass.REQUEST
    assert msg.transaction_id == TID
    assert msg.attributes == []


def test_accepts_bytearray_and_memoryview() -> None:
    data = raw_message([(Attr.USERNAME, b"bob")])
    for variant in (bytearray(data), memoryview(data)):
        msg = parse_message(variant)  # type: ignore[arg-type]
        assert msg.get(Attr.USERNAME) == b"bob"
        assert type(msg.raw) is bytes


# -- attribute framing -> 400 ---------------------------------------------------------------------


def test_attribute_running_past_the_end_is_400_with_header_info() -> None:
    data = raw_message([(Attr.USERNAME, b"abcd")])
    bad = data[:22] + struct.pack("!H", 8) + data[24:]  # USERNAME claims 8 bytes, 4 present
    with pytest.raises(StunError) as ei:
        parse_message(bad)
    err = ei.value
    assert err.code == 400
    assert err.transaction_id == TID
    assert err.method == Method.ALLOCATE
    assert err.msg_class == MsgClass.REQUEST


def test_padding_running_past_the_end_is_400() -> None:
    # A 3-byte value whose padding would be missing: body length 8 but needs 4 + 4.
    hdr = struct.pack("!HHI", 0x0003, 8, 0x2112A442) + TID
    data = hdr + struct.pack("!HH", Attr.USERNAME, 5) + b"abcd"
    with pytest.raises(StunError) as ei:
        parse_message(data)
    assert ei.value.code == 400


def test_padding_content_is_ignored() -> None:
    msg = parse_message(raw_message([(Attr.USERNAME, b"ab")], pad=b"\xff"))
    assert msg.get(Attr.USERNAME) == b"ab"


def test_zero_length_attribute() -> None:
    msg = parse_message(raw_message([(Attr.DONT_FRAGMENT, b""), (Attr.LIFETIME, b"\0\0\0\5")]))
    assert msg.attributes == [(Attr.DONT_FRAGMENT, b""), (Attr.LIFETIME, b"\0\0\0\5")]
    assert msg.has(Attr.DONT_FRAGMENT)


def test_too_many_attributes_is_400() -> None:
    data = raw_message([(Attr.SOFTWARE, b"")] * (DEFAULT_MAX_ATTRIBUTES + 1))
    with pytest.raises(StunError) as ei:
        parse_message(data)
    assert ei.value.code == 400
    parse_message(data, max_attributes=DEFAULT_MAX_ATTRIBUTES + 1)
    parse_message(raw_message([(Attr.SOFTWARE, b"")] * DEFAULT_MAX_ATTRIBUTES))


def test_max_size() -> None:
    data = raw_message([(Attr.DATA, b"x" * 5000)], method=Method.SEND, cls=MsgClass.INDICATION)
    assert parse_message(data).get(Attr.DATA) == b"x" * 5000
    with pytest.raises(StunError) as ei:
        parse_message(data, max_size=4096)
    assert ei.value.code is None
    assert "4096" in ei.value.reason


def test_largest_possible_message() -> None:
    # The body length must be a multiple of 4, so 65532 is the largest usable body.
    value = b"x" * (65532 - 4)
    data = raw_message([(Attr.DATA, value)], method=Method.SEND, cls=MsgClass.INDICATION)
    assert len(data) == 20 + 65532
    assert parse_message(data).get(Attr.DATA) == value
    with pytest.raises(StunError):
        parse_message(data + b"\0\0\0\0")


# -- MESSAGE-INTEGRITY ordering (RFC 8489 §14.5, §14.6) --------------------------------------------


def test_attributes_after_message_integrity_are_ignored() -> None:
    data = raw_message(
        [
            (Attr.USERNAME, b"u"),
            (Attr.MESSAGE_INTEGRITY, b"\0" * 20),
            (Attr.LIFETIME, b"\0\0\0\1"),
            (0x0777, b"zzz"),  # even an unknown comprehension-required one
            (Attr.MESSAGE_INTEGRITY, b"\1" * 20),
        ]
    )
    msg = parse_message(data)
    assert [t for t, _ in msg] == [Attr.USERNAME, Attr.MESSAGE_INTEGRITY]
    assert msg.get(Attr.MESSAGE_INTEGRITY) == b"\0" * 20
    assert unknown_comprehension_required(msg) == []
    assert msg.integrity_offset == 28


def test_sha256_after_sha1_is_kept_and_then_only_fingerprint() -> None:
    data = raw_message(
        [
            (Attr.MESSAGE_INTEGRITY, b"\0" * 20),
            (Attr.MESSAGE_INTEGRITY_SHA256, b"\2" * 32),
            (Attr.LIFETIME, b"\0\0\0\1"),
        ]
    )
    msg = parse_message(with_fingerprint(data))
    assert [t for t, _ in msg] == [
        Attr.MESSAGE_INTEGRITY,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.FINGERPRINT,
    ]
    assert msg.integrity_offset == 20
    assert msg.integrity_sha256_offset == 44
    assert check_fingerprint(msg)


def test_sha1_after_sha256_is_ignored() -> None:
    data = raw_message(
        [(Attr.MESSAGE_INTEGRITY_SHA256, b"\2" * 16), (Attr.MESSAGE_INTEGRITY, b"\0" * 20)]
    )
    msg = parse_message(data)
    assert [t for t, _ in msg] == [Attr.MESSAGE_INTEGRITY_SHA256]
    assert msg.integrity_offset == -1


@pytest.mark.parametrize("n", [0, 16, 19, 21, 32])
def test_message_integrity_wrong_length_is_400(n: int) -> None:
    with pytest.raises(StunError) as ei:
        parse_message(raw_message([(Attr.MESSAGE_INTEGRITY, b"\0" * n)]))
    assert ei.value.code == 400


@pytest.mark.parametrize("n", [0, 12, 15, 18, 36])
def test_message_integrity_sha256_wrong_length_is_400(n: int) -> None:
    with pytest.raises(StunError) as ei:
        parse_message(raw_message([(Attr.MESSAGE_INTEGRITY_SHA256, b"\0" * n)]))
    assert ei.value.code == 400


@pytest.mark.parametrize("n", [16, 20, 24, 28, 32])
def test_message_integrity_sha256_truncations_accepted(n: int) -> None:
    msg = parse_message(raw_message([(Attr.MESSAGE_INTEGRITY_SHA256, b"\0" * n)]))
    assert msg.integrity_sha256_offset == 20


# -- FINGERPRINT (RFC 8489 §14.7) -----------------------------------------------------------------


def test_fingerprint_valid() -> None:
    msg = parse_message(with_fingerprint(raw_message([(Attr.USERNAME, b"abc")])))
    assert check_fingerprint(msg)
    assert msg.fingerprint_offset == 28


def test_fingerprint_wrong_is_dropped() -> None:
    data = bytearray(with_fingerprint(raw_message([(Attr.USERNAME, b"abc")])))
    data[-1] ^= 1
    with pytest.raises(StunError) as ei:
        parse_message(bytes(data))
    assert ei.value.code is None


def test_fingerprint_wrong_length_is_dropped() -> None:
    with pytest.raises(StunError) as ei:
        parse_message(raw_message([(Attr.FINGERPRINT, b"\0" * 8)]))
    assert ei.value.code is None


def test_attribute_after_fingerprint_is_dropped() -> None:
    data = with_fingerprint(raw_message([(Attr.USERNAME, b"abc")]))
    extra = struct.pack("!HH", Attr.SOFTWARE, 0)
    data = data[:2] + struct.pack("!H", len(data) - 20 + 4) + data[4:] + extra
    with pytest.raises(StunError) as ei:
        parse_message(data)
    assert ei.value.code is None


def test_check_fingerprint_absent_and_unparsed() -> None:
    assert not check_fingerprint(parse_message(raw_message([])))
    assert not check_fingerprint(Message(1, 0, TID, []))


# -- unknown attributes (RFC 8489 §6.3.1) -----------------------------------------------------------


def test_unknown_comprehension_required() -> None:
    msg = parse_message(
        raw_message(
            [
                (0x0777, b""),
                (Attr.LIFETIME, b"\0\0\0\1"),
                (0x9999, b""),  # optional: never reported
                (0x0003, b""),  # CHANGE-REQUEST (RFC 5780): not understood
                (0x0777, b"x"),  # reported once
                (Attr.CONNECTION_ID, b"\0\0\0\1"),  # RFC 6062 not implemented
            ]
        )
    )
    assert unknown_comprehension_required(msg) == [0x0777, 0x0003, Attr.CONNECTION_ID]


def test_known_attributes_cover_what_turn_needs() -> None:
    for a in (
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.REALM,
        Attr.NONCE,
        Attr.LIFETIME,
        Attr.REQUESTED_TRANSPORT,
        Attr.REQUESTED_ADDRESS_FAMILY,
        Attr.XOR_PEER_ADDRESS,
        Attr.DATA,
        Attr.CHANNEL_NUMBER,
        Attr.EVEN_PORT,
        Attr.RESERVATION_TOKEN,
        Attr.DONT_FRAGMENT,
        Attr.USERHASH,
        Attr.PASSWORD_ALGORITHM,
        Attr.PRIORITY,
        Attr.USE_CANDIDATE,
    ):
        assert a in KNOWN_ATTRIBUTES
    assert Attr.CONNECTION_ID not in KNOWN_ATTRIBUTES


# -- Message accessors ----------------------------------------------------------------------------


def test_get_has_get_all() -> None:
    msg = parse_message(
        raw_message(
            [
                (Attr.XOR_PEER_ADDRESS, b"a" * 8),
                (Attr.LIFETIME, b"\0\0\0\1"),
                (Attr.XOR_PEER_ADDRESS, b"b" * 8),
            ]
        )
    )
    assert msg.get(Attr.XOR_PEER_ADDRESS) == b"a" * 8
    assert msg.get_all(Attr.XOR_PEER_ADDRESS) == [b"a" * 8, b"b" * 8]
    assert msg.has(Attr.LIFETIME)
    assert not msg.has(Attr.DATA)
    assert msg.get(Attr.DATA) is None
    assert msg.get_all(Attr.DATA) == []


# -- MessageBuilder ---------------------------------------------------------------------------------


def test_builder_pads_and_parses_back() -> None:
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.SUCCESS, TID)
        .add(Attr.SOFTWARE, b"abcde")
        .add(Attr.DONT_FRAGMENT, b"")
        .add(Attr.LIFETIME, b"\0\0\2\x58")
        .build()
    )
    assert len(data) == 20 + (4 + 8) + 4 + (4 + 4)
    assert data[20 + 4 + 5 : 20 + 4 + 8] == b"\0\0\0"
    msg = parse_message(data)
    assert msg.method == Method.ALLOCATE and msg.msg_class == MsgClass.SUCCESS
    assert msg.attributes == [
        (Attr.SOFTWARE, b"abcde"),
        (Attr.DONT_FRAGMENT, b""),
        (Attr.LIFETIME, b"\0\0\2\x58"),
    ]


@pytest.mark.parametrize("sha256", [False, True])
@pytest.mark.parametrize("fingerprint", [False, True])
def test_builder_integrity_and_fingerprint(sha256: bool, fingerprint: bool) -> None:
    data = (
        MessageBuilder(Method.REFRESH, MsgClass.REQUEST, TID)
        .add(Attr.USERNAME, b"user")
        .build(key=KEY, sha256=sha256, fingerprint=fingerprint)
    )
    msg = parse_message(data)
    mi = Attr.MESSAGE_INTEGRITY_SHA256 if sha256 else Attr.MESSAGE_INTEGRITY
    names = [t for t, _ in msg]
    assert names == [Attr.USERNAME, mi] + ([Attr.FINGERPRINT] if fingerprint else [])
    assert len(msg.get(mi) or b"") == (32 if sha256 else 20)
    assert check_integrity(msg, KEY)
    assert not check_integrity(msg, KEY[:-1])
    assert check_fingerprint(msg) is fingerprint


def test_builder_fingerprint_only() -> None:
    data = MessageBuilder(Method.BINDING, MsgClass.SUCCESS, TID).build(fingerprint=True)
    msg = parse_message(data)
    assert check_fingerprint(msg)
    assert not check_integrity(msg, KEY)


def test_builder_add_error_and_xor_address() -> None:
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.ERROR, TID)
        .add_error(401, "Unauthenticated")
        .add_xor_address(Attr.XOR_MAPPED_ADDRESS, "2001:db8::1", 3478)
        .build()
    )
    msg = parse_message(data)
    assert decode_error_code(msg.get(Attr.ERROR_CODE) or b"") == (401, "Unauthenticated")
    from confedge.stun import decode_xor_address

    assert decode_xor_address(msg.get(Attr.XOR_MAPPED_ADDRESS) or b"", TID) == (
        "2001:db8::1",
        3478,
    )


def test_builder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        MessageBuilder(Method.BINDING, MsgClass.REQUEST, b"short")
    b = MessageBuilder(Method.BINDING, MsgClass.REQUEST, TID)
    with pytest.raises(ValueError, match="length field"):
        b.add(Attr.DATA, b"x" * 0x10000)
    b.add(Attr.DATA, b"x" * 0xFFF0)
    b.add(Attr.DATA, b"x" * 0x10)
    with pytest.raises(ValueError, match="length field"):
        b.build()


def test_builder_largest_message_with_integrity_fits() -> None:
    b = MessageBuilder(Method.SEND, MsgClass.INDICATION, TID)
    b.add(Attr.DATA, b"x" * (0xFFFF - 4 - 24 - 8 - 3))
    data = b.build(key=KEY, fingerprint=True)
    assert len(data) <= 20 + 0xFFFF
    assert check_integrity(parse_message(data), KEY)


def test_new_transaction_id() -> None:
    ids = {new_transaction_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 12 for i in ids)


def test_stun_error_str_and_fields() -> None:
    e = StunError(420, "unknown", (0x7777,))
    assert e.code == 420 and e.unknown == (0x7777,) and e.transaction_id is None
    assert "420" in str(e) and "unknown" in str(e)
    assert "not answerable" in str(StunError(None, "garbage"))
