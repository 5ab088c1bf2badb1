"""What the status page, /status.json and /metrics show: one plain-data snapshot of the runtime.

Why one snapshot feeding three renderers: the HTML page, the JSON and the Prometheus text must
never disagree, and the renderers (render.py) stay pure functions of plain data, testable
without sockets. The snapshot reads only what the running parts already keep (TURN's
``stats()``, the proxy's health monitor and balancer, the guards' ban tables); the two things
they do not keep are added here from the outside, without touching their hot paths:

* the reason and time of each node's last health change, from the proxy core's
  ``on_transition`` callbacks;
* requests answered by status class, from a tee in front of the proxy's access-log sink (one
  extra call per request, on the same path that already formats the access-log line).

With ``proxy.workers`` > 1 the proxy runs in other processes, whose health monitors and
counters this process cannot read. The node table then comes from the management listener's
own status checks (the same ``GET /api/client/v2/status`` with the same rise/fall rules), and
request counters are reported as unavailable rather than as zero.

Secrets never enter the snapshot: the configuration is ``Config.masked()`` with, in addition,
the password of a ``redis://`` guard store URL masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import confedge
from confedge.admin.procstats import child_pids, read_proc, self_stat
from confedge.config import Config, NodeAddress
from confedge.proxy import build_kind
from confedge.proxy.health import HealthMonitor, NodeState, Transition
from confedge.proxy.pools import PoolSpec, build_pools, health_monitor
from confedge.tls.certs import configured_certificates, leaf_summary

__all__ = ["BAN_LIMIT", "RuntimeView", "StatusSource", "mask_url"]

log = logging.getLogger("confedge.admin")

BAN_LIMIT = 1000  # bans listed in a snapshot (`confedge bans list` shows them all)
TOP_ALLOCATIONS = 20  # busiest TURN allocations in a snapshot (status page, /metrics)
MASK = "****"


class RuntimeView(Protocol):
    """The parts of confedge.runtime.Runtime the snapshot reads (each may be None)."""

    guard: Any
    turn: Any
    proxy: Any


def mask_url(url: str) -> str:
    """`redis://user:pw@host/0` -> `redis://user:****@host/0`; other text unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit((parts.scheme, f"{user}{MASK}@{host}", parts.path, parts.query, ""))


def masked_config(cfg: Config) -> dict[str, Any]:
    data = cfg.masked()
    data["guard"]["store"] = mask_url(data["guard"]["store"])
    data["cluster"]["store"] = mask_url(data["cluster"]["store"])
    return data


class _OwnHealth:
    """Status checks run by the management listener when the proxy's own are out of reach."""

    def __init__(self, cfg: Config, record: Callable[[Transition], None]) -> None:
        self.cfg = cfg
        # Every pool's nodes, as the proxy workers number them (proxy/pools.py).
        self.specs = build_pools(cfg)
        self.nodes: list[NodeAddress] = [n for spec in self.specs for n in spec.nodes]
        self.monitor = health_monitor(self.specs)
        self.record = record
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="admin-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        from confedge.proxy.healthcheck import HealthChecker
        from confedge.tls.context import client_context

        p = self.cfg.proxy
        ctx = (
            client_context(p.verify_upstream)
            if any(n.scheme == "https" for n in self.nodes)
            else None
        )

        def record(t: Transition | None) -> None:
            if t is not None:
                self.record(t)

        # The same loop as the proxy workers' (proxy/healthcheck.py), one per pool.
        await asyncio.gather(
            *(
                HealthChecker(
                    self.nodes,
                    self.monitor,
                    ctx,
                    p,
                    record,
                    indices=spec.indices,
                    interval=spec.health_interval,
                    timeout=spec.health_timeout,
                ).run()
                for spec in self.specs
                if spec.nodes
            )
        )


