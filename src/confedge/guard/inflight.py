"""Sans-I/O accounting of PIN guesses in flight, and of the sessions the nodes opened.

Theory of operation
-------------------
Counting a wrong PIN when its answer comes back is too late under concurrency: an attacker who
opens 200 connections at once has 200 guesses at the node before the first answer is read
(measured on the first implementation: about 95 wrong PINs with `maxretry = 10`; 12 with two
worker processes and one connection at a time, because each worker learnt of the other's
failures a refresh later). So a `request_token` is counted *before* it is forwarded:

* it takes a **reservation** (a pending failure) for its address and conference, admitted only
  if ``counted failures + reservations + 1 <= maxretry`` for the address, and the address and
  the conference are under their in-flight limits (`admit`);
* when the node answers, the reservation is **settled**: removed, and turned into a failure in
  the same atomic step when the answer is 403 "Invalid PIN"; any other answer just removes it;
* a client that hangs up before the answer settles its reservation at once (the proxy closes
  the node connection with it): as a failure if a node got the whole request (it may have
  judged the PIN), else as nothing (proxy/exchange.py `_settle_abandoned`);
* a reservation whose answer never comes otherwise (the node went away or never answered, the
  worker crashed) **expires** after `ttl`, which the proxy sets to the longest it would wait
  for an answer (`(api_connect_timeout + read_timeout)` per node it may try). Its guess was
  answered to nobody, so it taught nobody anything; keeping the slot until then means a late
  answer can never overtake the bound.

So at most `maxretry` *answered* wrong PINs per address per `findtime`, whatever the
concurrency: the decision and the insertion of the reservation happen in one atomic step of the
shared store (stores implement `reserve` with `admit` inside a transaction or Lua script), and
every worker and instance counts into the same rows.

The in-flight limits (`inflight_per_address`, `inflight_per_conference`) bound what the failure
arithmetic does not: requests that are not wrong PINs yet occupy a node ("PIN required" probes,
unknown aliases), and a distributed guess at one conference from many addresses.

Sessions: while an address is banned, its admitted participants must still be able to refresh
their token, leave (`release_token`) and hang up (`disconnect`). The proxy cannot validate a
conference token, so the guard remembers (a salted hash of) each token a node issued to an
address, from the 200 answers to `request_token` and `refresh_token`, until the token's
`expires`; a banned address's request that carries one of them is not a guess and passes. A
token is a 128-bit secret that only a successful join produces, so this cannot be used to guess:
`request_token` itself is refused to a banned address whatever it carries.

`Limits`, `admit` and `InFlight` are pure (time passed in): `InFlight` is the memory store's
table and the guard's fallback while a network store is unreachable.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from confedge.config import GuardConfig

__all__ = [
    "MAX_SESSION_LIFETIME",
    "Admission",
    "InFlight",
    "Limits",
    "Reservation",
    "admit",
    "counted",
    "issued_token",
    "session_token",
    "token_call",
]

# A token a node issues lives `expires` seconds (Pexip: 120) and is refreshed before then; a
# longer claim is capped so that a node's bad answer cannot pin a session open for good.
MAX_SESSION_LIFETIME = 3600.0
DEFAULT_SESSION_LIFETIME = 120.0
# Bound on remembered sessions and reservations kept in memory (a backstop; each needs a join
# or a forwarded request).
MAX_TRACKED = 200_000


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers `admit` needs, from [guard] (so stores need not know the whole config)."""

    maxretry: int
    findtime: float
    per_address: int
    per_conference: int
    distinct_pins: bool = False

    @classmethod
    def of(cls, cfg: GuardConfig) -> Limits:
        return cls(
            cfg.maxretry,
            cfg.findtime,
            cfg.inflight_per_address,
            cfg.inflight_per_conference,
            cfg.distinct_pins,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """One forwarded request_token awaiting its answer."""

    id: str
    ip: str
    alias: str
    expires: float


@dataclass(frozen=True, slots=True)
class Admission:
    """`admit`'s verdict when it refuses: why, and when to try again."""

    reason: str  # "banned", "failures", "address" or "conference"
    retry_after: float  # seconds, at least 1


def admit(
    lim: Limits, now: float, failures: Sequence[float], at_address: int, at_conference: int
) -> Admission | None:
    """None if one more request_token may be forwarded, else why not.

    `failures`: sorted timestamps of the address's counted wrong PINs in the window (after its
    last ban's creation: those before are paid for); `at_address` / `at_conference`: live
    reservations of the address / of the conference. Redis mirrors the yes/no rule in Lua
    (redis_store._RESERVE); keep them together.
    """
    if at_address >= lim.per_address:
        return Admission("address", 1.0)
    if at_conference >= lim.per_conference:
        return Admission("conference", 1.0)
    n = len(failures)
    if n + at_address + 1 <= lim.maxretry:
        return None
    if at_address:
        # Answers pending: each frees a slot or becomes a failure; ask again shortly.
        return Admission("failures", 1.0)
    # Enough of the oldest failures must leave the window for one slot to open.
    k = n + 1 - lim.maxretry
    return Admission("failures", max(1.0, failures[k - 1] + lim.findtime - now))


class InFlight:
    """Reservations and remembered sessions of one process (memory store; store outages)."""

    def __init__(self) -> None:
        self._res: dict[str, Reservation] = {}
        self._heap: list[tuple[float, str]] = []
        self._by_ip: dict[str, int] = {}
        self._by_alias: dict[str, int] = {}
        self._sessions: dict[str, tuple[str, float]] = {}

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            r = self._res.get(rid)
            if r is not None and r.expires <= now:
                self.release(rid)

    def counts(self, ip: str, alias: str, now: float) -> tuple[int, int]:
        self.expire(now)
        return self._by_ip.get(ip, 0), self._by_alias.get(alias, 0)

    def reserve(
        self, lim: Limits, now: float, res: Reservation, failures: Sequence[float]
    ) -> Admission | None:
        """Admit and record `res`, or say why not (see `admit`)."""
        at_ip, at_conf = self.counts(res.ip, res.alias, now)
        verdict = admit(lim, now, failures, at_ip, at_conf)
        if verdict is None:
            if len(self._res) >= MAX_TRACKED:
                self.release(next(iter(self._res)))
            self._res[res.id] = res
            heapq.heappush(self._heap, (res.expires, res.id))
            self._by_ip[res.ip] = at_ip + 1
            self._by_alias[res.alias] = at_conf + 1
        return verdict

    def release(self, rid: str) -> Reservation | None:
        """Drop a reservation (answered, or expired); unknown ids are fine (already expired)."""
        r = self._res.pop(rid, None)
        if r is not None:
            for table, key in ((self._by_ip, r.ip), (self._by_alias, r.alias)):
                n = table.get(key, 1) - 1
                if n > 0:
                    table[key] = n
                else:
                    table.pop(key, None)
        return r

    def __len__(self) -> int:
        return len(self._res)

    # -- sessions ----------------------------------------------------------------------------

    def remember(self, key: str, ip: str, expires: float) -> None:
        if key not in self._sessions and len(self._sessions) >= MAX_TRACKED:
            del self._sessions[next(iter(self._sessions))]
        self._sessions[key] = (ip, expires)

    def known(self, key: str, ip: str, now: float) -> bool:
        s = self._sessions.get(key)
        if s is None:
            return False
        if s[1] <= now:
            del self._sessions[key]
            return False
        return s[0] == ip

    def purge(self, now: float) -> None:
        self.expire(now)
        for key in [k for k, s in self._sessions.items() if s[1] <= now]:
            del self._sessions[key]


# -- what the proxy hands over -------------------------------------------------------------------

_TOKEN_CALL = re.compile(r"/api/client/v2/conferences/[^/]+/(request_token|refresh_token)/?")


def token_call(path: str) -> str | None:
    """Which token-issuing call `path` (normalised by the proxy) is: "request_token" or
    "refresh_token", whose 200 answers carry a conference token; None for anything else."""
    m = _TOKEN_CALL.fullmatch(unquote(path.partition("?")[0]).lower())
    return m.group(1) if m else None


def session_token(headers: Sequence[tuple[bytes, bytes, bytes]], url: bytes) -> str | None:
    """The conference token a request carries: its `token` header (client API v2), else its
    `token` query parameter (EventSource cannot send headers). None when it carries none."""
    for lname, _, value in headers:
        if lname == b"token":
            v = value.strip().decode("latin-1")
            return v or None
    _, sep, query = url.partition(b"?")
    if sep:
        for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=False):
            if k == "token" and v:
                return v
    return None


