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
from collections.abc import Sequence

from confedge.stun import long_term_key

__all__ = [
    "Credentials",
    "LongTermCredentials",
    "NonceManager",
    "RestCredentials",
    "UnauthBudget",
]


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


class LongTermCredentials(Credentials):
    """One static username/password (restricted mode, SPEC §3)."""

    def __init__(self, username: str, password: str, realm: str) -> None:
        self.realm = realm
        self._username = username.encode()
        # Derive once: MD5(username ":" realm ":" SASLprep(password)) (RFC 8489 §9.2.2).
        self._key = long_term_key(username, realm, password)

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

    def expired(self, username: str, wall_now: float) -> bool:
        expiry = self.expiry_of(username)
        return expiry is not None and expiry < wall_now

    def keys_for(self, username: str, wall_now: float) -> list[bytes]:
        expiry = self.expiry_of(username)
        if expiry is None or expiry < wall_now:
            return []  # malformed or expired: refused like an unknown user
        return [
            long_term_key(username, self.realm, self.password_for(sec, username))
            for sec in self._secrets
        ]


class NonceManager:
    """Stateless nonces bound to the client address (RFC 8489 §9.2.1, §9.2.4 item 4)."""

    def __init__(self, lifetime: float, key: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._key = key if key is not None else os.urandom(32)

    def _mac(self, ts: int, ip: str, port: int) -> str:
        msg = f"{ts:x}|{ip}|{port}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:24]

    def issue(self, now: float, ip: str, port: int) -> str:
        ts = max(int(now), 0)
        return f"{ts:012x}{self._mac(ts, ip, port)}"

    def valid(self, nonce: str, now: float, ip: str, port: int) -> bool:
        """True when the nonce was minted by this process for this address and is still fresh."""
        if len(nonce) != 36:
            return False
        try:
            ts = int(nonce[:12], 16)
        except ValueError:
            return False
        if not hmac.compare_digest(nonce[12:], self._mac(ts, ip, port)):
            return False
        return ts - 1 <= now < ts + self.lifetime


class UnauthBudget:
    """Per-source budget for 401/438 answers (SPEC §3): at most ``limit`` per 10 s window.

    Beyond the budget the request is dropped silently: a spoofed-source flood then gets no
    amplification at all, and a real client simply retransmits later.
    """

    WINDOW = 10.0
    MAX_SOURCES = 65536  # bounded memory under a spoofed-source flood

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, tuple[float, int]] = {}
        self._last_sweep = 0.0

    def spend(self, now: float, ip: str) -> bool:
        """Account one answer to ``ip``; False when the budget is exhausted (drop instead)."""
        if now - self._last_sweep > self.WINDOW:
            self._sweep(now)
        start, count = self._seen.get(ip, (now, 0))
        if now - start >= self.WINDOW:
            start, count = now, 0
        if count >= self.limit:
            return False
        if count == 0 and len(self._seen) >= self.MAX_SOURCES:
            # Forgetting everyone errs towards answering real clients; a flood of spoofed
            # sources gains at most one window's worth of small 401s per address.
            self._seen.clear()
        self._seen[ip] = (start, count + 1)
        return True

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        stale = [ip for ip, (start, _) in self._seen.items() if now - start >= self.WINDOW]
        for ip in stale:
            del self._seen[ip]
