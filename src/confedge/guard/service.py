"""The guard as the proxy and TURN see it: the hook of docs (guard_api), over a core and a store.

Why this split: `GuardCore` decides, `BanTable` answers check() in well under 2 µs, and this
adapter moves events between them and the shared store in one background task per worker:

* a failure is counted locally at once (so the attacker's very next request on the same
  connection is refused) and queued; the task wakes and pushes the queue to the store;
* every `refresh_interval` the task polls the store for other workers' failures (fed to the
  core, so counting is right across workers and instances) and, when the ban set's version
  moved, reloads the bans (so a ban decided anywhere reaches this worker within ~2 intervals);
* it claims expired bans so that exactly one worker writes the "unban" audit line, and purges
  old rows every 30 s.

When the store fails (Redis down, typically) the guard logs it once and carries on locally:
counting, banning and check() never wait for the store. Queued failures are kept (bounded) and
pushed when the store is back, together with the bans decided meanwhile.

PIN guesses in flight (guard/inflight.py) are the one place where the proxy waits for the
store: `reserve_pin` asks it, in one atomic step shared by every worker and instance, whether a
request_token may go to a node, and `settle_pin` turns the answer into a failure (or nothing)
in another. Both run as tasks and answer through a callback, so the proxy's protocol callbacks
never block. While the store is unreachable the same rule runs on this worker's own counts and
reservations (`InFlight`), like the rest of the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from confedge.config import Config, GuardConfig
from confedge.guard.addresses import normalise_ip
from confedge.guard.bantable import BanTable
from confedge.guard.core import PIN, TURN, BanRecord, Failure, GuardCore
from confedge.guard.inflight import Admission, InFlight, Limits, Reservation
from confedge.guard.store import GuardStore, StoreError

__all__ = ["Guard", "audit_ban", "audit_unban"]

log = logging.getLogger("confedge.guard")
audit = logging.getLogger("confedge.guard.audit")

_INF = float("inf")
MAX_QUEUED = 10_000  # failures kept while the store is unreachable
PURGE_EVERY = 30.0


def _when(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # an expiry beyond any calendar (hand-edited)
        return "never"


def audit_ban(rec: BanRecord, how: str) -> None:
    """One audit line per ban (automatic or manual); `how` says who decided."""
    audit.info(
        "ban source=%s seconds=%.0f until=%s offence=%d failures=%d by=%s reason=%r",
        rec.source,
        rec.expires - rec.created,
        _when(rec.expires),
        rec.count,
        rec.failures,
        how,
        rec.reason,
    )


def audit_unban(rec: BanRecord, how: str) -> None:
    """One audit line per lifted ban: `how` is "expired" or "manual"."""
    audit.info("unban source=%s by=%s reason=%r", rec.source, how, rec.reason)


class Guard:
    """The enabled guard; see the module docstring and docs/GUARD.md."""

    enabled = True
    check: Callable[[str], float | None]

    def __init__(
        self,
        cfg: GuardConfig,
        store: GuardStore,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.ban_status: int = cfg.ban_status
        self.store = store
        self.core = GuardCore(cfg, rand)
        self.table = BanTable(clock)
        # check() is the table's own bound method: no extra call layer on the hot path.
        self.check = self.table.check
        self._clock = clock
        self.origin = secrets.token_hex(8)
        self._salt = secrets.token_bytes(16)  # replaced by the store's shared salt
        self._queued: list[Failure] = []
        self._pending: list[BanRecord] = []
        self._logged_local: set[tuple[str, float]] = set()
        self._expiry_done: set[tuple[str, float]] = set()
        self._cursor: str | None = None
        self._version: str | None = None
        self._connected = False
        self._down = False
        self._last_poll = float("-inf")
        self._last_purge = float("-inf")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_expiry = float("-inf")  # earliest expiry not yet handled by _expire
        # Called (no arguments, must not block) whenever the active ban set may have changed:
        # a local ban or a reload from the store. host/banset.py mirrors bans into the kernel.
        self.observers: list[Callable[[], None]] = []
        self._limits = Limits.of(cfg)
        # Reservations this worker holds: id -> (reservation, taken locally in an outage).
        self._tickets: dict[str, tuple[Reservation, bool]] = {}
        self.local = InFlight()  # outage fallback, and a cache of sessions seen here
        self._tasks: set[asyncio.Task[None]] = set()

    def reload(self, cfg: Config) -> None:
        """New thresholds from a reloaded configuration (`confedge reload`): counts, bans and
        sessions so far stay; the next decision uses the new limits. guard.enabled, store and
        firewall are restart-only (runtime.py refuses a change)."""
        g = cfg.guard
        self.cfg = g
        self.ban_status = g.ban_status
        self.core.retune(g)
        self._limits = Limits.of(g)

    # -- the hook (called from the proxy's and TURN's protocol callbacks) --------------------

    def hash_pin(self, pin: str | None) -> str:
        """Salted hash of a PIN: enough to count distinct PINs, useless to recover them."""
        if not pin:
            return ""
        return hashlib.blake2b(pin.encode(), key=self._salt, digest_size=12).hexdigest()

    def record_pin_failure(self, client_ip: str, alias: str, pin: str | None) -> None:
        """A node answered 403 "Invalid PIN" to request_token (contract: docs/GUARD.md)."""
        self._record(client_ip, PIN, alias.lower(), self.hash_pin(pin))

    def record_turn_auth_failure(self, client_ip: str) -> None:
        """TURN rejected a request whose MESSAGE-INTEGRITY did not verify."""
        self._record(client_ip, TURN, "", "")

    def _record(
        self, client_ip: str, kind: str, alias: str, pin: str, *, queue: bool = True
    ) -> Failure | None:
        """Count a failure here at once; `queue` it for the store unless the caller writes it
        (settle_pin does, atomically with its reservation)."""
        try:
            ip = normalise_ip(client_ip)
        except ValueError:
            log.debug("guard: ignoring a failure from unparsable address %r", client_ip)
            return None
        if self.core.ignored(ip):
            return None
        now = self._clock()
        f = Failure(now, kind, ip, alias, pin, self.origin)
        if queue:
            self._queue(f)
        self._adopt(self.core.observe(f, now))
        return f

    def _queue(self, f: Failure) -> None:
        self._queued.append(f)
        if len(self._queued) > MAX_QUEUED:
            del self._queued[: len(self._queued) - MAX_QUEUED]
        if self._wake is not None:
            self._wake.set()

    # -- guesses in flight and sessions (guard/inflight.py) ----------------------------------

    def reserve_pin(
        self, client_ip: str, alias: str, ttl: float, done: Callable[[str | None, float], None]
    ) -> None:
        """May this request_token go to a node? `done(ticket, 0)` if so (settle the ticket
        with `settle_pin` when the node answers; "" means nothing to settle), else
        `done(None, retry_after)`. `ttl`: the longest the proxy may wait for the answer; an
        unsettled reservation lapses then. `done` may be called before this returns."""
        try:
            ip = normalise_ip(client_ip)
        except ValueError:
            done("", 0.0)
            return
        if self.core.ignored(ip):
            done("", 0.0)  # never counted, so never limited
            return
        now = self._clock()
        res = Reservation(secrets.token_hex(12), ip, alias.lower(), now + ttl)
        self._spawn(self._reserve(res, now, done))

    async def _reserve(
        self, res: Reservation, now: float, done: Callable[[str | None, float], None]
    ) -> None:
        local = False
        verdict: Admission | None
        try:
            verdict = await self.store.reserve(res, self._limits, now)
        except StoreError as exc:
            self._went_down(exc)
            local = True
            fails = self.core.pin_failures(res.ip, now)
            verdict = self.local.reserve(self._limits, now, res, fails)
        if verdict is None:
            self._tickets[res.id] = (res, local)
            done(res.id, 0.0)
        else:
            log.debug("guard: request_token from %s refused: %s", res.ip, verdict.reason)
            done(None, verdict.retry_after)

    def settle_pin(
        self, ticket: str, client_ip: str, alias: str, pin: str | None, failed: bool
    ) -> None:
        """The node answered the request_token of `ticket`: `failed` if with 403 "Invalid
        PIN" (that failure is counted here at once, and written to the store together with
        the reservation's removal), otherwise the reservation is just released. Also the way
        to give back a ticket whose request never went out (failed = False)."""
        entry = self._tickets.pop(ticket, None) if ticket else None
        in_store = entry is not None and not entry[1]
        f = None
        if failed:
            f = self._record(client_ip, PIN, alias.lower(), self.hash_pin(pin), queue=not in_store)
        if entry is None:
            return
        res = entry[0]
        if not in_store:
            self.local.release(res.id)
            return
        self._spawn(self._settle(res, f))

    async def _settle(self, res: Reservation, f: Failure | None) -> None:
        try:
            await self.store.settle(res, f)
        except StoreError as exc:
            self._went_down(exc)
            if f is not None:
                self._queue(f)  # pushed when the store is back; the reservation lapses

    def _session_key(self, token: str) -> str:
        h = hashlib.blake2b(token.encode(), key=self._salt, digest_size=16, person=b"session")
        return h.hexdigest()

    def remember_session(self, client_ip: str, token: str, lifetime: float) -> None:
        """A node issued `token` to `client_ip` (a 200 answer to request_token or
        refresh_token), valid for `lifetime` seconds: while the address is banned, requests
        carrying it still pass (see guard/inflight.py for why)."""
        try:
            ip = normalise_ip(client_ip)
        except ValueError:
            return
        key = self._session_key(token)
        now = self._clock()
        self.local.remember(key, ip, now + lifetime)
        self._spawn(self._remember(key, ip, now + lifetime, now))

    async def _remember(self, key: str, ip: str, expires: float, now: float) -> None:
        try:
            await self.store.remember_session(key, ip, expires, now)
        except StoreError as exc:
            self._went_down(exc)

    def session_known(self, client_ip: str, token: str, done: Callable[[bool], None]) -> None:
        """`done(True)` if a node issued `token` to `client_ip` and it has not expired (from
        any worker or instance sharing the store). May call `done` before returning."""
        try:
            ip = normalise_ip(client_ip)
        except ValueError:
            done(False)
            return
        key = self._session_key(token)
        now = self._clock()
        if self.local.known(key, ip, now):
            done(True)
            return
        self._spawn(self._known(key, ip, now, done))

    async def _known(self, key: str, ip: str, now: float, done: Callable[[bool], None]) -> None:
        try:
            ok = await self.store.session_known(key, ip, now)
        except StoreError as exc:
            self._went_down(exc)
            ok = False  # what this worker has not seen, it cannot vouch for
        done(ok)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("guard: in-flight accounting failed", exc_info=task.exception())

    def _adopt(self, bans: list[BanRecord]) -> None:
        for rec in bans:
            self.table.add(rec)
            self._pending.append(rec)
            self._next_expiry = min(self._next_expiry, rec.expires)
        if bans:
            self._notify()

    def _notify(self) -> None:
        for observer in self.observers:
            try:
                observer()
            except Exception:  # an observer's bug must not stop counting or banning
                log.exception("guard: ban observer failed")

    # -- operator views ----------------------------------------------------------------------

    def bans(self) -> list[BanRecord]:
        """Active bans as this worker sees them (status page)."""
        return sorted(self.core.active(self._clock()), key=lambda r: r.expires)

    @property
    def store_ok(self) -> bool:
        return self._connected and not self._down

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load the bans and the last findtime of failures, start syncing.

        A store that cannot be opened stops the start-up (a bad state_dir is a configuration
        error the operator must see) unless it is a network store, which may come back later.
        """
        self._wake = asyncio.Event()
        try:
            await self._connect()
        except StoreError as exc:
            if not getattr(self.store, "transient", False):
                raise
            self._went_down(exc)
        self._task = asyncio.create_task(self._run(), name="guard-sync")

    async def close(self) -> None:
        if self._tasks:  # settlements still on their way to the store
            await asyncio.wait(set(self._tasks), timeout=2.0)
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Not `await task`: a client library that turns our cancellation into its own
            # timeout error would leave us waiting forever; the loop also checks _closing.
            await asyncio.wait({task}, timeout=2.0)
            if not task.done():
                log.warning("guard sync task did not stop within 2 s")
        with contextlib.suppress(StoreError):
            if self._connected:
                await self._flush()
        await self.store.close()

    async def sync(self) -> None:
        """One round of store traffic (the background task's body; tests call it directly)."""
        now = self._clock()
        try:
            if not self._connected:
                await self._connect()
            await self._flush()
            if now - self._last_poll >= self.cfg.refresh_interval * 0.8:
                await self._poll(now)
            await self._expire(now)
            if now - self._last_purge >= PURGE_EVERY:
                self._last_purge = now
                self.core.purge(now)
                self._purge_inflight(now)
                await self.store.purge(now - self.cfg.findtime, now - self.cfg.ban_memory, now=now)
        except StoreError as exc:
            self._went_down(exc)
            self._connected = False
            # Locally decided bans are in force already; write their audit lines now.
            for rec in self._pending:
                key = (rec.source, rec.created)
                if key not in self._logged_local:
                    self._logged_local.add(key)
                    audit_ban(rec, f"{self.origin} (store unreachable; local only)")
            if now - self._last_purge >= PURGE_EVERY:
                self._last_purge = now
                self.core.purge(now)
                self._purge_inflight(now)
                self._prune_table(now)
        else:
            if self._down:
                self._down = False
                log.warning("guard store %s reachable again", self.store.description)

    # -- internals ---------------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning(
                "guard store %s unreachable (%s); counting and banning locally until it is back",
                self.store.description,
                exc,
            )

    async def _run(self) -> None:
        assert self._wake is not None
        said, said_at = "", -math.inf  # the last unexpected failure logged, and when
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.refresh_interval):  # not wait_for (3.11)
                    await self._wake.wait()
                await asyncio.sleep(0.005)  # gather a burst of failures into one write
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the sync task die: bans must keep flowing
                # With its traceback, but once a minute for the same failure: it recurs at
                # every sync (four times a second) for as long as its cause lasts.
                what, now = f"{type(exc).__name__}: {exc}", self._clock()
                if what != said or now - said_at >= 60.0:
                    said, said_at = what, now
                    log.exception("guard sync failed (logged once a minute while it recurs)")
                await asyncio.sleep(self.cfg.refresh_interval)

    async def _connect(self) -> None:
        await self.store.open()
        self._salt = await self.store.salt()
        # The cursor is kept across reconnects: restarting from the window's start would feed
        # the core the other workers' failures a second time (double counting).
        self._version = None
        await self._poll(self._clock())
        self._connected = True

    async def _flush(self) -> None:
        if not self._queued and not self._pending:
            return
        failures, bans = self._queued, self._pending
        self._queued, self._pending = [], []
        try:
            applied = await self.store.push(failures, bans)
        except BaseException:
            self._queued = failures + self._queued
            self._pending = bans + self._pending
            raise
        for rec in applied:
            key = (rec.source, rec.created)
            if key in self._logged_local:
                self._logged_local.discard(key)
            else:
                audit_ban(rec, self.origin)

    async def _poll(self, now: float) -> None:
        while True:
            p = await self.store.poll(self._cursor, now - self.cfg.findtime, self._version)
            self._cursor = p.cursor
            if p.bans is not None:
                self._version = p.version
                merged = {r.source: r for r in p.bans}
                for rec in self._pending:  # decided here, not yet pushed
                    cur = merged.get(rec.source)
                    if cur is None or cur.expires <= rec.created:
                        merged[rec.source] = rec
                self.core.set_bans(merged.values())
                self.table.rebuild(self.core.active(now), now)
                self._next_expiry = float("-inf")  # rescan once
                self._notify()
            for f in p.failures:
                if f.origin != self.origin:
                    self._adopt(self.core.observe(f, now))
            if not p.more:
                break
        self._last_poll = now

    async def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return  # nothing can have ended yet: skip the scan (10k bans, 4 ticks a second)
        ended = [
            r
            for r in self.core.bans.values()
            if r.expires <= now and (r.source, r.created) not in self._expiry_done
        ]
        if not ended:
            self._next_expiry = min(
                (r.expires for r in self.core.bans.values() if r.expires > now), default=_INF
            )
            return
        self._prune_table(now)
        for rec in await self.store.claim_expired([r.source for r in ended], now):
            audit_unban(rec, "expired")
        for r in ended:
            self._expiry_done.add((r.source, r.created))
        if len(self._expiry_done) > 4 * len(self.core.bans) + 1000:
            live = {(r.source, r.created) for r in self.core.bans.values()}
            self._expiry_done &= live

    def _purge_inflight(self, now: float) -> None:
        self.local.purge(now)
        for rid in [k for k, (r, _) in self._tickets.items() if r.expires <= now]:
            del self._tickets[rid]  # never settled (the exchange died): lapsed in the store

    def _prune_table(self, now: float) -> None:
        self.table.rebuild(self.core.active(now), now)
