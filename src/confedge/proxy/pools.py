"""Node pools per path prefix (SPEC §2: a separate pool for e.g. the Outlook scheduling add-in).

Theory of operation
-------------------
`build_pools(cfg)` turns `proxy.nodes` and every `[[proxy.pools]]` entry into a list of
`PoolSpec`, plain data: the default pool (prefix "", every path) first, then the prefixed pools
in file order. It is the one place pools are made from configuration: the proxy workers
(proxy/core.py), the management listener's own health checks (admin/snapshot.py) and a reload
of the node list all call it.

A worker flattens the pools' nodes into one list (`PoolSpec.lo` is the pool's first index in
it), so health (one `HealthMonitor` with each node's own rise/fall), the connection pools and
the adapters keep using one global node index; each pool has its own `Balancer` that picks only
within its slice, its own `ExchangeSettings` (the exchange core's node-choice point) and its own
health-check loop with its own interval and timeout. Failover therefore never leaves a pool: the
exchange retries through its pool's Balancer only.

Routing (`route`) is the longest prefix of the canonical request path (proxy/paths.py, the same
string the allowlist and static mounts read) among the prefixed pools; a request that matches
none goes to the default pool. Prefixes end in "/" (config.py), so "/scheduling/" never
captures "/schedulingX"; the path "/scheduling" itself (no slash) goes to the default pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from confedge.config import Config, NodeAddress
from confedge.proxy.health import HealthMonitor

__all__ = ["PoolSpec", "build_pools", "health_monitor", "route"]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One node pool, as data: what a worker and the status page need to run it."""

    name: str  # "default", or the prefix: the label on the status page and in /metrics
    prefix: str  # "" for the default pool
    nodes: tuple[NodeAddress, ...]
    lo: int  # global index of its first node
    balance: str
    health_interval: float
    health_timeout: float
    health_rise: int
    health_fall: int

    @property
    def indices(self) -> range:
        return range(self.lo, self.lo + len(self.nodes))


def build_pools(cfg: Config) -> list[PoolSpec]:
    """Every pool of `cfg`, the default one first; node indices run on across pools."""
    p = cfg.proxy
    out = [
        PoolSpec(
            "default",
            "",
            tuple(p.node_addresses),
            0,
            p.balance,
            p.health_interval,
            p.health_timeout,
            p.health_rise,
            p.health_fall,
        )
    ]
    lo = len(out[0].nodes)
    for pool in p.pools:
        nodes = tuple(NodeAddress.parse(n) for n in pool.nodes)
        out.append(
            PoolSpec(
                pool.prefix,
                pool.prefix,
                nodes,
                lo,
                pool.balance or p.balance,
                pool.health_interval or p.health_interval,
                pool.health_timeout or p.health_timeout,
                pool.health_rise or p.health_rise,
                pool.health_fall or p.health_fall,
            )
        )
        lo += len(nodes)
    return out


def health_monitor(specs: list[PoolSpec]) -> HealthMonitor:
    """One HealthMonitor over every pool's nodes (global indices), each node with its pool's
    rise and fall thresholds."""
    return HealthMonitor(
        sum(len(spec.nodes) for spec in specs),
        rise=[spec.health_rise for spec in specs for _ in spec.nodes],
        fall=[spec.health_fall for spec in specs for _ in spec.nodes],
    )


def route(prefixes: list[str], path: str) -> int:
    """Index (1-based, into the pool list) of the pool whose prefix is the longest one `path`
    starts with, or 0 (the default pool). `prefixes` are the prefixed pools' prefixes in pool
    order; `path` is the canonical target (a query after "?" never holds a "/"-ended prefix
    match that the path would not, since prefixes end in "/" and are matched from the start)."""
    best = 0
    best_len = 0
    for k, prefix in enumerate(prefixes):
        n = len(prefix)
        if n > best_len and path.startswith(prefix):
            best, best_len = k + 1, n
    return best
