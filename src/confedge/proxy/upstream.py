"""Connections to the conferencing nodes: keep-alive pools and the response-side adapter.

Each `UpstreamConnection` is an asyncio Protocol with its own httptools HttpResponseParser.
While an exchange uses it, parser callbacks are events for that exchange's core (exchange.py),
and its owner carries out what the core decided, once per read; in between, the connection
sits in its node's idle list (LIFO, so the warmest connection is reused and surplus ones age
out). A connection is reused only when the previous response ended cleanly with keep-alive and
the whole request had been sent.

The owner is the client side the exchange belongs to, whatever protocol the client speaks: an
HTTP/1.1 connection (server.ClientConnection) or one HTTP/2 stream (h2.H2Stream). Both meet
the small `NodeOwner` protocol below, so both get the same node side: the worker's keep-alive
pools, the node timers of the core's sweep, the latency histogram (/metrics), the node's
address, status and time in the access log, failover and node-failure marking. The nodes
always speak HTTP/1.1; only the client side differs.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import httptools

from confedge.config import NodeAddress
from confedge.proxy.defects import report_defect
from confedge.proxy.exchange import A_CONNECT, A_NODE_DONE, A_NODE_TIMER, DONE, WAITING
from confedge.proxy.health import LATENCY_BOUNDS
from confedge.proxy.wsframes import FrameBoundary

if TYPE_CHECKING:
    from confedge.proxy.core import WorkerRuntime
    from confedge.proxy.exchange import Exchange
    from confedge.proxy.server import ClientConnection

__all__ = ["MAX_RESPONSE_HEAD", "NodeOwner", "NodePool", "UpstreamConnection", "node_action"]

_INF = math.inf
_FIRST_BOUND: Final = LATENCY_BOUNDS[0]
# The most a node may send before its final response head is complete: that head and any 1xx
# heads before it, in all (nginx's proxy_buffer_size is 4-8 KiB). More: an invalid response
# (502 or failover). httptools has no limit of its own: without one, a node sending an endless
# head grew the worker without bound (1.5 GB in 4 s), and a 1xx flood held the request forever.
MAX_RESPONSE_HEAD: Final = 64 * 1024


def _fields_size(headers: list[tuple[bytes, bytes]]) -> int:
    n = 0
    for name, value in headers:
        n += len(name) + len(value) + 4
    return n


class NodeOwner(Protocol):
    """The client side a node connection reports to while an exchange uses it: an HTTP/1.1
    client connection (server.ClientConnection) or an HTTP/2 stream (h2.H2Stream).

    The node connection feeds the owner's `exchange` (the core) and then calls `drive` once
    per read, so that the owner carries out what the core decided; `pause`/`resume` (reason 1)
    hold back the client's request body while the node's write buffer is full. `up` is the
    owner's current node connection (cleared here when it fails). `transport` and `activity`
    are used only by a WebSocket tunnel (HTTP/1.1: an HTTP/2 stream never tunnels, its
    `transport` is None). `node_ready`/`node_connect_failed` answer `NodePool.connect` (and
    A_CONNECT, `node_action`); `now` >= 0 is the loop time when the caller has just read it.
    """

    exchange: Exchange | None
    up: UpstreamConnection | None
    transport: asyncio.Transport | None
    activity: bool

    def drive(self, ex: Exchange) -> None: ...

    def pause(self, reason: int) -> None: ...

    def resume(self, reason: int) -> None: ...

    def node_ready(
        self, ex: Exchange, conn: UpstreamConnection, reused: bool, now: float = -1.0
    ) -> None: ...

    def node_connect_failed(self, ex: Exchange, i: int, reason: str) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to a node."""

    __slots__ = (
        "activity",
        "deadline",
        "ex",
        "feed",
        "get_status_code",
        "got_bytes",
        "h1",
        "head_bytes",
        "headers",
        "now",
        "oversize",
        "owner",
        "parser",
        "pool",
        "read_len",
        "reading_paused",
        "reused",
        "should_keep_alive",
        "timeout",
        "trailing",
        "transport",
        "tunnel",
        "writing_paused",
        "ws_down",
    )

    def __init__(self, pool: NodePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The parser's methods of every response, bound once (see server.ClientConnection).
        self.feed: Callable[[bytes], None] = self.parser.feed_data
        self.get_status_code: Callable[[], int] = self.parser.get_status_code
        self.should_keep_alive: Callable[[], bool] = self.parser.should_keep_alive
        # The client side whose exchange uses this connection (None while pooled).
        self.owner: NodeOwner | None = None
        # The owner again when it is an HTTP/1.1 client connection (server.py sets both), by
        # its own class: the compiled build reads its exchange and calls its drive natively
        # once per read, where through the NodeOwner protocol both are generic Python calls.
        # Used only while it `is` the owner; cleared with it.
        self.h1: ClientConnection | None = None
        # The owner's exchange while a read is parsed (the parser callbacks' target; the owner
        # drives only after the read, so it cannot change in between).
        self.ex: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.got_bytes = False
        # The loop time of the read being parsed and driven (one clock read per read); -1.0
        # outside a read.
        self.now = -1.0
        self.tunnel = False
        # A WebSocket tunnel's node-to-client frame boundaries (set with `tunnel`): a stop
        # sends the client a Close frame only between two frames (proxy/wsframes.py).
        self.ws_down: FrameBoundary | None = None
        self.writing_paused = False
        # Reading paused for the owner's flow control (its client cannot take more yet).
        self.reading_paused = False
        self.activity = False
        self.deadline = _INF
        self.timeout = 0.0
        # Bytes of the reads that ended with the exchange still waiting for its final head
        # (MAX_RESPONSE_HEAD), the length of the read being parsed, and whether its final head
        # was found over the limit (then not handed to the exchange).
        self.head_bytes = 0
        self.read_len = 0
        self.oversize = False
        # A message began after the exchange's response had ended, in the same read: the node
        # sent more than it was asked for (a body after a 204/304, a second response), so the
        # parser is no longer at a message boundary we know of; never reused (NodePool.release).
        self.trailing = False

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.core.upstreams.add(self)

    def data_received(self, data: bytes) -> None:
        self.activity = True
        self.got_bytes = True
        owner = self.owner
        if owner is None:
            # Bytes on an idle keep-alive connection: the node broke framing; never reuse it.
            self.close()
            return
        if self.tunnel:
            owner.activity = True  # traffic either way keeps a WebSocket alive
            if owner.transport is not None:
                self.pool.core.send(owner.transport, data)
                if self.ws_down is not None:
                    self.ws_down.feed(data)
            return
        h1 = self.h1
        if h1 is not None and h1 is not owner:
            h1 = None  # (an HTTP/2 stream's: see h1)
        ex = owner.exchange if h1 is None else h1.exchange
        if ex is None:
            self.close()
            return
        self.now = self.pool.clock()
        self.ex = ex
        self.read_len = len(data)
        try:
            # proxy.http1_engine "native": an ordinary answer (a whole head and its
            # Content-Length body, exactly this read) read in one C pass, then the events the
            # callbacks below would send; None: anything else, to httptools.
            reader = self.pool.core.h1_response
            r = None
            if (
                reader is not None
                and ex.state == WAITING
                and not ex.head_only
                and self.head_bytes == 0
                and not self.trailing
            ):
                r = reader(data, MAX_RESPONSE_HEAD)
            if r is None:
                self.feed(data)
            else:
                try:
                    status, headers, at, keep_alive = r
                    now = self.now
                    self._observe(ex, now)
                    ex.response_head(status, headers, now)
                    if at < len(data):
                        ex.response_body(data[at:])
                    ex.response_end(keep_alive, now)
                except Exception as defect:  # (the proxy's own, as in a callback below)
                    self._unusable(owner, ex, "internal error", defect)
            if ex.head_out is not None:
                ex.flush_head()  # the head arrived without body bytes in this read
            if ex.state == WAITING:  # (still no final head: rare, a head split over reads)
                self.head_bytes += len(data)
                if self.head_bytes > MAX_RESPONSE_HEAD:
                    self.oversize = True
            if self.oversize:
                owner.up = None
                self.close()
                ex.node_failed(
                    f"invalid response from node: head over {MAX_RESPONSE_HEAD} bytes", self.now
                )
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            # The node's first tunnel bytes (if the exchange takes the 101: start_tunnel).
            self.ws_down = FrameBoundary()
            self.ws_down.feed(rest)
            ex.node_upgraded(rest, self.now)
        except httptools.HttpParserError as exc:
            # (a callback of the proxy's own that failed: httptools keeps it as the context)
            bug = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            self._unusable(owner, ex, str(exc), bug)
        self.ex = None
        if h1 is None:
            owner.drive(ex)
        else:
            h1.drive(ex)
        self.now = -1.0  # (good for this read only: see NodePool.release)

    def _unusable(
        self, owner: NodeOwner, ex: Exchange, why: str, bug: BaseException | None
    ) -> None:
        """This answer cannot be passed on: the connection is closed and the exchange fails
        over or answers 502. `bug`: the proxy's own code failed on it, not the node's framing,
        so it goes to the log with its traceback."""
        owner.up = None
        self.close()
        if bug is not None:
            report_defect(bug, "reading a node's answer")
        ex.node_failed(f"invalid response from node: {why}", self.now)

    def eof_received(self) -> bool | None:
        return False  # close our side too (no half-open upstream connections)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        owner = self.owner
        if owner is not None:
            self.owner = None
            self.h1 = None
            if owner.up is self:
                owner.up = None
            ex = owner.exchange
            if ex is not None:
                ex.node_lost(self.pool.clock(), got_bytes=self.got_bytes)
                owner.drive(ex)

    def pause_writing(self) -> None:
        # The node reads the request body slower than the client sends it.
        self.writing_paused = True
        if self.owner is not None:
            self.owner.pause(1)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.owner is not None:
            self.owner.resume(1)

    # -- flow control towards the client (the owner's) -------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading the response: the owner's client cannot take more yet."""
        t = self.transport
        if not self.reading_paused and t is not None:
            self.reading_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            t = self.transport
            if t is not None:
                t.resume_reading()

    # -- httptools callbacks: events for the owner's exchange (driven once per read) ------------

    def on_message_begin(self) -> None:
        # (The header list is reset after each head, not here.) A message that begins when
        # the exchange is done began in the read that ended its response: see `trailing`.
        ex = self.ex
        if ex is not None and ex.state == DONE:
            self.trailing = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.ex
        if (
            self.head_bytes + self.read_len > MAX_RESPONSE_HEAD
            and _fields_size(self.headers) > MAX_RESPONSE_HEAD
        ):
            self.oversize = True  # (data_received fails the exchange after this read)
            ex = None
        if ex is not None:
            now = self.now
            self._observe(ex, now)
            ex.response_head(self.get_status_code(), self.headers, now)
        self.headers.clear()  # (the core keeps no reference to it: the same list again)

    def _observe(self, ex: Exchange, now: float) -> None:
        """The node's latency to this head, into its histogram (/metrics: [count per
        LATENCY_BOUNDS bucket ..., count of all, sum]; observed here once per answer: a
        dictionary lookup fewer than through the worker)."""
        pool = self.pool
        h = pool.latency
        if h is None:
            h = pool.latency = pool.core.latency_row(pool.netloc)
        seconds = now - ex.upstream_time
        # (float increments: native in the compiled build, where += 1 is a generic add)
        if seconds <= _FIRST_BOUND:  # (a node nearby, the usual answer: no loop)
            h[0] += 1.0
        else:
            for i, bound in enumerate(LATENCY_BOUNDS):
                if seconds <= bound:
                    h[i] += 1.0
                    break
        h[-2] += 1.0
        h[-1] += seconds

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is not None:
            ex.response_body(body)

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.response_end(self.should_keep_alive(), self.now)

    # -- the core's decisions about this connection (node_action) -------------------------------

    def done(self, keep: bool) -> None:
        """A_NODE_DONE: the exchange is finished with this connection: back to its node's pool
        (`keep`) or closed."""
        self.owner = None
        self.h1 = None
        if keep:
            self.pool.release(self)  # (resumes its reading if the owner's client paused it)
        else:
            self.close()

    def arm(self, timer: tuple[float, float]) -> None:
        """A_NODE_TIMER: (idle timeout or 0, absolute deadline) for the sweep (timers.py)."""
        self.timeout, self.deadline = timer
        self.activity = False

    # -- helpers --------------------------------------------------------------------------------

    def on_timeout(self) -> None:
        owner = self.owner
        ex = owner.exchange if owner is not None else None
        if owner is None or ex is None:
            self.close()  # idle in the pool too long
            return
        self.deadline = _INF
        ex.node_timeout(self.pool.clock())
        owner.drive(ex)

    def close(self) -> None:
        self.owner = None
        self.h1 = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


def node_action(
    owner: NodeOwner,
    up: UpstreamConnection | None,
    core: WorkerRuntime,
    ex: Exchange,
    kind: int,
    arg: Any,
) -> UpstreamConnection | None:
    """Carry out one of the core's node-side decisions for `owner`, whose node connection is
    `up`: the kinds up to A_NODE_LAST (A_CONNECT, A_MARK_FAILED, A_NODE_DONE, A_NODE_TIMER;
    exchange.py), the same for both client adapters, which keep only their client-side
    decisions (A_LOG, A_FINISH, A_LOCAL, client aborts, tunnel, guard).

    The caller's half of the contract, kept there because on the compiled path `owner` is a
    protocol, so that each of its attributes or methods used here would be a generic Python
    lookup (measured: 3.6% more instructions per proxied request when A_CONNECT called
    `owner.node_ready` and A_NODE_DONE cleared `owner.up` here): the caller passes its `up`,
    clears it itself for A_NODE_DONE, and hands the pooled connection returned for A_CONNECT
    to its own `node_ready` at once (server.py's `drive` does node_ready's part in place; None:
    a new connection is being opened, and `owner.node_ready` or `owner.node_connect_failed`
    follows). Every proxied request has one each of A_CONNECT, A_NODE_DONE and A_NODE_TIMER
    (the rare A_MARK_FAILED last); A_CONNECT first, as server.py's `drive` hands over only
    A_CONNECT and A_MARK_FAILED (A_CONNECT only when the default pool has no idle connection
    for it, or for another pool's node: it takes the default pool's own with `NodePool.take`,
    the call node_action makes too)."""
    if kind == A_CONNECT:
        # Node i of the node list `ex` started with (a reload may have replaced it since).
        i: int = arg[0]
        st = ex.settings
        # (the default pool's settings are always the current generation's: no call)
        pools = core.pools if st is core.exchange_settings else core.pools_for(st)
        if pools is None:
            owner.node_connect_failed(ex, i, "node list reloaded twice meanwhile")
            return None
        pool = pools[i]
        conn = pool.take()
        if conn is None:
            pool.connect(owner, ex, arg[1])  # (the connect timeout)
        return conn
    elif kind == A_NODE_DONE:
        if up is not None:
            up.done(arg)
    elif kind == A_NODE_TIMER:
        if up is not None:
            up.arm(arg)
    else:  # A_MARK_FAILED: passive health
        i, reason, maintenance = arg
        if core.is_current(ex.settings):  # not a node of a reloaded-away list
            core.passive_failure(i, reason, maintenance=maintenance)
    return None


class NodePool:
    """Idle keep-alive connections to one node, and new connections on demand."""

    __slots__ = (
        "clock",
        "core",
        "host",
        "idle",
        "index",
        "latency",
        "netloc",
        "node",
        "port",
        "server_hostname",
        "ssl",
    )

    def __init__(self, core: WorkerRuntime, index: int, node: NodeAddress) -> None:
        self.core = core
        self.clock = core.loop.time  # (bound once: every read of the loop's clock here)
        self.index = index
        self.node = node
        self.host = node.host
        self.port = node.port
        self.netloc = node.netloc  # for the access log: computed once, not per request
        self.ssl: ssl.SSLContext | None = core.upstream_ssl if node.scheme == "https" else None
        self.server_hostname = node.host if self.ssl is not None else None
        self.idle: list[UpstreamConnection] = []
        # This node's latency histogram (WorkerRuntime.latency_row), from its first answer.
        self.latency: list[float] | None = None

    def take(self) -> UpstreamConnection | None:
        """The warmest idle connection still open (LIFO), marked reused; None: none left."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float = -1.0) -> None:
        """Back to the idle list (or closed when it is full); `now`: the loop time when the
        caller has just read it (else read here)."""
        core = self.core
        if len(self.idle) >= core.upstream_keepalive or core.closing or conn.trailing:
            conn.close()
            return
        conn.owner = None
        conn.h1 = None
        if conn.reading_paused:
            # Never pooled with its reading paused: the owner that paused it (a slow client)
            # no longer resumes it, and the next exchange on it would wait for its response
            # until proxy.read_timeout. (The read that ended the response can be the one whose
            # write filled the client's buffer: pause_writing, then A_NODE_DONE, in one drive.)
            conn.resume_reading()
        conn.got_bytes = False
        conn.head_bytes = 0
        conn.timeout = 0.0
        conn.activity = False
        conn.deadline = (now if now >= 0.0 else self.clock()) + core.upstream_idle
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.core.upstreams.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def connect(self, owner: NodeOwner, ex: Exchange, timeout: float) -> None:
        """Open a new connection for `ex`: owner.node_ready or owner.node_connect_failed."""
        self.core.loop.create_task(self._connect(owner, ex, timeout))

    async def _connect(self, owner: NodeOwner, ex: Exchange, timeout: float) -> None:
        loop = self.core.loop
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname,
                )
        except TimeoutError:
            owner.node_connect_failed(ex, self.index, f"connect timeout ({timeout:g} s)")
            return
        except (OSError, ssl.SSLError) as exc:
            owner.node_connect_failed(ex, self.index, f"connect error: {exc.strerror or exc}")
            return
        except asyncio.CancelledError:
            raise
        owner.node_ready(ex, proto, reused=False)
