"""Channel numbers and TCP framing as the TURN *server* accepts them.

RFC 8656 §12 narrowed channel numbers to 0x4000-0x4FFF, but RFC 5766 §11 allowed
0x4000-0x7FFF, and deployed clients still use the wider range: coturn's ``turnutils_uclient``
4.6 picks a channel uniformly in 0x4000-0x7FFF (0x7FFF included, about one bind in 16,384), and
coturn accepts them all.  On a TURN port the first bytes
0x50-0x7F are not used by anything else (RFC 7983 §7: STUN 0-3, ZRTP 16-19, DTLS 20-63, TURN
channels 64-79, RTP/RTCP 128-191), so accepting them costs nothing and keeps those clients
working.  confedge.stun implements the strict RFC 8656 range; these helpers are the lenient
server-side counterparts.
"""

from __future__ import annotations

from confedge.stun import StunError
from confedge.stun.constants import MAGIC_COOKIE_BYTES as _COOKIE

__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "TurnStreamFramer",
    "decode_channel_number",
    "is_channel_byte",
]

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x7FFF  # RFC 5766 §11 (as coturn reads it: STUN_VALID_CHANNEL)


def is_channel_byte(first: int) -> bool:
    """True when a packet starting with this byte is ChannelData (0x40-0x7F)."""
    return 0x40 <= first <= 0x7F


def decode_channel_number(value: bytes) -> int:
    """CHANNEL-NUMBER value -> channel; StunError(400) outside 0x4000-0x7FFF (RFC 8656 §11.2)."""
    if len(value) != 4:
        raise StunError(400, f"CHANNEL-NUMBER has length {len(value)}, expected 4")
    ch = value[0] << 8 | value[1]
    if not CHANNEL_MIN <= ch <= CHANNEL_MAX:
        raise StunError(400, f"channel number {ch:#06x} outside 0x4000-0x7FFF")
    return ch


class TurnStreamFramer:
    """Cuts a TCP byte stream into STUN messages (20 + Length, RFC 8489 §6.2.2) and ChannelData
    messages (4 + Length padded to 4, RFC 8656 §12.5).

    ``feed`` returns complete frames and keeps the remainder; StunError(None) means the stream is
    not TURN (close the connection).  The buffer is bounded: one frame is at most 20 + 65535
    bytes.

    Two early refusals, so that a stream that is not TURN is closed at its first bytes instead
    of holding up to 64 KiB until a timeout: a STUN header whose magic cookie (RFC 8489 §5) is
    wrong, and ChannelData while ``channel_ok`` is False -- a connection cannot have a channel
    before it has an allocation (RFC 8656 §11), and "GET " or "POST" look like ChannelData.
    """

    __slots__ = ("_buf", "channel_ok")

    MAX_BUFFER = 20 + 0xFFFF + 4

    def __init__(self, *, channel_ok: bool = True) -> None:
        self._buf = b""
        self.channel_ok = channel_ok

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        frames: list[bytes] = []
        start = 0
        end = len(buf)
        channel_ok = self.channel_ok
        while end - start >= 4:
            first = buf[start]
            length = buf[start + 2] << 8 | buf[start + 3]
            if first < 0x40:
                if length & 3:
                    raise StunError(None, f"STUN length {length} is not a multiple of 4")
                if end - start >= 8 and buf[start + 4 : start + 8] != _COOKIE:
                    raise StunError(None, "STUN header without the magic cookie")
                need = 20 + length
            elif first <= 0x7F:
                if not channel_ok:
                    raise StunError(None, "ChannelData before any allocation")
                need = 4 + ((length + 3) & ~3)
            else:
                raise StunError(None, f"first byte {first:#04x} is neither STUN nor ChannelData")
            if start + need > end:
                break
            frames.append(buf[start : start + need] if start or need != end else buf)
            start += need
        self._buf = buf[start:] if start < end else b""
        if len(self._buf) > self.MAX_BUFFER:
            raise StunError(None, "frame larger than any STUN or ChannelData message")
        return frames
