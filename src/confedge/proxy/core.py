"""Per-worker proxy state: node pools, balancer, health, limits, timers, logging hooks.

One `WorkerRuntime` lives in each worker process and is shared by all its connections. It turns the
configuration into the constants the hot path reads (bytes, frozensets, floats) once, so a
request never looks anything up in the pydantic model, never calls logging.getLogger, and never
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
from typing import TYPE_CHECKING, Any, Protocol

from confedge.config import Config, NodeAddress
from confedge.guard.addresses import Networks, client_address, parse_networks
from confedge.guard.hook import GuardHook
from confedge.proxy.balancer import Balancer
from confedge.proxy.exchange import Exchange, ExchangeSettings
from confedge.proxy.health import HealthMonitor, Transition
from confedge.proxy.healthcheck import HealthChecker
from confedge.proxy.pages import DateCache
from confedge.proxy.request import Refused, Request, host_allowed, normalise_target
from confedge.timers import sweep, sweep_interval
from confedge.tls.context import client_context

if TYPE_CHECKING:
    from confedge.proxy.h2 import H2Client
    from confedge.proxy.redirect import RedirectConnection
    from confedge.proxy.server import ClientConnection
    from confedge.proxy.upstream import NodePool, UpstreamConnection

__all__ = ["AccessLogSink", "TurnShare", "WorkerRuntime"]

log = logging.getLogger("confedge.proxy")

# Entries kept by WorkerRuntime's memos of Host checks and normalised targets.
MEMO_SIZE = 2048

# Writes up to this size are coalesced per event-loop iteration (see "Write coalescing"), and
# at most this many bytes wait in the queue before it is flushed early.
COALESCE_MAX = 32 * 1024
COALESCE_BATCH = 256 * 1024


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
        self.guard = guard if guard is not None and getattr(guard, "enabled", True) else None
        self.access_log = access_log
        self.static = static
        self.allowed_hosts = _allowed_hosts(cfg)
        # Memos of two pure checks every request repeats (clients send the same few Host values
        # and poll the same API paths): Host header -> allowed?, raw target -> normalised target.
        # Bounded and emptied when full, so a client inventing values only loses the shortcut.
        self.host_ok: dict[bytes, bool] = {}
        self.targets: dict[bytes, str] = {}
        # Port 80: (Host, target) -> the Location header line of the 301 (redirect.py).
        self.locations: dict[tuple[bytes | None, bytes], bytes] = {}
        self.allowlist = tuple(p.path_allowlist)
        self.max_body = p.max_body_bytes
        self.max_header_bytes = p.max_header_bytes
        self.max_url_bytes = max(1024, p.max_header_bytes // 2)
        self.max_headers = p.max_headers
        self.header_timeout = p.header_timeout
        self.body_timeout = p.body_timeout
        self.request_buffer = p.request_buffer_bytes
        self.idle_timeout = p.idle_timeout
        self.read_timeout = p.read_timeout
        self.connect_timeout = p.connect_timeout
        self.api_connect_timeout = p.api_connect_timeout
        self.sse_lifetime = p.sse_max_lifetime
        self.ws_idle = p.websocket_idle_timeout
        self.max_connections = max(1, math.ceil(p.max_connections / max(1, workers)))
        self.upstream_keepalive = p.upstream_keepalive
        self.upstream_idle = p.upstream_idle_timeout
        self.csp_line = (
            b"Content-Security-Policy: " + p.csp_policy.encode() + b"\r\n" if p.csp else b""
        )
        # Parsed once: client_address() walks X-Forwarded-For against these per request.
        self.trusted: Networks = parse_networks(p.trusted_proxies)
        self.date = DateCache()
        # The clients' shared read buffer (server.ClientConnection is a BufferedProtocol): one
        # per worker, not per connection, so 10,000 idle streams do not hold 10,000 buffers.
        self.read_view = memoryview(bytearray(64 * 1024))
        self.nodes: list[NodeAddress] = p.node_addresses
        self.health = HealthMonitor(len(self.nodes), rise=p.health_rise, fall=p.health_fall)
        self.balancer = Balancer(
            [n.netloc for n in self.nodes], self.health.up, p.balance, self.health.serving
        )
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
        # What every exchange core (exchange.py) of this worker reads, as plain data.
        self.exchange_settings = ExchangeSettings(
            nodes=self.balancer,
            netlocs=[n.netloc for n in self.nodes],
            fqdn=cfg.server.fqdn.encode(),
            connect_timeout=self.connect_timeout,
            api_connect_timeout=self.api_connect_timeout,
            read_timeout=self.read_timeout,
            sse_lifetime=self.sse_lifetime,
            csp_line=self.csp_line,
            request_buffer=self.request_buffer,
            guard=self.guard is not None,
            ban_status=self.guard.ban_status if self.guard is not None else 429,
        )
        self.clients: set[ClientConnection | H2Client] = set()
        # proxy.http2: the HTTP/2 adapter's shared part (proxy/h2.py H2Runtime), set by
        # ProxyWorker when ALPN offers "h2"; None keeps every connection on HTTP/1.1.
        self.h2: Any = None
        # turn.tls_on_https: where TURN connections on the HTTPS port go (set by ProxyWorker);
        # None keeps the HTTP path exactly as without the option.
        self.turn_share: TurnShare | None = None
        self.upstreams: set[UpstreamConnection] = set()
        self.on_transition: list[Callable[[Transition], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.redirects: set[RedirectConnection] = set()  # port 80 (proxy/redirect.py)
        self.sweep_interval = sweep_interval(
            p.header_timeout, p.body_timeout, p.idle_timeout, p.read_timeout, p.health_timeout
        )
        self.closing = False
        self.out: list[tuple[asyncio.Transport, bytes]] = []  # see "Write coalescing"
        self.out_bytes = 0

    # -- write coalescing ---------------------------------------------------------------------

    def send(self, t: asyncio.Transport, data: bytes) -> None:
        """Write `data` (bytes, never a view of a reused buffer) at the end of this iteration."""
        if len(data) > COALESCE_MAX:
            if self.out:
                self.flush_writes()
            t.write(data)
            return
        out = self.out
        if not out:
            self.loop.call_soon(self.flush_writes)
        out.append((t, data))
        queued = self.out_bytes + len(data)
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

    def start(self, *, health_checks: bool = True) -> None:
        self._tasks.append(self.loop.create_task(self._sweeper()))
        if health_checks and self.nodes:
            checker = HealthChecker(
                self.nodes, self.health, self.upstream_ssl, self.cfg.proxy, self.transition
            )
            self._tasks.append(self.loop.create_task(checker.run()))

    async def close(self) -> None:
        self.closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for c in list(self.clients):
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
            sweep(list(self.clients), now)
            sweep(list(self.upstreams), now)
            if self.redirects:
                sweep(list(self.redirects), now)

    # -- access log ---------------------------------------------------------------------------

    def log_exchange(self, ex: Exchange, *, truncated: bool = False) -> None:
        """One access-log line for a finished (or abandoned) exchange."""
        sink = self.access_log
        if sink is None:
            return
        req = ex.req
        status = ex.status or 499  # nginx's "client closed the request" code
        sink.log(
            ex.peer,
            time.time(),
            f"{req.method.decode()} {req.url.decode('latin-1')} HTTP/{req.version}",
            status,
            ex.sent,
            req.referer,
            req.ua,
            ", ".join(ex.addrs) or None,
            ", ".join(ex.statuses) or None,
            ", ".join(ex.times) or None,
        )

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
        else:
            line = f"{req.method.decode()} {req.url.decode('latin-1')} HTTP/{req.version}"
            ua, referer = req.ua, req.referer
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


def normalise_peer(peer: Any) -> str:
    """Peer address text; IPv4-mapped IPv6 (dual-stack sockets) shown as IPv4."""
    host = str(peer[0]) if isinstance(peer, tuple) else "unknown"
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


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
