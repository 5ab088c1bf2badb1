"""SQLite guard store: one file in server.state_dir, shared by the workers of a host.

Why SQLite: bans must survive a restart and be shared by separate worker processes, with no
extra daemon on a small DMZ host. WAL mode lets readers (every worker polls several times per
second) run beside the one writer, and `busy_timeout` absorbs the rare writer collisions. Every
call runs on a private single-thread executor, which owns the connection (sqlite3 connections are
not to be shared across threads) and keeps all file I/O off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from confedge.guard.addresses import prefix64
from confedge.guard.core import PIN, BanRecord, Failure, bounded_reason
from confedge.guard.inflight import Admission, Limits, Reservation, admit, counted
from confedge.guard.store import Poll, StoreError, StoreOpenError, ensure_state_dir

__all__ = ["SQLiteStore"]

log = logging.getLogger("confedge.guard")

# sqlite3 result codes meaning "this file is damaged", not "cannot open it" (permissions, a
# directory in the way, a full disk): https://www.sqlite.org/rescode.html
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, kind TEXT NOT NULL, ip TEXT NOT NULL,
    alias TEXT NOT NULL, pin TEXT NOT NULL, origin TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS failures_ts ON failures(ts);
CREATE TABLE IF NOT EXISTS bans (
    source TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL,
    count INTEGER NOT NULL, failures INTEGER NOT NULL, reason TEXT NOT NULL,
    logged INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS failures_ip ON failures(ip, ts);
CREATE TABLE IF NOT EXISTS inflight (
    id TEXT PRIMARY KEY, ip TEXT NOT NULL, alias TEXT NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS inflight_ip ON inflight(ip);
CREATE INDEX IF NOT EXISTS inflight_alias ON inflight(alias);
CREATE INDEX IF NOT EXISTS inflight_expires ON inflight(expires);
CREATE TABLE IF NOT EXISTS sessions (
    k TEXT PRIMARY KEY, ip TEXT NOT NULL, expires REAL NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema', '1');
INSERT OR IGNORE INTO meta VALUES ('bans_version', '0');
"""

BATCH = 5000


