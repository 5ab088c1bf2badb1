"""One timer scheme for every hand-written HTTP/1.1 protocol in confedge.

The proxy's client and node connections (proxy/server.py, proxy/upstream.py), the port-80
redirect listener (proxy/redirect.py), the management listener (admin/http.py) and the
simulated node (nodesim/server.py) all time out the same way: no TimerHandle per request, but
three plain fields on the connection and one periodic sweep over a set of connections.

- `deadline`: the loop time at which `on_timeout()` is called (math.inf: never);
- `timeout`: when non-zero, an *idle* timeout: activity pushes the deadline out by it;
- `activity`: set by the protocol when bytes move (one flag store per chunk is the whole
  per-chunk cost), cleared by the sweep.

`arm` sets an absolute deadline (a request head must arrive within header_timeout of its first
byte, whatever trickles in), `arm_idle` an idle one (a keep-alive connection, a WebSocket),
`disarm` none. `sweep` is one pass; `Sweeper` runs the pass every `interval` seconds over what
its `members` callable returns, and stops by itself when that is empty (the next `ensure`
restarts it), so a listener needs no start/stop hooks for its timers. Precision is the sweep
interval; owners pick it as a fraction of their shortest timeout.

This module is sans-I/O but for `Sweeper` (an asyncio task): the pure parts take `now`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["Sweeper", "Timed", "arm", "arm_idle", "disarm", "sweep", "sweep_interval"]

INF = math.inf


class Timed(Protocol):
    """A connection under this scheme."""

    activity: bool
    timeout: float
    deadline: float

    def on_timeout(self) -> None: ...


def arm(c: Any, now: float, seconds: float) -> None:
    """An absolute deadline `seconds` from `now` (activity does not move it)."""
    c.timeout = 0.0
    c.activity = False
    c.deadline = now + seconds


def arm_idle(c: Any, now: float, seconds: float) -> None:
    """An idle timeout: `seconds` without activity."""
    c.timeout = seconds
    c.activity = False
    c.deadline = now + seconds


def disarm(c: Any) -> None:
    c.timeout = 0.0
    c.deadline = INF


def sweep(conns: Iterable[Any], now: float) -> None:
    """One timer pass: activity since the last pass pushes an idle deadline out; a connection
    past its deadline gets on_timeout() (once: the deadline is cleared first)."""
    for c in conns:
        if c.activity:
            c.activity = False
            if c.timeout:
                c.deadline = now + c.timeout
        elif now >= c.deadline:
            c.deadline = INF
            c.on_timeout()


def sweep_interval(*timeouts: float) -> float:
    """A sweep period of a fifth of the shortest timeout, between 20 ms and 0.5 s."""
    return max(0.02, min(0.5, min((*timeouts, 2.0)) / 5))


class Sweeper:
    """Sweeps `members()` every `interval` seconds while it is not empty."""

    def __init__(self, members: Callable[[], Iterable[Any]], interval: float) -> None:
        self.members = members
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Call when a member is added: starts the sweep if it is not running."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            conns = list(self.members())
            if not conns:
                return
            sweep(conns, loop.time())

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
