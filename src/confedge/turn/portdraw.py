"""Random relay port numbers from the kernel's CSPRNG, drawn in bulk.

Why: RFC 8656 §7.2 asks for relay ports chosen at random (so an off-path attacker cannot guess
a relayed transport address), which ``random.SystemRandom().randint`` does with one
``getrandom(2)`` call and four Python frames per draw; an Allocate draws once or more (again
after a port another socket holds).  Here one ``os.urandom`` call fills 256 draws, and the
module is compiled with the control plane (pyproject ``[tool.confedge] compiled``).
Rejection sampling keeps every port of the range equally likely.
"""

from __future__ import annotations

import os

__all__ = ["PortDraw"]

_BUFFER = 1024  # bytes of randomness per os.urandom call: 256 draws of 32 bits


class PortDraw:
    """Drop-in for the ``randint`` of :class:`random.SystemRandom` the data plane uses."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def _u32(self) -> int:
        if self._pos + 4 > len(self._buf):
            self._buf = os.urandom(_BUFFER)
            self._pos = 0
        pos = self._pos
        self._pos = pos + 4
        return int.from_bytes(self._buf[pos : pos + 4], "big")

    def randint(self, lo: int, hi: int) -> int:
        """A uniformly random integer in [lo, hi] (hi - lo < 2**32)."""
        span = hi - lo + 1
        if span <= 0:
            raise ValueError(f"empty range {lo}-{hi}")
        limit = (1 << 32) - (1 << 32) % span  # largest multiple of span: no modulo bias
        while True:
            v = self._u32()
            if v < limit:
                return lo + v % span