def _pool_rows(
    specs: list[PoolSpec], nodes: list[dict[str, Any]], requests: list[int] | None
) -> list[dict[str, Any]]:
    """One row per node pool (proxy/pools.py), summed from its nodes' rows; node rows get
    their pool's name too. `requests`: proxied requests finished per pool, when known."""
    rows = []
    for k, spec in enumerate(specs):
        mine = nodes[spec.lo : spec.lo + len(spec.nodes)]
        for r in mine:
            r["pool"] = spec.name
        known = [r for r in mine if r["state"] is not None]
        flights = [r["in_flight"] for r in mine if r.get("in_flight") is not None]
        rows.append(
            {
                "pool": spec.name,
                "prefix": spec.prefix or None,
                "balance": spec.balance,
                "nodes": len(mine),
                "nodes_up": (
                    sum(1 for r in known if r["state"] == NodeState.UP.value) if known else None
                ),
                "in_flight": sum(flights) if flights else None,
                "requests": requests[k] if requests is not None else None,
            }
        )
    return rows


class StatusSource:
    """Builds snapshots of one runtime; attach() before use, detach() on close."""

    def __init__(
        self,
        cfg: Config,
        runtime: RuntimeView,
        *,
        management_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.rt = runtime
        self.management_url = management_url
        self.clock = clock
        self.config = masked_config(cfg)  # the model is frozen: mask once
        self.started = getattr(runtime, "started", None) or clock()
        self.last_change: dict[int, tuple[str, float]] = {}  # node -> (reason, wall time)
        self.own_health: _OwnHealth | None = None
        self._core: Any = None
        # Certificate file -> ((mtime, size), its leaf as plain data): parsed again only when
        # the file changed (a renewal, `confedge cert install`), not at every scrape.
        self._certs: dict[str, tuple[tuple[int, int], dict[str, object]]] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self) -> None:
        """Hook into the in-process proxy core, or start own checks for out-of-process workers."""
        proxy = self.rt.proxy
        if proxy is None or not self.cfg.proxy.nodes:
            return
        core = getattr(proxy, "core", None)
        if core is not None:
            self._core = core
            core.on_transition.append(self._record)
        else:
            self.own_health = _OwnHealth(self.cfg, self._record)
            self.own_health.start()

    async def detach(self) -> None:
        core, self._core = self._core, None
        if core is not None:
            with contextlib.suppress(ValueError):
                core.on_transition.remove(self._record)
        if self.own_health is not None:
            await self.own_health.close()
            self.own_health = None

    def _record(self, t: Transition) -> None:
        loop = asyncio.get_running_loop()
        self.last_change[t.node] = (t.reason, self.clock() - (loop.time() - t.at))

    # -- the snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        srv = self.cfg.server
        return {
            "version": confedge.__version__,
            "build": build_kind(),  # the proxy hot path: "compiled (mypyc)" or "interpreted"
            "time": now,
            "started": self.started,
            "uptime": max(0.0, now - self.started),
            "server": {
                "fqdn": srv.fqdn,
                "internal_address": srv.internal_address,
                "external_address": srv.relay_address,
            },
            "management": {
                "url": self.management_url,
                "networks": list(self.cfg.management.networks),
            },
            "drain": self._drain(),
            "reload": getattr(self.rt, "last_reload", None),
            "proxy": self._proxy(now),
            "turn": self._turn(),
            "guard": self._guard(now),
            "cluster": self._cluster(),
            "tls": self._tls(),
            "process": self._process(),
            "config": self.config,
        }

    def _tls(self) -> list[dict[str, Any]]:
        """Each certificate [tls] serves (tls/certs.configured_certificates): its leaf's
        subject, issuer, names and expiry, so that a renewal that stopped working shows on the
        status page and in /metrics before clients see an expired certificate."""
        out: list[dict[str, Any]] = []
        for label, path, _key in configured_certificates(self.cfg):
            entry: dict[str, Any] = {"certificate": label, "path": path}
            try:
                st = os.stat(path)
            except OSError as exc:
                entry["problem"] = f"cannot read {path}: {exc.strerror}"
                out.append(entry)
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._certs.get(path)
            if cached is None or cached[0] != stamp:
                cached = self._certs[path] = (stamp, leaf_summary(path))
            entry.update(cached[1])
            out.append(entry)
        return out

    def _proxy(self, now: float) -> dict[str, Any]:
        proxy = self.rt.proxy
        p = self.cfg.proxy
        if proxy is None:
            return {"enabled": False}
        out: dict[str, Any] = {
            "enabled": True,
            "listeners": proxy.info(),
            "workers": getattr(proxy, "workers", None),
            "balance": p.balance,
        }
        core = self._core
        # Worker processes (workers > 1) report their counters to the main process each second.
        reports_fn = getattr(proxy, "worker_stats", None) if core is None else None
        reports = reports_fn() if callable(reports_fn) else None
        loop_now = asyncio.get_running_loop().time()
        monitor: HealthMonitor | None
        if core is not None:
            monitor, source = core.health, "proxy"
        elif self.own_health is not None:
            monitor, source = self.own_health.monitor, "management"
        else:
            monitor, source = None, None
        specs = build_pools(self.cfg)
        nodes = []
        for i, node in enumerate(n for spec in specs for n in spec.nodes):
            row: dict[str, Any] = {"node": node.url, "state": None, "since": None, "reason": None}
            if monitor is not None:
                row["state"] = monitor.states[i].value
                since = monitor.since[i]
                # 0.0 is the initial "up since start" mark of HealthMonitor, not a time.
                row["since"] = now - (loop_now - since) if since > 0 else None
                change = self.last_change.get(i)
                if change is not None:
                    row["reason"] = change[0]
            if core is not None:
                row["in_flight"] = core.balancer.active[i]
                row["idle_connections"] = len(core.pools[i].idle)
            elif reports is not None:
                row["in_flight"] = reports["in_flight"][i]
                row["idle_connections"] = reports["idle_connections"][i]
            nodes.append(row)
        out["health_source"] = source
        out["nodes"] = nodes
        out["nodes_up"] = sum(1 for r in nodes if r["state"] == NodeState.UP.value)
        pool_requests: list[int] | None = None
        if core is not None:
            pool_requests = list(core.pool_requests)
        elif reports is not None and len(reports.get("pool_requests", ())) == len(specs):
            pool_requests = reports["pool_requests"]
        out["pools"] = _pool_rows(specs, nodes, pool_requests)
        if core is not None:
            out["client_connections"] = len(core.clients)
            out["upstream_connections"] = len(core.upstreams)
            counts = getattr(proxy, "request_counts", None)
            out["requests"] = counts() if callable(counts) else None
        elif reports is not None:
            out["client_connections"] = reports["client_connections"]
            out["upstream_connections"] = reports["upstream_connections"]
            out["requests"] = reports["requests"]
            out["workers_reporting"] = reports["reporting"]
        else:
            out["requests"] = None  # workers not heard from yet: unknown, not 0
        for key in ("sessions", "latency", "guard_decisions"):
            fn = getattr(proxy, key, None)
            if callable(fn):
                out[key] = fn()
        if "latency" in out:  # by node URL, like the other per-node figures
            urls = {n.netloc: n.url for n in p.node_addresses}
            out["latency"] = {urls.get(k, k): v for k, v in out["latency"].items()}
        return out

    def _drain(self) -> dict[str, Any]:
        """The drain's phase and what is left (Runtime.drain_status; confedge/drain.py)."""
        status = getattr(self.rt, "drain_status", None)
        out: dict[str, Any] = status() if callable(status) else {"phase": "serving"}
        return out

    def _turn(self) -> dict[str, Any]:
        turn = self.rt.turn
        t = self.cfg.turn
        if turn is None:
            return {"enabled": False}
        host = self.cfg.server.internal_address
        listeners = [
            {"transport": "udp", "address": _hostport(host, turn.port)},
            {"transport": "tcp", "address": _hostport(host, turn.port)},
        ]
        tls_port = getattr(turn, "tls_port", 0)
        if tls_port:
            listeners.append({"transport": "tls", "address": _hostport(host, tls_port)})
        relays = [self.cfg.server.relay_address]
        if t.relay_address_v6 and t.relay_address_v6 not in relays:
            relays.append(t.relay_address_v6)
        return {
            "enabled": True,
            "mode": t.mode,
            "realm": self.cfg.server.domain,
            "listeners": listeners,
            "relay": {"addresses": relays, "ports": t.relay_ports},
            **turn.stats(),
            **_turn_live(turn),
            **_turn_dataplane(turn),
        }

    def _cluster(self) -> dict[str, Any]:
        cluster = getattr(self.rt, "cluster", None)
        if cluster is None:
            return {"enabled": False}
        out: dict[str, Any] = cluster.snapshot()
        return out

    def _guard(self, now: float) -> dict[str, Any]:
        g = self.cfg.guard
        out: dict[str, Any] = {"enabled": g.enabled}
        if not g.enabled:
            return out
        guards = [self.rt.guard]
        core = self._core
        if core is not None:
            guards.append(core.guard)  # the in-process proxy worker has its own guard instance
        merged: dict[str, Any] = {}
        store, store_ok = None, None
        for guard in guards:
            if guard is None or not hasattr(guard, "bans"):
                continue
            if store is None:
                store = getattr(getattr(guard, "store", None), "description", None)
                store_ok = getattr(guard, "store_ok", None)
            for rec in guard.bans():
                cur = merged.get(rec.source)
                if cur is None or rec.expires > cur.expires:
                    merged[rec.source] = rec
        active = sorted(
            (r for r in merged.values() if r.expires > now), key=lambda r: r.expires, reverse=True
        )
        out.update(
            store=mask_url(store) if store else None,
            store_ok=store_ok,
            maxretry=g.maxretry,
            findtime=g.findtime,
            bantime=g.bantime,
            bans_total=len(active),
            bans=[
                {
                    "source": r.source,
                    "reason": r.reason,
                    "count": r.count,
                    "failures": r.failures,
                    "created": r.created,
                    "expires": r.expires,
                    "remaining": r.expires - now,
                }
                for r in active[:BAN_LIMIT]
            ],
        )
        return out

    def _process(self) -> dict[str, Any]:
        out = self_stat().to_json()
        children = [read_proc(pid) for pid in child_pids()]
        out["children"] = [c.to_json() for c in children if c is not None]
        return out


