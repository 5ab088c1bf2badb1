"""STUN/TURN protocol constants and the one exception type of the codec.

Numbers come from the IANA "STUN Parameters" registry as defined by RFC 8489 §18 (STUN), RFC 8656
§17 (TURN), RFC 6156/RFC 8656 §18.11-18.12 (address families), RFC 8445 §16 (ICE attributes) and
RFC 6062 (CONNECTION-ID). They are ``IntEnum`` so that values coming off the wire (plain ``int``)
compare equal to them without conversion on the hot path.

Why a single exception type: the codec is fed attacker-controlled bytes. Callers must be able to
wrap one ``except StunError`` around a parse and be certain nothing else escapes (the property the
fuzz tests check), and the exception carries the STUN error code the server should answer with so
the TURN layer does not have to re-derive it.
"""

from __future__ import annotations

import enum

__all__ = [
    "DEFAULT_MAX_ATTRIBUTES",
    "FINGERPRINT_XOR",
    "KNOWN_ATTRIBUTES",
    "MAGIC_COOKIE",
    "MAGIC_COOKIE_BYTES",
    "MAX_MESSAGE_SIZE",
    "REASONS",
    "AddressFamily",
    "Attr",
    "ErrorCode",
    "Method",
    "MsgClass",
    "PasswordAlgorithm",
    "StunError",
    "TransportProtocol",
]

#: RFC 8489 §5: fixed value in bytes 4..8 of every STUN message; also the XOR mask of §14.2.
MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

#: RFC 8489 §14.7: the CRC-32 of FINGERPRINT is XOR-ed with this ("STUN" in ASCII).
FINGERPRINT_XOR = 0x5354554E

#: The 16-bit length field bounds a message at 20 + 65535 bytes (RFC 8489 §5). Callers may pass a
#: smaller ``max_size`` to :func:`parse_message`, e.g. for UDP where RFC 8489 §6.2.1 expects
#: messages to fit the path MTU.
MAX_MESSAGE_SIZE = 20 + 0xFFFF

#: No legitimate STUN/TURN message carries more than a couple of dozen attributes. Bounding the
#: count keeps the cost of parsing a hostile 64 KiB message of empty attributes (16k of them)
#: bounded too. Exceeding it is a 400, since the message is well-formed but absurd.
DEFAULT_MAX_ATTRIBUTES = 64


class Method(enum.IntEnum):
    """STUN methods (RFC 8489 §18.2, RFC 8656 §17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MsgClass(enum.IntEnum):
    """The two class bits C1 C0 of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(enum.IntEnum):
    """Attribute types. 0x0000-0x7FFF are comprehension-required, 0x8000-0xFFFF optional
    (RFC 8489 §14)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    CONNECTION_ID = 0x002A
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


#: Attribute types this server understands. A request carrying a comprehension-required type
#: (< 0x8000) outside this set must be answered 420 with UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1).
#: CONNECTION-ID is excluded: confedge does not implement TCP allocations (RFC 6062), so a
#: request depending on it must fail loudly rather than be half-understood.
KNOWN_ATTRIBUTES: frozenset[int] = frozenset(int(a) for a in Attr if a is not Attr.CONNECTION_ID)


class ErrorCode(enum.IntEnum):
    """Error codes used by STUN and TURN (RFC 8489 §14.8, RFC 8656 §18.15 / §19)."""

    TRY_ALTERNATE = 300
    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437
    STALE_NONCE = 438
    ADDRESS_FAMILY_NOT_SUPPORTED = 440
    WRONG_CREDENTIALS = 441
    UNSUPPORTED_TRANSPORT_PROTOCOL = 442
    PEER_ADDRESS_FAMILY_MISMATCH = 443
    ALLOCATION_QUOTA_REACHED = 486
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508


#: Default reason phrases (RFC 8489 §14.8, RFC 8656 §19), used when a reason is wanted.
REASONS: dict[int, str] = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


class PasswordAlgorithm(enum.IntEnum):
    """PASSWORD-ALGORITHM values (RFC 8489 §18.5)."""

    MD5 = 0x0001
    SHA256 = 0x0002


class AddressFamily(enum.IntEnum):
    """Family byte of address attributes and of REQUESTED-ADDRESS-FAMILY (RFC 8489 §14.1,
    RFC 8656 §18.11)."""

    IPV4 = 0x01
    IPV6 = 0x02


class TransportProtocol(enum.IntEnum):
    """REQUESTED-TRANSPORT protocol numbers (RFC 8656 §18.7); TURN only relays UDP."""

    UDP = 17
    TCP = 6


class StunError(Exception):
    """Parse or validation failure; the only exception the decoding functions raise.

    ``code`` is the STUN error code to answer with (400, or 420 with ``unknown`` filled in), or
    ``None`` when the input is not answerable (not STUN at all, truncated, bad FINGERPRINT: RFC
    8489 §6.3 says such messages are silently discarded). A code is only ever *used* for requests;
    for indications and responses the caller drops the message whatever the code.

    When the 20-byte header was readable, ``method``, ``msg_class`` and ``transaction_id`` are
    set so that the server can build the error response without re-parsing.
    """

    code: int | None
    reason: str
    unknown: tuple[int, ...]
    method: int | None
    msg_class: int | None
    transaction_id: bytes | None

    def __init__(
        self,
        code: int | None,
        reason: str = "",
        unknown: tuple[int, ...] = (),
        *,
        method: int | None = None,
        msg_class: int | None = None,
        transaction_id: bytes | None = None,
    ) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.unknown = unknown
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id

    def __str__(self) -> str:
        prefix = "not answerable" if self.code is None else str(self.code)
        return f"STUN error ({prefix}): {self.reason}"
