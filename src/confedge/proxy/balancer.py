"""Choosing a node for a request, sans-I/O: round-robin, ip-hash, least-conn (SPEC §2).

Every policy skips nodes that are not UP (health.py) and nodes already tried for this request
(a bitmask, so failover never loops). ip-hash is rendezvous hashing (highest random weight):
each client address ranks the nodes by crc32(address, node); when a node goes down only its
own clients move, and when it returns they move back, which keeps a client's SSE stream and
its REST calls on one node (SPEC §2 affinity); `pick_serving` also looks at nodes in maintenance,
for token-bearing requests a node refused (exchange.py). crc32 rather than hash(): Python salts str
hashes per process, and every worker process must pick the same node for one client.

Pools (proxy/pools.py): node indices are global to a worker (its flat node list: the default
pool's nodes first, then each `[[proxy.pools]]` entry's), and one Balancer per pool picks only
in its slice `[lo, lo + len(keys))`. Health (`up`, `serving`) and `active` are the worker's
global lists, shared by every pool's Balancer, so a pool's failover never leaves its slice and
the adapters, health monitor and connection pools need no translation of indices.
"""

from __future__ import annotations

import zlib
from typing import Final, Literal

__all__ = ["Balancer"]

Policy = Literal["round-robin", "ip-hash", "least-conn"]
_POLICIES: Final = ("round-robin", "ip-hash", "least-conn")


class Balancer:
    """Picks node indices; `active[i]` is maintained by the caller (requests in flight)."""

    def __init__(
        self,
        keys: list[str],
        up: list[bool],
        policy: Policy,
        serving: list[bool] | None = None,
        *,
        lo: int = 0,
        active: list[int] | None = None,
    ) -> None:
        self.lo = lo  # this pool's first global node index (see "Pools" above)
        self.hi = lo + len(keys)  # one past its last
        self.up = up  # shared with HealthMonitor.up: health changes are seen at once
        # HealthMonitor.serving: UP or MAINTENANCE, i.e. nodes that still hold sessions.
        self.serving = up if serving is None else serving
        if policy not in _POLICIES:  # config.py validates the key; this catches a caller's typo
            raise ValueError(f"unknown balancing policy {policy!r} (one of {', '.join(_POLICIES)})")
        self.policy = policy
        self.active = [0] * self.hi if active is None else active
        self._next = lo
        self._salts = [k.encode() + b"|" for k in keys]

    def pick(self, client_ip: str, tried: int) -> int | None:
        """The node for the next attempt, or None when no untried node is UP."""
        if self.policy == "round-robin":
            start = self._next
            if start < self.hi and self.up[start] and not tried >> start & 1:
                # The usual case, the next node is fine (here: a call fewer per request).
                self._next = start + 1 if start + 1 < self.hi else self.lo
                return start
            return self._round_robin(tried)
        if self.policy == "ip-hash":
            return self._ip_hash(client_ip, tried, self.up)
        return self._least_conn(tried)

    def pick_serving(self, client_ip: str, tried: int) -> int | None:
        """The next node that may hold this client's session (UP or in maintenance), for a
        token-bearing request a node refused; ranked like ip-hash, whatever the policy."""
        return self._ip_hash(client_ip, tried, self.serving)

    def _round_robin(self, tried: int) -> int | None:
        """Round-robin past the next node (pick found it down or tried)."""
        lo = self.lo
        hi = self.hi
        start = self._next
        up = self.up
        span = hi - lo
        for k in range(span):
            i = lo + (start - lo + k) % span
            if up[i] and not tried >> i & 1:
                self._next = i + 1 if i + 1 < hi else lo
                return i
        return None

    def _ip_hash(self, client_ip: str, tried: int, up: list[bool]) -> int | None:
        best = -1
        best_score = -1
        ip = client_ip.encode()
        lo = self.lo
        for k, salt in enumerate(self._salts):
            i = lo + k
            if up[i] and not tried >> i & 1:
                score = zlib.crc32(salt + ip)
                if score > best_score:
                    best, best_score = i, score
        return best if best >= 0 else None

    def _least_conn(self, tried: int) -> int | None:
        lo = self.lo
        hi = self.hi
        span = hi - lo
        start = self._next
        best = -1
        best_load = 0
        up, active = self.up, self.active
        for k in range(span):
            i = lo + (start - lo + k) % span
            if up[i] and not tried >> i & 1 and (best < 0 or active[i] < best_load):
                best, best_load = i, active[i]
        if best < 0:
            return None
        self._next = best + 1 if best + 1 < hi else lo
        return best
