"""TURN/STUN relay (SPEC §3): sans-I/O core, auth, peer policy, data plane, listeners, service."""

from .service import TurnService

__all__ = ["TurnService"]
