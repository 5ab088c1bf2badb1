"""Node health, sans-I/O: active check results and passive failures in, state changes out.

Theory of operation: each node is UP, DOWN or MAINTENANCE. Active checks (`GET
/api/client/v2/status`, SPEC §2) report "ok" (200), "maintenance" (503) or "fail" (anything
else, a timeout, a refused connection). An UP node goes DOWN after `fall` consecutive failed
checks, and at once on a passive failure (a request that could not connect, or was answered
502/504), because the request path has just proven it broken; a 503 (the node's maintenance
answer) moves it to MAINTENANCE at once. A DOWN or MAINTENANCE node comes back after `rise`
consecutive "ok" checks. Only UP nodes get new requests; requests in flight are never touched
(streams in flight stay, SPEC §2). Time is injected (`now`) so tests step through it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["LATENCY_BUCKETS", "CheckResult", "HealthMonitor", "NodeState", "Transition"]

CheckResult = Literal["ok", "fail", "maintenance"]

# Upper bounds (seconds) of the per-node latency histogram buckets (/metrics; +Inf is implied):
# measured by each worker (upstream.UpstreamConnection.on_headers_complete), rendered by the
# management listener.
# (As a list too, which a compiled loop indexes natively per answer.)
LATENCY_BOUNDS: Final[list[float]] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
LATENCY_BUCKETS: Final = tuple(LATENCY_BOUNDS)


class NodeState(enum.Enum):
    UP = "up"
    DOWN = "down"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, for the log and the status page."""

    node: int
    old: NodeState
    new: NodeState
    reason: str
    at: float


class HealthMonitor:
    """Health state of every node of one pool."""

    def __init__(self, count: int, *, rise: int | list[int], fall: int | list[int]) -> None:
        # One threshold for every node, or one per node (each pool its own, proxy/pools.py).
        self.rise = [rise] * count if isinstance(rise, int) else list(rise)
        self.fall = [fall] * count if isinstance(fall, int) else list(fall)
        self.states = [NodeState.UP] * count  # optimistic: serve at once after start
        self.up = [True] * count  # the hot path reads this list only
        self.serving = [True] * count  # UP or MAINTENANCE: still holds its sessions
        self.since = [0.0] * count
        self._ok_streak = [0] * count
        self._fail_streak = [0] * count

    def _set(self, i: int, new: NodeState, reason: str, now: float) -> Transition | None:
        old = self.states[i]
        if old is new:
            return None
        self.states[i] = new
        self.up[i] = new is NodeState.UP
        self.serving[i] = new is not NodeState.DOWN
        self.since[i] = now
        self._ok_streak[i] = 0
        self._fail_streak[i] = 0
        return Transition(i, old, new, reason, now)

    def check_result(
        self, i: int, result: CheckResult, now: float, detail: str = ""
    ) -> Transition | None:
        """Record one active check of node `i`; return the state change, if any."""
        state = self.states[i]
        if result == "maintenance":
            return self._set(
                i, NodeState.MAINTENANCE, "status check answered 503 (maintenance)", now
            )
        if result == "ok":
            self._fail_streak[i] = 0
            if state is NodeState.UP:
                return None
            self._ok_streak[i] += 1
            rise = self.rise[i]
            if self._ok_streak[i] >= rise:
                return self._set(i, NodeState.UP, f"{rise} status checks passed", now)
            return None
        self._ok_streak[i] = 0
        if state is NodeState.MAINTENANCE:
            return self._set(i, NodeState.DOWN, f"status check failed: {detail}", now)
        if state is NodeState.DOWN:
            return None
        self._fail_streak[i] += 1
        fall = self.fall[i]
        if self._fail_streak[i] >= fall:
            return self._set(i, NodeState.DOWN, f"{fall} status checks failed: {detail}", now)
        return None

    def passive_failure(
        self, i: int, now: float, reason: str, *, maintenance: bool = False
    ) -> Transition | None:
        """A proxied request failed on node `i` (connect error/timeout, 502/503/504)."""
        if maintenance:
            return self._set(i, NodeState.MAINTENANCE, reason, now)
        if self.states[i] is NodeState.MAINTENANCE:
            return None
        return self._set(i, NodeState.DOWN, reason, now)
