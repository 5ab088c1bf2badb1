"""PIN brute-force guard (SPEC §4): counters, bans, shared stores, and the hook the proxy and
TURN call. See docs/GUARD.md for operators and `hook.GuardHook` for the contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confedge.config import Config
from confedge.guard.addresses import client_address, parse_networks
from confedge.guard.hook import GuardHook, NullGuard

if TYPE_CHECKING:
    from confedge.guard.service import Guard

__all__ = ["Guard", "GuardHook", "NullGuard", "client_address", "create_guard", "parse_networks"]


def create_guard(cfg: Config) -> Guard | NullGuard:
    """The guard for this configuration, not yet started (call `await guard.start()`).

    Each proxy worker process calls this itself: the workers share bans and counts through the
    configured store (guard.store), never through memory.
    """
    if not cfg.guard.enabled:
        return NullGuard(cfg.guard.ban_status)
    from confedge.guard.service import Guard
    from confedge.guard.store import open_store

    return Guard(cfg.guard, open_store(cfg))


def __getattr__(name: str) -> Any:
    """`Guard` on first use (PEP 562): the service imports asyncio, and the sans-I/O parts
    (addresses, inflight, hook) are imported by cores that must not (proxy/exchange.py)."""
    if name == "Guard":
        from confedge.guard.service import Guard

        return Guard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
