"""The hook contract between the guard, the proxy and TURN (see docs/GUARD.md).

Why a Protocol: the proxy and TURN are written against this shape only, so they work the same
with the real guard, with `NullGuard` when guard.enabled is false, and with fakes in their own
unit tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["GuardHook", "NullGuard"]


class GuardHook(Protocol):
    ban_status: int  # 429 (default) or 403
    enabled: bool

    def check(self, client_ip: str) -> float | None:
        """Seconds of ban left if client_ip is banned (its address, its IPv6 /64, or the IPv4
        inside an IPv4-mapped IPv6 address), else None. Costs well under 2 µs."""
        ...

    def record_pin_failure(self, client_ip: str, alias: str, pin: str | None) -> None:
        """The node answered POST .../conferences/<alias>/request_token with 403 and
        result == "Invalid PIN". alias lower-cased and percent-decoded; pin is the request's
        `pin` header (only a salted hash is kept)."""
        ...

    def record_turn_auth_failure(self, client_ip: str) -> None:
        """TURN saw a request whose MESSAGE-INTEGRITY failed (401 after a nonce was issued)."""
        ...

    def reserve_pin(
        self, client_ip: str, alias: str, ttl: float, done: Callable[[str | None, float], None]
    ) -> None:
        """Before forwarding a request_token: `done(ticket, 0)` to go ahead, or
        `done(None, retry_after)` to answer 429 (guard/inflight.py). Every ticket is settled
        with `settle_pin`, or lapses after `ttl` seconds."""
        ...

    def settle_pin(
        self, ticket: str, client_ip: str, alias: str, pin: str | None, failed: bool
    ) -> None:
        """The node answered the ticket's request_token; `failed`: 403 "Invalid PIN" (this
        replaces record_pin_failure for reserved requests)."""
        ...

    def remember_session(self, client_ip: str, token: str, lifetime: float) -> None:
        """A node's 200 answer to request_token/refresh_token issued `token` to client_ip."""
        ...

    def session_known(self, client_ip: str, token: str, done: Callable[[bool], None]) -> None:
        """`done(True)` if `token` was issued to client_ip and is still valid: a banned
        address's request carrying it is an admitted participant's, not a guess."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class NullGuard:
    """The guard when guard.enabled is false: nothing is counted, nobody is banned."""

    enabled = False

    def __init__(self, ban_status: int = 429) -> None:
        self.ban_status = ban_status

    def check(self, client_ip: str) -> float | None:
        return None

    def record_pin_failure(self, client_ip: str, alias: str, pin: str | None) -> None:
        return None

    def record_turn_auth_failure(self, client_ip: str) -> None:
        return None

    def reserve_pin(
        self, client_ip: str, alias: str, ttl: float, done: Callable[[str | None, float], None]
    ) -> None:
        done("", 0.0)

    def settle_pin(
        self, ticket: str, client_ip: str, alias: str, pin: str | None, failed: bool
    ) -> None:
        return None

    def remember_session(self, client_ip: str, token: str, lifetime: float) -> None:
        return None

    def session_known(self, client_ip: str, token: str, done: Callable[[bool], None]) -> None:
        done(False)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
