"""HTTP/2 to clients (RFC 9113): the second client adapter on the exchange core.

Theory of operation
-------------------
A TLS connection whose handshake selected ALPN ``h2`` (RFC 9113 §3.2) is handed, in
`ClientConnection.connection_made`, to an `H2Client`: an HTTP/2 engine (proxy/h2engine.py:
libnghttp2 when built, else hyper-h2; both sans-I/O) turns the bytes into events, and each
request stream becomes one `H2Stream` driving one `exchange.Exchange`, exactly as the HTTP/1.1
adapter drives one per request. The nodes keep speaking HTTP/1.1: every stream gets its own node
connection, so one slow stream never blocks another. That connection is the one node-side
adapter of the package, `upstream.UpstreamConnection`, taken from the worker's keep-alive pools
(`upstream.NodePool`, shared with HTTP/1.1 clients); the stream is its owner
(`upstream.NodeOwner`). So failover, node-failure marking, node timers, the latency histogram
and the access log's upstream fields are the same code for both client protocols.

The core is told the request is HTTP "2.0"; `plan_response` then frames nothing (no chunked
coding, no Connection header) and the adapter turns the head the core queued into a HEADERS
frame (hop-by-hop fields dropped, RFC 9113 §8.2.2) and the body bytes into DATA frames.

Every per-request protection of the HTTP/1.1 path applies here too, through the same code:
the canonical target and Host checks (`WorkerRuntime.target`/`check_host`, on ``:path`` and
``:authority``), header limits (also advertised as SETTINGS_MAX_HEADER_LIST_SIZE and
SETTINGS_MAX_CONCURRENT_STREAMS), forwarding-header stripping and the guard (in the core),
body limits, the body timeout, and the access log. Extended CONNECT (RFC 8441) is not offered,
so WebSockets use HTTP/1.1 (browsers open a separate HTTP/1.1 connection for them).

Flow control (RFC 9113 §5.2): response bytes go out only as far as the stream's and the
connection's send windows allow; the rest waits in the stream's `pending` list. When that
passes `STREAM_BUFFER` bytes the stream's node connection stops being read (TCP backpressure
on the node), and reading resumes once the client opened the window and the backlog drained
below half. Nothing buffers a whole response. Request bodies are acknowledged (WINDOW_UPDATE)
only once written on to the node; while the node's write buffer is full they are not, so a
client that uploads faster than the node reads runs out of window.

Rapid reset (CVE-2023-44487): the client's RST_STREAMs are counted per connection in a
sliding window; past `RESET_LIMIT` in `RESET_WINDOW` seconds the connection gets GOAWAY
ENHANCE_YOUR_CALM and is closed. CONTINUATION floods are bounded by the engine (hyper-h2: at
most 64 CONTINUATION frames per header block; libnghttp2: its CVE-2024-28182 limit) and by
SETTINGS_MAX_HEADER_LIST_SIZE, which both enforce as a connection error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from confedge.guard.addresses import in_networks
from confedge.proxy.accesslog import remote_user
from confedge.proxy.exchange import (
    A_ABORT_CLIENT,
    A_CLOSE_CLIENT,
    A_FINISH,
    A_LOCAL,
    A_LOG,
    A_NODE_DONE,
    A_NODE_LAST,
    BUFFERING,
    CONNECTING,
    Exchange,
)
from confedge.proxy.guardcalls import carry_guard
from confedge.proxy.h2engine import (
    CLOSED,
    DATA,
    END,
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REQUEST,
    RESET,
    WINDOW,
    Engine,
    EngineError,
    choose,
    new_engine,
    server_config,
)
from confedge.proxy.pages import error_response, health_response, retry_page_response
from confedge.proxy.request import (
    ALLOWED_METHODS,
    LOCAL_BANNED,
    LOCAL_HEALTH,
    LOCAL_STATIC,
    NOT_ALLOWED_METHODS,
    TO_NODE,
    Refused,
    Request,
    canonical_length,
    h2_fields_problem,
)
from confedge.proxy.upstream import node_action
from confedge.timers import Sweeper, arm, arm_idle, disarm

if TYPE_CHECKING:
    from confedge.proxy.core import WorkerRuntime
    from confedge.proxy.upstream import UpstreamConnection

__all__ = [
    "ALPN_H2",
    "RESET_LIMIT",
    "RESET_WINDOW",
    "STREAM_BUFFER",
    "H2Client",
    "H2Runtime",
    "H2Stream",
    "h1_head",
    "h2_selected",
    "server_config",
]

log = logging.getLogger("confedge.proxy")

ALPN_H2 = "h2"
STREAM_BUFFER = 256 * 1024  # response bytes held per stream before its node is paused
RESET_LIMIT = 200  # client RST_STREAMs allowed per connection within RESET_WINDOW seconds
RESET_WINDOW = 10.0
_INF = math.inf

# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2 (hyper-h2 refuses them
# on the way in; on the way out the node's are dropped here).
_H2_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)
# Request headers the proxy reads (the HTTP/1.1 adapter's _STEER, for what HTTP/2 can carry).
_STEER = frozenset(
    {b"host", b"content-length", b"x-forwarded-for", b"user-agent", b"referer", b"authorization"}
)


class _Malformed(Exception):
    """A request `H2Client.vet` finds malformed (RFC 9113 §8.1.1): a connection error."""


def h2_selected(transport: Any) -> bool:
    """True when the TLS handshake selected ALPN "h2" (RFC 9113 §3.2)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_H2


