"""The per-worker ban table behind `check()`: one dictionary lookup per request.

Why this shape: check() runs for every HTTP request and every TURN packet from a new source, so it
must cost well under 2 µs (bench/guard/bench_check.py measures it). IPv4 bans are keyed by the
address text, which is what the socket layer hands us, so the common case is a single `dict.get`
on a string, and a miss on an empty table costs one truth test. IPv6 needs `inet_pton` (C, about
0.1 µs) because the same address has many spellings and the /64 is its first 8 bytes: the
packed address and its prefix are both keys. The table is rebuilt off the hot path whenever the
shared store's ban set changes, and swapped in with one assignment.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable

from confedge.guard.addresses import source_keys
from confedge.guard.core import BanRecord

_log = logging.getLogger("confedge.guard")

__all__ = ["BanTable"]

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_MAPPED = b"\x00" * 10 + b"\xff\xff"


class BanTable:
    """Ban expiry (wall-clock seconds) by lookup key; see the module docstring."""

    __slots__ = ("_clock", "_table", "_v6")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._table: dict[str | bytes, float] = {}
        self._v6 = False  # any IPv6 key? If not, an IPv6 client needs no inet_pton
        self._clock = clock  # injectable for tests; wall clock because bans cross processes

    def __len__(self) -> int:
        return len(self._table)

    def rebuild(self, records: Iterable[BanRecord], now: float) -> None:
        table: dict[str | bytes, float] = {}
        for rec in records:
            if rec.expires > now:
                key = _key_or_none(rec.source)
                if key is not None and table.get(key, 0.0) < rec.expires:
                    table[key] = rec.expires
        self._v6 = any(isinstance(k, bytes) for k in table)
        self._table = table

    def add(self, rec: BanRecord) -> None:
        key = _key_or_none(rec.source)
        if key is None:
            return
        if self._table.get(key, 0.0) < rec.expires:
            self._table[key] = rec.expires
        if isinstance(key, bytes):
            self._v6 = True

    def discard(self, source: str) -> None:
        self._table.pop(source_keys(source), None)

    def expiry(self, ip: str) -> float | None:
        """Latest expiry among the bans that cover ip (address, /64, mapped IPv4), or None."""
        table = self._table
        if not table:
            return None
        exp = table.get(ip)
        if exp is not None or ":" not in ip:
            return exp
        try:
            packed = socket.inet_pton(_AF_INET6, ip.split("%", 1)[0])  # zone: fe80::1%eth0
        except OSError:
            return None
        if packed[:12] == _MAPPED:
            return table.get(socket.inet_ntop(_AF_INET, packed[12:]))
        exp = table.get(packed)
        net = table.get(packed[:8])
        if net is not None and (exp is None or net > exp):
            return net
        return exp

    def check(self, ip: str) -> float | None:
        """Seconds of ban left for ip, or None. The hot path: keep it short."""
        table = self._table
        if not table:
            return None
        exp = table.get(ip)
        if exp is None:
            if ":" not in ip or (not self._v6 and not ip.startswith("::ffff:")):
                return None
            exp = self.expiry(ip)
            if exp is None:
                return None
        left = exp - self._clock()
        return left if left > 0.0 else None


def _key_or_none(source: str) -> str | bytes | None:
    """The table key of a stored ban's source, or None (logged) for one that is not an address.

    Stores outlive versions and can be edited by hand: one such record (a zoned "fe80::1%eth0"
    written by an older `confedge bans add`) made every reload raise, so the guard could not
    start and running workers stopped seeing new bans."""
    try:
        return source_keys(source)
    except (OSError, ValueError):
        _log.warning("guard: ignoring a stored ban whose source is not an address: %r", source)
        return None