def _hostport(host: str, port: int) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    return f"{host}:{port}"


_DROP_KEYS = ("drop_", "kernel_drops_")


def _turn_dataplane(turn: Any) -> dict[str, Any]:
    """The relay's data plane under ``dataplane``: backend, relay threads and folding, whether
    requests take the control socket (``steered``), drops by cause (native only; the Python
    plane has just its backend name)."""
    stats = getattr(turn, "dataplane_stats", None)
    if stats is None:
        return {}
    s = stats()
    out: dict[str, Any] = {"backend": s.get("backend", "python")}
    for key in ("threads", "folded", "folds", "unfolds", "steered"):
        if key in s:
            out[key] = s[key]
    # every place the relay drops a packet (issue 14: "drops counted, not silent"), as the
    # engine names its counters: drop_<cause> and kernel_drops_<socket>
    drops = {k.removeprefix("drop_"): v for k, v in s.items() if k.startswith(_DROP_KEYS)}
    if drops:
        out["drops"] = drops
    return {"dataplane": out}


def _turn_live(turn: Any) -> dict[str, Any]:
    """TURN's live figures (throughput, busiest allocations, answers by cause, lifetimes, caps,
    drain state: TurnService.live) under ``live``, when the service has them."""
    live = getattr(turn, "live", None)
    if live is None:
        return {}
    return {"live": live(TOP_ALLOCATIONS)}
