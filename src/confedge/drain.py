"""Drain: take an instance out of service without cutting a call (issue 15; docs/OPERATIONS.md).

Theory of operation. A load balancer in front of several edges moves new users away from one
only after its health check has seen it fail, so the phases are, in order:

1. ``draining`` (for ``proxy.drain_grace`` seconds): everything keeps working, new client
   connections are still accepted, but the proxy's health endpoint answers 503 "draining" and
   TURN answers new Allocates with 300 Try Alternate (or refuses them). No request fails here.
2. ``closing``: the proxy's listeners are closed (every worker); requests, SSE streams and
   WebSockets in flight go on until they end, idle keep-alive connections are closed; TURN
   allocations keep relaying and can be refreshed.
3. ``drained``: nothing is left (no client connection, no allocation) or ``drain_timeout``
   seconds have passed since the drain began: the process exits.

``confedge drain --cancel`` (SIGUSR2) from phase 1 or 2 returns to ``serving`` (listeners
reopened). This module is the sans-I/O part: it takes ``now`` and the count of what is left and
says what to do; runtime.py carries it out.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Drain", "DrainAction", "Phase"]


class Phase(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"  # grace: health says draining, listeners still open
    CLOSING = "closing"  # listeners closed, waiting for what is left
    DRAINED = "drained"


class DrainAction(StrEnum):
    NONE = "none"
    CLOSE_LISTENERS = "close-listeners"
    EXIT = "exit"


class Drain:
    """The drain's state machine. `grace` and `timeout` are seconds from `start`."""

    def __init__(self, grace: float, timeout: float) -> None:
        self.grace = grace
        self.timeout = timeout
        self.phase = Phase.SERVING
        self.started: float | None = None

    def start(self, now: float) -> bool:
        """Begin draining; False (nothing changes) when already draining."""
        if self.phase is not Phase.SERVING:
            return False
        self.phase = Phase.DRAINING
        self.started = now
        return True

    def cancel(self) -> bool:
        """Back to serving; False when not draining (or already drained: the process exits)."""
        if self.phase not in (Phase.DRAINING, Phase.CLOSING):
            return False
        self.phase = Phase.SERVING
        self.started = None
        return True

    def tick(self, now: float, left: int) -> DrainAction:
        """What to do now, given `left` client connections and allocations still open.

        The grace period is always served in full (even with nothing left: the balancer must
        see the 503 before the port closes); the deadline ends everything.
        """
        if self.started is None or self.phase in (Phase.SERVING, Phase.DRAINED):
            return DrainAction.NONE
        elapsed = now - self.started
        if self.phase is Phase.DRAINING and elapsed >= self.grace:
            self.phase = Phase.CLOSING
            return DrainAction.CLOSE_LISTENERS
        if elapsed >= self.timeout or (self.phase is Phase.CLOSING and left <= 0):
            self.phase = Phase.DRAINED
            return DrainAction.EXIT
        return DrainAction.NONE

    def remaining(self, now: float) -> dict[str, float]:
        """Seconds until the listeners close and until the deadline (0 when past)."""
        if self.started is None:
            return {}
        elapsed = now - self.started
        return {
            "grace_left": max(0.0, self.grace - elapsed),
            "deadline_left": max(0.0, self.timeout - elapsed),
        }
