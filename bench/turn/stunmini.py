"""Minimal client-side STUN/TURN encoding for the benchmark's load generator.

Why a separate codec instead of confedge.stun: the load generator must be the same, independent
program for both servers, so a bug in confedge's own codec cannot flatter (or hide from) confedge.
It implements only what a TURN client needs: requests with long-term credentials
(RFC 8489 §9.2), the responses' ERROR-CODE / REALM / NONCE / XOR-*-ADDRESS attributes, and
ChannelData framing (RFC 8656 §12.4).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass, field

MAGIC = 0x2112A442
_MAGIC_BYTES = struct.pack("!I", MAGIC)

# Methods and classes (RFC 8489 §5, RFC 8656 §17).
BINDING = 0x0001
ALLOCATE = 0x0003
REFRESH = 0x0004
CREATE_PERMISSION = 0x0008
CHANNEL_BIND = 0x0009
CLASS_REQUEST = 0x0000
CLASS_SUCCESS = 0x0100
CLASS_ERROR = 0x0110

# Attributes (RFC 8489 §18.3, RFC 8656 §18).
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_CHANNEL_NUMBER = 0x000C
ATTR_LIFETIME = 0x000D
ATTR_XOR_PEER_ADDRESS = 0x0012
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_XOR_RELAYED_ADDRESS = 0x0016
ATTR_REQUESTED_TRANSPORT = 0x0019
ATTR_XOR_MAPPED_ADDRESS = 0x0020


class StunError(Exception):
    """A response the benchmark cannot use (malformed, or an unexpected error code)."""


@dataclass
class Response:
    """The parts of a STUN response the load generator looks at."""

    msg_type: int
    txid: bytes
    attrs: dict[int, bytes] = field(default_factory=dict)

    @property
    def is_success(self) -> bool:
        return self.msg_type & 0x0110 == CLASS_SUCCESS

    @property
    def error_code(self) -> int:
        raw = self.attrs.get(ATTR_ERROR_CODE)
        if raw is None or len(raw) < 4:
            return 0
        return (raw[2] & 0x07) * 100 + raw[3]

    def xor_address(self, attr: int) -> tuple[str, int]:
        raw = self.attrs.get(attr)
        if raw is None or len(raw) < 8 or raw[1] != 0x01:
            raise StunError(f"response has no IPv4 XOR address attribute 0x{attr:04x}")
        port = struct.unpack_from("!H", raw, 2)[0] ^ (MAGIC >> 16)
        ip = bytes(a ^ b for a, b in zip(raw[4:8], _MAGIC_BYTES, strict=True))
        return socket.inet_ntoa(ip), port


def _attr(kind: int, value: bytes) -> bytes:
    pad = (4 - len(value) % 4) % 4
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * pad


def xor_address_value(ip: str, port: int) -> bytes:
    """XOR-PEER-ADDRESS value for an IPv4 address (RFC 8489 §14.2)."""
    raw = socket.inet_aton(ip)
    xip = bytes(a ^ b for a, b in zip(raw, _MAGIC_BYTES, strict=True))
    return struct.pack("!BBH", 0, 0x01, port ^ (MAGIC >> 16)) + xip


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2: key = MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def build_request(
    method: int,
    attrs: list[tuple[int, bytes]],
    *,
    key: bytes | None = None,
    txid: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Encode a request; with `key`, append MESSAGE-INTEGRITY (RFC 8489 §14.5). Returns (txid, msg)."""
    tid = txid if txid is not None else os.urandom(12)
    body = b"".join(_attr(k, v) for k, v in attrs)
    if key is None:
        return tid, struct.pack("!HHI", method | CLASS_REQUEST, len(body), MAGIC) + tid + body
    # The header length must already count the 24-byte MESSAGE-INTEGRITY attribute.
    header = struct.pack("!HHI", method | CLASS_REQUEST, len(body) + 24, MAGIC) + tid
    mac = hmac.new(key, header + body, hashlib.sha1).digest()
    return tid, header + body + _attr(ATTR_MESSAGE_INTEGRITY, mac)


def parse_response(data: bytes) -> Response:
    """Parse a STUN message header and attributes (no integrity check: the bench trusts its server)."""
    if len(data) < 20 or data[0] & 0xC0:
        raise StunError("not a STUN message")
    msg_type, length, magic = struct.unpack_from("!HHI", data, 0)
    if magic != MAGIC or 20 + length > len(data):
        raise StunError("bad STUN header")
    resp = Response(msg_type, bytes(data[8:20]))
    pos = 20
    end = 20 + length
    while pos + 4 <= end:
        kind, alen = struct.unpack_from("!HH", data, pos)
        resp.attrs.setdefault(kind, bytes(data[pos + 4 : pos + 4 + alen]))
        pos += 4 + alen + (4 - alen % 4) % 4
    return resp


def channel_data(channel: int, payload: bytes) -> bytes:
    """ChannelData message (RFC 8656 §12.4); over UDP no padding is needed."""
    return struct.pack("!HH", channel, len(payload)) + payload
