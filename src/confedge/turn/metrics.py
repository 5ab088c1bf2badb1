"""Live TURN figures kept by the core (sans-I/O): answer tallies, lifetimes, relay throughput.

Why here and not only at an allocation's end: an operator watching a busy edge needs to see
which allocation is moving how much *now* (a runaway client, a call stuck at the cap), and a
Prometheus scrape every 15 s needs counters that grow while allocations live.  The core samples
the data plane's per-allocation counters once a second (:meth:`RateSampler.sample`, called from
``TurnCore.sample``), which both data planes serve without stopping their relay threads.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["LIFETIME_BUCKETS", "AnswerTally", "Histogram", "Rate"]

# Allocation lifetimes (seconds): a failed ICE check ends within seconds, a call within minutes
# to hours (RFC 8656 refreshes every few minutes).
LIFETIME_BUCKETS = (10.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-friendly histogram: ``counts[i]`` observations <= ``bounds[i]`` and above the
    previous bound; the last count is the overflow (+Inf)."""

    bounds: tuple[float, ...] = LIFETIME_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, +Inf last: Prometheus' ``le`` buckets."""
        out: list[tuple[float, int]] = []
        acc = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += count
            out.append((bound, acc))
        return out


class AnswerTally:
    """Error answers sent, by (code, cause): which check turned clients away, and how often.

    Causes are short fixed words (``bad-credentials``, ``stale-nonce``, ``not-media-node``,
    ``peer-policy``, ``max-allocations``, ``relay-ports``, ``bandwidth-total``, ``draining``,
    ``user-quota``, ...) so that they can be metric labels."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, str]] = Counter()

    def add(self, code: int, cause: str) -> None:
        self.counts[(code, cause)] += 1

    def by_code(self, code: int) -> int:
        return sum(n for (c, _), n in self.counts.items() if c == code)


@dataclass(slots=True)
class Rate:
    """One allocation's recent throughput (bytes/s each way) from the last two samples."""

    bytes_to_peer: int = 0
    bytes_to_client: int = 0
    to_peer: float = 0.0
    to_client: float = 0.0
    dropped_bandwidth: int = 0
    at: float = 0.0

    def update(
        self, now: float, bytes_to_peer: int, bytes_to_client: int, dropped_bandwidth: int
    ) -> None:
        dt = now - self.at
        if dt > 0 and self.at > 0:
            self.to_peer = max(0.0, (bytes_to_peer - self.bytes_to_peer) / dt)
            self.to_client = max(0.0, (bytes_to_client - self.bytes_to_client) / dt)
        self.bytes_to_peer, self.bytes_to_client = bytes_to_peer, bytes_to_client
        self.dropped_bandwidth = dropped_bandwidth
        self.at = now
