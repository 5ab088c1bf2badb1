"""Guard stores: where failures and bans are shared between workers and instances.

Why failures are shared as an append-only event log, not as counters: every worker's core must
see the same events to count right (an attacker's connections are spread over the workers by the
kernel), and a log lets each core keep its own sliding windows, in simulated time for tests,
while the store stays dumb. Bans are a keyed table with a version number; workers poll the
version (cheap) and reload the table only when it moved. Inserting a ban is conditional: if the
source already has an active ban the insert is dropped, so two workers that cross the threshold
on the same event produce one ban, one audit line and one escalation step.

PIN guesses in flight (guard/inflight.py) need more than a log: a request_token is admitted
or refused by *one atomic step* of the store (`reserve`: count the address's failures and live
reservations, decide with `inflight.admit`, insert the reservation), so that no two workers or
instances can both take the last slot; `settle` removes a reservation and appends its failure
in one step too. The same stores remember the sessions nodes opened (`remember_session`).

Three implementations: `MemoryStore` (one process; tests), `SQLiteStore` (default; shared by the
workers of one host, survives restarts) and `RedisStore` (shared by several hosts).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from confedge.config import Config
from confedge.guard.addresses import prefix64
from confedge.guard.core import PIN, BanRecord, Failure
from confedge.guard.inflight import Admission, InFlight, Limits, Reservation, counted

__all__ = ["GuardStore", "MemoryStore", "Poll", "StoreError", "StoreOpenError", "open_store"]


class StoreError(Exception):
    """The store cannot be reached or used; the guard keeps working locally."""


class StoreOpenError(StoreError, OSError):
    """A local store (SQLite in state_dir) cannot be opened at start.

    Also an OSError, like the file problem it is, so that `confedge run` reports it as one
    "cannot start: ..." line instead of a traceback; ``str()`` is the message alone."""


@dataclass(slots=True)
class Poll:
    """What changed since the caller's cursor."""

    failures: list[Failure]
    cursor: str
    version: str
    bans: list[BanRecord] | None = None  # None: the ban set did not change
    more: bool = False  # the failure batch was truncated; poll again


class GuardStore(Protocol):
    description: str
    transient: bool  # True for network stores: an outage at start-up is not fatal

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def salt(self) -> bytes:
        """A random salt, the same for every user of the store (PIN hashes must agree)."""
        ...

    async def push(
        self, failures: list[Failure], bans: list[BanRecord], *, force: bool = False
    ) -> list[BanRecord]:
        """Append failures and insert bans; return the bans that took effect.

        Without `force` a ban is dropped when the source already has a ban that is active at
        the new ban's creation time (see module docstring). With `force` it replaces any ban.
        """
        ...

    async def poll(self, cursor: str | None, since: float, version: str | None) -> Poll:
        """Failures after `cursor` (or, when None, with ts > since), and the bans if the ban
        set's version differs from `version`."""
        ...

    async def claim_expired(self, sources: list[str], now: float) -> list[BanRecord]:
        """Mark these sources' bans as expired-and-logged; return the ones this call marked
        (exactly one caller wins each, so exactly one audit line says the ban ended)."""
        ...

    async def list_bans(self) -> list[BanRecord]: ...

    async def remove(self, source: str) -> BanRecord | None: ...

    async def clear(self) -> int:
        """Remove every ban (and the failure log); return how many bans were active."""
        ...

    async def purge(
        self, failures_before: float, bans_before: float, *, now: float | None = None
    ) -> None:
        """Drop failures older than the window, bans expired before the memory horizon (but
        not before their failures left the window: a ban's creation says which failures it
        paid for) and, given `now`, reservations and sessions past their expiry."""
        ...

    async def reserve(self, res: Reservation, lim: Limits, now: float) -> Admission | None:
        """Atomically: refuse if res.ip (or its /64) is banned, else count res.ip's failures
        since max(now - findtime, its last ban's creation) and the live reservations of
        res.ip and res.alias, decide with `inflight.admit`, and insert `res` if admitted."""
        ...

    async def settle(self, res: Reservation, failure: Failure | None) -> None:
        """Atomically remove the reservation and append `failure` (the node said Invalid PIN)
        to the log. An already expired reservation is fine: the failure is appended anyway."""
        ...

    async def remember_session(self, key: str, ip: str, expires: float, now: float) -> None:
        """A node issued a token (salted hash `key`) to `ip`, valid until `expires`."""
        ...

    async def session_known(self, key: str, ip: str, now: float) -> bool: ...


