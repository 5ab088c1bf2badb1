"""TURN authentication: credentials, stateless nonces, and the unauthenticated-answer budget.

RFC 8489 §9.2 long-term credentials are used in both modes; what differs is where the password
comes from:

* restricted mode: one configured username/password (the conferencing platform's TURN settings);
* permissive mode: the "TURN REST API" time-limited scheme (draft-uberti-behave-turn-rest-00, as
  implemented by coturn's ``use-auth-secret``): username ``<expiry-unix-time>:<user>``, password
  ``base64(HMAC-SHA1(secret, username))``.  Several secrets are accepted so they can be rotated;
  the first one is the current one (it is the one :meth:`RestCredentials.make` uses).

Nonces are stateless (no table to fill with garbage): ``<timestamp hex><HMAC(key, ts|ip|port)>``
with a per-process random key, so a nonce is bound to the client transport address it was issued
to and goes stale after ``turn.nonce_lifetime`` seconds (then the client gets 438 and a fresh one).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import hmac
import os
from collections.abc import Hashable, Sequence
from hashlib import blake2s

from confedge.stun import long_term_key

__all__ = [
    "Credentials",
    "LongTermCredentials",
    "NonceManager",
    "RestCredentials",
    "UnauthBudget",
]


KEY_CACHE = 4096  # RestCredentials: usernames whose derived keys are kept


class Credentials(abc.ABC):
    """Maps a USERNAME to the candidate long-term keys (RFC 8489 §9.2.2) it may be signed with."""

    realm: str

    @abc.abstractmethod
    def keys_for(self, username: str, wall_now: float) -> list[bytes]:
        """Candidate keys; empty when the username is unknown or expired."""

    def expired(self, username: str, wall_now: float) -> bool:
        """True for a well-formed credential that has merely expired: a legitimate client with
        a stale credential, not a guess, so it is not reported to the guard."""
        return False

    def known_keys_for(self, username: str, wall_now: float) -> list[bytes]:
        """The keys of ``username`` that cost nothing more to find: all of them here; only
        those already derived for :class:`RestCredentials`.  For credentials a reload rotated
        away, checked on every failed request (TurnCore._auth_failed), which must not let a
        flood of made-up usernames cost a key derivation per retired secret."""
        return self.keys_for(username, wall_now)

    @abc.abstractmethod
    def identity(self) -> tuple[object, ...]:
        """What the accepted credentials depend on: equal for two objects that accept the same
        requests (a reload that changed nothing), different after a rotation."""


class LongTermCredentials(Credentials):
    """One static username/password (restricted mode, SPEC §3)."""

    def __init__(self, username: str, password: str, realm: str) -> None:
        self.realm = realm
        self._username = username.encode()
        # Derive once: MD5(username ":" realm ":" SASLprep(password)) (RFC 8489 §9.2.2).
        self._key = long_term_key(username, realm, password)

    def identity(self) -> tuple[object, ...]:
        return ("long-term", self.realm, self._username, self._key)

    def keys_for(self, username: str, wall_now: float) -> list[bytes]:
        # Constant-time comparison so the username cannot be probed byte by byte.
        if hmac.compare_digest(username.encode(), self._username):
            return [self._key]
        return []


class RestCredentials(Credentials):
    """TURN REST API shared-secret credentials (permissive mode, SPEC §3)."""

    def __init__(self, secrets: Sequence[str], realm: str) -> None:
        if not secrets:
            raise ValueError("RestCredentials needs at least one secret")
        self.realm = realm
        self._secrets = [s.encode() for s in secrets]
        # username -> its keys: deriving one (HMAC, base64, SASLprep, MD5) costs more than the
        # rest of an Allocate, and a client signs every request of its allocation with the same
        # username.  Bounded: cleared when full (a flood of made-up usernames only empties it).
        self._keys: dict[str, list[bytes]] = {}

    @staticmethod
    def expiry_of(username: str) -> int | None:
        """The expiry timestamp of ``<expiry>:<user>`` (or a bare ``<expiry>``), else None."""
        head = username.split(":", 1)[0]
        # ASCII digits only: str.isdigit() is also true for "²" (which int() refuses, so a
        # hostile USERNAME raised out of the listener) and for other scripts' digits ("١٢٣").
        if not (head.isascii() and head.isdigit()) or len(head) > 12:
            return None
        return int(head)

    @staticmethod
    def password_for(secret: str | bytes, username: str) -> str:
        """base64(HMAC-SHA1(secret, username)) -- what the web application hands the browser."""
        sec = secret.encode() if isinstance(secret, str) else secret
        return base64.b64encode(hmac.new(sec, username.encode(), hashlib.sha1).digest()).decode()

    def make(self, user: str, wall_now: float, ttl: int = 86400) -> tuple[str, str]:
        """Mint a (username, password) pair with the current secret (for tests and the demo)."""
        username = f"{int(wall_now) + ttl}:{user}"
        return username, self.password_for(self._secrets[0], username)

    def identity(self) -> tuple[object, ...]:
        return ("rest", self.realm, tuple(self._secrets))

    def known_keys_for(self, username: str, wall_now: float) -> list[bytes]:
        # Only usernames seen while these secrets were current (a client that allocated with
        # its credential then, and now comes back with it): no HMAC, no MD5 on this path.
        expiry = self.expiry_of(username)
        if expiry is None or expiry < wall_now:
            return []
        return self._keys.get(username, [])

    def expired(self, username: str, wall_now: float) -> bool:
        expiry = self.expiry_of(username)
        return expiry is not None and expiry < wall_now

    def keys_for(self, username: str, wall_now: float) -> list[bytes]:
        expiry = self.expiry_of(username)
        if expiry is None or expiry < wall_now:
            return []  # malformed or expired: refused like an unknown user
        keys = self._keys.get(username)
        if keys is None:
            keys = [
                long_term_key(username, self.realm, self.password_for(sec, username))
                for sec in self._secrets
            ]
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            self._keys[username] = keys
        return keys


class NonceManager:
    """Stateless nonces bound to the client address (RFC 8489 §9.2.1, §9.2.4 item 4)."""

    def __init__(self, lifetime: float, key: bytes | None = None) -> None:
        self.lifetime = lifetime
        key = key if key is not None else os.urandom(32)
        # BLAKE2s takes keys of up to 32 bytes (RFC 7693 §2.1): a longer one is hashed down.
        self._key = key if len(key) <= 32 else blake2s(key).digest()

    def _mac(self, ts: int, ip: str, port: int) -> str:
        # Keyed BLAKE2s (RFC 7693 §2.5: the key block makes it a MAC, a PRF under a secret
        # key): one C call where HMAC-SHA-256 takes two hash copies and two finalisations. It
        # runs twice per Allocate (the 401's nonce, then its check). Only confedge checks the
        # nonce: this process, or an instance of the same cluster sharing the key; during a
        # rolling upgrade from an HMAC-nonce version a client may get one 438 with a fresh
        # nonce (RFC 8489 §9.2.4) and retry, as after any restart of a lone instance.
        msg = b"%x|%s|%d" % (ts, ip.encode(), port)
        return blake2s(msg, key=self._key, digest_size=12).hexdigest()

    def issue(self, now: float, ip: str, port: int) -> str:
        ts = max(int(now), 0)
        return f"{ts:012x}{self._mac(ts, ip, port)}"

    def valid(self, nonce: str, now: float, ip: str, port: int) -> bool:
        """True when the nonce was minted by this process for this address and is still fresh."""
        return self.check(nonce, now, ip, port) == "fresh"

    def check(self, nonce: str, now: float, ip: str, port: int) -> str:
        """``"fresh"``; ``"stale"`` (minted by us for exactly this address, but too old: the
        client once received our answer there, which a forger of the source address cannot);
        or ``"invalid"``."""
        if len(nonce) != 36:
            return "invalid"
        try:
            ts = int(nonce[:12], 16)
        except ValueError:
            return "invalid"
        if not hmac.compare_digest(nonce[12:], self._mac(ts, ip, port)):
            return "invalid"
        return "fresh" if ts - 1 <= now < ts + self.lifetime else "stale"


class UnauthBudget:
    """Budget for unauthenticated answers (401/438, and 403 to sources outside
    ``media_nodes``): at most ``limit`` per key per 10 s window (SPEC §3).

    Beyond the budget the request is dropped silently: a spoofed-source flood then gets no
    amplification at all, and a real client simply retransmits later.  The key is the caller's
    choice; :class:`~.core.TurnCore` keeps two budgets (issue 11, "spoofed-source denial"):

    * it applies them to **UDP only**.  Over TCP and TLS the handshake has proven the source
      address, so an answer cannot be reflected at a victim, and a budget there would only let
      forged UDP datagrams carrying a node's address starve the node's real TCP allocations
      (coturn's ``turnutils_uclient -t -m 50`` hung that way);
    * everyone but the media nodes shares one budget **per source IP**: this is what caps the
      401s that forged datagrams can make us send to an arbitrary victim;
    * sources inside ``turn.media_nodes`` have their own budget, **per source IP and port**, in
      a separate table (a flood of other sources cannot evict it).  Forging a node's address is
      indistinguishable from the node, so the design makes exhaustion cost the attacker: to keep
      a node from getting its first 401 on a new socket the forger must exhaust every port the
      node may pick (``limit`` datagrams per port per 10 s, millions in all), not one address
      (5 datagrams a second did it before).  What the node is sent is bounded by what the
      forger sends (a 401 is about 2-3 times an unauthenticated request);
    * a request whose NONCE we minted for exactly that address and port and whose
      MESSAGE-INTEGRITY verifies is answered outside any budget, even when the nonce has gone
      stale (its 438 is "retry with this nonce", like HTTP Digest's ``stale=true``, RFC 2617
      §3.2.1): a client that has once heard from us is never silenced by an exhausted budget,
      while a forger, who never sees our answers, cannot produce one.
    """

    WINDOW = 10.0
    MAX_SOURCES = 65536  # bounded memory under a spoofed-source flood

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[Hashable, tuple[float, int]] = {}
        self._last_sweep = 0.0

    def spend(self, now: float, key: Hashable) -> bool:
        """Account one answer to ``key`` (a source IP, or an (IP, port) pair); False when the
        budget is exhausted (drop instead)."""
        if now - self._last_sweep > self.WINDOW:
            self._sweep(now)
        start, count = self._seen.get(key, (now, 0))
        if now - start >= self.WINDOW:
            start, count = now, 0
        if count >= self.limit:
            return False
        if count == 0 and len(self._seen) >= self.MAX_SOURCES:
            # Forgetting everyone errs towards answering real clients; a flood of spoofed
            # sources gains at most one window's worth of small 401s per address.
            self._seen.clear()
        self._seen[key] = (start, count + 1)
        return True

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        stale = [k for k, (start, _) in self._seen.items() if now - start >= self.WINDOW]
        for k in stale:
            del self._seen[k]
