"""ChannelData messages and stream framing (RFC 8656 §12, §12.5; RFC 8489 §6.2.2; RFC 7983).

Theory of operation
-------------------
A TURN port carries two kinds of packets, told apart by the first byte (RFC 7983 §7, RFC 8656
§12): 0x00-0x03 is STUN (top two bits 00), 0x40-0x4F is ChannelData (channel numbers
0x4000-0x4FFF; 0x5000-0x7FFF are reserved, RFC 8656 §12). ChannelData is the media hot path::

     0                   1                   2                   3
    |         Channel Number        |            Length             |
    |                       Application Data ...                    |

so :func:`parse_channel_data` does one ``unpack_from`` and returns a zero-copy ``memoryview``
of the payload that can go straight to ``sendto``.

Over UDP a ChannelData message need not be padded and trailing bytes beyond ``Length`` are
ignored; a datagram shorter than ``4 + Length`` is discarded (RFC 8656 §12.5). Over TCP/TLS there
are no datagram boundaries: STUN frames are ``20 + Length`` bytes (RFC 8489 §6.2.2) and
ChannelData frames are padded to a multiple of 4 (RFC 8656 §12.5), which
:func:`next_frame_length` computes so that stream adapters can cut frames out of their buffer,
and :class:`StreamFramer` does the cutting for them.
"""

from __future__ import annotations

import struct

from .constants import StunError

__all__ = [
    "StreamFramer",
    "encode_channel_data",
    "is_channel_data",
    "next_frame_length",
    "parse_channel_data",
]

_CD = struct.Struct("!HH")
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def is_channel_data(data: bytes) -> bool:
    """First byte 0x40..0x4F and at least the 4-byte header present."""
    return len(data) >= 4 and 0x40 <= data[0] <= 0x4F


def parse_channel_data(data: bytes) -> tuple[int, memoryview | bytes]:
    """Return ``(channel, payload)``. Raises StunError(None) (drop) when shorter than 4 bytes,
    when the channel is outside 0x4000-0x4FFF, or when ``Length`` exceeds the bytes present."""
    if len(data) < 4:
        raise StunError(None, "ChannelData shorter than its 4-byte header")
    channel, length = _CD.unpack_from(data)
    if not 0x4000 <= channel <= 0x4FFF:
        raise StunError(None, f"channel number {channel:#06x} outside 0x4000-0x4FFF")
    if 4 + length > len(data):
        raise StunError(None, f"ChannelData length {length} exceeds {len(data) - 4} bytes")
    return channel, memoryview(data)[4 : 4 + length]


def encode_channel_data(
    channel: int, payload: bytes | bytearray | memoryview, *, pad: bool = False
) -> bytes:
    """Frame ``payload`` for ``channel``; ``pad=True`` for TCP/TLS (RFC 8656 §12.5).

    ``payload`` may be any buffer (a memoryview from :func:`parse_channel_data` included).
    """
    n = len(payload)
    if n > 0xFFFF:
        raise ValueError(f"ChannelData payload of {n} bytes does not fit the length field")
    if pad:
        return _CD.pack(channel, n) + payload + _PAD[n & 3]
    return _CD.pack(channel, n) + payload


def next_frame_length(buf: bytes | bytearray | memoryview) -> int | None:
    """Total length of the frame at the start of a TCP stream buffer, or None if fewer than 4
    bytes are buffered.

    STUN (first byte 0-3): 20 + Length (RFC 8489 §6.2.2). ChannelData (first byte 0x40-0x4F):
    4 + Length rounded up to 4 (RFC 8656 §12.5). Raises StunError(None) when the first byte is
    neither (the peer is not speaking TURN, so the connection should be closed) or a STUN length
    is not a multiple of 4 (RFC 8489 §14: the framing would be lost)."""
    if len(buf) < 4:
        return None
    first = buf[0]
    length = buf[2] << 8 | buf[3]
    if first <= 0x03:
        # RFC 7983 §7: STUN starts with 0-3 (every registered method is below 0x100). 4-63
        # would be TLS/DTLS (0x14-0x3F) and the like: not for us.
        if length & 3:
            raise StunError(None, f"STUN length {length} is not a multiple of 4")
        return 20 + length
    if 0x40 <= first <= 0x4F:
        return 4 + ((length + 3) & ~3)
    raise StunError(None, f"first byte {first:#04x} is neither STUN nor ChannelData")


class StreamFramer:
    """Cuts a TCP/TLS byte stream into STUN and ChannelData frames.

    ``feed`` returns the complete frames now available (as ``bytes``; ChannelData frames keep
    their padding, which :func:`parse_channel_data` ignores) and keeps the remainder. It raises
    StunError(None) for garbage, and also when more than ``max_buffer`` bytes would be buffered,
    which bounds memory per connection (a frame is at most 20 + 65535 bytes).
    """

    __slots__ = ("_buf", "max_buffer")

    def __init__(self, max_buffer: int = 20 + 0xFFFF + 4) -> None:
        self._buf = bytearray()
        self.max_buffer = max_buffer

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        start = 0
        end = len(buf)
        mv = memoryview(buf)
        try:
            while True:
                need = next_frame_length(mv[start:])
                if need is None or start + need > end:
                    break
                frames.append(bytes(mv[start : start + need]))
                start += need
        finally:
            mv.release()
        if start:
            del buf[:start]
        if len(buf) > self.max_buffer:
            raise StunError(None, f"more than {self.max_buffer} bytes buffered without a frame")
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)