@dataclass
class MemoryStore:
    """A store inside the process. Guards sharing one instance share bans (tests do this)."""

    description: str = "memory"
    transient: bool = True
    failures: list[tuple[int, Failure]] = field(default_factory=list)
    bans: dict[str, BanRecord] = field(default_factory=dict)
    logged: set[str] = field(default_factory=set)
    version: int = 0
    next_id: int = 1
    inflight: InFlight = field(default_factory=InFlight)
    _salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    down: bool = False  # tests flip this to simulate an unreachable store

    def _up(self) -> None:
        if self.down:
            raise StoreError("memory store marked down")

    async def open(self) -> None:
        self._up()

    async def close(self) -> None:
        return None

    async def salt(self) -> bytes:
        self._up()
        return self._salt

    async def push(
        self, failures: list[Failure], bans: list[BanRecord], *, force: bool = False
    ) -> list[BanRecord]:
        self._up()
        for f in failures:
            self.failures.append((self.next_id, f))
            self.next_id += 1
        applied: list[BanRecord] = []
        for rec in bans:
            cur = self.bans.get(rec.source)
            if force or cur is None or cur.expires <= rec.created:
                self.bans[rec.source] = rec
                self.logged.discard(rec.source)
                applied.append(rec)
        if applied:
            self.version += 1
        return applied

    async def poll(self, cursor: str | None, since: float, version: str | None) -> Poll:
        self._up()
        if cursor is None:
            out = [f for _, f in self.failures if f.ts > since]
        else:
            c = int(cursor)
            out = [f for i, f in self.failures if i > c]
        ver = str(self.version)
        bans = list(self.bans.values()) if ver != version else None
        return Poll(out, str(self.next_id - 1), ver, bans)

    async def claim_expired(self, sources: list[str], now: float) -> list[BanRecord]:
        self._up()
        out = []
        for s in sources:
            rec = self.bans.get(s)
            if rec is not None and rec.expires <= now and s not in self.logged:
                self.logged.add(s)
                out.append(rec)
        return out

    async def list_bans(self) -> list[BanRecord]:
        self._up()
        return list(self.bans.values())

    async def remove(self, source: str) -> BanRecord | None:
        self._up()
        rec = self.bans.pop(source, None)
        if rec is not None:
            self.version += 1
        # Lifting a ban forgets the source's failures too, or the next request_token would be
        # refused for the failures the lifted ban had paid for.
        self.failures = [(i, f) for i, f in self.failures if f.ip != source]
        return rec

    async def clear(self) -> int:
        self._up()
        n = len(self.bans)
        self.bans.clear()
        self.failures.clear()
        self.version += 1
        return n

    async def purge(
        self, failures_before: float, bans_before: float, *, now: float | None = None
    ) -> None:
        self._up()
        self.failures = [(i, f) for i, f in self.failures if f.ts >= failures_before]
        for s, r in list(self.bans.items()):
            if r.expires < bans_before and r.created < failures_before:
                del self.bans[s]
                self.logged.discard(s)
        if now is not None:
            self.inflight.purge(now)

    async def reserve(self, res: Reservation, lim: Limits, now: float) -> Admission | None:
        self._up()
        since = now - lim.findtime
        for src in (res.ip, prefix64(res.ip)):
            rec = self.bans.get(src) if src is not None else None
            if rec is not None and rec.expires > now:
                return Admission("banned", max(1.0, rec.expires - now))
            if rec is not None and src == res.ip:
                since = max(since, rec.created)
        rows = [
            (f.ts, f.pin)
            for _, f in self.failures
            if f.kind == PIN and f.ip == res.ip and f.ts > since
        ]
        return self.inflight.reserve(lim, now, res, counted(rows, lim.distinct_pins))

    async def settle(self, res: Reservation, failure: Failure | None) -> None:
        self._up()
        self.inflight.release(res.id)
        if failure is not None:
            self.failures.append((self.next_id, failure))
            self.next_id += 1

    async def remember_session(self, key: str, ip: str, expires: float, now: float) -> None:
        self._up()
        self.inflight.remember(key, ip, expires)

    async def session_known(self, key: str, ip: str, now: float) -> bool:
        self._up()
        return self.inflight.known(key, ip, now)


def sqlite_path(cfg: Config) -> Path:
    return Path(cfg.server.state_dir) / "guard.sqlite3"


def open_store(cfg: Config) -> GuardStore:
    """The store named by guard.store (not yet opened: call `await store.open()`)."""
    kind = cfg.guard.store
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        from confedge.guard.sqlite_store import SQLiteStore

        return SQLiteStore(sqlite_path(cfg))
    from confedge.guard.redis_store import RedisStore

    return RedisStore(kind, findtime=cfg.guard.findtime, distinct_pins=cfg.guard.distinct_pins)


def ensure_state_dir(path: Path) -> None:
    """Create the state directory (0700: the guard database names attackers and users)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
