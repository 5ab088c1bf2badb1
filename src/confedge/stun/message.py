"""STUN message parsing and building (RFC 8489 §5, §6, §14; RFC 5389 compatible).

Theory of operation
-------------------
Header (RFC 8489 §5)::

     0                   1                   2                   3
    |0 0|     STUN Message Type     |         Message Length        |
    |                         Magic Cookie                          |
    |                     Transaction ID (96 bits)                  |

followed by ``Message Length`` bytes of TLV attributes, each padded to a multiple of 4 (§14).

:func:`parse_message` is on the TURN hot path (every Send indication and every control request
goes through it), so it does exactly one pass with precompiled ``struct.Struct`` objects and
allocates nothing per attribute beyond the ``(type, value)`` tuple it must return. It validates
the framing completely (so that later code can trust offsets) but interprets no attribute values:
decoding is lazy, in :mod:`confedge.stun.attributes`, because a Refresh or ChannelBind needs only
three or four of them.

Rules enforced, with what the caller should do on failure (``StunError.code``):

* fewer than 20 bytes, top two bits not 00, wrong magic cookie, length field not equal to the
  datagram/frame size or not a multiple of 4: not STUN (``None``: drop silently, §6.3).
* an attribute whose length (plus padding, §14) runs past the end: malformed (400).
* MESSAGE-INTEGRITY must be 20 bytes, MESSAGE-INTEGRITY-SHA256 16-32 bytes in steps of 4 (§14.5,
  §14.6): else 400.
* attributes after MESSAGE-INTEGRITY are *ignored* (left out of ``attributes``) except
  MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT is
  kept (§14.5, §14.6). This is what makes integrity checks meaningful: nothing an on-path
  attacker appends after the HMAC can influence processing.
* FINGERPRINT must be 4 bytes, the last attribute, and carry the right CRC-32 (§14.7); anything
  else means the packet is not (intact) STUN: ``None``, drop.
* more than ``max_attributes`` attributes or more than ``max_size`` bytes: 400 / ``None``.

Unknown comprehension-required attributes are NOT rejected here; the server asks
:func:`unknown_comprehension_required` and answers 420 itself (§6.3.1), because only requests are
answered and only the server knows which class it is handling.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

from .attributes import encode_error_code, encode_xor_address
from .constants import (
    DEFAULT_MAX_ATTRIBUTES,
    FINGERPRINT_XOR,
    KNOWN_ATTRIBUTES,
    MAGIC_COOKIE,
    MAX_MESSAGE_SIZE,
    StunError,
)
from .mac import hmac_digest

__all__ = [
    "Message",
    "MessageBuilder",
    "decode_message_type",
    "encode_message_type",
    "is_stun",
    "new_transaction_id",
    "parse_message",
    "unknown_comprehension_required",
]

_HEADER = struct.Struct("!HHI12s")  # type, length, magic cookie, transaction ID
_TL = struct.Struct("!HH")  # attribute type, length
_U32 = struct.Struct("!I")
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # indexed by len % 4

_MI = 0x0008
_MI256 = 0x001C
_FP = 0x8028


def encode_message_type(method: int, msg_class: int) -> int:
    """Interleave the 12 method bits M11..M0 and class bits C1 C0 (RFC 8489 §5, figure 3)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((msg_class & 1) << 4)
        | ((msg_class & 2) << 7)
    )


def decode_message_type(mtype: int) -> tuple[int, int]:
    """Inverse of :func:`encode_message_type`: ``(method, class)``."""
    return (
        (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2),
        ((mtype >> 4) & 1) | ((mtype >> 7) & 2),
    )


