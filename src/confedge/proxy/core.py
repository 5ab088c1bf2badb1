"""Per-worker proxy state: node pools, balancer, health, limits, timers, logging hooks.

One `WorkerRuntime` lives in each worker process and is shared by all its connections. It turns the
configuration into the constants the hot path reads (bytes, frozensets, floats) once, so a
request never looks anything up in the configuration, never calls logging.getLogger, and never
formats a date more than once a second.

Timers (confedge/timers.py, the scheme every hand-written HTTP/1.1 protocol shares): instead
of a loop.call_later per request, every connection (client, node, port-80 redirect) carries a
`deadline`, a `timeout` and an `activity` flag, and one sweep per fraction of a second expires
what is due. A flag store per chunk is the whole per-chunk cost of idle timeouts.

Write coalescing: small writes to clients and nodes (request heads, small responses, SSE
events, WebSocket frames) are not written at once but queued with `send` and written together
at the end of the event-loop iteration that produced them (`flush_writes`, one call_soon per
batch). On a busy worker one iteration handles the readable sockets of many connections, and
every write(2) to a loopback or LAN peer that sleeps in epoll_wait costs a wake-up of that peer
(an inter-processor interrupt on a VM) charged to the writer. Written back to back, the writes
of one batch wake each peer once instead of once per request: in the proxy benchmark this
halved the kernel time per proxied HTTPS request (20 -> 11 us) and raised throughput by half
(docs/BENCHMARKS.md). A batch never outlives the iteration, so latency is unchanged.

Rules that keep the stream of each transport in order and backpressure intact: data is queued
only as immutable bytes of at most COALESCE_MAX bytes (a larger write first flushes the queue,
then goes straight to the transport); once COALESCE_BATCH bytes are queued the queue is flushed
at once, because a node streaming a large body in small chunks would otherwise be read up to
libuv's 32 reads of 256 KiB in one iteration before any write could make the client transport
call pause_writing (which pauses reading from the node); a close goes through `close_after`,
which writes what is queued first, and a direct write calls `flush_writes` first; an abort needs
nothing (it discards what is buffered anyway, and the flush skips closing transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from confedge.config import Config, NodeAddress
from confedge.guard.addresses import Networks, client_address, parse_networks
from confedge.guard.hook import GuardHook
from confedge.proxy import h1engine
from confedge.proxy.accesslog import RequestCounter, remote_user
from confedge.proxy.balancer import Balancer
from confedge.proxy.exchange import Exchange, ExchangeSettings
from confedge.proxy.h1engine import RequestReader, ResponseReader
from confedge.proxy.health import LATENCY_BUCKETS, Transition
from confedge.proxy.healthcheck import HealthChecker
from confedge.proxy.pages import DateCache
from confedge.proxy.pools import build_pools, health_monitor, route
from confedge.proxy.request import (
    LOCAL_BANNED,
    LOCAL_HEALTH,
    LOCAL_NOT_ALLOWED,
    LOCAL_STATIC,
    MEMO_SIZE,
    TO_NODE,
    Refused,
    Request,
    host_allowed,
    normalise_target,
    path_allowed,
)
from confedge.timers import sweep, sweep_interval
from confedge.tls.context import client_context

if TYPE_CHECKING:
    from confedge.proxy.redirect import RedirectConnection
    from confedge.proxy.server import ClientConnection
    from confedge.proxy.upstream import NodePool, UpstreamConnection

__all__ = ["AccessLogSink", "ClientSide", "TurnShare", "WorkerRuntime"]

log = logging.getLogger("confedge.proxy")

# The wall clock for access-log lines, held as a constant (the compiled build then calls it
# without looking `time` and its attribute up per request).
_wall_clock: Final = time.time

# Proxied sessions a worker reports for the status page (longest first), and their path's length.
SESSIONS_SHOWN: Final = 10
SESSION_PATH_MAX: Final = 80

# Writes up to this size are coalesced per event-loop iteration (see "Write coalescing"), and
# at most this many bytes wait in the queue before it is flushed early.
COALESCE_MAX: Final = 32 * 1024
COALESCE_BATCH: Final = 256 * 1024

# At a stop, how long WebSocket tunnels that were sent Close frames get to finish (seconds).
_GOING_AWAY_WAIT: Final = 1.0


class ClientSide(Protocol):
    """A client connection as the worker sees it: the HTTP/1.1 `server.ClientConnection` or
    the HTTP/2 `h2.H2Client`. The worker keeps them in `clients`, sweeps their timers
    (timers.py), drains and lists them only through these members, so it never imports (or
    tests the class of) an adapter."""

    activity: bool
    timeout: float
    deadline: float

    @property
    def exchange(self) -> Any:
        """Something in progress (not None): the drain waits for it to end."""

    def on_timeout(self) -> None: ...

    def abort(self) -> None: ...

    def going_away(self) -> bool:
        """The worker stops: end the connection politely where its protocol has a way (a
        WebSocket tunnel's Close frames) and say True; False leaves it to `abort`."""

    def close_if_idle(self) -> None:
        """Drain, listeners closed: close the connection now if nothing is in progress on it."""

    def in_progress(self) -> list[tuple[Exchange, bool]]:
        """The exchanges in progress on it, each with whether it is a tunnel (WebSocket)."""


class TurnShare(Protocol):
    """Takes over a client connection that turned out to be TURN over TLS (turn.tls_on_https;
    proxy/turnshare.py): `first` is what was already read from it."""

    def take(self, t: asyncio.Transport, first: bytes) -> None: ...


class AccessLogSink(Protocol):
    """Receives one finished request (confedge.proxy.accesslog.AccessLog fits)."""

    def log(
        self,
        remote_addr: str,
        now: float,
        request: str,
        status: int,
        body_bytes_sent: int,
        referer: str | bytes | None = None,
        user_agent: str | bytes | None = None,
        upstream_addr: str | None = None,
        upstream_status: str | None = None,
        upstream_response_time: str | None = None,
        remote_user: str | None = None,
    ) -> None: ...


def _allowed_hosts(cfg: Config) -> frozenset[str]:
    s = cfg.server
    names = {s.fqdn, s.hostname, s.internal_address, "localhost", "127.0.0.1", "::1"}
    if s.external_address:
        names.add(s.external_address)
    names.update(cfg.proxy.allowed_hosts)
    return frozenset(n.lower().rstrip(".") for n in names)


class WorkerRuntime:
    """Everything one worker's connections share."""

    def __init__(
        self,
        cfg: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        guard: GuardHook | None = None,
        access_log: AccessLogSink | None = None,
        static: Any = None,
        workers: int = 1,
    ) -> None:
        p = cfg.proxy
        self.cfg = cfg
        self.loop = loop
        # The loop's clock, bound once (the request path reads it without a method lookup).
        self.clock: Callable[[], float] = loop.time
        self.guard = guard if guard is not None and getattr(guard, "enabled", True) else None
        self.access_log = access_log
        # The sink the service passes, by its own class: the compiled build calls its `log`
        # natively, where a call through the AccessLogSink protocol is a generic Python call
        # with eleven arguments, once per request.
        self.log_counter = access_log if type(access_log) is RequestCounter else None
        self.static = static
        self.allowed_hosts = _allowed_hosts(cfg)
        # Memos of two pure checks every request repeats (clients send the same few Host values
        # and poll the same API paths): Host header -> allowed?, raw target -> normalised target.
        # Bounded and emptied when full, so a client inventing values only loses the shortcut.
        self.host_ok: dict[bytes, bool] = {}
        self.targets: dict[bytes, str] = {}
        # Raw target -> (method, version, access-log request line): see request_line.
        self.lines: dict[bytes, tuple[bytes, str, str]] = {}
        # Port 80: (Host, target) -> the Location header line of the 301 (redirect.py).
        self.locations: dict[tuple[bytes | None, bytes], bytes] = {}
        self.workers = workers
        self.read_settings(cfg)
        self.date = DateCache()
        # The clients' shared read buffer (server.ClientConnection is a BufferedProtocol): one
        # per worker, not per connection, so 10,000 idle streams do not hold 10,000 buffers.
        self.read_buffer = bytearray(64 * 1024)
        self.read_view = memoryview(self.read_buffer)
        self.fqdn = cfg.server.fqdn.encode()
        self.previous: tuple[tuple[ExchangeSettings, ...], list[NodePool]] | None = None
        self.install_pools(cfg)
        # Drain (confedge/drain.py): "serving", "draining" (the health endpoint says so) or
        # "closing" (listeners closed: idle keep-alive connections are closed by the sweep).
        self.drain_phase = "serving"
        self.health_target = p.health_path
        # Per-node latency to the response head (connect + request + node's answer), by node
        # netloc: [count per LATENCY_BUCKETS bound ..., count of all, sum], for /metrics.
        self.latency: dict[str, list[float]] = {}
        # Guard decisions about proxied requests, by kind (banned, pin_admitted, ...).
        self.guard_decisions: dict[str, int] = {}
        self.clients: set[ClientSide] = set()
        # proxy.http2: the HTTP/2 adapter's shared part (proxy/h2.py H2Runtime), set by
        # ProxyWorker when ALPN offers "h2"; None keeps every connection on HTTP/1.1.
        self.h2: Any = None
        # proxy.http1_engine (h1engine.py): the C readers of ordinary HTTP/1.1 heads, tried
        # before httptools by server.py and upstream.py; None for both: httptools alone.
        self.h1_request: RequestReader | None
        self.h1_response: ResponseReader | None
        self.h1_request, self.h1_response = h1engine.readers(
            h1engine.choose(cfg.proxy.http1_engine)
        )
        # turn.tls_on_https: where TURN connections on the HTTPS port go (set by ProxyWorker);
        # None keeps the HTTP path exactly as without the option.
        self.turn_share: TurnShare | None = None
        self.upstreams: set[UpstreamConnection] = set()
        self.on_transition: list[Callable[[Transition], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._health_tasks: list[asyncio.Task[None]] = []  # one health-check loop per pool
        self._checks = False  # start(health_checks=...): whether reloads restart them
        self.redirects: set[RedirectConnection] = set()  # port 80 (proxy/redirect.py)
        self.sweep_interval = sweep_interval(
            p.header_timeout, p.body_timeout, p.idle_timeout, p.read_timeout, p.health_timeout
        )
        self.closing = False
        self.out: list[tuple[asyncio.Transport, bytes]] = []  # see "Write coalescing"
        self.out_bytes = 0
        # The flush of a batch scheduled with one call of the loop's call_soon on the bound
        # flush (both bound once, not per batch; no functools.partial in between).
        self.call_soon: Callable[[Callable[[], None]], object] = loop.call_soon
        self.flush_cb: Callable[[], None] = self.flush_writes

    def read_settings(self, cfg: Config) -> None:
        """The limits, time-outs and headers the hot path reads, as plain attributes (at start
        and on reload)."""
        p = cfg.proxy
        self.allowlist = tuple(p.path_allowlist)
        self.max_body = p.max_body_bytes
        self.max_header_bytes = p.max_header_bytes
        self.max_url_bytes = max(1024, p.max_header_bytes // 2)
        self.max_headers = p.max_headers
        # Port 80 answers ACME HTTP-01 challenges from here ("" = off; proxy/acme.py).
        self.acme_webroot = p.acme_webroot
        self.header_timeout = p.header_timeout
        self.body_timeout = p.body_timeout
        self.request_buffer = p.request_buffer_bytes
        self.idle_timeout = p.idle_timeout
        self.read_timeout = p.read_timeout
        self.connect_timeout = p.connect_timeout
        self.api_connect_timeout = p.api_connect_timeout
        self.sse_lifetime = p.sse_max_lifetime
        self.ws_idle = p.websocket_idle_timeout
        self.max_connections = max(1, math.ceil(p.max_connections / max(1, self.workers)))
        self.upstream_keepalive = p.upstream_keepalive
        self.upstream_idle = p.upstream_idle_timeout
        self.csp_line = (
            b"Content-Security-Policy: " + p.csp_policy.encode() + b"\r\n" if p.csp else b""
        )
        # Parsed once: client_address() walks X-Forwarded-For against these per request.
        self.trusted: Networks = parse_networks(p.trusted_proxies)

    # -- node list and pools (built once here; a reload builds them again) --------------------

    def install_pools(self, cfg: Config) -> None:
        """Build the node pools of `cfg` (proxy/pools.py build_pools): the flat node list, one
        HealthMonitor, the connection pools, and one Balancer and ExchangeSettings per pool.
        Called once at start; a reload of the node list or pools calls it again (then restarts
        the health checks with `start_health_checks`). Exchanges in flight keep the settings
        they were made with: `previous` keeps the last generation's settings and connection
        pools so that an exchange that fails over after a reload still finds its node by index.
        """
        p = cfg.proxy
        # One flat node list, each pool a slice of it.
        self.pool_specs = build_pools(cfg)
        self.nodes: list[NodeAddress] = [n for spec in self.pool_specs for n in spec.nodes]
        self.health = health_monitor(self.pool_specs)
        self.upstream_ssl: ssl.SSLContext | None = None
        if any(n.scheme == "https" for n in self.nodes):
            self.upstream_ssl = client_context(p.verify_upstream)
            if not p.verify_upstream:
                log.warning(
                    "proxy.verify_upstream is false: node certificates are not verified "
                    "(like the reference); set it to true if the nodes have trusted certificates"
                )
        from confedge.proxy.upstream import NodePool

        self.pools: list[NodePool] = [NodePool(self, i, n) for i, n in enumerate(self.nodes)]
        # Requests in flight per node, shared by every pool's Balancer (global indices).
        self.active = [0] * len(self.nodes)
        netlocs = [n.netloc for n in self.nodes]
        # What every exchange core (exchange.py) of this worker reads, as plain data: one
        # ExchangeSettings per pool, differing only in its Balancer.
        self.pool_settings: list[ExchangeSettings] = []
        # Requests finished per pool that reached one of its nodes (status page, /metrics).
        self.pool_requests = [0] * len(self.pool_specs)
        for k, spec in enumerate(self.pool_specs):
            balancer = Balancer(
                [n.netloc for n in spec.nodes],
                self.health.up,
                spec.balance,  # type: ignore[arg-type]  # validated by config.py
                self.health.serving,
                lo=spec.lo,
                active=self.active,
            )
            self.pool_settings.append(self.settings_over(balancer, netlocs, k))
        self.exchange_settings = self.pool_settings[0]  # the default pool (proxy.nodes)
        self.balancer = self.exchange_settings.nodes
        self.pool_prefixes = [spec.prefix for spec in self.pool_specs[1:]]

    def pools_for(self, settings: ExchangeSettings) -> list[NodePool] | None:
        """The connection pools of the node list an exchange started with (None: two reloads
        ago; its node numbers mean nothing any more)."""
        # (is_current, inlined as a plain loop: once per proxied request, and any() over a
        # generator costs the interpreted build some 3,500 instructions)
        for s in self.pool_settings:
            if s is settings:
                return self.pools
        prev = self.previous
        if prev is not None:
            for s in prev[0]:
                if s is settings:
                    return prev[1]
        return None

    def is_current(self, settings: ExchangeSettings) -> bool:
        """Whether `settings` belong to this generation of the node list (so its node numbers
        index `self.nodes` and health failures may be charged to them)."""
        return any(s is settings for s in self.pool_settings)

    def apply(self, cfg: Config) -> None:
        """Take a reloaded configuration (runtime.py checked it; restart-only keys are equal).

        Limits, time-outs, CSP, trusted proxies and Host names apply to the next request; the
        node list, pools, balancing and health settings rebuild the node set (install_pools)
        and restart the health checks. Open client and node connections are kept.
        """
        old = self.cfg.proxy
        p = cfg.proxy
        self.cfg = cfg
        self.allowed_hosts = _allowed_hosts(cfg)
        self.host_ok.clear()
        self.read_settings(cfg)
        self.health_target = p.health_path
        self.fqdn = cfg.server.fqdn.encode()
        node_keys = (
            "nodes", "pools", "balance", "verify_upstream", "health_interval", "health_timeout",
            "health_rise", "health_fall",
        )  # fmt: skip
        previous = (tuple(self.pool_settings), self.pools)
        if any(getattr(old, k) != getattr(p, k) for k in node_keys):
            self.install_pools(cfg)
            self.previous = previous
            if self._checks:
                self.start_health_checks()
            log.info("proxy: node list reloaded: %s", ", ".join(p.nodes) or "no nodes")
        else:
            # Same nodes: keep their health and pools, the exchanges read the new settings.
            self.build_settings_only()

    def build_settings_only(self) -> None:
        """New ExchangeSettings over the same balancers (CSP, time-outs changed)."""
        previous = (tuple(self.pool_settings), self.pools)
        self.pool_settings = [
            self.settings_over(st.nodes, st.netlocs, k) for k, st in enumerate(self.pool_settings)
        ]
        self.exchange_settings = self.pool_settings[0]
        self.previous = previous

    def settings_over(self, nodes: Balancer, netlocs: list[str], pool: int) -> ExchangeSettings:
        """The settings every exchange core reads, as plain data, over one pool's Balancer."""
        return ExchangeSettings(
            nodes=nodes,
            netlocs=netlocs,
            fqdn=self.fqdn,
            connect_timeout=self.connect_timeout,
            api_connect_timeout=self.api_connect_timeout,
            read_timeout=self.read_timeout,
            sse_lifetime=self.sse_lifetime,
            csp_line=self.csp_line,
            request_buffer=self.request_buffer,
            guard=self.guard is not None,
            ban_status=self.guard.ban_status if self.guard is not None else 429,
            pool=pool,
        )

    # -- drain (confedge/drain.py) ------------------------------------------------------------

    def close_idle(self) -> None:
        """Listeners closed (drain): close client connections with nothing in progress (an
        HTTP/2 connection without open streams gets a GOAWAY first, RFC 9113 §6.8)."""
        for c in list(self.clients):
            c.close_if_idle()

    def sessions(self, limit: int = SESSIONS_SHOWN) -> list[dict[str, Any]]:
        """The longest-running proxied exchanges now on a node (SSE streams, WebSockets, long
        polls), with the node's name, for the status page: [{client, node, path, kind, age}]."""
        now = self.loop.time()
        rows: list[tuple[float, dict[str, Any]]] = []
        for c in self.clients:
            for ex, tunnel in c.in_progress():
                if ex.node < 0 or not ex.addrs:
                    continue
                req = ex.req
                kind = "websocket" if tunnel else ("sse" if ex.sse else "request")
                age = now - ex.upstream_time
                rows.append(
                    (
                        age,
                        {
                            "client": ex.client_ip,
                            "node": ex.addrs[-1],
                            "path": req.target.partition("?")[0][:SESSION_PATH_MAX],
                            "kind": kind,
                            "age": round(age, 1),
                        },
                    )
                )
        rows.sort(key=lambda r: r[0], reverse=True)
        return [r for _, r in rows[:limit]]

    def triage(self, req: Request, client_ip: str) -> tuple[int, float | None]:
        """Where a vetted request is answered, for the HTTP/1.1 and HTTP/2 adapters alike:
        (TO_NODE or a LOCAL_* kind, seconds of ban left for the client's address or None).
        A banned address's token-bearing request may be an admitted participant's: it goes on
        (TO_NODE), and the exchange asks the guard before it goes anywhere (Exchange.attempt);
        such a request is not served from a static mount either."""
        banned: float | None = None
        guard = self.guard
        if guard is not None:
            banned = guard.check(client_ip)
            if banned is not None and not (req.session or b"token=" in req.url):
                self.guard_decided("banned")
                return LOCAL_BANNED, banned
        path = req.target
        if path == self.health_target and self.health_target:
            return LOCAL_HEALTH, banned
        static = self.static
        if banned is None and static is not None and static.match(path.partition("?")[0]):
            return LOCAL_STATIC, banned
        if self.allowlist and not path_allowed(path, self.allowlist):
            return LOCAL_NOT_ALLOWED, banned
        return TO_NODE, banned

    def ban_answer(self, banned: float) -> tuple[int, bytes]:
        """The status and the Retry-After header line of the answer to a banned address."""
        assert self.guard is not None
        return self.guard.ban_status, b"Retry-After: %d\r\n" % max(1, math.ceil(banned))

    def guard_decided(self, decision: str) -> None:
        """Count one guard decision about a proxied request (for /metrics)."""
        self.guard_decisions[decision] = self.guard_decisions.get(decision, 0) + 1

    def latency_row(self, netloc: str) -> list[float]:
        """The latency histogram of node `netloc` (/metrics), made at its first answer; a
        NodePool keeps a reference (upstream.py observes into it), so pools rebuilt by a
        reload keep counting into the same row."""
        h = self.latency.get(netloc)
        if h is None:
            h = self.latency[netloc] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        return h

    # -- write coalescing ---------------------------------------------------------------------

    def send(self, t: asyncio.Transport, data: bytes) -> None:
        """Write `data` (bytes, never a view of a reused buffer) at the end of this iteration."""
        n = len(data)
        if n > COALESCE_MAX:
            if self.out:
                self.flush_writes()
            t.write(data)
            return
        out = self.out
        if not out:
            self.call_soon(self.flush_cb)
        out.append((t, data))
        queued = self.out_bytes + n
        if queued > COALESCE_BATCH:
            self.flush_writes()  # now, so that pause_writing can still stop the reading
        else:
            self.out_bytes = queued

    def flush_writes(self) -> None:
        """Write every queued chunk, in order (also called before a close or direct write)."""
        out = self.out
        if not out:
            return
        self.out = []
        self.out_bytes = 0
        for t, data in out:
            if not t.is_closing():
                try:
                    t.write(data)
                except (RuntimeError, OSError) as exc:  # a transport torn down meanwhile
                    log.debug("dropped a queued write: %s", exc)
                    t.abort()

    def close_after(self, t: asyncio.Transport, last: bytes = b"") -> None:
        """Close `t` once everything queued (then `last`) is written: a close must never
        overtake a queued response (it would cut it off)."""
        self.flush_writes()
        if last:
            t.write(last)
        t.close()

    # -- lifecycle ----------------------------------------------------------------------------

    def settings_for(self, target: str) -> ExchangeSettings:
        """The ExchangeSettings (so the node pool) of a request: the longest pool prefix of
        its canonical target, else the default pool (proxy/pools.py). Every client adapter
        calls this before it makes an Exchange."""
        if not self.pool_prefixes:
            return self.exchange_settings
        return self.pool_settings[route(self.pool_prefixes, target)]

    def start(self, *, health_checks: bool = True) -> None:
        self._tasks.append(self.loop.create_task(self._sweeper()))
        self._checks = health_checks
        if health_checks:
            self.start_health_checks()

    def start_health_checks(self) -> None:
        """One active health-check loop per pool, with its own interval and timeout (again
        after a reload of the node list)."""
        for t in self._health_tasks:
            t.cancel()
            self._tasks.remove(t)
        self._health_tasks = []
        for spec in self.pool_specs:
            if not spec.nodes:
                continue
            checker = HealthChecker(
                self.nodes,
                self.health,
                self.upstream_ssl,
                self.cfg.proxy,
                self.transition,
                indices=spec.indices,
                interval=spec.health_interval,
                timeout=spec.health_timeout,
            )
            task = self.loop.create_task(checker.run())
            self._health_tasks.append(task)
            self._tasks.append(task)

    async def close(self) -> None:
        self.closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        # WebSocket tunnels get their Close frames and a flushed close (server.going_away);
        # everything else is cut as before. A tunnel's node connection is closing already and
        # is left to finish writing its Close frame (an abort would drop it).
        polite = {c for c in list(self.clients) if c.going_away()}  # (a set: 10,000s open)
        for c in list(self.clients):
            if c not in polite:
                c.abort()
        for u in list(self.upstreams):
            node = u.transport
            if not (u.tunnel and node is not None and node.is_closing()):
                u.close()
        # Time for the frames to leave and the peers to close (a browser answers a Close
        # with its own and then closes), bounded: a peer that does not is cut.
        deadline = self.loop.time() + _GOING_AWAY_WAIT
        while self.loop.time() < deadline and any(c in self.clients for c in polite):
            await asyncio.sleep(0.02)
        for c in polite:
            c.abort()
        for u in list(self.upstreams):
            u.close()
        for r in list(self.redirects):
            r.abort()
        for pool in self.pools:
            pool.idle.clear()

    # -- health -------------------------------------------------------------------------------

    def transition(self, t: Transition | None) -> None:
        if t is None:
            return
        node = self.nodes[t.node].url
        level = logging.INFO if t.new.value == "up" else logging.WARNING
        log.log(level, "node %s: %s -> %s (%s)", node, t.old.value, t.new.value, t.reason)
        for cb in self.on_transition:
            cb(t)

    def passive_failure(self, i: int, reason: str, *, maintenance: bool = False) -> None:
        self.transition(
            self.health.passive_failure(i, self.loop.time(), reason, maintenance=maintenance)
        )

    # -- timers -------------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        loop = self.loop
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            self.date.refresh()
            if self.drain_phase == "closing":
                self.close_idle()
            sweep(list(self.clients), now)
            sweep(list(self.upstreams), now)
            if self.redirects:
                sweep(list(self.redirects), now)

    # -- access log ---------------------------------------------------------------------------

    def log_exchange(self, ex: Exchange, *, truncated: bool = False) -> None:
        """One access-log line for a finished (or abandoned) exchange (`truncated` is what the
        core said; the line is the same)."""
        addrs = ex.addrs
        if addrs:  # it reached at least one node of its pool (not static, not refused)
            self.pool_requests[ex.settings.pool] += 1
        sink = self.access_log
        if sink is None:
            return
        req = ex.req
        url = req.url
        memo = self.lines.get(url)  # (request_line's usual case, without the call)
        if memo is not None and memo[0] == req.method and memo[1] == req.version:
            line = memo[2]
        else:
            line = self.request_line(req.method, url, req.version)
        # (one node tried, the usual case: its fields as they are, no join)
        statuses, times = ex.statuses, ex.times
        peer = ex.peer
        now = _wall_clock()
        status = ex.status or 499  # nginx's "client closed the request" code
        addr = addrs[0] if len(addrs) == 1 else ", ".join(addrs) or None
        node_status = statuses[0] if len(statuses) == 1 else ", ".join(statuses) or None
        node_time = times[0] if len(times) == 1 else ", ".join(times) or None
        user = None if req.auth is None else remote_user(req.auth)
        # (`is sink`: a test may replace access_log after the start)
        counter = self.log_counter
        if counter is not None and counter is sink:
            counter.log(
                peer, now, line, status, ex.sent, req.referer, req.ua, addr, node_status,
                node_time, user,
            )  # fmt: skip
            return
        sink.log(
            peer, now, line, status, ex.sent, req.referer, req.ua, addr, node_status, node_time,
            user,
        )  # fmt: skip

    def request_line(self, method: bytes, url: bytes, version: str) -> str:
        """``$request`` ("GET /path?q HTTP/1.1") for the access log, memoised by target: the
        same str object for a repeated request, so the log's memo of escaped fields finds it
        by the hash the string already carries instead of hashing a new one."""
        memo = self.lines.get(url)
        if memo is not None and memo[0] == method and memo[1] == version:
            return memo[2]
        line = f"{method.decode()} {url.decode('latin-1')} HTTP/{version}"
        if len(self.lines) >= MEMO_SIZE:
            self.lines.clear()
        self.lines[url] = (method, version, line)
        return line

    def log_local(
        self,
        client: ClientConnection,
        req: Request | None,
        status: int,
        nbytes: int,
        ex: Exchange | None,
    ) -> None:
        """An answer the proxy wrote itself (refusal, ban, error page)."""
        sink = self.access_log
        if sink is None:
            return
        if req is None or not req.method:
            line = "-" if req is None else req.url.decode("latin-1")
            ua = referer = None
            user = None
        else:
            line = f"{req.method.decode()} {req.url.decode('latin-1')} HTTP/{req.version}"
            ua, referer = req.ua, req.referer
            user = None if req.auth is None else remote_user(req.auth)
        sink.log(
            client.peer,
            time.time(),
            line,
            status,
            nbytes,
            referer,
            ua,
            ", ".join(ex.addrs) or None if ex else None,
            ", ".join(ex.statuses) or None if ex else None,
            ", ".join(ex.times) or None if ex else None,
            user,
        )

    # -- memoised request checks -------------------------------------------------------------

    def check_host(self, host: bytes) -> bool:
        """host_allowed() for a Host header value, memoised."""
        ok = self.host_ok.get(host)
        if ok is None:
            ok = host_allowed(host.decode("latin-1"), self.allowed_hosts)
            if len(self.host_ok) >= MEMO_SIZE:
                self.host_ok.clear()
            self.host_ok[host] = ok
        return ok

    def target(self, url: bytes) -> str:
        """normalise_target() for a raw request target, memoised (refusals are not kept)."""
        t = self.targets.get(url)
        if t is None:
            try:
                t = normalise_target(url.decode("ascii"))
            except UnicodeDecodeError:
                raise Refused(400, "non-ASCII request target") from None
            if len(self.targets) >= MEMO_SIZE:
                self.targets.clear()
            self.targets[url] = t
        return t

    # -- client address -----------------------------------------------------------------------

    def client_ip(self, peer: str, xff: bytes | None) -> str:
        """The client address: the peer, or behind trusted_proxies the last untrusted hop.

        One implementation with the guard (confedge.guard.addresses.client_address), so the
        address the proxy forwards as X-Real-IP, hashes for ip-hash and hands the guard are the
        same, including for "ip:port" and "[v6]:port" hops and ::ffff: forms, which must never
        fall back to the load balancer's own address (that would ban everyone behind it).
        """
        if not self.trusted or xff is None:
            return peer
        return client_address(peer, xff.decode("latin-1"), self.trusted)


def reuse_port_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; SO_REUSEPORT lets each worker own one (kernel load-balances)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock
