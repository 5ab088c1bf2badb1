"""The exchange core's guard decisions, carried out: one place for both client adapters.

`Exchange` (exchange.py) asks for guard work as actions (A_ASK_SESSION, A_RESERVE_PIN,
A_SETTLE_PIN, A_REMEMBER, A_RECORD_FAILURE); the HTTP/1.1 adapter (server.py) and the HTTP/2
adapter (h2.py) both hand them to the guard here. The guard answers the two questions through
callbacks (its store may be remote); the answer is fed back to the exchange with the time, and
the adapter's `drive` carries out what the exchange decided next. No asyncio, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confedge.proxy.exchange import (
    A_ASK_SESSION,
    A_RECORD_FAILURE,
    A_REMEMBER,
    A_RESERVE_PIN,
    A_SETTLE_PIN,
    Exchange,
)

__all__ = ["carry_guard"]


def carry_guard(
    guard: Any,
    ex: Exchange,
    kind: int,
    arg: Any,
    drive: Callable[[Exchange], None],
    clock: Callable[[], float],
    decided: Callable[[str], None],
) -> None:
    """Carry out one guard action of `ex` (guard: a guard.hook.GuardHook, or None when off);
    `decided` counts each decision by kind for /metrics (WorkerRuntime.guard_decided)."""
    if guard is None:
        return
    ip = ex.client_ip
    if kind == A_ASK_SESSION:

        def known(k: bool) -> None:
            decided("session_known" if k else "session_unknown")
            ex.guard_session(k, clock())
            drive(ex)

        guard.session_known(ip, arg, known)
    elif kind == A_RESERVE_PIN:

        def admitted(ticket: str | None, retry_after: float) -> None:
            decided("pin_admitted" if ticket is not None else "pin_held_back")
            ex.guard_admitted(ticket, retry_after, clock())
            drive(ex)

        alias, ttl = arg
        guard.reserve_pin(ip, alias, ttl, admitted)
    elif kind == A_SETTLE_PIN:
        ticket, alias, pin, failed = arg
        decided("pin_failure" if failed else "pin_accepted")
        guard.settle_pin(ticket, ip, alias, pin, failed)
    elif kind == A_REMEMBER:
        token, lifetime = arg
        guard.remember_session(ip, token, lifetime)
    elif kind == A_RECORD_FAILURE:
        alias, pin = arg
        decided("pin_failure")
        guard.record_pin_failure(ip, alias, pin)
