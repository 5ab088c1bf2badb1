"""Random relay port numbers from the kernel's CSPRNG, drawn in bulk.

Why: RFC 8656 §7.2 asks for relay ports chosen at random (so an off-path attacker cannot guess
a relayed transport address), which ``random.SystemRandom().randint`` does with one
``getrandom(2)`` call and four Python frames per draw; an Allocate draws once or more (again
after a port another socket holds).  Here one ``os.urandom`` call fills 256 draws, and the
module is compiled with the control plane (pyproject ``[tool.confedge] compiled``).
Rejection sampling keeps every port of the range equally likely.

:class:`PortTable` remembers which ports of the range this process already holds, so a draw
never spends a socket(2) + bind(2) + close(2) on a port its own allocations have (the kernel's
EADDRINUSE was the only check before), and an almost full range still finds its last free
ports instead of giving up after a fixed number of random misses.
"""

from __future__ import annotations

import os

__all__ = ["PortDraw", "PortTable"]

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


_RANDOM_TRIES = 32  # random draws before a scan (a miss costs a byte lookup, no syscall)


class PortTable:
    """The relay ports of ``[lo, hi]`` this process holds, and a random free one.

    Why: with one port per allocation, a random draw in a range that is 55% held (1,000
    allocations in 1,800 ports) misses 0.45 times per Allocate on average, each miss a failed
    bind(2); at 97% held, 64 random tries all miss 14% of the time and the Allocate got 508
    while ports were free.  Here the misses on our own ports cost a byte lookup, and after
    ``_RANDOM_TRIES`` of them a scan from a random port finds any free one.  Ports other
    programs hold are still found by bind(2); the caller marks them with :meth:`hold` for the
    rest of its search.

    Every port not held is equally likely while random draws succeed (rejection sampling,
    RFC 8656 §7.2); only in a range so full that 32 draws all miss does the scan prefer the
    free port after the longest held run, which an attacker cannot steer.
    """

    __slots__ = ("_draw", "_held", "count", "hi", "lo")

    def __init__(self, lo: int, hi: int, draw: PortDraw | None = None) -> None:
        if hi < lo:
            raise ValueError(f"empty range {lo}-{hi}")
        self.lo = lo
        self.hi = hi
        self._draw = draw if draw is not None else PortDraw()
        self._held = bytearray(hi - lo + 1)
        self.count = 0  # ports held

    def _usable(self, port: int, even: bool, pair: bool) -> bool:
        lo = self.lo
        if port < lo or port > self.hi or self._held[port - lo]:
            return False
        if even and port % 2:
            return False
        if pair:
            nxt = port + 1
            if nxt > self.hi or self._held[nxt - lo]:
                return False
        return True

    def candidate(self, even: bool = False, pair: bool = False) -> int:
        """A port not held (even when ``even``; with ``port + 1`` also free when ``pair``: the
        R bit of EVEN-PORT, RFC 8656 §7.2), or -1 when there is none."""
        lo, hi = self.lo, self.hi
        for _ in range(_RANDOM_TRIES):
            port = self._draw.randint(lo, hi)
            if even and port % 2:
                port -= 1
            if self._usable(port, even, pair):
                return port
        span = hi - lo + 1
        start = self._draw.randint(lo, hi)
        for k in range(span):
            port = lo + (start - lo + k) % span
            if self._usable(port, even, pair):
                return port
        return -1

    def hold(self, port: int) -> None:
        """``port`` is taken (bound here, or found bound by another program)."""
        i = port - self.lo
        if 0 <= i < len(self._held) and not self._held[i]:
            self._held[i] = 1
            self.count += 1

    def free(self, port: int) -> None:
        """``port`` was released (its socket closed)."""
        i = port - self.lo
        if 0 <= i < len(self._held) and self._held[i]:
            self._held[i] = 0
            self.count -= 1

    def held(self, port: int) -> bool:
        i = port - self.lo
        return 0 <= i < len(self._held) and bool(self._held[i])
