"""Redis guard store: bans and failures shared by several confedge instances.

Layout under the key prefix `confedge:guard:` in the URL's database:

* `events`  a stream of failures (XADD, trimmed to the window by MINID), read by each worker
  from its cursor with an exclusive XRANGE;
* `bans`    a hash source -> JSON ban record; `version` a counter bumped on every change, so a
  poll is one round trip when nothing changed;
* `logged`  a set of sources whose expiry has been written to the audit log (SADD answers 1 to
  exactly one caller);
* `salt`    the PIN-hash salt, set once with NX;
* `pinfail:<ip>`  a sorted set of the address's PIN failures (score = time), for the in-flight
  admission; `inflight:ip:<ip>` and `inflight:conf:<alias>` sorted sets of live reservations
  (score = expiry); `session:<hash>` the address a node issued that token to, expiring with it.

Admission of a request_token (`reserve`) and its settlement are Lua scripts: the count, the
decision and the insertion happen on the server in one step, whichever instance asks.

The conditional ban insert and the purge are Lua scripts so that they are atomic on the server,
which is the only place that sees every instance's writes. Timeouts are short: a Redis that does
not answer must not hold up the guard, which then keeps counting and banning locally
(`service.Guard` logs the outage once and retries every refresh tick).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Iterable
from typing import Any

from confedge.guard.addresses import prefix64
from confedge.guard.core import PIN, BanRecord, Failure
from confedge.guard.inflight import Admission, Limits, Reservation, admit
from confedge.guard.store import Poll, StoreError
from confedge.redisclient import RedisSetupError, redis_client

log = logging.getLogger("confedge.guard")

__all__ = ["RedisStore"]

PREFIX = "confedge:guard:"
BATCH = 5000
MAXLEN = 200_000

_PUSH = """
local applied = {}
local force = ARGV[1] == '1'
for i = 2, #ARGV, 3 do
  local src, created, js = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local ok = force
  if not ok then
    local cur = redis.call('HGET', KEYS[1], src)
    ok = (not cur) or tonumber(cjson.decode(cur)['expires']) <= created
  end
  if ok then
    redis.call('HSET', KEYS[1], src, js)
    redis.call('SREM', KEYS[3], src)
    applied[#applied + 1] = src
  end
end
if #applied > 0 then redis.call('INCR', KEYS[2]) end
return applied
"""

_PURGE = """
local all = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #all, 2 do
  local b = cjson.decode(all[i + 1])
  if tonumber(b['expires']) < tonumber(ARGV[1]) and tonumber(b['created']) < tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('SREM', KEYS[3], all[i])
    n = n + 1
  end
end
if n > 0 then redis.call('INCR', KEYS[2]) end
return n
"""

_REMOVE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('INCR', KEYS[2])
end
redis.call('DEL', KEYS[4])
return cur
"""

# KEYS: bans, inflight:ip:<ip>, inflight:conf:<alias>, pinfail:<ip>
# ARGV: now, findtime, maxretry, per_address, per_conference, id, expires, ip, /64 or ''
# The yes/no rule is inflight.admit's; the caller computes the refusal's reason and
# Retry-After from what a refusal returns (at_ip, at_conf, failure times).
_RESERVE = """
local now = tonumber(ARGV[1])
local findtime = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - findtime)
local since = now - findtime
for i = 8, 9 do
  if ARGV[i] ~= '' then
    local cur = redis.call('HGET', KEYS[1], ARGV[i])
    if cur then
      local ok, b = pcall(cjson.decode, cur)
      if ok and type(b) == 'table' then
        local exp = tonumber(b['expires'])
        if exp and exp > now then return {'banned', tostring(exp)} end
        local created = tonumber(b['created'])
        if i == 8 and created and created > since then since = created end
      end
    end
  end
end
local fails = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. string.format('%.17g', since), '+inf',
  'WITHSCORES')
local at_ip = redis.call('ZCARD', KEYS[2])
local at_conf = redis.call('ZCARD', KEYS[3])
local n = #fails / 2
if at_ip < tonumber(ARGV[4]) and at_conf < tonumber(ARGV[5])
    and n + at_ip + 1 <= tonumber(ARGV[3]) then
  -- Key lifetimes are relative (PEXPIRE, not PEXPIREAT): the server's clock need not agree
  -- with the guard's; the scores, compared with `now` above, are the guard's times.
  local ms = math.ceil((tonumber(ARGV[7]) - now) * 1000) + 1000
  for k = 2, 3 do
    redis.call('ZADD', KEYS[k], ARGV[7], ARGV[6])
    if redis.call('PTTL', KEYS[k]) < ms then redis.call('PEXPIRE', KEYS[k], ms) end
  end
  return {'ok'}
end
local out = {'no', tostring(at_ip), tostring(at_conf)}
for k = 2, #fails, 2 do out[#out + 1] = fails[k] end
return out
"""

# KEYS: inflight:ip:<ip>, inflight:conf:<alias>, pinfail:<ip>, events
# ARGV: id, failed, score, member, nx, keep_ms, maxlen, then the event's six fields
_SETTLE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then
  if ARGV[5] == '1' then
    redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[4])
  else
    redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'ts', ARGV[8], 'kind', ARGV[9],
    'ip', ARGV[10], 'alias', ARGV[11], 'pin', ARGV[12], 'origin', ARGV[13])
