"""Attribute value codecs (RFC 8489 §14, RFC 8656 §18, RFC 6156)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from confedge.stun import (
    MAX_USERNAME_BYTES,
    PasswordAlgorithm,
    StunError,
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
    encode_channel_number,
    encode_error_code,
    encode_even_port,
    encode_password_algorithm,
    encode_password_algorithms,
    encode_requested_address_family,
    encode_requested_transport,
    encode_text,
    encode_u32,
    encode_u64,
    encode_unknown_attributes,
    encode_xor_address,
)

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def bad(fn: Callable[[], object]) -> StunError:
    with pytest.raises(StunError) as ei:
        fn()
    assert ei.value.code == 400
    assert ei.value.reason
    return ei.value


# -- addresses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "port"),
    [
        ("192.0.2.1", 32853),
        ("0.0.0.0", 0),
        ("255.255.255.255", 65535),
        ("2001:db8:1234:5678:11:2233:4455:6677", 32853),
        ("::", 0),
        ("::1", 1),
        ("::ffff:192.0.2.1", 443),
        ("fe80::1", 5000),
    ],
)
def test_address_round_trips(ip: str, port: int) -> None:
    plain = encode_address(ip, port)
    assert decode_address(plain) == (ip, port)
    xored = encode_xor_address(ip, port, TID)
    assert decode_xor_address(xored, TID) == (ip, port)
    assert len(plain) == len(xored) == (20 if ":" in ip else 8)


def test_plain_address_layout() -> None:
    assert encode_address("192.0.2.1", 32853) == bytes.fromhex("00018055c0000201")


def test_xor_address_layout_rfc5769() -> None:
    # RFC 5769 §2.2: 192.0.2.1:32853 -> 0001 a147 e112a643
    assert encode_xor_address("192.0.2.1", 32853, TID) == bytes.fromhex("0001a147e112a643")


def test_xor_ipv6_depends_on_transaction_id() -> None:
    a = encode_xor_address("2001:db8::1", 1, TID)
    b = encode_xor_address("2001:db8::1", 1, bytes(12))
    assert a != b
    assert decode_xor_address(a, bytes(12)) != ("2001:db8::1", 1)


def test_address_canonical_ipv6_output() -> None:
    v = encode_address("2001:0db8:0000:0000:0000:0000:0000:0001", 1)
    assert decode_address(v) == ("2001:db8::1", 1)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x01\x00",
        b"\x00\x01\x00\x01\x01\x02\x03",  # 7 bytes
        b"\x00\x02\x00\x01\x01\x02\x03\x04",  # family IPv6, IPv4 length
        b"\x00\x01\x00\x01" + bytes(16),  # family IPv4, IPv6 length
        b"\x00\x03\x00\x01\x01\x02\x03\x04",  # unknown family
        b"\x00\x01\x00\x01" + bytes(5),
    ],
)
def test_address_malformed(value: bytes) -> None:
    bad(lambda: decode_address(value))
    bad(lambda: decode_xor_address(value, TID))


def test_reserved_first_byte_ignored() -> None:
    v = b"\xff" + encode_address("10.0.0.1", 7)[1:]
    assert decode_address(v) == ("10.0.0.1", 7)


@pytest.mark.parametrize("ip", ["1.2", "1.2.3", "example.com", "", "1.2.3.4.5", "::g", "1.2.3.256"])
def test_encode_address_rejects_non_literals(ip: str) -> None:
    with pytest.raises(ValueError):
        encode_address(ip, 1)
    with pytest.raises(ValueError):
        encode_xor_address(ip, 1, TID)


@pytest.mark.parametrize("port", [-1, 65536])
def test_encode_address_rejects_bad_port(port: int) -> None:
    with pytest.raises(ValueError):
        encode_address("1.2.3.4", port)
    with pytest.raises(ValueError):
        encode_xor_address("1.2.3.4", port, TID)


def test_xor_ipv6_needs_12_byte_transaction_id() -> None:
    with pytest.raises(ValueError):
        encode_xor_address("::1", 1, b"short")
    v = encode_xor_address("::1", 1, TID)
    bad(lambda: decode_xor_address(v, b"short"))


# -- ERROR-CODE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [300, 400, 401, 420, 437, 438, 440, 441, 442, 443, 486, 508, 699])
def test_error_code_round_trip(code: int) -> None:
    v = encode_error_code(code, "reason ü")
    assert v[:2] == b"\0\0"
    assert v[2] == code // 100 and v[3] == code % 100
    assert decode_error_code(v) == (code, "reason ü")
    assert decode_error_code(encode_error_code(code)) == (code, "")


def test_error_code_invalid() -> None:
    for code in (299, 700, 0):
        with pytest.raises(ValueError):
            encode_error_code(code)
    with pytest.raises(ValueError):
        encode_error_code(400, "x" * 128)
    bad(lambda: decode_error_code(b"\0\0\4"))
    bad(lambda: decode_error_code(b"\0\0\2\0"))  # class 2
    bad(lambda: decode_error_code(b"\0\0\7\0"))  # class 7
    bad(lambda: decode_error_code(b"\0\0\4\x64"))  # number 100


def test_error_code_tolerates_bad_utf8_and_reserved_bits() -> None:
    assert decode_error_code(b"\xff\xff\xfc\x01\xff") == (401, "\ufffd")


# -- UNKNOWN-ATTRIBUTES, integers ----------------------------------------------------------------


def test_unknown_attributes() -> None:
    v = encode_unknown_attributes([0x7777, 0x0003, 0x0024])
    assert v == bytes.fromhex("777700030024")
    assert decode_unknown_attributes(v) == [0x7777, 0x0003, 0x0024]
    assert decode_unknown_attributes(b"") == []
    bad(lambda: decode_unknown_attributes(b"\0\1\2"))


def test_u32_u64() -> None:
    assert encode_u32(600) == b"\0\0\x02\x58"
    assert decode_u32(encode_u32(0xFFFFFFFF)) == 0xFFFFFFFF
    assert decode_u64(encode_u64(0x932FF9B151263B36)) == 0x932FF9B151263B36
    for n in (0, 3, 5, 8):
        bad(lambda n=n: decode_u32(bytes(n)))  # type: ignore[misc]
    for n in (0, 4, 9):
        bad(lambda n=n: decode_u64(bytes(n)))  # type: ignore[misc]


# -- TURN attributes ------------------------------------------------------------------------------


def test_requested_transport() -> None:
    assert encode_requested_transport(17) == b"\x11\0\0\0"
    assert decode_requested_transport(b"\x11\0\0\0") == 17
    assert decode_requested_transport(b"\x06\xff\xff\xff") == 6  # RFFU ignored
    bad(lambda: decode_requested_transport(b"\x11"))
    with pytest.raises(ValueError):
        encode_requested_transport(256)


def test_channel_number() -> None:
    assert encode_channel_number(0x4000) == b"\x40\x00\0\0"
    for ch in (0x4000, 0x4321, 0x4FFF):
        assert decode_channel_number(encode_channel_number(ch)) == ch
    for ch in (0x0000, 0x3FFF, 0x5000, 0xFFFF):
        bad(lambda ch=ch: decode_channel_number(encode_channel_number(ch)))  # type: ignore[misc]
    bad(lambda: decode_channel_number(b"\x40\x00"))
    with pytest.raises(ValueError):
        encode_channel_number(0x10000)


def test_even_port() -> None:
    assert decode_even_port(encode_even_port(True)) is True
    assert decode_even_port(encode_even_port(False)) is False
    assert decode_even_port(b"\x7f") is False  # only the top bit is R
    assert decode_even_port(b"\xff") is True
    bad(lambda: decode_even_port(b""))
    bad(lambda: decode_even_port(b"\x80\0\0\0"))


def test_requested_address_family() -> None:
    assert encode_requested_address_family(2) == b"\x02\0\0\0"
    assert decode_requested_address_family(b"\x01\0\0\0") == 1
    assert decode_requested_address_family(b"\x02\0\0\0") == 2
    # Unknown families come back as is: the server answers 440, not 400.
    assert decode_requested_address_family(b"\x03\0\0\0") == 3
    bad(lambda: decode_requested_address_family(b"\x01"))
    with pytest.raises(ValueError):
        encode_requested_address_family(-1)


def test_reservation_token() -> None:
    assert decode_reservation_token(b"12345678") == b"12345678"
    bad(lambda: decode_reservation_token(b"1234567"))


# -- PASSWORD-ALGORITHM(S) ------------------------------------------------------------------------


def test_password_algorithms() -> None:
    algs = [(PasswordAlgorithm.MD5, b""), (PasswordAlgorithm.SHA256, b""), (0x7F, b"abc")]
    v = encode_password_algorithms(algs)
    assert v == bytes.fromhex("00010000 00020000 007f0003 61626300")
    assert decode_password_algorithms(v) == algs
    assert decode_password_algorithm(encode_password_algorithm(2)) == (2, b"")
    bad(lambda: decode_password_algorithms(b"\0\1\0"))
    bad(lambda: decode_password_algorithms(b"\0\1\0\4abc"))  # params past the end
    bad(lambda: decode_password_algorithms(b"\0\1\0\3abc"))  # padding missing
    bad(lambda: decode_password_algorithm(b""))
    bad(lambda: decode_password_algorithm(v))


# -- text -----------------------------------------------------------------------------------------


def test_text() -> None:
    assert decode_text(encode_text("マトリックス")) == "マトリックス"
    bad(lambda: decode_text(b"\xff\xfe"))
    bad(lambda: decode_text(b"x" * 764))
    assert decode_text(b"x" * 513, MAX_USERNAME_BYTES) == "x" * 513
    bad(lambda: decode_text(b"x" * 514, MAX_USERNAME_BYTES))
    with pytest.raises(ValueError):
        encode_text("x" * 764)