class Message:
    """A parsed (or hand-made) STUN message.

    ``attributes`` holds raw values without padding in wire order. The three offsets locate
    MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (their TLV header) in ``raw``,
    -1 when absent; :mod:`confedge.stun.integrity` needs them to know what the HMAC covers.

    A plain class rather than a dataclass: one is built per request, and a dataclass's
    generated ``__init__`` stays interpreted even when mypyc compiles this module.
    """

    __slots__ = (
        "attributes",
        "fingerprint_offset",
        "integrity_offset",
        "integrity_sha256_offset",
        "method",
        "msg_class",
        "raw",
        "transaction_id",
    )

    def __init__(
        self,
        method: int,
        msg_class: int,
        transaction_id: bytes,
        attributes: list[tuple[int, bytes]],
        raw: bytes = b"",
        integrity_offset: int = -1,
        integrity_sha256_offset: int = -1,
        fingerprint_offset: int = -1,
    ) -> None:
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id
        self.attributes = attributes
        self.raw = raw
        self.integrity_offset = integrity_offset
        self.integrity_sha256_offset = integrity_sha256_offset
        self.fingerprint_offset = fingerprint_offset

    def _fields(self) -> tuple[object, ...]:
        return (
            self.method,
            self.msg_class,
            self.transaction_id,
            self.attributes,
            self.raw,
            self.integrity_offset,
            self.integrity_sha256_offset,
            self.fingerprint_offset,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return (
            f"Message(method={self.method:#x}, msg_class={self.msg_class}, "
            f"transaction_id={self.transaction_id!r}, attributes={self.attributes!r})"
        )

    def get(self, attr: int) -> bytes | None:
        """Value of the first occurrence of ``attr`` (RFC 8489 §14: later duplicates are
        ignored), or None."""
        for t, v in self.attributes:
            if t == attr:
                return v
        return None

    def has(self, attr: int) -> bool:
        # A plain loop: about twice as fast as any(<generator>) for the usual 3-8 attributes.
        for t, _ in self.attributes:  # noqa: SIM110
            if t == attr:
                return True
        return False

    def get_all(self, attr: int) -> list[bytes]:
        """All values of ``attr`` in order (CreatePermission may carry several
        XOR-PEER-ADDRESS, RFC 8656 §9.1)."""
        return [v for t, v in self.attributes if t == attr]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self.attributes)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 8489 §6.3, RFC 7983): top two bits 00, magic cookie at
    bytes 4..8, length a multiple of 4. Does not validate the length against the size."""
    return (
        len(data) >= 20
        and data[0] < 0x40
        and data[4] == 0x21
        and data[5] == 0x12
        and data[6] == 0xA4
        and data[7] == 0x42
        and not data[3] & 3
    )


def parse_message(
    raw: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_MESSAGE_SIZE,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> Message:
    """Validate and split one complete STUN message (a UDP datagram or one TCP frame).

    Raises only :class:`StunError`; see the module docstring for the rules and codes.
    """
    # One typed local (mypyc compiles this module: a bytes variable, not a union, on the hot
    # path); a bytearray or memoryview (a TCP frame) is copied once.
    data = raw if type(raw) is bytes else bytes(raw)
    n = len(data)
    if n < 20:
        raise StunError(None, f"{n} bytes is shorter than the 20-byte STUN header")
    if n > max_size:
        raise StunError(None, f"message of {n} bytes exceeds the limit of {max_size}")
    mtype, length, cookie, tid = _HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunError(None, "first two bits are not 00: not a STUN message")
    if cookie != MAGIC_COOKIE:
        raise StunError(None, "wrong magic cookie: not an RFC 5389/8489 STUN message")
    if length != n - 20 or length & 3:
        raise StunError(None, f"length field {length} does not match {n - 20} bytes of body")
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)

    attrs: list[tuple[int, bytes]] = []
    append = attrs.append
    unpack_tl = _TL.unpack_from
    mi = mi256 = fp = -1
    count = 0
    off = 20
    # `off` stays a multiple of 4 and n - 20 is a multiple of 4, so a 4-byte TLV header always
    # fits when off < n.
    while off < n:
        atype, alen = unpack_tl(data, off)
        vstart = off + 4
        nxt = vstart + ((alen + 3) & ~3)
        if nxt > n:
            raise StunError(
                400,
                f"attribute {atype:#06x} of length {alen} at offset {off} runs past the end",
                method=method,
                msg_class=cls,
                transaction_id=tid,
            )
        count += 1
        if count > max_attributes:
            raise StunError(
                400,
                f"more than {max_attributes} attributes",
                method=method,
                msg_class=cls,
                transaction_id=tid,
            )
        if fp >= 0:
            raise StunError(None, "attribute after FINGERPRINT (RFC 8489 §14.7)")
        if atype == _FP:
            if alen != 4:
                raise StunError(None, f"FINGERPRINT has length {alen}, expected 4")
            if (zlib.crc32(memoryview(data)[:off]) ^ FINGERPRINT_XOR) != _U32.unpack_from(
                data, vstart
            )[0]:
                raise StunError(None, "FINGERPRINT does not match (RFC 8489 §14.7)")
            fp = off
        elif mi256 >= 0:
            off = nxt  # §14.6: only FINGERPRINT may follow MESSAGE-INTEGRITY-SHA256
            continue
        elif atype == _MI256:
            if not 16 <= alen <= 32 or alen & 3:
                raise StunError(
                    400,
                    f"MESSAGE-INTEGRITY-SHA256 has length {alen}, expected 16..32 step 4",
                    method=method,
                    msg_class=cls,
                    transaction_id=tid,
                )
            mi256 = off
        elif mi >= 0:
            off = nxt  # §14.5: ignore what follows MESSAGE-INTEGRITY except the two above
            continue
        elif atype == _MI:
            if alen != 20:
                raise StunError(
                    400,
                    f"MESSAGE-INTEGRITY has length {alen}, expected 20",
                    method=method,
                    msg_class=cls,
                    transaction_id=tid,
                )
            mi = off
        append((atype, data[vstart : vstart + alen]))
        off = nxt
    return Message(method, cls, tid, attrs, data, mi, mi256, fp)


def unknown_comprehension_required(msg: Message) -> list[int]:
    """Comprehension-required types (0x0000-0x7FFF, RFC 8489 §14) in ``msg`` that this server
    does not understand, each once, in wire order; non-empty means answer 420 (§6.3.1)."""
    out: list[int] = []
    for t, _ in msg.attributes:
        if t < 0x8000 and t not in KNOWN_ATTRIBUTES and t not in out:
            out.append(t)
    return out


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 §6: "cryptographically random")."""
    return os.urandom(12)


