"""WebSocket frame boundaries in a tunnel, so that a stopping proxy can say goodbye (RFC 6455).

Why: the proxy relays a WebSocket's bytes without reading them (a tunnel after the 101). When
the process stops (SIGTERM, the end of a drain, `drain_timeout`), cutting the TCP connections
leaves the browser with close code 1006 ("abnormal closure") and the node with a vanished
peer, both of which look like a network fault. RFC 6455 §7.4.1 has a code for this case, 1001
"going away" ("a server going down"), but a Close frame may only be inserted between two frames
of the stream, never inside one (it would become part of a payload). So each direction of a
tunnel keeps a `FrameBoundary`: it reads the frame headers of the bytes sent (§5.2, base
framing: two bytes, an extended length of 2 or 8 bytes, a 4-byte masking key when masked) and
skips the payloads, and knows at every moment whether the bytes sent so far end on a frame
boundary. Control frames may come between the fragments of a message (§5.4), so a boundary
inside a fragmented message is a valid place too.

The tracker never changes what is relayed, and gives up (never at a boundary again) on bytes
that are not WebSocket framing: a 64-bit length with its top bit set (§5.2), or a stream that
has already carried a Close frame (§5.5.1: nothing may follow one, not even a second Close).
Pure, no I/O: proxy/server.py and proxy/upstream.py feed it; tests/unit/test_proxy_wsframes.py.
"""

from __future__ import annotations

import os
import struct
from typing import Final

__all__ = ["GOING_AWAY", "FrameBoundary", "close_frame"]

GOING_AWAY: Final = 1001  # RFC 6455 §7.4.1
_OP_CLOSE: Final = 0x8


class FrameBoundary:
    """Where one direction of a WebSocket stream stands: between frames or inside one."""

    __slots__ = ("closed", "head", "left", "lost")

    def __init__(self) -> None:
        self.head = bytearray()  # a frame header still incomplete (at most 14 bytes)
        self.left = 0  # payload bytes of the current frame still to come
        self.closed = False  # a Close frame went by (§5.5.1)
        self.lost = False  # the bytes are not WebSocket framing

    @property
    def at_boundary(self) -> bool:
        """True when a frame may be inserted now: the bytes so far end a frame (or none came),
        no Close went by, and the stream was framing as RFC 6455 says."""
        return not self.head and self.left == 0 and not self.closed and not self.lost

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Account for `data`, the next bytes sent in this direction (any split: a header may
        arrive one byte at a time)."""
        n = len(data)
        i = 0
        while i < n and not self.lost:
            left = self.left
            if left:
                take = min(left, n - i)
                self.left = left - take
                i += take
                continue
            head = self.head
            need = _header_size(head)
            take = min(need - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) == need and need == _header_size(head):
                self._header_done(head)

    def _header_done(self, head: bytearray) -> None:
        """§5.2: the payload length is 7 bits, or 126 then 16 bits, or 127 then 64 bits."""
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack_from("!H", head, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", head, 2)[0]
            if length >> 63:
                self.lost = True  # "the most significant bit MUST be 0"
                return
        if head[0] & 0x0F == _OP_CLOSE:
            self.closed = True
        self.left = length
        head.clear()


def _header_size(head: bytearray) -> int:
    """How long the header begun in `head` is: 2 until its second byte is known, then 2 plus
    the extended length (0, 2 or 8) plus the masking key (0 or 4)."""
    if len(head) < 2:
        return 2
    b = head[1]
    size = 2 + (4 if b & 0x80 else 0)
    length = b & 0x7F
    if length == 126:
        size += 2
    elif length == 127:
        size += 8
    return size


def close_frame(code: int = GOING_AWAY, *, masked: bool) -> bytes:
    """A Close frame with a status code and no reason (§5.5.1). A client's frames are masked
    with a fresh unpredictable key (§5.3), a server's never are (§5.1): `masked` says which
    side the proxy speaks for."""
    payload = struct.pack("!H", code)
    if not masked:
        return bytes((0x80 | _OP_CLOSE, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | _OP_CLOSE, 0x80 | len(payload))) + key + body
