"""Attribute value codecs (values WITHOUT the 4-byte type/length header, WITHOUT padding).

Theory of operation: :func:`confedge.stun.message.parse_message` splits a message into
``(type, raw value)`` pairs and does no per-attribute interpretation, because most messages on a
TURN server only need two or three of their attributes looked at (and ChannelData none). The
functions here decode or encode one value on demand. Every ``decode_*`` raises only
:class:`StunError` with code 400 (RFC 8489 §6.3.1: a malformed attribute makes the request
malformed); every ``encode_*`` raises ``ValueError`` for arguments the program itself got wrong.

Addresses (RFC 8489 §14.1, §14.2; RFC 8656 §18.3, §18.5; RFC 6156 for IPv6 relaying)::

     0                   1                   2                   3
    |0 0 0 0 0 0 0 0|    Family     |         (X-)Port              |
    |                 (X-)Address (32 bits or 128 bits)             |

The XOR forms mask the port with the top 16 bits of the magic cookie and the address with the
cookie (IPv4) or cookie || transaction ID (IPv6), so that NATs rewriting addresses in payloads do
not corrupt them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from .constants import MAGIC_COOKIE, MAGIC_COOKIE_BYTES, StunError

__all__ = [
    "decode_address",
    "decode_channel_number",
    "decode_error_code",
    "decode_even_port",
    "decode_password_algorithm",
    "decode_password_algorithms",
    "decode_requested_address_family",
    "decode_requested_transport",
    "decode_reservation_token",
    "decode_text",
    "decode_u32",
    "decode_u64",
    "decode_unknown_attributes",
    "decode_xor_address",
    "encode_address",
    "encode_channel_number",
    "encode_error_code",
    "encode_even_port",
    "encode_password_algorithm",
    "encode_password_algorithms",
    "encode_requested_address_family",
    "encode_requested_transport",
    "encode_text",
    "encode_u32",
    "encode_u64",
    "encode_unknown_attributes",
    "encode_xor_address",
]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_ADDR_HEAD = struct.Struct("!xBH")  # reserved, family, port
_ADDR4 = struct.Struct("!xBH4s")
_ADDR4_INT = struct.Struct("!xBHI")
_ALG_HEAD = struct.Struct("!HH")
_ERR_HEAD = struct.Struct("!xxBB")  # reserved(16 bits, with class in the low 3 bits), number

_COOKIE_HI = MAGIC_COOKIE >> 16
_AF_INET6 = socket.AF_INET6
_AF_INET = socket.AF_INET

#: RFC 8489 §14.3/14.4/14.8/14.9/14.10 length limits (bytes of UTF-8).
MAX_USERNAME_BYTES = 513
MAX_TEXT_BYTES = 763  # "fewer than 128 characters (which can be as long as 763 bytes)"


def _bad(reason: str) -> StunError:
    return StunError(400, reason)


def _pack_ip(ip: str) -> tuple[int, bytes]:
    """Return (family byte, packed address) for an IPv4 or IPv6 literal; ValueError otherwise.

    ``inet_pton`` (not ``inet_aton``) so that shorthand like "1.2" is refused."""
    try:
        if ":" in ip:
            return 2, socket.inet_pton(_AF_INET6, ip)
        return 1, socket.inet_pton(_AF_INET, ip)
    except OSError:
        raise ValueError(f"not an IP address literal: {ip!r}") from None


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")


# -- MAPPED-ADDRESS family (RFC 8489 §14.1; also ALTERNATE-SERVER §14.15) -------------------------


def encode_address(ip: str, port: int) -> bytes:
    """Encode a plain (non-XOR) address value, IPv4 or IPv6."""
    _check_port(port)
    family, packed = _pack_ip(ip)
    return _ADDR_HEAD.pack(family, port) + packed


def decode_address(value: bytes) -> tuple[str, int]:
    """Decode a plain address value into ``(ip, port)``; StunError(400) when malformed."""
    n = len(value)
    if n == 8:
        family, port, packed = _ADDR4.unpack(value)
        if family == 1:
            return socket.inet_ntoa(packed), port
    elif n == 20:
        family, port = _ADDR_HEAD.unpack_from(value)
        if family == 2:
            return socket.inet_ntop(_AF_INET6, value[4:]), port
    else:
        raise _bad(f"address attribute has length {n}, expected 8 (IPv4) or 20 (IPv6)")
    raise _bad(f"address family {family:#04x} does not match length {n}")


# -- XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS (RFC 8489 §14.2, RFC 8656 §18.3,
# §18.5) ------------------------------------------------------------------------------------


def encode_xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    """Encode an XOR-*-ADDRESS value; the transaction ID is needed for the IPv6 mask."""
    _check_port(port)
    family, packed = _pack_ip(ip)
    if family == 1:
        return _ADDR4_INT.pack(1, port ^ _COOKIE_HI, int.from_bytes(packed) ^ MAGIC_COOKIE)
    if len(transaction_id) != 12:
        raise ValueError("transaction ID must be 12 bytes")
    mask = int.from_bytes(MAGIC_COOKIE_BYTES + transaction_id)
    return _ADDR_HEAD.pack(2, port ^ _COOKIE_HI) + (int.from_bytes(packed) ^ mask).to_bytes(16)


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """Decode an XOR-*-ADDRESS value into ``(ip, port)``; StunError(400) when malformed.

    IPv6 results come out in the canonical compressed form of ``inet_ntop`` (IPv4-mapped ones as
    ``::ffff:a.b.c.d``), which the peer policy normalises further.
    """
    n = len(value)
    if n == 8:
        family, xport, xaddr = _ADDR4_INT.unpack(value)
        if family == 1:
            return socket.inet_ntoa(_U32.pack(xaddr ^ MAGIC_COOKIE)), xport ^ _COOKIE_HI
    elif n == 20:
        family, xport = _ADDR_HEAD.unpack_from(value)
        if family == 2:
            if len(transaction_id) != 12:
                raise _bad("transaction ID must be 12 bytes")
            addr = int.from_bytes(value[4:]) ^ int.from_bytes(MAGIC_COOKIE_BYTES + transaction_id)
            return socket.inet_ntop(_AF_INET6, addr.to_bytes(16)), xport ^ _COOKIE_HI
    else:
        raise _bad(f"XOR address attribute has length {n}, expected 8 (IPv4) or 20 (IPv6)")
    raise _bad(f"address family {family:#04x} does not match length {n}")


# -- ERROR-CODE (RFC 8489 §14.8) ------------------------------------------------------------------


def encode_error_code(code: int, reason: str = "") -> bytes:
    """Encode ERROR-CODE: class (hundreds) in 3 bits, number (0-99) in 8 bits, UTF-8 reason."""
    if not 300 <= code <= 699:
        raise ValueError(f"STUN error code must be in 300..699, got {code}")
    raw = reason.encode()
    if len(reason) >= 128 or len(raw) > MAX_TEXT_BYTES:
        raise ValueError("reason phrase must be fewer than 128 characters")
    return _ERR_HEAD.pack(code // 100, code % 100) + raw


def decode_error_code(value: bytes) -> tuple[int, str]:
    """Decode ERROR-CODE into ``(code, reason)``; undecodable reason bytes are replaced."""
    if len(value) < 4:
        raise _bad(f"ERROR-CODE too short ({len(value)} bytes)")
    cls, number = _ERR_HEAD.unpack_from(value)
    cls &= 0x07
    if not 3 <= cls <= 6 or number > 99:
        raise _bad(f"ERROR-CODE class {cls} number {number} out of range")
    return cls * 100 + number, value[4:].decode("utf-8", "replace")


# -- UNKNOWN-ATTRIBUTES (RFC 8489 §14.9) ----------------------------------------------------------


def encode_unknown_attributes(types: Iterable[int]) -> bytes:
    """Encode a list of 16-bit attribute types (padding is added by the message builder)."""
    return b"".join(_U16.pack(t) for t in types)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) & 1:
        raise _bad("UNKNOWN-ATTRIBUTES length is odd")
    return [t for (t,) in _U16.iter_unpack(value)]


# -- 32/64-bit integers: LIFETIME (RFC 8656 §18.2), PRIORITY, ICE-CONTROLL(ED|ING) (RFC 8445) -----


def encode_u32(v: int) -> bytes:
    return _U32.pack(v)


def decode_u32(value: bytes) -> int:
    if len(value) != 4:
        raise _bad(f"expected a 4-byte value, got {len(value)} bytes")
    return int(_U32.unpack(value)[0])


def encode_u64(v: int) -> bytes:
    return _U64.pack(v)


def decode_u64(value: bytes) -> int:
    if len(value) != 8:
        raise _bad(f"expected an 8-byte value, got {len(value)} bytes")
    return int(_U64.unpack(value)[0])


# -- REQUESTED-TRANSPORT (RFC 8656 §18.7) ---------------------------------------------------------


def encode_requested_transport(proto: int) -> bytes:
    """Protocol number (17 = UDP) followed by 24 RFFU bits."""
    if not 0 <= proto <= 0xFF:
        raise ValueError(f"protocol number out of range: {proto}")
    return bytes((proto, 0, 0, 0))


def decode_requested_transport(value: bytes) -> int:
    if len(value) != 4:
        raise _bad(f"REQUESTED-TRANSPORT has length {len(value)}, expected 4")
    return value[0]


# -- CHANNEL-NUMBER (RFC 8656 §18.1, range §12) ---------------------------------------------------


def encode_channel_number(ch: int) -> bytes:
    """Channel number followed by 16 RFFU bits."""
    if not 0 <= ch <= 0xFFFF:
        raise ValueError(f"channel number out of range: {ch}")
    return _U32.pack(ch << 16)


def decode_channel_number(value: bytes) -> int:
    """Decode CHANNEL-NUMBER; StunError(400) outside 0x4000-0x4FFF, which RFC 8656 §11.2 says
    a ChannelBind request must be rejected with 400 for."""
    if len(value) != 4:
        raise _bad(f"CHANNEL-NUMBER has length {len(value)}, expected 4")
    ch = value[0] << 8 | value[1]
    if not 0x4000 <= ch <= 0x4FFF:
        raise _bad(f"channel number {ch:#06x} outside 0x4000-0x4FFF")
    return ch


# -- EVEN-PORT (RFC 8656 §18.6) -------------------------------------------------------------------


def encode_even_port(reserve: bool) -> bytes:
    """One byte: the R bit (reserve the next-higher port too) in the most significant bit."""
    return b"\x80" if reserve else b"\x00"


def decode_even_port(value: bytes) -> bool:
    """Return the R bit. The RFC fixes the length at 1 (3 padding bytes follow on the wire)."""
    if len(value) != 1:
        raise _bad(f"EVEN-PORT has length {len(value)}, expected 1")
    return bool(value[0] & 0x80)


# -- REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11, §18.12; RFC 6156) -----


def encode_requested_address_family(family: int) -> bytes:
    if not 0 <= family <= 0xFF:
        raise ValueError(f"address family out of range: {family}")
    return bytes((family, 0, 0, 0))


def decode_requested_address_family(value: bytes) -> int:
    """Return the family byte (0x01 IPv4, 0x02 IPv6). Other values are returned unchanged: the
    server answers them with 440 Address Family not Supported (RFC 8656 §7.2), not 400."""
    if len(value) != 4:
        raise _bad(f"address family attribute has length {len(value)}, expected 4")
    return value[0]


# -- RESERVATION-TOKEN (RFC 8656 §18.9) -----------------------------------------------------------


def decode_reservation_token(value: bytes) -> bytes:
    if len(value) != 8:
        raise _bad(f"RESERVATION-TOKEN has length {len(value)}, expected 8")
    return value


# -- PASSWORD-ALGORITHM(S) (RFC 8489 §14.11, §14.12) ----------------------------------------------


def encode_password_algorithm(alg: int, params: bytes = b"") -> bytes:
    """One algorithm: 16-bit number, 16-bit parameter length, parameters padded to 4 bytes."""
    return _ALG_HEAD.pack(alg, len(params)) + params + b"\x00" * (-len(params) & 3)


def encode_password_algorithms(algs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_password_algorithm(a, p) for a, p in algs)


def decode_password_algorithms(value: bytes) -> list[tuple[int, bytes]]:
    """Decode a list of ``(algorithm, parameters)``; StunError(400) on a bad inner length."""
    out: list[tuple[int, bytes]] = []
    off = 0
    n = len(value)
    while off < n:
        if off + 4 > n:
            raise _bad("PASSWORD-ALGORITHMS truncated")
        alg, plen = _ALG_HEAD.unpack_from(value, off)
        end = off + 4 + plen
        if end > n:
            raise _bad("PASSWORD-ALGORITHMS parameter length runs past the attribute")
        out.append((alg, value[off + 4 : end]))
        off = end + (-plen & 3)
    if off != n:
        raise _bad("PASSWORD-ALGORITHMS padding runs past the attribute")
    return out


def decode_password_algorithm(value: bytes) -> tuple[int, bytes]:
    algs = decode_password_algorithms(value)
    if len(algs) != 1:
        raise _bad(f"PASSWORD-ALGORITHM must hold exactly one algorithm, got {len(algs)}")
    return algs[0]


# -- UTF-8 text: USERNAME (§14.3), REALM (§14.9), NONCE (§14.10), SOFTWARE (§14.14) ---------------


def encode_text(text: str, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    raw = text.encode()
    if len(raw) > max_bytes:
        raise ValueError(f"text attribute longer than {max_bytes} bytes")
    return raw


def decode_text(value: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """Decode a UTF-8 text attribute; StunError(400) when too long or not valid UTF-8.
    Use ``max_bytes=MAX_USERNAME_BYTES`` for USERNAME."""
    if len(value) > max_bytes:
        raise _bad(f"text attribute longer than {max_bytes} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("text attribute is not valid UTF-8") from None