class SQLiteStore:
    """See the module docstring. Methods mirror `GuardStore`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self.transient = False
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None or self._db is None:
            raise StoreError(f"{self.description}: store is not open")
        db = self._db

        def call() -> T:
            try:
                return fn(db)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.description}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _connect(self) -> sqlite3.Connection:
        """Open (creating) the database; a damaged file is moved aside and replaced.

        Why recover rather than refuse: the file holds bans and the last findtime of failures,
        a cache of recent history. Refusing to start would put the whole edge (proxy and TURN)
        into a crash loop under systemd over it; a fresh database costs only that history, and
        the damaged file is kept beside it for inspection, named in a WARNING.
        """
        ensure_state_dir(self.path.parent)
        try:
            return self._open_db_when_free()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise
            aside = self._move_aside()
            log.warning(
                "guard database %s is damaged (%s); moved it to %s and started a new one: "
                "bans and failure counts from before are lost",
                self.path,
                exc,
                aside,
            )
            return self._open_db_when_free()

    def _open_db_when_free(self) -> sqlite3.Connection:
        """Workers start together and race to create the file and switch it to WAL; SQLite
        answers some of those races with "database is locked" at once, without waiting on the
        busy timeout. Retry for up to 5 s (this runs on the store's own thread)."""
        for attempt in range(50):
            try:
                return self._open_db()
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if code not in (_SQLITE_BUSY, _SQLITE_LOCKED) or attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes
            db.execute("PRAGMA busy_timeout=5000")
            # A damaged page can hide anywhere; quick_check (no index cross-checks) reads the
            # whole small file once, so damage shows now rather than at the first ban.
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                err = sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")
                err.sqlite_errorcode = _SQLITE_CORRUPT
                raise err
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    async def open(self) -> None:
        if self._db is not None:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._db = await loop.run_in_executor(self._pool, self._connect)
        except (sqlite3.Error, OSError) as exc:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise StoreOpenError(
                f"{self.description}: cannot open the guard database: {_why(exc)}"
            ) from exc

    async def close(self) -> None:
        db, pool = self._db, self._pool
        self._db = self._pool = None
        if db is not None and pool is not None:
            await asyncio.get_running_loop().run_in_executor(pool, db.close)
            pool.shutdown(wait=True)

    # -- operations ------------------------------------------------------------------------

    async def salt(self) -> bytes:
        def op(db: sqlite3.Connection) -> bytes:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
            row = db.execute("SELECT v FROM meta WHERE k = 'salt'").fetchone()
            return bytes.fromhex(row[0])

        return await self._run(op)

    async def push(
        self, failures: list[Failure], bans: list[BanRecord], *, force: bool = False
    ) -> list[BanRecord]:
        def op(db: sqlite3.Connection) -> list[BanRecord]:
            applied: list[BanRecord] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                _append(db, failures)
                sql = _UPSERT if force else _INSERT_UNLESS_ACTIVE
                for r in bans:
                    cur = db.execute(
                        sql, (r.source, r.created, r.expires, r.count, r.failures, r.reason)
                    )
                    if cur.rowcount == 1:
                        applied.append(r)
                if applied:
                    _bump(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return applied

        return await self._run(op)

    async def poll(self, cursor: str | None, since: float, version: str | None) -> Poll:
        def op(db: sqlite3.Connection) -> Poll:
            db.execute("BEGIN")  # one snapshot for failures, version and bans
            try:
                if cursor is None:
                    # First poll: the last findtime of events (a restart keeps its counts),
                    # and a cursor at the end of the log even when that is empty.
                    top = db.execute("SELECT COALESCE(MAX(id), 0) FROM failures").fetchone()
                    rows_cursor = str(top[0])
                    rows = db.execute(
                        "SELECT id, ts, kind, ip, alias, pin, origin FROM failures "
                        "WHERE ts > ? AND id <= ? ORDER BY id LIMIT ?",
                        (since, top[0], BATCH),
                    ).fetchall()
                else:
                    rows_cursor = cursor
                    rows = db.execute(
                        "SELECT id, ts, kind, ip, alias, pin, origin FROM failures "
                        "WHERE id > ? ORDER BY id LIMIT ?",
                        (int(cursor), BATCH),
                    ).fetchall()
                if rows and (cursor is not None or len(rows) == BATCH):
                    rows_cursor = str(rows[-1][0])
                ver = db.execute("SELECT v FROM meta WHERE k = 'bans_version'").fetchone()[0]
                bans = _all_bans(db) if ver != version else None
            finally:
                db.execute("COMMIT")
            fails = [Failure(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]
            return Poll(fails, rows_cursor, ver, bans, more=len(rows) == BATCH)

        return await self._run(op)

    async def claim_expired(self, sources: list[str], now: float) -> list[BanRecord]:
        def op(db: sqlite3.Connection) -> list[BanRecord]:
            out: list[BanRecord] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for s in sources:
                    row = db.execute(_CLAIM, (s, now)).fetchone()
                    if row is not None:
                        out.append(_rec(row))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

        return await self._run(op)

    async def list_bans(self) -> list[BanRecord]:
        return await self._run(_all_bans)

    async def remove(self, source: str) -> BanRecord | None:
        def op(db: sqlite3.Connection) -> BanRecord | None:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(_DELETE, (source,))
            found = row.fetchone()
            if found is not None:
                _bump(db)
            # Forget the failures the lifted ban paid for (store.GuardStore.remove).
            db.execute("DELETE FROM failures WHERE ip = ?", (source,))
            db.execute("COMMIT")
            return None if found is None else _rec(found)

        return await self._run(op)

    async def clear(self) -> int:
        def op(db: sqlite3.Connection) -> int:
            import time

            db.execute("BEGIN IMMEDIATE")
            n = db.execute("SELECT COUNT(*) FROM bans WHERE expires > ?", (time.time(),))
            count = int(n.fetchone()[0])
            db.execute("DELETE FROM bans")
            db.execute("DELETE FROM failures")
            _bump(db)
            db.execute("COMMIT")
            return count

        return await self._run(op)

    async def purge(
        self, failures_before: float, bans_before: float, *, now: float | None = None
    ) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM failures WHERE ts < ?", (failures_before,))
            cur = db.execute(
                "DELETE FROM bans WHERE expires < ? AND created < ?",
                (bans_before, failures_before),
            )
            if cur.rowcount:
                _bump(db)
            if now is not None:
                db.execute("DELETE FROM inflight WHERE expires <= ?", (now,))
                db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            db.execute("COMMIT")

        await self._run(op)

    # -- guesses in flight (guard/inflight.py) ---------------------------------------------

    async def reserve(self, res: Reservation, lim: Limits, now: float) -> Admission | None:
        """BEGIN IMMEDIATE takes the database's write lock before the first read, so the
        count and the insert are one step for every process on the host: a second worker's
        reserve waits (busy_timeout) and then sees this reservation."""

        return await self._run(_immediate(lambda db: _reserve(db, res, lim, now)))

    async def settle(self, res: Reservation, failure: Failure | None) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM inflight WHERE id = ?", (res.id,))
            _append(db, [] if failure is None else [failure])

        await self._run(_immediate(op))

    async def remember_session(self, key: str, ip: str, expires: float, now: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (key, ip, expires))

        await self._run(op)

    async def session_known(self, key: str, ip: str, now: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM sessions WHERE k = ? AND ip = ? AND expires > ?", (key, ip, now)
            ).fetchone()
            return row is not None

        return await self._run(op)


def _immediate(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """`fn` as one write transaction, its lock taken before its first read."""

    def op(db: sqlite3.Connection) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    return op


def _append(db: sqlite3.Connection, failures: list[Failure]) -> None:
    db.executemany(
        "INSERT INTO failures (ts, kind, ip, alias, pin, origin) VALUES (?,?,?,?,?,?)",
        [(f.ts, f.kind, f.ip, f.alias, f.pin, f.origin) for f in failures],
    )


def _reserve(db: sqlite3.Connection, res: Reservation, lim: Limits, now: float) -> Admission | None:
    """The body of SQLiteStore.reserve, inside its transaction."""
    db.execute("DELETE FROM inflight WHERE expires <= ?", (now,))
    since = now - lim.findtime
    for src in (res.ip, prefix64(res.ip)):
        if src is None:
            continue
        row = db.execute("SELECT created, expires FROM bans WHERE source = ?", (src,)).fetchone()
        if row is None:
            continue
        if row[1] > now:  # banned by another worker a moment ago (not yet in our table)
            return Admission("banned", max(1.0, row[1] - now))
        if src == res.ip:
            since = max(since, row[0])  # failures before the last ban are paid for
    rows = db.execute(
        "SELECT ts, pin FROM failures WHERE ip = ? AND kind = ? AND ts > ?", (res.ip, PIN, since)
    ).fetchall()
    at_ip = db.execute("SELECT COUNT(*) FROM inflight WHERE ip = ?", (res.ip,)).fetchone()[0]
    conf = db.execute("SELECT COUNT(*) FROM inflight WHERE alias = ?", (res.alias,))
    at_conf = conf.fetchone()[0]
    verdict = admit(lim, now, counted(rows, lim.distinct_pins), at_ip, at_conf)
    if verdict is None:
        db.execute(
            "INSERT INTO inflight VALUES (?, ?, ?, ?)", (res.id, res.ip, res.alias, res.expires)
        )
    return verdict


_UPSERT = """
INSERT INTO bans (source, created, expires, count, failures, reason, logged)
VALUES (?, ?, ?, ?, ?, ?, 0)
ON CONFLICT(source) DO UPDATE SET created = excluded.created, expires = excluded.expires,
    count = excluded.count, failures = excluded.failures, reason = excluded.reason, logged = 0
"""
# The idempotent insert of the store module's docstring: a source with a ban still active at the
# new ban's creation keeps it, so rowcount is 0 and nobody logs a duplicate.
_INSERT_UNLESS_ACTIVE = _UPSERT + "WHERE bans.expires <= excluded.created"
_CLAIM = """
UPDATE bans SET logged = 1 WHERE source = ? AND expires <= ? AND logged = 0
RETURNING source, created, expires, count, failures, reason
"""
_DELETE = """
DELETE FROM bans WHERE source = ? RETURNING source, created, expires, count, failures, reason
"""
_SELECT_ALL = "SELECT source, created, expires, count, failures, reason FROM bans"


def _rec(row: tuple[object, ...]) -> BanRecord:
    return BanRecord(
        source=str(row[0]),
        created=float(row[1]),  # type: ignore[arg-type]
        expires=float(row[2]),  # type: ignore[arg-type]
        count=int(row[3]),  # type: ignore[call-overload]
        failures=int(row[4]),  # type: ignore[call-overload]
        reason=bounded_reason(str(row[5])),
    )


def _all_bans(db: sqlite3.Connection) -> list[BanRecord]:
    return [_rec(r) for r in db.execute(_SELECT_ALL).fetchall()]


def _bump(db: sqlite3.Connection) -> None:
    db.execute("UPDATE meta SET v = CAST(v AS INTEGER) + 1 WHERE k = 'bans_version'")


def _why(exc: BaseException) -> str:
    """A reason an operator can act on (sqlite3 says "unable to open database file" for a
    directory in the way, a missing permission, ...)."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    text = str(exc)
    if "unable to open" in text:
        text += " (is the path a directory, or the directory not writable?)"
    return text