def issued_token(body: bytes) -> tuple[str, float] | None:
    """(token, lifetime in seconds) from a node's 200 answer to request_token/refresh_token
    (`{"status": "success", "result": {"token": ..., "expires": "120", ...}}`), else None."""
    try:
        result = json.loads(body).get("result")
        token = result.get("token")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(token, str) or not token:
        return None
    try:
        life = float(result.get("expires", DEFAULT_SESSION_LIFETIME))
    except (TypeError, ValueError, OverflowError):  # (an integer past a float: 400 digits)
        life = DEFAULT_SESSION_LIFETIME
    if not life > 0:  # also NaN
        life = DEFAULT_SESSION_LIFETIME
    return token, min(life, MAX_SESSION_LIFETIME)


def counted(rows: Sequence[tuple[float, str]], distinct: bool) -> list[float]:
    """Sorted timestamps of the failures that count, from (ts, pin hash) rows in the window:
    with `distinct_pins` a repeated PIN counts once (at its first time in the window).

    A failure without a PIN hash ("": no `pin` header reached the node, which took the PIN
    from elsewhere, e.g. nodesim's JSON body) counts every time, as GuardCore.observe and the
    Redis store count it: folded into one, any number of body-PIN guesses looked like one
    failure to the admission of the SQLite and memory stores."""
    if not distinct:
        return sorted(ts for ts, _ in rows)
    first: dict[str, float] = {}
    anonymous: list[float] = []
    for ts, pin in rows:
        if not pin:
            anonymous.append(ts)
        elif pin not in first or ts < first[pin]:
            first[pin] = ts
    return sorted([*first.values(), *anonymous])
