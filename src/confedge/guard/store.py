"""Guard stores: where failures and bans are shared between workers and instances.

Why failures are shared as an append-only event log, not as counters: every worker's core must
see the same events to count right (an attacker's connections are spread over the workers by the
kernel), and a log lets each core keep its own sliding windows, in simulated time for tests,
while the store stays dumb. Bans are a keyed table with a version number; workers poll the
version (cheap) and reload the table only when it moved. Inserting a ban is conditional: if the
source already has an active ban the insert is dropped, so two workers that cross the threshold
on the same event produce one ban, one audit line and one escalation step.

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
from confedge.guard.core import BanRecord, Failure

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

    async def purge(self, failures_before: float, bans_before: float) -> None:
        """Drop failures older than the window and bans expired before the memory horizon."""
        ...


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
        return rec

    async def clear(self) -> int:
        self._up()
        n = len(self.bans)
        self.bans.clear()
        self.failures.clear()
        self.version += 1
        return n

    async def purge(self, failures_before: float, bans_before: float) -> None:
        self._up()
        self.failures = [(i, f) for i, f in self.failures if f.ts >= failures_before]
        for s in [s for s, r in self.bans.items() if r.expires < bans_before]:
            del self.bans[s]
            self.logged.discard(s)


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

    return RedisStore(kind)


def ensure_state_dir(path: Path) -> None:
    """Create the state directory (0700: the guard database names attackers and users)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
