"""TURN/STUN relay (SPEC §3): sans-I/O core, auth, peer policy, data plane, listeners, service.

``TurnService`` is imported on first use (PEP 562): proxy worker processes import
``confedge.turn.portshare`` (turn.tls_on_https) and must not load the whole relay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import TurnService

__all__ = ["TurnService"]


def __getattr__(name: str) -> Any:
    if name == "TurnService":
        from .service import TurnService

        return TurnService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