end
return 1
"""


def _ms(t: float) -> int:
    return max(0, int(t * 1000))


def _id_le(a: str, b: str) -> bool:
    am, _, aseq = a.partition("-")
    bm, _, bseq = b.partition("-")
    return (int(am), int(aseq or 0)) <= (int(bm), int(bseq or 0))


def _decode_bans(values: Iterable[str | bytes]) -> list[BanRecord]:
    """Ban records from the hash, skipping (with a warning) any that do not decode: the store
    is shared by instances of other versions and open to hand edits, and one bad value must not
    stop every worker from ever reloading its bans."""
    out: list[BanRecord] = []
    for v in values:
        try:
            out.append(BanRecord.from_json(json.loads(v)))
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("guard: ignoring an undecodable ban record in Redis: %.200r", v)
    return out


def _failure(fields: dict[str, str]) -> Failure | None:
    try:
        return Failure(
            ts=float(fields["ts"]),
            kind=fields["kind"],
            ip=fields["ip"],
            alias=fields.get("alias", ""),
            pin=fields.get("pin", ""),
            origin=fields.get("origin", ""),
        )
    except (ValueError, KeyError, TypeError):  # see _decode_bans
        log.warning("guard: ignoring an undecodable failure event in Redis: %.200r", fields)
        return None


class RedisStore:
    """See the module docstring. Methods mirror `GuardStore`."""

    def __init__(
        self,
        url: str,
        prefix: str = PREFIX,
        *,
        findtime: float = 300.0,
        distinct_pins: bool = False,
    ) -> None:
        self.url = url
        self.description = f"redis:{_redact(url)}"
        self.transient = True
        self._k_events = prefix + "events"
        self._k_bans = prefix + "bans"
        self._k_version = prefix + "version"
        self._k_logged = prefix + "logged"
        self._k_salt = prefix + "salt"
        self._prefix = prefix
        self._r: Any = None
        # How long a pinfail set outlives its newest member, and how it counts (guard config).
        self._keep_ms = max(1, int(findtime * 1000))
        self._distinct = distinct_pins

    def _keys(self) -> list[str]:
        return [self._k_bans, self._k_version, self._k_logged]

    async def _call(self, coro: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        except Exception as exc:
            # Something on the store's port that is not Redis, or a Redis that answers a
            # wrong-typed reply (`:42` to HELLO): the client library raises what it happens to
            # (AttributeError, TypeError, IndexError...). Still an unusable store, not a bug to
            # log with a traceback at every sync.
            raise StoreError(
                f"{self.description}: not a usable Redis answer ({type(exc).__name__}: {exc})"
            ) from exc

    async def open(self) -> None:
        if self._r is None:
            try:
                self._r = redis_client(self.url, "guard.store")
            except RedisSetupError as exc:
                raise StoreError(str(exc)) from None
            self._push = self._r.register_script(_PUSH)
            self._purge = self._r.register_script(_PURGE)
            self._remove = self._r.register_script(_REMOVE)
            self._reserve = self._r.register_script(_RESERVE)
            self._settle = self._r.register_script(_SETTLE)
        await self._call(self._r.ping())

    async def close(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            # Closing a broken connection may fail; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                await r.aclose()

    def _client(self) -> Any:
        if self._r is None:
            raise StoreError(f"{self.description}: store is not open")
        return self._r

    async def salt(self) -> bytes:
        r = self._client()
        await self._call(r.set(self._k_salt, secrets.token_hex(16), nx=True))
        value = await self._call(r.get(self._k_salt))
        return bytes.fromhex(value)

    async def push(
        self, failures: list[Failure], bans: list[BanRecord], *, force: bool = False
    ) -> list[BanRecord]:
        r = self._client()
        if failures:
            pipe = r.pipeline(transaction=False)
            for f in failures:
                if f.kind == PIN:  # counted by reserve (failures kept during an outage)
                    k = self._k_fails(f.ip)
                    pipe.zadd(k, {self._member(f): f.ts}, nx=self._distinct)
                    pipe.pexpire(k, self._keep_ms)
                pipe.xadd(
                    self._k_events,
                    {
                        "ts": repr(f.ts),
                        "kind": f.kind,
                        "ip": f.ip,
                        "alias": f.alias,
                        "pin": f.pin,
                        "origin": f.origin,
                    },
                    maxlen=MAXLEN,
                    approximate=True,
                )
            await self._call(pipe.execute())
        if not bans:
            return []
        args: list[str] = ["1" if force else "0"]
        by_source: dict[str, BanRecord] = {}
        for b in bans:
            args += [b.source, repr(b.created), json.dumps(b.to_json())]
            by_source[b.source] = b
        done = await self._call(self._push(keys=self._keys(), args=args))
        return [by_source[s] for s in done]

    async def poll(self, cursor: str | None, since: float, version: str | None) -> Poll:
        r = self._client()
        pipe = r.pipeline(transaction=False)
        if cursor is None:
            pipe.xrevrange(self._k_events, "+", "-", count=1)
            pipe.xrange(self._k_events, f"{_ms(since)}-0", "+", count=BATCH)
        else:
            pipe.xrange(self._k_events, f"({cursor}", "+", count=BATCH)
        pipe.get(self._k_version)
        res = await self._call(pipe.execute())
        ver = str(res[-1] or "0")
        if cursor is None:
            top = res[0][0][0] if res[0] else "0-0"
            rows = [row for row in res[1] if _id_le(row[0], top)]
            new_cursor = top if len(res[1]) < BATCH else (rows[-1][0] if rows else top)
        else:
            rows = res[0]
            new_cursor = rows[-1][0] if rows else cursor
        bans = None
        if ver != version:
            raw = await self._call(r.hgetall(self._k_bans))
            bans = _decode_bans(raw.values())
        fails = [f for _, fields in rows if (f := _failure(fields)) is not None]
        return Poll(fails, new_cursor, ver, bans, more=len(rows) == BATCH)

    async def claim_expired(self, sources: list[str], now: float) -> list[BanRecord]:
        if not sources:
            return []
        r = self._client()
        raw = await self._call(r.hmget(self._k_bans, sources))
        out: list[BanRecord] = []
        for value in raw:
            if value is None:
                continue
            decoded = _decode_bans([value])
            if not decoded:
                continue
            rec = decoded[0]
            if rec.expires <= now and await self._call(r.sadd(self._k_logged, rec.source)):
                out.append(rec)
        return out

    async def list_bans(self) -> list[BanRecord]:
        raw = await self._call(self._client().hgetall(self._k_bans))
        return _decode_bans(raw.values())

    async def remove(self, source: str) -> BanRecord | None:
        self._client()
        keys = [*self._keys(), self._k_fails(source)]
        cur = await self._call(self._remove(keys=keys, args=[source]))
        return None if cur is None else BanRecord.from_json(json.loads(cur))

    async def clear(self) -> int:
        import time

        r = self._client()
        now = time.time()
        n = sum(1 for b in await self.list_bans() if b.expires > now)
        pipe = r.pipeline(transaction=True)
        pipe.delete(self._k_bans, self._k_events, self._k_logged)
        pipe.incr(self._k_version)
        await self._call(pipe.execute())
        return n

    async def purge(
        self, failures_before: float, bans_before: float, *, now: float | None = None
    ) -> None:
        # Reservations, failure sets and sessions expire by themselves (key TTLs, and reserve
        # trims the sets it reads): `now` is not needed here.
        r = self._client()
        await self._call(
            r.xtrim(self._k_events, minid=f"{_ms(failures_before)}-0", approximate=True)
        )
        await self._call(
            self._purge(keys=self._keys(), args=[repr(bans_before), repr(failures_before)])
        )

    # -- guesses in flight (guard/inflight.py) ---------------------------------------------

    def _k_fails(self, ip: str) -> str:
        return f"{self._prefix}pinfail:{ip}"

    def _k_inflight(self, res: Reservation) -> list[str]:
        return [f"{self._prefix}inflight:ip:{res.ip}", f"{self._prefix}inflight:conf:{res.alias}"]

    def _member(self, f: Failure) -> str:
        # distinct_pins: one member per PIN hash (ZADD NX keeps its first time), else one per
        # failure event.
        return f.pin if self._distinct and f.pin else f"{f.origin}:{f.ts!r}:{f.pin}"

    async def reserve(self, res: Reservation, lim: Limits, now: float) -> Admission | None:
        self._client()
        keys = [self._k_bans, *self._k_inflight(res), self._k_fails(res.ip)]
        args = [
            repr(now),
            repr(lim.findtime),
            lim.maxretry,
            lim.per_address,
            lim.per_conference,
            res.id,
            repr(res.expires),
            res.ip,
            prefix64(res.ip) or "",
        ]
        out = await self._call(self._reserve(keys=keys, args=args))
        if out[0] == "ok":
            return None
        if out[0] == "banned":
            return Admission("banned", max(1.0, float(out[1]) - now))
        fails = sorted(float(x) for x in out[3:])
        verdict = admit(lim, now, fails, int(out[1]), int(out[2]))
        return verdict if verdict is not None else Admission("failures", 1.0)

    async def settle(self, res: Reservation, failure: Failure | None) -> None:
        self._client()
        keys = [*self._k_inflight(res), self._k_fails(res.ip), self._k_events]
        args: list[str | int] = [res.id, "0"]
        if failure is not None:
            f = failure
            args = [res.id, "1", repr(f.ts), self._member(f), "1" if self._distinct else "0"]
            args += [self._keep_ms, MAXLEN, repr(f.ts), f.kind, f.ip, f.alias, f.pin, f.origin]
        await self._call(self._settle(keys=keys, args=args))

    async def remember_session(self, key: str, ip: str, expires: float, now: float) -> None:
        # The value carries the guard's expiry; the key's TTL (relative, so independent of
        # the server's clock) only cleans up.
        r = self._client()
        px = max(1, int((expires - now) * 1000)) + 1000
        await self._call(r.set(f"{self._prefix}session:{key}", f"{ip} {expires!r}", px=px))

    async def session_known(self, key: str, ip: str, now: float) -> bool:
        r = self._client()
        value = await self._call(r.get(f"{self._prefix}session:{key}"))
        if not isinstance(value, str):
            return False
        who, _, until = value.partition(" ")
        try:
            return who == ip and float(until) > now
        except ValueError:
            return False


def _redact(url: str) -> str:
    """The URL without a password (redis://:secret@host/0 -> redis://:****@host/0)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{scheme}{sep}{user}:****@{host}"
    return url
