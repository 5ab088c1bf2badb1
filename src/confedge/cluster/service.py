"""The cluster registry's I/O: publish this instance's record, read the others', share the
nonce key (docs/SCALING.md).

Redis layout under ``confedge:cluster:``:

* ``nonce_key``          32 random bytes (hex), set once with NX by whichever instance starts
  first; every instance's TURN mints and checks nonces with it, so a client whose balancer
  moves it to another instance keeps its nonce;
* ``instance:<name>``    the instance's record (JSON, core.InstanceRecord), SET with a TTL of
  ``cluster.ttl`` every ``cluster.interval``: a dead instance's record expires by itself;
* ``instances``          a sorted set name -> time of last publication, to find the records
  with one ZRANGE (entries older than the TTL are trimmed by every publisher).

Outage behaviour (same rule as the guard's redis_store): Redis is never on the request or
packet path and an unreachable Redis never stops the edge. Timeouts are short; a failed
publication is logged once per outage and retried every interval; meanwhile the page shows
the last known view marked stale. A Redis unreachable at start costs the shared nonce key:
TURN then uses a key of its own, and a client moved to or from this instance gets one extra 438
(Stale Nonce, with a fresh nonce) before it allocates -- the key is not swapped in later because
that would invalidate every nonce this instance has handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from confedge.cluster.core import (
    InstanceRecord,
    allocation_rows,
    busiest,
    decode_record,
    hostport,
    instance_name,
    secret_fingerprint,
)
from confedge.config import Config, ConfigError
from confedge.redisclient import RedisSetupError, redis_client

__all__ = ["PREFIX", "ClusterService", "read_registry"]

log = logging.getLogger("confedge.cluster")

PREFIX = "confedge:cluster:"
WARNED_LIMIT = 1024  # (instance, fingerprint) pairs remembered as warned about


class ClusterService:
    """A runtime part (start/close) that keeps this instance in the shared registry."""

    def __init__(
        self,
        cfg: Config,
        runtime: Any,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = PREFIX,
    ) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.rt = runtime
        self.clock = clock
        self.name = instance_name(c.instance)
        self.url = c.store
        self._prefix = prefix
        self.nonce_key: bytes | None = None  # None: TURN keeps a key of its own
        self.nonce_shared = False
        self.started = clock()
        self.up = False  # the last publication reached Redis
        self.error = ""  # why not, when not
        self.last_ok: float | None = None  # Unix time of the last good publication
        self.others: list[InstanceRecord] = []  # as of last_ok
        self.publications = 0
        self.failures = 0
        self._r: Any = None
        self._task: asyncio.Task[None] | None = None
        self._warned: set[tuple[str, str, str]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._r = redis_client(self.url, "cluster.store")
        except RedisSetupError as exc:
            raise ConfigError([str(exc)]) from None
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(2.0):
                self.nonce_key = await self._shared_nonce_key()
            self.nonce_shared = True
        except (RedisError, OSError, TimeoutError, ValueError, TypeError) as exc:
            self.error = _why(exc, 2.0)
            log.warning(
                "cluster: %s unreachable at start (%s); TURN nonces are this instance's own "
                "until a restart, so a client moved here from another instance gets one more "
                "438 (Stale Nonce); the registry retries every %gs",
                _redact(self.url),
                self.error,
                self.cfg.cluster.interval,
            )
        self._task = asyncio.create_task(self._run(), name="cluster-registry")

    async def _shared_nonce_key(self) -> bytes:
        """The cluster's nonce key, written first by whichever instance starts first."""
        key = self._prefix + "nonce_key"
        await self._r.set(key, os.urandom(32).hex(), nx=True)
        value = await self._r.get(key)
        raw = bytes.fromhex(value)
        if len(raw) < 16:
            raise ValueError(f"{key} in Redis is {len(raw)} bytes; delete it to get a new one")
        return raw

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        r, self._r = self._r, None
        if r is None:
            return
        # Leave at once on a clean stop (a crash leaves by the TTL).
        with contextlib.suppress(Exception):
            pipe = r.pipeline(transaction=False)
            pipe.delete(self._key(self.name))
            pipe.zrem(self._prefix + "instances", self.name)
            async with asyncio.timeout(1.0):
                await pipe.execute()
        with contextlib.suppress(Exception):
            await r.aclose()

    # -- the loop -------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self._prefix}instance:{name}"

    def state(self) -> str:
        """ "serving", or what the runtime says (the drain sets ``Runtime.state = "draining"``)."""
        return str(getattr(self.rt, "state", "serving") or "serving")

    def fingerprint(self) -> str:
        """Of the running configuration's current REST secret (a reload may rotate it)."""
        t = getattr(self.rt, "cfg", self.cfg).turn
        return secret_fingerprint(t.secrets) if t.mode == "permissive" else ""

    def record(self) -> InstanceRecord:
        turn = getattr(self.rt, "turn", None)
        rows = allocation_rows(getattr(turn, "core", None))
        port = getattr(turn, "port", 0) if turn is not None else 0
        return InstanceRecord(
            instance=self.name,
            state=self.state(),
            started=self.started,
            updated=self.clock(),
            turn=hostport(self.cfg.server.internal_address, port) if port else "",
            fingerprint=self.fingerprint(),
            allocation_count=len(rows),
            allocations=busiest(rows),
        )

    async def publish_once(self) -> None:
        """Write our record, trim the index, read everyone's (two round trips)."""
        r = self._r
        if r is None:
            return
        rec = self.record()
        ttl = self.cfg.cluster.ttl
        index = self._prefix + "instances"
        pipe = r.pipeline(transaction=False)
        pipe.set(self._key(self.name), rec.to_json(), px=int(ttl * 1000))
        pipe.zadd(index, {self.name: rec.updated})
        pipe.zremrangebyscore(index, "-inf", rec.updated - ttl)
        pipe.zrange(index, 0, -1)
        if self.nonce_key is not None and self.nonce_shared:
            # A Redis that restarted empty gets the running cluster's key back (first wins;
            # every instance that shares it writes the same value).
            pipe.set(self._prefix + "nonce_key", self.nonce_key.hex(), nx=True)
        res = await pipe.execute()
        names = [n for n in res[3] if n != self.name]
        self.others = await _records(r, self._prefix, names)
        self._warn_secret_mismatch(rec.fingerprint)
        self.last_ok = rec.updated
        self.publications += 1

    def _warn_secret_mismatch(self, mine: str) -> None:
        """One warning per other instance and secret it is seen with: a client's credential
        would then work on some edges and not on others (docs/SCALING.md, rotating).

        The name is a record's, from a store others can write: one that is not printable is
        logged as its repr (was: a line feed in it forged a second log line), and the set of
        names warned about is bounded (was: grew with every new name put in the registry)."""
        if len(self._warned) > WARNED_LIMIT:
            self._warned.clear()  # a warning may then repeat; memory stays bounded
        for o in self.others:
            seen = (o.instance, o.fingerprint, mine)
            if o.fingerprint != mine and seen not in self._warned:
                self._warned.add(seen)
                log.warning(
                    "cluster: instance %s has a different current REST secret (turn.secrets[0]) "
                    "than this one: credentials minted with one are refused by the other unless "
                    "both list both secrets; see docs/SCALING.md",
                    o.instance if o.instance.isprintable() else repr(o.instance),
                )

    async def _run(self) -> None:
        interval = self.cfg.cluster.interval
        limit = max(1.0, interval)
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that
                # lands as the inner call finishes, and close() then waited on this loop forever.
                async with asyncio.timeout(limit):
                    await self.publish_once()
            except Exception as exc:
                # Not only RedisError, OSError, TimeoutError: a server on the store's port
                # that answers what the client library cannot take (a wrong-typed reply, not
                # Redis at all) raises AttributeError, TypeError...; uncaught, that ended this
                # task silently and the instance never published again, even with Redis back.
                self.failures += 1
                why = _why(exc, limit)
                if self.up or not self.error:
                    log.warning(
                        "cluster: cannot reach %s (%s); other instances' allocations are shown "
                        "as of the last contact, bans and nonces keep working locally",
                        _redact(self.url),
                        why,
                    )
                self.up = False
                self.error = why
            else:
                if not self.up and self.failures:
                    log.info("cluster: %s reachable again", _redact(self.url))
                self.up = True
                self.error = ""
            await asyncio.sleep(interval)

    # -- for the status page --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        mine = self.record()
        instances = []
        for rec in [mine, *self.others]:
            instances.append(
                {
                    "instance": rec.instance,
                    "self": rec.instance == self.name,
                    "state": rec.state,
                    "started": rec.started,
                    "updated": rec.updated,
                    "age": max(0.0, now - rec.updated),
                    "turn": rec.turn,
                    "same_secret": rec.fingerprint == mine.fingerprint,
                    "allocation_count": rec.allocation_count,
                    "allocations": [
                        {
                            "client": a.client,
                            "relay": a.relay,
                            "username": a.username,
                            "created": a.created,
                            "bytes_to_peer": a.bytes_to_peer,
                            "bytes_to_client": a.bytes_to_client,
                        }
                        for a in rec.allocations
                    ],
                }
            )
        return {
            "enabled": True,
            "instance": self.name,
            "state": mine.state,
            "store": _redact(self.url),
            "store_up": self.up,
            "error": self.error,
            "last_contact": self.last_ok,
            "nonce_key_shared": self.nonce_shared,
            "interval": self.cfg.cluster.interval,
            "ttl": self.cfg.cluster.ttl,
            "instances": instances,
        }


