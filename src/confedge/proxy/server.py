"""The client side of the proxy: one asyncio Protocol per connection.

Theory of operation
-------------------
`ClientConnection.data_received` feeds httptools; its callbacks build a `Request` (header names
are lower-cased once, and the few that steer the proxy are noted as they pass). When the head is
complete the request is vetted (request.py: method, target, Host, framing, limits) and, if
nothing is in progress, an `Exchange` (exchange.py) starts: guard check, static mounts,
allowlist, then a node from the balancer and a connection from its keep-alive pool.

Backpressure (the uvicorn flow-control idea): when the client's write buffer passes its
high-water mark asyncio calls `pause_writing` here and we pause reading from the node; when a
node's write buffer fills (a request body faster than the node reads it) the upstream protocol
pauses reading from the client. Nothing is ever queued in Python beyond one chunk. Pipelined
requests are parsed into a queue while client reading is paused, and answered in order.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import httptools

from confedge.guard.addresses import in_networks
from confedge.proxy.defects import report_defect
from confedge.proxy.exchange import (
    A_ABORT_CLIENT,
    A_CLOSE_CLIENT,
    A_CONNECT,
    A_FINISH,
    A_LOCAL,
    A_LOG,
    A_NO_TUNNEL,
    A_NODE_DONE,
    A_NODE_LAST,
    A_NODE_TIMER,
    A_TUNNEL,
    BUFFERING,
    CONNECTING,
    Exchange,
)
from confedge.proxy.guardcalls import carry_guard
from confedge.proxy.pages import error_response, health_response, retry_page_response, status_line
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
    normalise_peer,
)
from confedge.proxy.turnshare import alpn_selects_turn
from confedge.proxy.upstream import node_action
from confedge.proxy.wsframes import FrameBoundary, close_frame
from confedge.turn.portshare import FIRST_HTTP, FIRST_TURN, classify

if TYPE_CHECKING:
    from confedge.proxy.core import WorkerRuntime
    from confedge.proxy.upstream import UpstreamConnection

__all__ = ["ClientConnection"]

log = logging.getLogger("confedge.proxy")


_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# The end of an HTTP/1.1 request line (see on_headers_complete).
_LINE_END_11: Final = b" HTTP/1.1\r\n"

_INF: Final = math.inf

# client timer modes (ClientConnection.tmode; the timer scheme is proxy/timers.py). Module
# constants are Final throughout the compiled modules: mypyc then reads them from a C static
# (or inlines them) instead of looking the name up in the module's dict on every use.
T_IDLE: Final = 0
T_HEAD: Final = 1
T_BODY: Final = 2
T_NONE: Final = 3
T_TUNNEL: Final = 4

# The request headers that steer the proxy (one dict lookup per header instead of a chain of
# comparisons: a browser sends a dozen headers, nearly all of them passed through untouched).
_H_HOST: Final = 0
_H_CONTENT_LENGTH: Final = 1
_H_TRANSFER_ENCODING: Final = 2
_H_CONNECTION: Final = 3
_H_XFF: Final = 4
_H_UPGRADE: Final = 5
_H_EXPECT: Final = 6
_H_USER_AGENT: Final = 7
_H_REFERER: Final = 8
_H_PIN: Final = 9
_H_TOKEN: Final = 10
_H_AUTHORIZATION: Final = 11
_STEER: Final[dict[bytes, int]] = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"x-forwarded-for": _H_XFF,
    b"upgrade": _H_UPGRADE,
    b"expect": _H_EXPECT,
    b"user-agent": _H_USER_AGENT,
    b"referer": _H_REFERER,
    b"pin": _H_PIN,
    b"token": _H_TOKEN,  # a conference session (client API v2), see Exchange.seek_session
    b"authorization": _H_AUTHORIZATION,  # only for the access log's $remote_user
}
_H_OTHER: Final = -1  # passed through untouched
# Header names as clients spell them -> (lower-cased name, _STEER kind or _H_OTHER), memoised:
# clients send the same few names in the same spelling on every request, so one lookup
# replaces a lower() (a new bytes object) and a second lookup per header. Bounded, and emptied
# when full, so a client inventing names only loses the shortcut (as exchange._RESP_KINDS).
_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {}


def _name_kind(name: bytes) -> tuple[bytes, int]:
    lname = name.lower()
    known = (lname, _STEER.get(lname, _H_OTHER))
    if len(_NAMES) >= 1024:
        _NAMES.clear()
    _NAMES[name] = known
    return known


# pause() reasons for client reading
_PAUSE_UPSTREAM: Final = 1  # the node's write buffer is full (request body backpressure)
_PAUSE_PIPELINE: Final = 2  # a pipelined request waits for the current one
_PAUSE_TUNNEL: Final = 4  # bytes after a WebSocket upgrade request wait for the node's 101
_PAUSE_WRITING: Final = 8  # the client has not read its answers: the next request waits


class ClientConnection(asyncio.BufferedProtocol):
    """One client connection (TLS already terminated by the transport).

    A BufferedProtocol, so that the TLS transport decrypts straight into the worker's shared
    read buffer (`WorkerRuntime.read_view`) instead of allocating a fresh bytes object per read:
    uvloop's SSL transport reads a plain Protocol's data with `SSLObject.read(256 KiB)`, which
    glibc serves with an mmap + mremap + munmap per request. Sharing one buffer per worker is
    safe because everything read is consumed synchronously in `buffer_updated` (httptools hands
    its callbacks copies; a transport's resume_reading schedules the next read, it never
    re-enters a read in progress); only tunnel bytes outlive the call, and those are copied.
    """

    __slots__ = (
        "activity",
        "at0",
        "core",
        "cur",
        "deadline",
        "discard",
        "exchange",
        "feed",
        "get_method",
        "head_raw",
        "in_head",
        "now",
        "parser",
        "paused",
        "peer",
        "pending",
        "refusal",
        "should_keep_alive",
        "sniff",
        "static_iter",
        "timeout",
        "tmode",
        "transport",
        "tunnel",
        "tunnel_buffer",
        "up",
        "writing_paused",
        "ws_up",
    )

    def __init__(self, core: WorkerRuntime) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # The parser's methods of every request, bound once: a call each without the method
        # lookup on the parser's type (generic in the compiled build too).
        self.feed: Callable[[bytes | memoryview], None] = self.parser.feed_data
        self.get_method: Callable[[], bytes] = self.parser.get_method
        self.should_keep_alive: Callable[[], bool] = self.parser.should_keep_alive
        self.cur: Request | None = None
        self.exchange: Exchange | None = None
        self.up: UpstreamConnection | None = None  # the current exchange's node connection
        self.pending: deque[Request] = deque()
        self.peer = ""
        self.head_raw = 0
        self.in_head = False
        # The loop time read when a request began in the read being parsed (-1.0 outside a
        # read): its exchange starts with the same reading, one clock call per request fewer.
        self.now = -1.0
        # The read being parsed is in the worker's read buffer from its first byte, and began
        # between two requests (False outside such a read, and once its first head is done).
        self.at0 = False
        self.paused = 0
        self.writing_paused = False
        self.refusal: Refused | None = None
        self.static_iter: Any = None
        self.tunnel = False
        self.tunnel_buffer: list[bytes] | None = None
        # A WebSocket tunnel's client-to-node frame boundaries (proxy/wsframes.py, going_away).
        self.ws_up: FrameBoundary | None = None
        self.discard = False
        self.activity = False
        self.deadline = _INF
        self.timeout = 0.0
        self.tmode = T_IDLE
        # turn.tls_on_https: the first bytes read so far, until they say HTTP or TURN.
        self.sniff: bytes | None = None

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        core = self.core
        self.transport = transport  # type: ignore[assignment]
        if len(core.clients) >= core.max_connections or core.closing:
            transport.abort()  # type: ignore[attr-defined]
            return
        core.clients.add(self)
        self.peer = normalise_peer(transport.get_extra_info("peername"))
        # The first request's head must arrive within header_timeout of the connection.
        self._set_timeout(T_HEAD, core.header_timeout, absolute=True)
        if core.turn_share is not None:
            # turn.tls_on_https (docs/TURN.md): this may be TURN over TLS. ALPN "stun.turn"
            # says so now; otherwise the first bytes will, through the in_head path below.
            if alpn_selects_turn(transport):
                self._to_turn(b"")
                return
            self.sniff = b""
            self.in_head = True
        h2 = core.h2
        if h2 is not None and h2.selected(transport):
            # ALPN "h2" (RFC 9113 §3.2): proxy/h2.py takes the connection over.
            self.sniff = None
            self._set_timeout(T_NONE, 0.0)
            self.transport = None
            h2.take(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.clients.discard(self)
        self.static_iter = None
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_lost(self.core.loop.time())
            self.drive(ex)

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.up
        if up is not None:
            ex = self.exchange
            # Only a response under way: a node that still owes its head is left to send it
            # (paused now, its read_timeout would blame the node for the client's slowness and
            # mark it down); drive pauses it as soon as the head has gone out.
            if ex is not None and ex.committed:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.up
        if up is not None:
            up.resume_reading()
        if self.static_iter is not None:
            self._pump_static()
        if self.paused & _PAUSE_WRITING:
            # (after this callback: it may come from inside a write)
            self.core.loop.call_soon(self._next_after_drain)

    def _next_after_drain(self) -> None:
        """The client has read its earlier answers (see finished): read it again, and start
        the next pipelined request."""
        t = self.transport
        if self.writing_paused or t is None or t.is_closing():
            return
        self.resume(_PAUSE_WRITING)
        if self.exchange is None and self.pending:
            nxt = self.pending.popleft()
            if not self.pending:
                self.resume(_PAUSE_PIPELINE)
            self._start(nxt)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.read_view

    def buffer_updated(self, nbytes: int) -> None:
        data = self.core.read_view[:nbytes]
        if self.tunnel or self.discard or self.in_head:
            self.data_received(data)
            return
        # The common case, a new request (or several) in this read: straight to the parser.
        self.activity = True
        cur = self.cur
        at0 = cur is None or cur.complete
        if at0 and self.exchange is None and not self.pending:
            # proxy.http1_engine "native": an ordinary request (bodiless, whole, alone in this
            # read) read in one C pass; None: anything else, to httptools as below.
            reader = self.core.h1_request
            if reader is not None:
                core = self.core
                r = reader(
                    core.read_view, nbytes, core.max_url_bytes, core.max_header_bytes,
                    core.max_headers,
                )  # fmt: skip
                if r is not None:
                    try:
                        self._read_whole(r)
                    except Exception as bug:  # (the proxy's own, as in a callback)
                        self._internal_error(bug)
                    return
        self.at0 = at0
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(bytes(data[exc.args[0] :]))
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
        self.now = -1.0  # (a reading is good for the read that made it only)
        self.at0 = False

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the client (a view of the shared buffer, or bytes from a hand-off)."""
        self.activity = True
        self.at0 = False  # (not necessarily the read buffer: see on_headers_complete)
        if self.tunnel:
            chunk = bytes(data)  # the shared buffer is reused by the next read
            up = self.up
            if up is not None and up.transport is not None and self.tunnel_buffer is None:
                self.core.send(up.transport, chunk)
                if self.ws_up is not None:
                    self.ws_up.feed(chunk)
            elif self.tunnel_buffer is not None:
                # RFC 6455 §4.1: a client waits for the handshake's answer before it sends
                # more; one that does not is held to this read until the 101 (else it could
                # fill the worker's memory while the node takes its time: read_timeout).
                self.tunnel_buffer.append(chunk)
                self.pause(_PAUSE_TUNNEL)
            return
        if self.discard:
            return
        head = None
        if self.in_head:
            if self.sniff is not None:
                data = self._sniffed(data)
                if not data:
                    return
            head = self.cur
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(bytes(data[exc.args[0] :]))
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
        self.now = -1.0
        if head is not None and self.in_head and self.cur is head:
            # Coarse guard against one endless header line (httptools only calls on_header
            # when a header is complete); the precise limit is enforced per header (on_header).
            # Counted only for a read that ends inside the head it began in: a read that
            # completes it may hold many pipelined requests after it (was: 431 for those).
            self.head_raw += len(data)
            t = self.transport
            too_long = self.head_raw > 2 * self.core.max_header_bytes
            if too_long and t is not None and not t.is_closing():
                self.refuse(431, "request head too large")

    def _sniffed(self, data: bytes | memoryview) -> bytes | memoryview:
        """turn.tls_on_https: what to parse as HTTP, once the first bytes say it is HTTP; b""
        while they say nothing yet, or when they were STUN/ChannelData (handed to TURN)."""
        buf = self.sniff + bytes(data) if self.sniff else data
        kind = classify(buf)
        if kind == FIRST_HTTP:
            self.sniff = None
            return buf
        if kind == FIRST_TURN:
            self._to_turn(bytes(buf))
        else:
            self.sniff = bytes(buf)  # at most 15 bytes (classify decides by the 16th)
        return b""

    def _to_turn(self, first: bytes) -> None:
        """Give this connection to TURN (core.turn_share); this object is done with it."""
        core = self.core
        share = core.turn_share
        t = self.transport
        core.clients.discard(self)
        self.sniff = None
        self._set_timeout(T_NONE, 0.0)
        self.transport = None
        if share is not None and t is not None and not t.is_closing():
            share.take(t, first)

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            self.refuse(501, "unknown method")
            return
        r = self.refusal
        if r is not None:
            self.refuse(r.status, r.reason)
            return
        bug = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
        if bug is not None and not isinstance(bug, Refused):
            # Not the client's request but the proxy's own callback failing (httptools says
            # "User callback error" and keeps the exception as the context).
            self._internal_error(bug)
            return
        t = self.transport
        if t is not None and not t.is_closing():
            self.refuse(400, f"malformed request: {exc}")

    def _internal_error(self, bug: BaseException) -> None:
        """The proxy's own code failed on a request (an httptools callback, or the steps after
        the C reader): a defect to see in the log with its traceback, and a 500, not a 400
        that blames the client."""
        report_defect(bug, f"parsing a request from {self.peer}")
        t = self.transport
        if t is not None and not t.is_closing():
            self.refuse(500, "internal error")

    def eof_received(self) -> bool | None:
        # A client half-close while a response is due: keep our side open to deliver it.
        return self.exchange is not None

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.cur = Request()
        self.in_head = True
        self.head_raw = 0
        if self.exchange is None and self.tmode == T_IDLE:
            # _set_timeout(T_HEAD, header_timeout, absolute=True), inlined (once per request)
            self.tmode = T_HEAD
            self.timeout = 0.0
            self.activity = False
            core = self.core
            now = core.clock()
            self.now = now  # (for _start, if the head completes in this read)
            self.deadline = now + core.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.cur
        assert req is not None
        req.url += url
        if len(req.url) > self.core.max_url_bytes:
            self.refusal = Refused(414, "request target too long")
            raise self.refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.cur
        assert req is not None
        headers = req.headers
        size = req.header_bytes + len(name) + len(value) + 4
        req.header_bytes = size
        core = self.core
        if size > core.max_header_bytes or len(headers) >= core.max_headers:
            self.refusal = Refused(431, "request headers too large or too many")
            raise self.refusal
        known = _NAMES.get(name)
        if known is None:
            known = _name_kind(name)
        lname, kind = known
        headers.append((lname, name, value))
        # Note the few headers that steer the proxy; everything else passes untouched.
        if kind == _H_OTHER:
            return
        # (the kinds nearly every request has first: Host, and a browser's User-Agent and
        # Referer; each comparison passed is a few bytecodes per header, interpreted)
        if kind == _H_HOST:
            if req.host is not None:
                self.refusal = Refused(400, "more than one Host header")  # RFC 9112 §3.2
                raise self.refusal
            req.host = value
        elif kind == _H_USER_AGENT:
            req.ua = value
        elif kind == _H_REFERER:
            req.referer = value
        elif kind == _H_CONTENT_LENGTH:
            req.content_length = value
        elif kind == _H_TRANSFER_ENCODING:
            if req.chunked or value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: only "chunked" alone is accepted (no stacked codings).
                self.refusal = Refused(501, "unsupported transfer coding")
                raise self.refusal
            req.chunked = True
        elif kind == _H_CONNECTION:
            req.conn_tokens = (
                value.lower() if req.conn_tokens is None else req.conn_tokens + b"," + value.lower()
            )
        elif kind == _H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif kind == _H_UPGRADE:
            req.websocket = value.strip().lower() == b"websocket"
        elif kind == _H_EXPECT:
            req.expect_continue = value.strip().lower() == b"100-continue"
        elif kind == _H_PIN:
            # Every value: the guard hashes what the node may read (exchange.guard_pin).
            req.pin = value if req.pin is None else req.pin + b", " + value
        elif kind == _H_TOKEN:
            req.session = True
        elif kind == _H_AUTHORIZATION and req.auth is None:
            req.auth = value

    def on_headers_complete(self) -> None:
        req = self.cur
        assert req is not None
        self.in_head = False
        method = self.get_method()
        req.method = method
        # HTTP/1.1 (Request's default) read off the request line itself when this read began
        # with it: httptools' get_http_version formats a new string with str.format, the
        # largest single cost of a head. This read (the worker's read buffer from byte 0)
        # holds the whole line, METHOD SP+ URL SP+ HTTP/x.y CRLF, after at most some blank
        # lines, and llhttp accepted it, so it has no CR or LF before its end: 11 bytes at
        # len(METHOD) + 1 + len(URL) that read " HTTP/1.1\r\n" can only be its end, and the
        # version is 1.1. Anything else (a head split over reads, a pipelined request, blank
        # lines before it, extra spaces, 1.0) asks the parser.
        at0 = self.at0
        self.at0 = False
        if not at0:
            req.version = self.parser.get_http_version()
        else:
            p = len(method) + 1 + len(req.url)
            if self.core.read_buffer[p : p + 11] != _LINE_END_11:
                req.version = self.parser.get_http_version()
        req.keep_alive = self.should_keep_alive()
        try:
            self._vet(req)
        except Refused as exc:
            self.refusal = exc
            raise
        if self.exchange is None and not self.pending:
            self._start(req)
        else:
            self.pending.append(req)
            self.pause(_PAUSE_PIPELINE)

    def _read_whole(self, r: tuple[Any, ...]) -> None:
        """A request the C reader took whole (h1engine): the same Request the callbacks above
        would have built, then the same steps in the same order (head complete, message
        complete), so the exchange core sees the same events as after httptools."""
        req = Request()
        (
            req.method,
            req.url,
            req.headers,
            req.host,
            req.ua,
            req.referer,
            req.xff,
            req.conn_tokens,
            req.pin,
            req.session,
            req.auth,
            req.header_bytes,
        ) = r
        self.cur = req
        # (version "1.1" and keep_alive True are Request's defaults: all the reader takes)
        try:
            self._vet(req)
        except Refused as exc:
            self.refuse(exc.status, exc.reason)  # (as _parse_error does after httptools)
            return
        self._start(req)
        self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        req = self.cur
        assert req is not None
        self.activity = True
        req.body_size += len(body)
        if req.body_size > self.core.max_body:
            self.refusal = Refused(413, "request body too large")
            raise self.refusal
        ex = self.exchange
        if ex is None or ex.req is not req:
            if req.retain:
                req.body.append(body)  # a pipelined request's, replayed when it starts
            return
        if ex.state == BUFFERING:
            ex.request_body(body, self.core.loop.time())
            if ex.state != BUFFERING:
                # Too big to hold back: streamed from here, with the body timeout now an idle
                # timeout between chunks.
                self._set_timeout(T_BODY, self.core.body_timeout)
        else:
            ex.request_body(body, 0.0)
        self.drive(ex)

    def on_message_complete(self) -> None:
        req = self.cur
        assert req is not None
        req.complete = True
        ex = self.exchange
        if ex is not None and ex.req is req:
            if self.tmode == T_BODY:
                self._set_timeout(T_NONE, 0.0)
            # (the clock is read only when the end of the body starts the first attempt)
            ex.request_end(self.core.loop.time() if ex.state == BUFFERING else 0.0)
            if ex.to_node or ex.actions:  # (usually nothing: the head went out whole)
                self.drive(ex)

    # -- request vetting ------------------------------------------------------------------------

    def _vet(self, req: Request) -> None:
        """Refuse what must never reach a node (SPEC §2); raise Refused with the status."""
        core = self.core
        method = req.method
        if method not in ALLOWED_METHODS:
            if method in NOT_ALLOWED_METHODS:
                raise Refused(405, f"method {method.decode()} refused")
            raise Refused(501, f"method {method.decode()} not implemented")
        # (the memos' usual hit without the call to core.target / core.check_host)
        target = core.targets.get(req.url)
        req.target = target if target is not None else core.target(req.url)
        host = req.host
        if host is None:
            if req.version != "1.0":
                raise Refused(400, "missing Host header")  # RFC 9112 §3.2
        else:
            ok = core.host_ok.get(host)
            if not (ok if ok is not None else core.check_host(host)):
                raise Refused(400, "Host names another server")
        if req.chunked and req.version == "1.0":
            raise Refused(400, "chunked body in an HTTP/1.0 request")
        cl = req.content_length
        if cl is not None:
            # llhttp has checked the digits, leading zeros included; the node gets the number
            digits = canonical_length(cl.strip())
            if digits is None or int(digits) > core.max_body:
                raise Refused(413, "request body too large")
            req.content_length = digits
        if req.websocket and (req.conn_tokens is None or b"upgrade" not in req.conn_tokens):
            req.websocket = False  # RFC 9110 §7.8: Upgrade only counts when Connection names it

    # -- request dispatch -----------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        core = self.core
        expecting = not req.complete and (
            req.chunked or (req.content_length is not None and req.content_length != b"0")
        )
        # While a body is buffered the whole of it must arrive within body_timeout (absolute):
        # a client trickling bytes (slowhttptest -B, "R-U-Dead-Yet") is cut off before any
        # node sees the request, as behind the reference's nginx.
        if expecting:
            self._set_timeout(T_BODY, core.body_timeout, absolute=True)
        else:
            self.tmode = T_NONE  # _set_timeout(T_NONE), inlined
            self.timeout = 0.0
            self.deadline = _INF
        # Without trusted_proxies (the usual case) the client is the peer, never trusted.
        if core.trusted:
            client_ip = core.client_ip(self.peer, req.xff)
            trusted = in_networks(self.peer, core.trusted)
        else:
            client_ip = self.peer
            trusted = False
        where, banned = core.triage(req, client_ip)
        if where != TO_NODE:
            if where == LOCAL_BANNED:
                assert banned is not None
                status, retry = core.ban_answer(banned)
                self.local_response(req, status, extra=retry)
            elif where == LOCAL_HEALTH:
                self._health(req)
            elif where == LOCAL_STATIC:
                self._serve_static(req)
            else:  # LOCAL_NOT_ALLOWED
                self.local_response(req, 404)
            return
        now = self.now  # (on_message_begin's reading, in the same read)
        if now < 0.0:
            now = core.clock()
        # (positional arguments, here and below: the cheaper call in the interpreted build)
        # (settings_for's usual case, no [[proxy.pools]], without the call)
        settings = core.settings_for(req.target) if core.pool_prefixes else core.exchange_settings
        ex = Exchange(settings, req, client_ip, self.peer, trusted, now)
        self.exchange = ex
        if req.expect_continue and not req.complete and req.version != "1.0":
            core.send(self.transport, _CONTINUE)  # type: ignore[arg-type]  # RFC 9110 §10.1.1
        # A small body is read whole first (attempt once it is complete or too big to wait).
        ex.start(now, expecting and req.body_size <= core.request_buffer, banned)
        self.drive(ex)

    # -- the exchange core's decisions (exchange.py "Theory of operation") ----------------------

    def drive(self, ex: Exchange) -> None:
        """Carry out what the core queued: bytes to the client and the node (through the write
        coalescing), then its decisions, in order; again while they produce more (a pooled node
        connection is ready at once: its head and timer are carried out in the same call)."""
        core = self.core
        while True:
            # (send never calls back into the core, so the byte outboxes are emptied in place;
            # the decisions may, so that list is swapped.)
            out = ex.to_client
            if out:
                t = self.transport
                if t is not None:
                    for data in out:
                        core.send(t, data)
                out.clear()
                if self.writing_paused:
                    # The client's buffer is full: no more of the node's answer until it
                    # drains (resume_writing); idempotent, a flag test when already paused.
                    up = self.up
                    if up is not None:
                        up.pause_reading()
            out = ex.to_node
            if out:
                up = self.up
                t = up.transport if up is not None else None
                if t is not None:
                    for data in out:
                        core.send(t, data)
                out.clear()
            actions = ex.actions
            if not actions:
                return
            ex.actions = []
            # The decisions every proxied request has (A_CONNECT on a pooled connection, the
            # node timer, the node connection done, A_FINISH) are carried out here, the rest by
            # node_action (upstream.py, shared with HTTP/2) and _act: a call per decision cost
            # the interpreted build several calls a request.
            again = False
            # The loop time of the node read that finished the response (UpstreamConnection
            # .now), for the pooled connection's and this connection's idle deadlines.
            now = -1.0
            for kind, arg in actions:
                if kind == A_NODE_TIMER:
                    up = self.up
                    if up is not None:  # (UpstreamConnection.arm, inlined)
                        # (typed: the compiled build reads the pair natively, not through
                        # the generic item access of an Any)
                        timer: tuple[float, float] = arg
                        up.timeout, up.deadline = timer
                        up.activity = False
                elif kind == A_NODE_DONE:
                    up = self.up
                    self.up = None  # (node_action's caller's part: see there)
                    if up is not None:  # (UpstreamConnection.done, inlined)
                        if arg:
                            now = up.now
                            up.pool.release(up, now)  # (which also clears its owner)
                        else:
                            up.close()
                elif kind == A_CONNECT:
                    # The default pool's warmest idle connection without node_action's call
                    # (its settings are always the current generation's); else node_action:
                    # another pool, or a new connection (node_ready / node_connect_failed).
                    i: int = arg[0]  # (typed: a native call to NodePool.take)
                    conn = core.pools[i].take() if ex.settings is core.exchange_settings else None
                    if conn is None:
                        conn = node_action(self, self.up, core, ex, kind, arg)
                    if conn is not None:
                        # A pooled connection: node_ready without its drive (attempt() read
                        # the clock just now); what node_connected queues is carried out by
                        # the next turn of this loop (A_CONNECT is the last decision of the
                        # event that made it).
                        if self.exchange is not ex or ex.state != CONNECTING:
                            conn.pool.release(conn)
                        else:
                            self.up = conn
                            conn.owner = self
                            conn.h1 = self
                            ex.node_connected(ex.upstream_time, True)
                            again = True
                elif kind == A_FINISH:
                    core.log_exchange(ex)
                    self.finished(ex, arg, now)
                elif kind <= A_NODE_LAST:  # A_MARK_FAILED
                    node_action(self, self.up, core, ex, kind, arg)
                else:
                    self._act(ex, kind, arg)
            if not again:
                return

    def _act(self, ex: Exchange, kind: int, arg: Any) -> None:
        """The core's rarer client-side decisions (drive carries out the usual ones)."""
        core = self.core
        if kind == A_LOG:
            core.log_exchange(ex, truncated=arg)
        elif kind == A_LOCAL:
            status, extra, retry_page = arg
            if self.exchange is ex:
                self.exchange = None
            self.local_response(ex.req, status, extra=extra, retry_page=retry_page, ex=ex)
        elif kind == A_ABORT_CLIENT:
            self.abort()
        elif kind == A_CLOSE_CLIENT:
            if self.transport is not None:
                core.close_after(self.transport)
        elif kind == A_TUNNEL:
            self.start_tunnel()
        elif kind == A_NO_TUNNEL:
            self.tunnel = False
            self.tunnel_buffer = None
        else:
            carry_guard(core.guard, ex, kind, arg, self.drive, core.loop.time, core.guard_decided)

    def node_ready(
        self, ex: Exchange, conn: UpstreamConnection, reused: bool, now: float = -1.0
    ) -> None:
        """A node connection for `ex` (from the pool or newly opened: NodePool.connect);
        `now`: the loop time when the caller has just read it."""
        if self.exchange is not ex or ex.state != CONNECTING:
            conn.pool.release(conn)  # the exchange ended meanwhile: keep it for the next
            return
        self.up = conn
        conn.owner = self
        conn.h1 = self
        ex.node_connected(now if now >= 0.0 else self.core.loop.time(), reused)
        self.drive(ex)

    def node_connect_failed(self, ex: Exchange, i: int, reason: str) -> None:
        ex.node_connect_failed(i, reason, self.core.loop.time())
        self.drive(ex)

    @staticmethod
    def _body_expected(req: Request) -> bool:
        return req.chunked or (req.content_length is not None and req.content_length != b"0")

    def finished(self, ex: Exchange, close: bool, now: float = -1.0) -> None:
        """The response to `ex` is fully written: next request, keep-alive idle, or close.
        `now`: the loop time when the caller has just read it (else read here)."""
        if self.exchange is ex:
            self.exchange = None
        t = self.transport
        if t is None or t.is_closing():
            return
        req = ex.req
        # A request without a body may finish (static file, cached answer) before httptools
        # reports its end: it is complete all the same.
        if close or not req.keep_alive or not (req.complete or not self._body_expected(req)):
            self.core.close_after(t)  # the response may still be queued: it goes first
            return
        if self.writing_paused:
            # The client has not read its earlier answers (pipelined requests, or new ones,
            # sent without reading): the next request is neither started nor read until they
            # drain (resume_writing), else they would pile up in the write buffer without
            # bound; a client that reads nothing is aborted at idle_timeout (T_IDLE).
            self.pause(_PAUSE_WRITING)
        elif self.pending:
            nxt = self.pending.popleft()
            if not self.pending:
                self.resume(_PAUSE_PIPELINE)
            self._start(nxt)
            return
        # _set_timeout(T_IDLE, idle_timeout), inlined (once per request)
        core = self.core
        self.tmode = T_IDLE
        self.timeout = core.idle_timeout
        self.activity = False
        self.deadline = (now if now >= 0.0 else core.clock()) + core.idle_timeout

    def local_response(
        self,
        req: Request | None,
        status: int,
        *,
        extra: bytes = b"",
        retry_page: bool = False,
        ex: Exchange | None = None,
        detail: str = "",
    ) -> None:
        """Answer from the proxy itself and close (the request body, if any, is not read)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        date = self.core.date.header
        head_only = req is not None and req.method == b"HEAD"
        if retry_page:
            data = retry_page_response(status, date, close=True, head_only=head_only)
        else:
            data = error_response(
                status, date, extra=extra, close=True, head_only=head_only, detail=detail
            )
        self.core.close_after(t, data)  # anything queued for this client goes first
        self.exchange = None
        self.core.log_local(self, req, status, len(data), ex)

    def refuse(self, status: int, reason: str) -> None:
        """A refusal found while parsing: answer with `status` and close."""
        self.refusal = None
        ex = self.exchange
        if ex is not None and ex.committed:
            # Mid-response (a pipelined request went bad): just close after what was sent.
            self.abort()
            return
        if ex is not None:
            ex.client_cancelled(self.core.loop.time())
            self.drive(ex)
        req = self.cur
        # The reason goes to the log and into the answer's body; the target is logged as a
        # Python bytes literal (escaped), since it is the sender's text.
        log.info(
            "refused %d from %s: %s (target %r)",
            status,
            self.peer,
            reason,
            req.url[:200] if req is not None else b"",
        )
        self.local_response(req, status, detail=reason)

    # -- what the worker asks of a client connection (core.ClientSide) ------------------------

    def close_if_idle(self) -> None:
        """Drain, listeners closed: close now if no request is in progress, queued, or being
        answered from a static file (a keep-alive connection waiting for its next request)."""
        t = self.transport
        if (
            self.exchange is None
            and self.tmode == T_IDLE
            and not self.pending
            and self.static_iter is None
            and t is not None
        ):
            self.core.close_after(t)

    def in_progress(self) -> list[tuple[Exchange, bool]]:
        """The exchange in progress (at most one: pipelined requests wait), and whether it
        became a tunnel (WebSocket), for the status page's sessions table."""
        ex = self.exchange
        return [] if ex is None else [(ex, self.tunnel)]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- flow control ---------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- timeouts -------------------------------------------------------------------------------

    def _set_timeout(self, mode: int, seconds: float, *, absolute: bool = False) -> None:
        self.tmode = mode
        if mode == T_NONE:
            self.timeout = 0.0
            self.deadline = _INF
            return
        self.timeout = 0.0 if absolute else seconds
        self.activity = False
        self.deadline = self.core.loop.time() + seconds

    def on_timeout(self) -> None:
        mode = self.tmode
        self.deadline = _INF
        self.timeout = 0.0
        if mode == T_IDLE:
            self.abort()
        elif mode == T_HEAD:
            self.local_response(self.cur if self.in_head else None, 408)
        elif mode == T_BODY:
            ex = self.exchange
            if ex is not None and ex.committed:
                self.abort()
            else:
                if ex is not None:
                    ex.client_cancelled(self.core.loop.time())
                    self.drive(ex)
                self.local_response(self.cur, 408)
        # websocket_idle_timeout: ended as a stop ends it (Close 1001 both ways where the
        # stream is between frames), as servers that close idle WebSockets do.
        elif mode == T_TUNNEL and not self.going_away():
            self.abort()

    # -- WebSocket ------------------------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """The parser stopped at an Upgrade request; bytes after it wait for the node's 101."""
        ex = self.exchange
        if ex is not None and ex.req is self.cur and ex.client_upgrade():
            self.tunnel = True
            if rest:
                self.tunnel_buffer = [rest]
                self.pause(_PAUSE_TUNNEL)  # (see data_received)
            else:
                self.tunnel_buffer = []
            return
        # Not a WebSocket upgrade (h2c, ...): the parser cannot go on after it, so that request
        # is served without the upgrade and the connection closes after it; later input is
        # ignored.
        if self.cur is not None:
            self.cur.keep_alive = False
        self.discard = True

    def start_tunnel(self) -> None:
        up = self.up
        assert up is not None and up.transport is not None
        up.tunnel = True
        buffered, self.tunnel_buffer = self.tunnel_buffer or [], None
        self.ws_up = FrameBoundary()
        for chunk in buffered:
            self.core.send(up.transport, chunk)
            self.ws_up.feed(chunk)
        self.resume(_PAUSE_TUNNEL)
        self._set_timeout(T_TUNNEL, self.core.ws_idle)

    def going_away(self) -> bool:
        """The worker stops (or the tunnel was idle for websocket_idle_timeout): a WebSocket
        tunnel ends with a Close frame, status 1001 "going away" (RFC 6455 §7.4.1), to the
        client and to the node, each where its direction of the stream stands between two
        frames (else that side is only closed: a frame put inside another would corrupt its
        payload), then both connections close once what is queued is written. False (nothing
        done) for any other connection, which the caller aborts as before."""
        t = self.transport
        up = self.up
        if not self.tunnel or t is None or up is None or not up.tunnel:
            return False
        core = self.core
        down = up.ws_down
        last = close_frame(masked=False) if down is not None and down.at_boundary else b""
        core.close_after(t, last)
        node = up.transport
        if node is not None and not node.is_closing():
            ws_up = self.ws_up
            if ws_up is not None and ws_up.at_boundary:
                # (the proxy speaks for the client here: a client's frames are masked, §5.3)
                node.write(close_frame(masked=True))
            node.close()
        return True

    def _health(self, req: Request) -> None:
        """The health endpoint for a load balancer in front (proxy.health_path): 200 "serving",
        or 503 "draining" from the moment a drain begins (confedge/drain.py), so the balancer
        moves new users away during the grace period while this connection stays usable."""
        core = self.core
        keep = req.keep_alive
        t = self.transport
        assert t is not None
        status, data, length = health_response(
            core.drain_phase == "serving",
            core.date.header,
            close=not keep,
            head_only=req.method == b"HEAD",
        )
        core.send(t, data)
        ex = Exchange(core.exchange_settings, req, client_ip=self.peer, peer=self.peer)
        ex.served_locally(status, length)
        self.exchange = ex
        ex.finish_local(keep)
        self.drive(ex)

    # -- static mounts --------------------------------------------------------------------------

    def _serve_static(self, req: Request) -> None:
        core = self.core
        headers = {lname.decode("latin-1"): v.decode("latin-1") for lname, _, v in req.headers}
        resp = core.static.respond(req.method.decode(), req.target, headers)
        parts = [status_line(resp.status), core.date.header]
        for name, value in resp.headers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        keep = req.keep_alive
        if not keep:
            parts.append(b"Connection: close\r\n\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        t = self.transport
        assert t is not None
        core.send(t, b"".join(parts))
        ex = Exchange(core.exchange_settings, req, client_ip=self.peer, peer=self.peer)
        ex.served_locally(resp.status, resp.length)
        self.exchange = ex
        if req.method == b"HEAD" or resp.length == 0:
            ex.finish_local(keep)
            self.drive(ex)
            return
        self.static_iter = (resp.iter_body(), keep)
        self._pump_static()

    def _pump_static(self) -> None:
        it, keep = self.static_iter
        ex = self.exchange
        t = self.transport
        if ex is None or t is None or t.is_closing():
            self.static_iter = None
            return
        # Direct writes from here (the head may still be queued: it goes first), so that
        # pause_writing stops this loop at the transport's high-water mark.
        self.core.flush_writes()
        while not self.writing_paused:
            try:
                chunk = next(it)
            except StopIteration:
                self.static_iter = None
                ex.finish_local(keep and ex.sent == ex.static_length)
                self.drive(ex)
                return
            except OSError:
                self.static_iter = None
                self.abort()
                return
            ex.local_body_sent(len(chunk))
            t.write(chunk)
