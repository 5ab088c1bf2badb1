"""Sans-I/O guard core: failure counters and ban decisions, with the time passed in.

Theory of operation
-------------------
Every failure is a `Failure` event (a wrong conference PIN seen by the proxy, or a wrong TURN
credential). Events reach the core from the worker that saw them *and* from every other worker
and instance through the shared store, so each core counts the same union of events and any of
them may be the one that crosses a threshold. The store makes ban insertion idempotent (a second
ban of a source that is already banned is dropped), so two cores deciding at once is harmless.

Counters are sliding windows of timestamps over `findtime` (fail2ban's semantics):

* per client address, PIN failures: `maxretry` bans the address;
* per IPv6 /64, PIN failures: `prefix_maxretry` bans the whole /64, because one subscriber
  usually holds a /64 and can rotate addresses inside it for free;
* per conference alias, PIN failures from anyone: `conference_maxretry` means a distributed
  guess at one PIN. Every source that contributed is banned, and the conference enters *alert*
  for `bantime`: during alert a single wrong PIN for it bans the source at once. We chose this
  over locking the conference because a lock-down hands the attacker a denial of service against
  the conference's real participants, who know the PIN and never fail; alert mode costs them
  nothing, and costs a mistyping participant one ban (lifted with `confedge bans remove`).
* per client address, TURN authentication failures: `turn_maxretry` bans the address.

Events at or before a source's latest ban were "used up" by that ban and never count again;
this keeps a restarted worker (which replays the last `findtime` of events from the store) or a
late-synced event from banning someone a second time for the same failures.

Ban durations escalate: the n-th ban of a source within `ban_memory` of its previous ban lasts
`bantime * escalation**(n-1)`, capped at `max_bantime`, stretched by up to `jitter` (a random
fraction) so an attacker cannot time his return to the second.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from confedge.config import GuardConfig
from confedge.guard.addresses import Networks, in_networks, parse_networks, prefix64

__all__ = ["BanRecord", "Failure", "GuardCore", "ban_duration"]

PIN = "pin"
TURN = "turn"
# Bound on tracked keys per counter: failures need a real round trip each, so this is only a
# backstop against memory growth from an attacker with a vast IPv6 range.
MAX_TRACKED = 200_000


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt. `pin` is a salted hash (never the PIN itself), "" when absent."""

    ts: float
    kind: str  # "pin" or "turn"
    ip: str  # canonical address
    alias: str = ""
    pin: str = ""
    origin: str = ""


# A ban's reason, at most this long (characters): it is a log field, a status-page cell and a
# value in the shared store, and it can hold a conference alias from a request path (up to
# 8 KB) or whatever another instance or a hand edit put into Redis or SQLite.
REASON_MAX = 256


def bounded_reason(text: str) -> str:
    """`text`, cut to REASON_MAX characters with a final "…" when longer."""
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "\u2026"


@dataclass(frozen=True, slots=True)
class BanRecord:
    """A ban, current or past (past ones are kept `ban_memory` long for escalation)."""

    source: str  # canonical address or IPv6 "/64" network
    created: float
    expires: float
    count: int  # 1 for a first ban, n for the n-th within ban_memory
    failures: int  # failures that triggered it (0 for a manual ban)
    reason: str

    def active(self, now: float) -> bool:
        return self.expires > now

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "created": self.created,
            "expires": self.expires,
            "count": self.count,
            "failures": self.failures,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> BanRecord:
        """A record as stored in Redis (shared, open to hand edits). Raises ValueError for
        times that are not finite: ``float()`` takes "inf", "nan" and 1e999, and an infinite
        expiry once made the status page and /status.json answer 500 while it stayed."""
        created = float(d["created"])  # type: ignore[arg-type]
        expires = float(d["expires"])  # type: ignore[arg-type]
        if not (math.isfinite(created) and math.isfinite(expires)):
            raise ValueError("ban times must be finite")
        return cls(
            source=str(d["source"]),
            created=created,
            expires=expires,
            count=int(d["count"]),  # type: ignore[call-overload]
            failures=int(d["failures"]),  # type: ignore[call-overload]
            reason=bounded_reason(str(d["reason"])),
        )


def ban_duration(cfg: GuardConfig, count: int, u: float) -> float:
    """Duration of the `count`-th ban: escalated, capped, jittered by fraction u in [0, 1)."""
    cap = cfg.max_bantime
    d = cfg.bantime
    for _ in range(max(0, count - 1)):  # a loop, not **, so that huge counts cannot overflow
        d *= cfg.escalation
        if d >= cap:
            break
    d = min(d, cap)
    return min(d * (1.0 + cfg.jitter * u), cap)