MAX_INSTANCES = 64  # other instances read from the registry (the first by name)


async def _records(
    r: Any, prefix: str, names: list[str], limit: int | None = MAX_INSTANCES
) -> list[InstanceRecord]:
    """The live records of `names`, by name (an expired or undecodable one is left out).

    The store is writable by anyone with its password (cluster/core.py), so two limits:

    * a record counts only under its own key: one stored under ``instance:a`` that says it is
      ``b`` (or this instance) is left out. Two rows with one name were two samples of one
      series in /metrics, which Prometheus refuses whole ("duplicate sample"), and a foreign
      record named like this instance was shown as "(this one)";
    * at most `limit` names (MAX_INSTANCES for the running registry; `confedge cluster list`
      reads them all): the index is a sorted set anyone can fill, and every name cost an MGET
      key, up to 200 allocations held in memory and rows on every page load.
    """
    names = sorted(names)[:limit]
    raw = await r.mget([f"{prefix}instance:{n}" for n in names]) if names else []
    out = [
        o
        for n, v in zip(names, raw, strict=False)
        if (o := decode_record(v)) is not None and o.instance == n
    ]
    return sorted(out, key=lambda o: o.instance)


async def read_registry(url: str, prefix: str = PREFIX) -> list[InstanceRecord]:
    """Every instance's record, read once (for `confedge cluster list`); raises
    RedisSetupError, or RedisError/OSError when Redis does not answer."""
    r = redis_client(url, "cluster.store")
    try:
        names = await r.zrange(prefix + "instances", 0, -1)
        return await _records(r, prefix, list(names), None)
    finally:
        with contextlib.suppress(Exception):
            await r.aclose()


def _why(exc: BaseException, limit: float) -> str:
    """What went wrong, for the log and the status page. A hung Redis (stopped, or a path that
    drops packets) ends in a bare TimeoutError, whose text is empty: say so instead."""
    from redis.exceptions import RedisError

    if not isinstance(exc, (RedisError, OSError, TimeoutError)):
        return f"not a usable Redis answer ({type(exc).__name__}: {exc})"
    if str(exc):
        return str(exc)
    return f"no answer within {limit:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__


def _redact(url: str) -> str:
    from confedge.admin.snapshot import mask_url

    return mask_url(url)