def h1_head(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """Split an HTTP/1.1 response head the core (or pages.py) produced into status, headers
    for HTTP/2 (lower-case names, connection-specific fields dropped) and the bytes after it;
    None while the head is incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    status = int(lines[0][9:12])
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname in _H2_DROP:
            continue
        headers.append((lname, value.strip()))
    return status, headers, data[end + 4 :]


class H2Runtime:
    """What the HTTP/2 connections of one worker share: their settings and one timer sweep
    over their connections and streams (proxy/timers.py; node connections are swept with the
    worker's, WorkerRuntime.upstreams)."""

    def __init__(self, core: WorkerRuntime, *, max_streams: int, engine: str = "auto") -> None:
        self.core = core
        self.max_streams = max_streams
        # proxy.http2_engine (h2engine.choose): "native" (libnghttp2) or "python" (hyper-h2);
        # ProxyService.start has checked and logged it
        self.engine = choose(engine)
        self.timed: set[Any] = set()
        self.sweeper = Sweeper(lambda: self.timed, core.sweep_interval)

    @staticmethod
    def selected(transport: Any) -> bool:
        return h2_selected(transport)

    def take(self, old: Any, transport: asyncio.Transport) -> None:
        """Give `transport` (ALPN h2) to a new H2Client; `old` is the HTTP/1.1 protocol."""
        core = self.core
        core.clients.discard(old)
        client = H2Client(self, transport, old.peer)
        transport.set_protocol(client)
        client.start()

    def watch(self, c: Any) -> None:
        self.timed.add(c)
        self.sweeper.ensure()


class H2Client(asyncio.Protocol):
    """One HTTP/2 client connection (TLS terminated by the transport)."""

    def __init__(self, rt: H2Runtime, transport: asyncio.Transport, peer: str) -> None:
        self.rt = rt
        self.core = rt.core
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        core = rt.core
        self.conn: Engine = new_engine(
            rt.engine, max_streams=rt.max_streams, max_header_list=core.max_header_bytes
        )
        self.streams: dict[int, H2Stream] = {}
        self.resets: collections.deque[float] = collections.deque()
        self.writing_paused = False
        self.closed = False
        self.reading = False  # in data_received: one flush at its end
        # timers (proxy/timers.py): the preface within header_timeout, then idle_timeout
        # whenever no stream is open
        self.activity = False
        self.deadline = _INF
        self.timeout = 0.0

    @property
    def exchange(self) -> Any:
        """Something in progress (ProxyWorker's drain waits while this is not None)."""
        return self.streams or None

    def start(self) -> None:
        core = self.core
        core.clients.add(self)
        # SETTINGS: MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE (a block that decodes to more
        # is a connection error, RFC 9113 §6.5.2), ENABLE_PUSH 0
        self.conn.initiate()
        self.flush()
        arm(self, core.loop.time(), core.header_timeout)

    # -- asyncio callbacks ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.activity = True
        try:
            events = self.conn.receive(data)
        except EngineError as exc:
            # The engine has queued GOAWAY with the matching error code.
            log.info("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self.flush()
            self.close()
            return
        # Everything this read causes goes out as one write (one TLS record where it fits).
        self.reading = True
        try:
            for kind, sid, a, b in events:
                self.event(kind, sid, a, b)
                if self.closed:
                    break
        finally:
            self.reading = False
        self.flush()
        if not self.closed and not self.conn.want_io():
            # A connection error the engine answered itself (libnghttp2: GOAWAY queued, no
            # exception), or the session is otherwise over: what it queued has gone out.
            log.info("HTTP/2 connection from %s ended by the protocol engine", self.peer)
            self.close()

    def event(self, kind: int, sid: int, a: Any, b: Any) -> None:
        """One engine event (h2engine's module docstring has the tuples)."""
        if kind == REQUEST:
            headers: list[tuple[bytes, bytes]] = a
            problem = h2_fields_problem(headers)
            if problem is not None:
                self.malformed(problem)
                return
            self.request(sid, headers, bool(b))
        elif kind == DATA:
            st = self.streams.get(sid)
            if st is None:
                self.ack(sid, b)
            else:
                st.body(a, b)
        elif kind == END:
            st = self.streams.get(sid)
            if st is not None:
                st.end()
        elif kind == RESET:
            st = self.streams.pop(sid, None)
            if st is not None:
                st.lost()
            if a:  # the client's RST_STREAM
                self.count_reset()
        elif kind == WINDOW:
            for st in list(self.streams.values()):
                st.pump()
        elif kind == CLOSED:
            self.close()

    def malformed(self, problem: str) -> None:
        """RFC 9113 §8.1.1: a malformed request; a connection error, as hyper-h2's own
        validation made it (GOAWAY PROTOCOL_ERROR, §5.4.2 allows it for a stream error), so
        nothing more of it reaches a node."""
        log.info("HTTP/2 malformed request from %s: %s", self.peer, problem)
        self.conn.goaway(PROTOCOL_ERROR)
        self.close()

    def count_reset(self) -> None:
        """Rapid reset (CVE-2023-44487): at most RESET_LIMIT client resets per RESET_WINDOW."""
        now = self.core.loop.time()
        q = self.resets
        q.append(now)
        while q and q[0] < now - RESET_WINDOW:
            q.popleft()
        if len(q) > RESET_LIMIT:
            log.warning("HTTP/2 rapid reset from %s: connection closed", self.peer)
            self.conn.goaway(ENHANCE_YOUR_CALM)
            self.flush()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.core.clients.discard(self)
        self.rt.timed.discard(self)
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.lost()
        self.transport = None

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        # The TLS write buffer is full: stop reading every stream's node, and the client too.
        # A client that sends PING, SETTINGS or anything else answered by the engine but never
        # reads the answers (CVE-2019-9512, -9515) would otherwise grow the write buffer
        # without bound; libnghttp2 notices only what piles up within one read, hyper-h2 never.
        self.writing_paused = True
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()
        for st in self.streams.values():
            st.pause_node()

    def resume_writing(self) -> None:
        self.writing_paused = False
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()
        for st in list(self.streams.values()):
            st.pump()

    # -- helpers --------------------------------------------------------------------------------

    def flush(self) -> None:
        if self.reading:
            return  # data_received flushes once at its end
        data = self.conn.output()
        t = self.transport
        if data and t is not None and not t.is_closing():
            self.core.send(t, data)

    def ack(self, sid: int, n: int) -> None:
        """Give `n` bytes of receive window back (connection, and the stream if still open)."""
        if n <= 0 or self.closed:
            return
        self.conn.consume(sid, n)  # (the connection's share only, once the stream is closed)
        self.flush()

    def close(self) -> None:
        self.reading = False
        self.flush()  # a GOAWAY queued by hyper-h2 goes first
        self.closed = True
        t = self.transport
        if t is not None:
            self.core.close_after(t)
            # The close waits for the write buffer to drain: a client that reads nothing would
            # hold the connection for ever. on_timeout aborts it if it is still here then.
            arm(self, self.core.loop.time(), self.core.idle_timeout)

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    def going_away(self) -> bool:
        """(ClientSide) An HTTP/2 stream never tunnels a WebSocket: nothing to say at a stop."""
        return False

    def on_timeout(self) -> None:
        if self.closed or self.writing_paused:
            # The client reads nothing (a close that never completed, or a full write buffer
            # when idle): a GOAWAY would never reach it either.
            self.abort()
            return
        # Idle (or no preface in time): a polite GOAWAY, then close.
        self.conn.goaway(NO_ERROR)
        self.flush()
        self.close()

    # -- what the worker asks of a client connection (core.ClientSide) ------------------------

    def close_if_idle(self) -> None:
        """Drain, listeners closed: with no stream open, GOAWAY (RFC 9113 §6.8), then close."""
        if not self.streams and not self.closed:
            self.on_timeout()

    def in_progress(self) -> list[tuple[Exchange, bool]]:
        """One exchange per open stream (HTTP/2 streams never tunnel), for the status page's
        sessions table."""
        return [(st.exchange, False) for st in self.streams.values() if st.exchange is not None]

    def stream_done(self, st: H2Stream) -> None:
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        if not self.streams:
            arm_idle(self, self.core.loop.time(), self.core.idle_timeout)

    # -- requests -------------------------------------------------------------------------------

    def request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        disarm(self)
        req = Request()
        req.version = "2.0"
        st = H2Stream(self, sid, req)
        self.streams[sid] = st
        if ended:
            # (before vet: a refusal's answer then knows there is no body to stop with
            # RST_STREAM, which on a stream closed both ways RFC 9113 §5.1 does not allow)
            req.complete = True
        try:
            self.vet(req, headers)
        except _Malformed as bad:  # (its own name: mypyc gives `exc` one type per function)
            self.malformed(str(bad))
            return
        except Refused as exc:
            log.info(
                "refused %d from %s: %s (target %r)", exc.status, self.peer, exc.reason, req.url
            )
            st.local(exc.status, detail=exc.reason)
            return
        if req.content_length is not None:  # (vet: digits only)
            st.expect = int(req.content_length)
        if ended and st.expect > 0:
            self.malformed("Content-Length without the body it announces")
            return
        st.start()

    def vet(self, req: Request, headers: list[tuple[bytes, bytes]]) -> None:
        """The HTTP/2 form of ClientConnection._vet: pseudo-headers to the request line and
        Host (RFC 9113 §8.3.1), the same limits, target and Host checks. The block is well
        formed (`event` ran `request.h2_fields_problem` first): one :method and :path, at
        most one Host, and :authority or Host, the same when both are sent."""
        core = self.core
        authority: bytes | None = None
        cookies: list[bytes] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32  # RFC 9113 §6.5.2's accounting
            if name[:1] == b":":
                if name == b":method":
                    req.method = value
                elif name == b":path":
                    req.url = value
                elif name == b":authority":
                    authority = value
                continue
            if len(req.headers) >= core.max_headers:
                raise Refused(431, "request headers too large or too many")
            if name == b"cookie":
                cookies.append(value)  # RFC 9113 §8.2.3: joined again for HTTP/1.1
                continue
            req.headers.append((name, name, value))
            if name in _STEER:
                if name == b"host":
                    req.host = value
                elif name == b"content-length":
                    # RFC 9110 §8.6: 1*DIGIT, and repeated only with the same value (hyper-h2
                    # makes anything else a connection error; the adapter does, for libnghttp2)
                    cl = req.content_length
                    if not value.isdigit():
                        raise _Malformed(f"invalid Content-Length {value[:40]!r}")
                    canon = canonical_length(value)  # (compared and kept as the number)
                    if cl is not None and cl != canon:
                        raise _Malformed("conflicting Content-Length values")
                    if canon is None:
                        raise Refused(413, "request body too large")
                    req.content_length = canon
                elif name == b"x-forwarded-for":
                    req.xff = value if req.xff is None else req.xff + b", " + value
                elif name == b"user-agent":
                    req.ua = value
                elif name == b"referer":
                    req.referer = value
                elif req.auth is None:  # authorization: only for the access log's $remote_user
                    req.auth = value
            elif name == b"pin":
                # Every value: the guard hashes what the node may read (exchange.guard_pin).
                req.pin = value if req.pin is None else req.pin + b", " + value
            elif name == b"token":
                req.session = True
        if cookies:
            req.headers.append((b"cookie", b"cookie", b"; ".join(cookies)))
        req.header_bytes = size
        if size > core.max_header_bytes:
            raise Refused(431, "request headers too large or too many")
        if len(req.url) > core.max_url_bytes:
            raise Refused(414, "request target too long")
        method = req.method
        if method not in ALLOWED_METHODS:
            # CONNECT (also RFC 8441's extended CONNECT, which is not offered) and TRACE: 405.
            if method in NOT_ALLOWED_METHODS:
                raise Refused(405, f"method {method.decode('latin-1')} refused")
            raise Refused(501, f"method {method.decode('latin-1')} not implemented")
        req.target = core.target(req.url)
        if req.host is None:
            assert authority is not None  # (h2_fields_problem: :authority or Host)
            req.host = authority
            req.headers.append((b"host", b"host", authority))
        if not core.check_host(req.host):
            raise Refused(400, "Host names another server")
        cl = req.content_length
        if cl is not None and int(cl) > core.max_body:
            raise Refused(413, "request body too large")


class H2Stream:
    """One request stream: the owner of its exchange and of its node connection (an
    `upstream.NodeOwner`, as an HTTP/1.1 client connection is)."""

    def __init__(self, client: H2Client, sid: int, req: Request) -> None:
        self.client = client
        self.core = client.core
        self.sid = sid
        self.req = req
        self.peer = client.peer
        self.exchange: Exchange | None = None
        self.up: UpstreamConnection | None = None
        self.transport: asyncio.Transport | None = None  # NodeOwner: a stream never tunnels
        self.head: bytes | None = b""  # the core's HTTP/1.1 head until it is complete
        self.out_head: list[tuple[bytes, bytes]] | None = None  # HEADERS not yet sent
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.ending = False  # END_STREAM once pending is sent
        self.done = False
        self.unacked = 0  # request body bytes not yet acknowledged (node write buffer full)
        self.body_paused = False
        # Content-Length as announced (-1: none): the DATA frames must add up to it exactly
        # (RFC 9113 §8.1.1), else the bytes beyond it would reach the node's HTTP/1.1
        # connection as the start of another request (request smuggling).
        self.expect = -1
        self.static_iter: Any = None
        self.activity = False
        self.deadline = _INF
        self.timeout = 0.0

    # -- request side ---------------------------------------------------------------------------

    def start(self) -> None:
        core = self.core
        req = self.req
        expecting = not req.complete and req.content_length != b"0"
        if expecting and req.content_length is None:
            req.chunked = True  # a body of unknown length goes to the node chunked
        client_ip = core.client_ip(self.peer, req.xff) if core.trusted else self.peer
        where, banned = core.triage(req, client_ip)
        if where != TO_NODE:
            if where == LOCAL_BANNED:
                assert banned is not None
                status, retry = core.ban_answer(banned)
                self.local(status, extra=retry)
            elif where == LOCAL_HEALTH:
                self.health()
            elif where == LOCAL_STATIC:
                self.serve_static()
            else:  # LOCAL_NOT_ALLOWED
                self.local(404)
            return
        path = req.target
        trusted = bool(core.trusted) and in_networks(self.peer, core.trusted)
        now = core.loop.time()
        ex = Exchange(
            core.settings_for(path),  # the request's node pool ([[proxy.pools]])
            req,
            client_ip=client_ip,
            peer=self.peer,
            trusted=trusted,
            now=now,
        )
        self.exchange = ex
        if expecting:
            # The whole body within body_timeout while it is buffered (as on HTTP/1.1).
            arm(self, now, core.body_timeout)
            self.client.rt.watch(self)
        ex.start(now, buffer_body=expecting and req.body_size <= core.request_buffer, banned=banned)
        self.drive(ex)

    def body(self, data: bytes, flow: int) -> None:
        req = self.req
        if 0 <= self.expect < req.body_size + len(data):
            self.client.malformed("DATA beyond the announced Content-Length")
            return
        self.activity = True
        req.body_size += len(data)
        ex = self.exchange
        if req.body_size > self.core.max_body:
            if ex is not None:
                ex.client_cancelled(self.core.loop.time())
                self.drive(ex)
            self.local(413, detail="request body too large")
            self.client.ack(self.sid, flow)
            return
        if ex is None or ex.dead:
            self.client.ack(self.sid, flow)
            return
        if ex.state == BUFFERING:
            ex.request_body(data, self.core.loop.time())
            if ex.state != BUFFERING:
                arm_idle(self, self.core.loop.time(), self.core.body_timeout)
        else:
            ex.request_body(data, 0.0)
        self.drive(ex)
        if self.body_paused:
            self.unacked += flow
        else:
            self.client.ack(self.sid, flow)

    def end(self) -> None:
        req = self.req
        if 0 <= self.expect != req.body_size:
            self.client.malformed("request body shorter than its Content-Length")
            return
        req.complete = True
        ex = self.exchange
        if ex is not None and not ex.dead:
            disarm(self)
            ex.request_end(self.core.loop.time())
            self.drive(ex)

    def pause(self, reason: int) -> None:
        """The node's write buffer is full: stop giving the client request-body window."""
        self.body_paused = True

    def resume(self, reason: int) -> None:
        self.body_paused = False
        n, self.unacked = self.unacked, 0
        self.client.ack(self.sid, n)

    def lost(self) -> None:
        """The client reset the stream or the connection went away."""
        self.done = True
        self.static_iter = None
        self.client.rt.timed.discard(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_lost(self.core.loop.time())
            self.drive(ex)

    def on_timeout(self) -> None:
        ex = self.exchange
        if ex is not None and ex.committed:
            self.reset()
            return
        if ex is not None:
            ex.client_cancelled(self.core.loop.time())
            self.drive(ex)
        self.local(408)

    # -- the exchange core's decisions ----------------------------------------------------------

    def drive(self, ex: Exchange) -> None:
        core = self.core
        out = ex.to_client
        if out:
            for data in out:
                self.write(data)
            out.clear()
        out = ex.to_node
        if out:
            up = self.up
            if up is not None and up.transport is not None:
                for data in out:
                    core.send(up.transport, data)
            out.clear()
        if ex.actions:
            actions, ex.actions = ex.actions, []
            for kind, arg in actions:
                self.act(ex, kind, arg)
        # Once, after the decisions: a complete response goes out as HEADERS + DATA with
        # END_STREAM on the last frame (no empty DATA frame to end it).
        self.pump()
        self.client.flush()

    def act(self, ex: Exchange, kind: int, arg: Any) -> None:
        core = self.core
        if kind <= A_NODE_LAST:  # the node side, shared with HTTP/1.1 (upstream.py)
            up = self.up
            if kind == A_NODE_DONE:
                self.up = None  # (node_action's caller's part: see there)
            conn = node_action(self, up, core, ex, kind, arg)
            if conn is not None:  # a pooled connection (attempt() read the clock just now)
                self.node_ready(ex, conn, reused=True, now=ex.upstream_time)
        elif kind == A_FINISH:
            core.log_exchange(ex)
            self.exchange = None
            self.client.rt.timed.discard(self)
            self.finish()
        elif kind == A_LOG:
            core.log_exchange(ex, truncated=arg)
        elif kind == A_LOCAL:
            status, extra, retry_page = arg
            self.exchange = None
            self.local(status, extra=extra, retry_page=retry_page, ex=ex)
        elif kind in (A_ABORT_CLIENT, A_CLOSE_CLIENT):
            self.reset()
        else:
            carry_guard(core.guard, ex, kind, arg, self.drive, core.loop.time, core.guard_decided)

    # -- node connections (upstream.NodeOwner) --------------------------------------------------

    def node_ready(
        self, ex: Exchange, conn: UpstreamConnection, reused: bool, now: float = -1.0
    ) -> None:
        """A node connection for `ex` (pooled, or newly opened by NodePool.connect); `now`:
        the loop time when the caller has just read it."""
        if self.exchange is not ex or ex.state != CONNECTING:
            conn.pool.release(conn)  # the stream ended meanwhile: keep it for the next
            return
        self.up = conn
        conn.owner = self
        ex.node_connected(now if now >= 0.0 else self.core.loop.time(), reused=reused)
        self.drive(ex)

    def node_connect_failed(self, ex: Exchange, i: int, reason: str) -> None:
        ex.node_connect_failed(i, reason, self.core.loop.time())
        self.drive(ex)

    def pause_node(self) -> None:
        up = self.up
        ex = self.exchange
        # Not while the node still owes its head: paused, its read_timeout would blame the node
        # for the client's slowness and mark it down (pump pauses it once the head is out).
        if up is not None and (ex is None or ex.committed):
            up.pause_reading()

    def resume_node(self) -> None:
        up = self.up
        if up is not None:
            up.resume_reading()  # (NodePool.release resumes one released while paused)

    # -- response side --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Bytes from the core: the HTTP/1.1-style head first (to HEADERS), then body."""
        if self.done:
            return
        head = self.head
        if head is not None:
            parsed = h1_head(head + data)
            if parsed is None:
                self.head = head + data
                return
            self.head = None
            status, headers, rest = parsed
            self.out_head = [(b":status", b"%d" % status), *headers]
            data = rest
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)

    def pump(self) -> None:
        """Send pending body bytes as far as the flow-control windows allow (RFC 9113 §5.2);
        a static file is read a chunk at a time as the window takes it."""
        if self.done:
            return
        client = self.client
        conn = client.conn
        sid = self.sid
        pending = self.pending
        try:
            head = self.out_head
            if head is not None:
                self.out_head = None
                last = self.ending and not pending and self.static_iter is None
                conn.respond(sid, head, last)
                if last:
                    self.ending = False
                    self.done = True
                    client.stream_done(self)
                    client.flush()
                    return
            while not client.writing_paused:
                if not pending:
                    if self.static_iter is None or not self.read_static():
                        break
                    continue
                window = min(conn.window(sid), conn.max_frame())
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) > window:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    pending.popleft()
                self.pending_bytes -= len(chunk)
                last = self.ending and not pending and self.static_iter is None
                conn.send(sid, chunk, last)
                if last:
                    self.ending = False
                    self.done = True
                    client.stream_done(self)
                    break
            if not pending and self.ending and self.static_iter is None:
                self.ending = False
                conn.end(sid)
                self.done = True
                client.stream_done(self)
        except EngineError:  # (StreamGone included)
            self.done = True
            self.static_iter = None
            self.pending.clear()
            self.pending_bytes = 0
            client.stream_done(self)
            return
        if self.pending_bytes > STREAM_BUFFER or client.writing_paused:
            self.pause_node()
        elif self.pending_bytes < STREAM_BUFFER // 2:
            self.resume_node()
        client.flush()

    def read_static(self) -> bool:
        """One chunk of a static file into pending; False at its end (or a read error)."""
        ex = self.exchange
        try:
            chunk = next(self.static_iter)
        except StopIteration:
            self.static_iter = None
            if ex is not None:
                self.end_local(ex)  # logs it and ends the stream after what is pending
            else:
                self.ending = True
            return False
        except OSError:
            self.static_iter = None
            self.ending = False
            self.reset()
            return False
        if ex is not None:
            ex.local_body_sent(len(chunk))
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        return True

    def end_local(self, ex: Exchange) -> None:
        """A local answer (a static file) is complete: ended through the core's transition
        table (DONE), whose A_FINISH logs it and ends the stream, as a proxied answer's does.
        Carried out here rather than by drive, which pumps: this runs inside pump."""
        ex.finish_local(True)
        actions, ex.actions = ex.actions, []
        for kind, arg in actions:
            self.act(ex, kind, arg)

    def finish(self) -> None:
        """The response is complete: END_STREAM after what is pending."""
        if self.done:
            return
        self.ending = True  # (drive pumps after its decisions)

    def reset(self) -> None:
        """A truncated response (or a stalled client): RST_STREAM, so the client notices."""
        if self.done:
            return
        self.done = True
        self.static_iter = None
        client = self.client
        with contextlib.suppress(EngineError):
            client.conn.reset(self.sid, INTERNAL_ERROR)
        client.stream_done(self)
        client.flush()

    def local(
        self,
        status: int,
        *,
        extra: bytes = b"",
        retry_page: bool = False,
        ex: Exchange | None = None,
        detail: str = "",
    ) -> None:
        """Answer from the proxy itself and end the stream (the connection stays)."""
        if self.done:
            return
        core = self.core
        req = self.req
        date = core.date.header
        head_only = req.method == b"HEAD"
        if retry_page:
            data = retry_page_response(status, date, close=False, head_only=head_only)
        else:
            data = error_response(
                status, date, extra=extra, close=False, head_only=head_only, detail=detail
            )
        self.answer(status, data, ex)

    def health(self) -> None:
        """proxy.health_path, answered by the proxy as over HTTP/1.1 (server.py `_health`):
        200 while serving, 503 once a drain begins; never sent to a node."""
        core = self.core
        status, data, _ = health_response(
            core.drain_phase == "serving",
            core.date.header,
            close=False,
            head_only=self.req.method == b"HEAD",
        )
        self.answer(status, data, None)

    def answer(self, status: int, data: bytes, ex: Exchange | None) -> None:
        """Send a whole HTTP/1.1-style response made by the proxy and end the stream."""
        if self.done:
            return
        req = self.req
        self.head = b""
        self.pending.clear()
        self.write(data)
        self.ending = True
        self.exchange = None
        self.client.rt.timed.discard(self)
        self.pump()
        if self.done and not req.complete:
            # RFC 9113 §8.1: the answer is complete, the request body is not wanted; without
            # this the client could go on sending it (acknowledged and dropped) indefinitely.
            with contextlib.suppress(EngineError):
                self.client.conn.reset(self.sid, NO_ERROR)
            self.client.flush()
        # $body_bytes_sent: the body only, as nginx counts it (the head became HEADERS)
        self.log_local(status, len(data) - data.find(b"\r\n\r\n") - 4, ex)

    def log_local(self, status: int, nbytes: int, ex: Exchange | None) -> None:
        sink = self.core.access_log
        if sink is None:
            return
        req = self.req
        line = f"{req.method.decode('latin-1')} {req.url.decode('latin-1')} HTTP/2.0"
        sink.log(
            self.peer,
            time.time(),
            line,
            status,
            nbytes,
            req.referer,
            req.ua,
            ", ".join(ex.addrs) or None if ex else None,
            ", ".join(ex.statuses) or None if ex else None,
            ", ".join(ex.times) or None if ex else None,
            None if req.auth is None else remote_user(req.auth),
        )

    # -- static mounts --------------------------------------------------------------------------

    def serve_static(self) -> None:
        core = self.core
        req = self.req
        headers = {lname.decode("latin-1"): v.decode("latin-1") for lname, _, v in req.headers}
        resp = core.static.respond(req.method.decode(), req.target, headers)
        h2_headers = [(b":status", b"%d" % resp.status)]
        h2_headers.append((b"date", core.date.header.partition(b":")[2].strip()))
        for name, value in resp.headers:
            h2_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        self.head = None
        ex = Exchange(core.exchange_settings, req, client_ip=self.peer, peer=self.peer)
        ex.served_locally(resp.status, resp.length)
        self.exchange = ex
        empty = req.method == b"HEAD" or resp.length == 0
        try:
            self.client.conn.respond(self.sid, h2_headers, empty)
        except EngineError:
            empty = True  # the stream is gone already
        if empty:
            self.done = True
            self.end_local(ex)
            self.client.stream_done(self)
            self.client.flush()
            return
        self.static_iter = resp.iter_body()
        self.pump()
