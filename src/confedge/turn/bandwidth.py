"""Bandwidth caps for relayed media: value parsing and the token bucket (sans-I/O).

Why token buckets: media is bursty at the frame level (a video key frame is tens of packets in a
few milliseconds) but steady over a second.  A bucket of ``rate`` bytes/s holding at most
``burst`` bytes lets the bursts through and holds the average to ``rate``; what exceeds it is
dropped (never queued: late media is worthless and a queue is memory an abuser controls).

Three buckets judge every relayed packet (UDP and TCP clients alike): the allocation's
(``turn.bandwidth_per_allocation``), its username's (``turn.bandwidth_per_user``, shared by
every allocation of that username) and the whole relay's (``turn.bandwidth_total``).  Each
direction (client -> peer, peer -> client) has its own three, so a cap of 5 Mbit/s lets a call
send 5 and receive 5 (coturn's ``max-bps`` counts input and output separately too).  A packet
passes only if all three have the tokens; a refused packet takes none and is counted as a drop
on its allocation.

The same algorithm runs in C in the native data plane (``_native.c``, ``bw_admit``), with
per-user and total buckets shared by the relay threads through atomics.  Stream (TCP/TLS)
clients are relayed in Python there too, and charge those same C per-user and total buckets
(``Engine.charge``), so a username or the relay has one budget whatever the transport.

``now`` is injected (seconds, monotonic) like everywhere in the cores.
"""

from __future__ import annotations

import re

__all__ = ["BURST_SECONDS", "TokenBucket", "burst_for", "format_rate", "parse_rate"]

# A bucket holds this many seconds of its rate (at least MIN_BURST bytes): enough for a key
# frame, little enough that a flow above the cap is held to it within a few percent per second.
BURST_SECONDS = 0.1
MIN_BURST = 64 * 1024

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*(bit|bps|b|B|Bps)?(?:/s)?\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(value: object) -> int:
    """A bandwidth setting in bytes per second; 0 means unlimited.

    Accepted: an integer (bytes/s), ``"unlimited"``, or a number with a decimal SI prefix and
    a unit: ``"10M"`` or ``"10MB"`` (10,000,000 bytes/s), ``"2.5Mbit"`` or ``"2.5Mbps"``
    (2,500,000 bits/s = 312,500 bytes/s), ``"500k"``.  Without ``bit``/``bps`` the unit is
    bytes.  Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a bandwidth")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative (0 = unlimited)")
        return value
    if isinstance(value, str):
        if value.strip().lower() in ("unlimited", "0"):
            return 0
        m = _RATE.match(value)
        if m is not None:
            number, prefix, unit = m.groups()
            rate = float(number) * _SCALE[prefix.lower()]
            if unit in ("bit", "bps"):
                rate /= 8
            return int(rate)
    raise ValueError(
        f"{value!r} is not a bandwidth: give bytes/s as an integer, "
        '"unlimited", or a value like "10M" (bytes/s), "2.5Mbit" (bits/s), "500k"'
    )


def format_rate(rate: int) -> str:
    """For logs and the status page: bytes/s as Mbit/s."""
    return "unlimited" if rate <= 0 else f"{rate * 8 / 1e6:.3g} Mbit/s"


def burst_for(rate: int) -> int:
    """The bucket size for a rate (BURST_SECONDS of it, at least MIN_BURST bytes)."""
    return max(MIN_BURST, int(rate * BURST_SECONDS))


class TokenBucket:
    """``rate`` bytes/s, at most ``burst`` bytes saved up; ``rate`` 0 = unlimited.

    ``take(now, n)`` is the per-packet call: refill by the time elapsed, then spend ``n`` if
    there is enough.  ``take_all`` spends on several buckets only if every one has enough, so a
    packet refused by the total cap does not also cost its allocation's tokens."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: int, burst: int | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else burst_for(rate)
        self.tokens = float(self.burst)
        self.last = now

    def set_rate(self, rate: int) -> None:
        """Change the rate (degrade policy, reload); the saved tokens stay within the new burst."""
        self.rate = rate
        self.burst = burst_for(rate)
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self, now: float) -> None:
        dt = now - self.last
        if dt > 0:
            self.last = now
            self.tokens = min(float(self.burst), self.tokens + dt * self.rate)

    def take(self, now: float, n: int) -> bool:
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    @staticmethod
    def take_all(now: float, n: int, buckets: tuple[TokenBucket | None, ...]) -> bool:
        if not TokenBucket.has_all(now, n, buckets):
            return False
        TokenBucket.spend_all(n, buckets)
        return True

    @staticmethod
    def has_all(now: float, n: int, buckets: tuple[TokenBucket | None, ...]) -> bool:
        """Do all of ``buckets`` (refilled to ``now``) hold ``n`` bytes?  Spends nothing: a
        caller that must also ask another budget (the native engine's shared buckets) spends
        with spend_all only once that one said yes."""
        for b in buckets:
            if b is not None and b.rate > 0:
                b._refill(now)
                if b.tokens < n:
                    return False
        return True

    @staticmethod
    def spend_all(n: int, buckets: tuple[TokenBucket | None, ...]) -> None:
        for b in buckets:
            if b is not None and b.rate > 0:
                b.tokens -= n