class _Window:
    """Sorted timestamps inside the sliding window (events from other workers arrive late)."""

    __slots__ = ("ts",)

    def __init__(self) -> None:
        self.ts: list[float] = []

    def add(self, t: float, cutoff: float) -> int:
        bisect.insort(self.ts, t)
        self.drop_until(cutoff)
        return len(self.ts)

    def drop_until(self, cutoff: float) -> None:
        i = bisect.bisect_right(self.ts, cutoff)
        if i:
            del self.ts[:i]


class GuardCore:
    """Counters and decisions; no I/O, no clock. See the module docstring."""

    def __init__(self, cfg: GuardConfig, rand: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self._rand = rand
        self._ignore: Networks = parse_networks(cfg.ignore)
        self._addr: dict[str, _Window] = {}
        self._prefix: dict[str, _Window] = {}
        self._turn: dict[str, _Window] = {}
        self._pins: dict[str, dict[str, float]] = {}
        self._conf: dict[str, list[tuple[float, str]]] = {}
        self._conf_reset: dict[str, float] = {}
        self._alert: dict[str, float] = {}
        self.bans: dict[str, BanRecord] = {}

    # -- queries ---------------------------------------------------------------------------

    def retune(self, cfg: GuardConfig) -> None:
        """Reloaded thresholds and ignore list; windows and bans so far are kept."""
        self.cfg = cfg
        self._ignore = parse_networks(cfg.ignore)

    def ignored(self, ip: str) -> bool:
        return in_networks(ip, self._ignore)

    def is_banned(self, source: str, now: float) -> bool:
        rec = self.bans.get(source)
        return rec is not None and rec.expires > now

    def active(self, now: float) -> list[BanRecord]:
        return [r for r in self.bans.values() if r.expires > now]

    def alert_until(self, alias: str) -> float | None:
        return self._alert.get(alias)

    def distinct_pins(self, ip: str) -> int:
        return len(self._pins.get(ip, {}))

    def pin_failures(self, ip: str, now: float) -> list[float]:
        """Sorted times of ip's counted PIN failures inside the window (for the in-flight
        admission while the store is unreachable, guard/inflight.py)."""
        w = self._addr.get(ip)
        cutoff = now - self.cfg.findtime
        return [] if w is None else [t for t in w.ts if t > cutoff]

    # -- events ----------------------------------------------------------------------------

    def observe(self, f: Failure, now: float) -> list[BanRecord]:
        """Count one failure; return the bans it causes (already applied to `self.bans`)."""
        cutoff = now - self.cfg.findtime
        if f.ts <= cutoff or self.ignored(f.ip):
            return []
        if f.kind == TURN:
            return self._observe_turn(f, now, cutoff)
        if f.kind != PIN:
            return []
        out: list[BanRecord] = []
        counted = True
        if f.pin and self._fresh(f.ip, f.ts):
            pins = self._pins.get(f.ip)
            if pins is None:
                pins = self._pins[f.ip] = self._bounded(self._pins)
            for h in [h for h, t in pins.items() if t <= cutoff]:
                del pins[h]
            if self.cfg.distinct_pins and f.pin in pins:
                counted = False
            pins[f.pin] = max(f.ts, pins.get(f.pin, f.ts))
        if counted and self._fresh(f.ip, f.ts):
            n = self._window(self._addr, f.ip).add(f.ts, cutoff)
            if n >= self.cfg.maxretry and not self.is_banned(f.ip, now):
                k = len(self._pins.get(f.ip, {}))
                out.append(self._ban(f.ip, now, f"pin: {n} wrong PINs ({k} distinct)", n))
        p = prefix64(f.ip)
        if counted and p is not None and self._fresh(p, f.ts):
            n = self._window(self._prefix, p).add(f.ts, cutoff)
            if n >= self.cfg.prefix_maxretry and not self.is_banned(p, now):
                out.append(self._ban(p, now, f"pin: {n} wrong PINs from one /64", n))
        if f.alias:
            out.extend(self._observe_conference(f, now, cutoff))
        return out

    def _observe_turn(self, f: Failure, now: float, cutoff: float) -> list[BanRecord]:
        if not self._fresh(f.ip, f.ts):
            return []
        n = self._window(self._turn, f.ip).add(f.ts, cutoff)
        if n >= self.cfg.turn_maxretry and not self.is_banned(f.ip, now):
            return [self._ban(f.ip, now, f"turn: {n} wrong credentials", n)]
        return []

    def _observe_conference(self, f: Failure, now: float, cutoff: float) -> list[BanRecord]:
        alias = f.alias
        until = self._alert.get(alias)
        if until is not None and until > now:
            # Alert: a conference under distributed attack; one wrong PIN is enough.
            if f.ts > self._conf_reset.get(alias, 0.0) and not self.is_banned(f.ip, now):
                return [self._ban(f.ip, now, f"conference {alias}: wrong PIN during alert", 1)]
            return []
        if until is not None:
            del self._alert[alias]
        if f.ts <= self._conf_reset.get(alias, float("-inf")) or not self._fresh(f.ip, f.ts):
            return []  # already paid for (a replay after restart, or a late copy)
        win = self._conf.get(alias)
        if win is None:
            win = self._conf[alias] = []
            if len(self._conf) > MAX_TRACKED:
                del self._conf[next(iter(self._conf))]
        bisect.insort(win, (f.ts, f.ip))
        i = bisect.bisect_right(win, (cutoff, "\uffff"))
        if i:
            del win[:i]
        if len(win) < self.cfg.conference_maxretry:
            return []
        sources: dict[str, int] = {}
        for _, ip in win:
            sources[ip] = sources.get(ip, 0) + 1
        total = len(win)
        del self._conf[alias]
        self._conf_reset[alias] = now
        self._alert[alias] = now + self.cfg.bantime
        reason = f"conference {alias}: {total} wrong PINs from {len(sources)} sources"
        return [
            self._ban(ip, now, reason, n)
            for ip, n in sources.items()
            if not self.is_banned(ip, now)
        ]

    # -- bans ------------------------------------------------------------------------------

    def _ban(self, source: str, now: float, reason: str, failures: int) -> BanRecord:
        prev = self.bans.get(source)
        count = 1
        if prev is not None and prev.expires + self.cfg.ban_memory > now:
            count = prev.count + 1
        rec = BanRecord(
            source=source,
            created=now,
            expires=now + ban_duration(self.cfg, count, self._rand()),
            count=count,
            failures=failures,
            reason=bounded_reason(reason),
        )
        self.put(rec)
        return rec

    def manual_ban(self, source: str, now: float, seconds: float | None, reason: str) -> BanRecord:
        """An operator's ban: escalates like any other unless `seconds` fixes its length."""
        rec = self._ban(source, now, reason, 0)
        if seconds is not None:
            rec = replace(rec, expires=now + seconds)
            self.put(rec)
        return rec

    def put(self, rec: BanRecord) -> None:
        """Adopt a ban (own decision, another worker's, or an operator's).

        The counters of the source are dropped up to the ban's creation: those failures are
        paid for.
        """
        self.bans[rec.source] = rec
        for table in (self._addr, self._prefix, self._turn):
            w = table.get(rec.source)
            if w is not None:
                w.drop_until(rec.created)
                if not w.ts:
                    del table[rec.source]
        self._pins.pop(rec.source, None)

    def set_bans(self, records: Iterable[BanRecord]) -> None:
        """Replace the whole ban view with the store's (removals by an operator included)."""
        old = self.bans
        self.bans = {}
        for rec in records:
            prev = old.get(rec.source)
            if prev is None or prev.created != rec.created:
                self.put(rec)
            else:
                self.bans[rec.source] = rec

    def remove(self, source: str) -> BanRecord | None:
        return self.bans.pop(source, None)

    # -- housekeeping ----------------------------------------------------------------------

    def purge(self, now: float) -> None:
        """Forget empty windows, finished alerts and bans past their escalation memory."""
        cutoff = now - self.cfg.findtime
        for table in (self._addr, self._prefix, self._turn):
            for key in list(table):
                w = table[key]
                w.drop_until(cutoff)
                if not w.ts:
                    del table[key]
        for ip in list(self._pins):
            pins = self._pins[ip]
            for h in [h for h, t in pins.items() if t <= cutoff]:
                del pins[h]
            if not pins:
                del self._pins[ip]
        for alias in list(self._conf):
            win = [e for e in self._conf[alias] if e[0] > cutoff]
            if win:
                self._conf[alias] = win
            else:
                del self._conf[alias]
        for alias in [a for a, t in self._alert.items() if t <= now]:
            del self._alert[alias]
        for alias in [a for a, t in self._conf_reset.items() if t <= cutoff]:
            del self._conf_reset[alias]
        forget = now - self.cfg.ban_memory
        for src in [s for s, r in self.bans.items() if r.expires <= now and r.expires <= forget]:
            del self.bans[src]

    def tracked(self) -> int:
        """Number of tracked counter keys (for tests and the status page)."""
        return len(self._addr) + len(self._prefix) + len(self._turn) + len(self._conf)

    # -- helpers ---------------------------------------------------------------------------

    def _fresh(self, source: str, ts: float) -> bool:
        """False if the source's latest ban already paid for a failure at ts."""
        rec = self.bans.get(source)
        return rec is None or ts > rec.created

    @staticmethod
    def _bounded(table: dict[str, dict[str, float]]) -> dict[str, float]:
        if len(table) >= MAX_TRACKED:
            del table[next(iter(table))]
        return {}

    @staticmethod
    def _window(table: dict[str, _Window], key: str) -> _Window:
        w = table.get(key)
        if w is None:
            if len(table) >= MAX_TRACKED:
                del table[next(iter(table))]
            w = table[key] = _Window()
        return w