class MessageBuilder:
    """Accumulates attributes and serialises a message, adding MESSAGE-INTEGRITY(-SHA256) and
    FINGERPRINT last, in the order RFC 8489 §14.5-14.7 requires.

    Usage::

        wire = (MessageBuilder(Method.BINDING, MsgClass.SUCCESS, msg.transaction_id)
                .add_xor_address(Attr.XOR_MAPPED_ADDRESS, ip, port)
                .build(fingerprint=True))
    """

    __slots__ = ("_length", "_parts", "method", "msg_class", "transaction_id")

    def __init__(self, method: int, msg_class: int, transaction_id: bytes) -> None:
        if len(transaction_id) != 12:
            raise ValueError("transaction ID must be 12 bytes")
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id
        self._parts: list[bytes | bytearray | memoryview] = []
        self._length = 0

    def add(self, attr: int, value: bytes | bytearray | memoryview) -> MessageBuilder:
        """Append one attribute; zero padding to 4 bytes is added (RFC 8489 §14). ``value`` may
        be any buffer, e.g. a relayed payload, to avoid a copy before the final join."""
        n = len(value)
        if n > 0xFFFF:
            raise ValueError(f"attribute value of {n} bytes does not fit the length field")
        pad = _PAD[n & 3]
        self._parts.append(_TL.pack(attr, n))
        self._parts.append(value)
        if pad:
            self._parts.append(pad)
        self._length += 4 + n + len(pad)
        return self

    def add_xor_address(self, attr: int, ip: str, port: int) -> MessageBuilder:
        return self.add(attr, encode_xor_address(ip, port, self.transaction_id))

    def add_error(self, code: int, reason: str = "") -> MessageBuilder:
        """Add ERROR-CODE. ``reason`` "" means none: SPEC §3 sends no reason phrases by default
        (smaller reflection); pass ``REASONS[code]`` for the standard one."""
        return self.add(0x0009, encode_error_code(code, reason))

    def build(
        self, *, key: bytes | None = None, sha256: bool = False, fingerprint: bool = False
    ) -> bytes:
        """Serialise. With ``key``, append MESSAGE-INTEGRITY (HMAC-SHA1, 20 bytes) or, when
        ``sha256``, MESSAGE-INTEGRITY-SHA256 (32 bytes), computed over the message with the
        length field already counting the integrity attribute (§14.5, §14.6). With
        ``fingerprint``, append FINGERPRINT last, the CRC-32 of everything before it XOR
        0x5354554E with the length field counting it (§14.7)."""
        mtype = encode_message_type(self.method, self.msg_class)
        tid = self.transaction_id
        body = b"".join(self._parts)
        length = self._length
        if key is not None:
            if sha256:
                attr, ilen, digest = _MI256, 32, "sha256"
            else:
                attr, ilen, digest = _MI, 20, "sha1"
            length += 4 + ilen
            mac = hmac_digest(key, _HEADER.pack(mtype, length, MAGIC_COOKIE, tid) + body, digest)
            body += _TL.pack(attr, ilen) + mac
        if fingerprint:
            length += 8
        if length > 0xFFFF:
            raise ValueError(f"message body of {length} bytes does not fit the length field")
        out = _HEADER.pack(mtype, length, MAGIC_COOKIE, tid) + body
        if fingerprint:
            crc = zlib.crc32(out) ^ FINGERPRINT_XOR
            out += _TL.pack(_FP, 4) + _U32.pack(crc)
        return out
