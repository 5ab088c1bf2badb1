"""The client side of the proxy: one asyncio Protocol per connection, one Exchange per request.

Theory of operation
-------------------
`ClientConnection.data_received` feeds httptools; its callbacks build a `Request` (headers are
lower-cased once, the few that matter are noted as they pass). When the head is complete the
request is vetted (request.py: method, target, Host, framing, limits) and, if nothing is already
in progress, an `Exchange` starts: guard check, static mounts, allowlist, then a node from the
balancer and a connection from that node's keep-alive pool (upstream.py).

The request head for the node is built once as bytes. Request body chunks are written through as
they arrive *and* retained until the response head is committed to the client, so a failed
attempt (connect error/timeout, a 500/502/503/504 head, a lost connection) can replay head and
body on the next node: failover for POST included, as long as nothing reached the client
(SPEC §2). After commit the retained copy is dropped.

Response bytes flow from the upstream protocol's callbacks straight into the client transport.
Backpressure (the uvicorn flow-control idea): when the client's write buffer passes its
high-water mark asyncio calls `pause_writing` here and we pause reading from the node, and the
other way round for request bodies; nothing is ever queued in Python beyond one chunk.

WebSocket: an `Upgrade: websocket` request is forwarded with its Upgrade/Connection headers; on
a 101 both parsers are left behind and bytes are piped both ways (tunnel mode).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from confedge.proxy.pages import error_response, retry_page_response, status_line
from confedge.proxy.request import (
    ALLOWED_METHODS,
    NOT_ALLOWED_METHODS,
    Refused,
    host_allowed,
    normalise_target,
    path_allowed,
    pin_alias,
    split_host,
)

if TYPE_CHECKING:
    from confedge.proxy.core import ProxyCore
    from confedge.proxy.upstream import UpstreamConnection

__all__ = ["ClientConnection", "Exchange", "RedirectConnection", "Request"]

_INF = math.inf

# RFC 9110 §7.6.1 / RFC 9112 §9.6: hop-by-hop fields, never forwarded. Content-Length is
# handled separately (re-emitted from the parsed value). X-Real-IP/X-Forwarded-Proto from the
# client are dropped because the proxy sets them (a client must not choose its own address).
_REQ_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"expect",
        b"content-length",
        b"x-real-ip",
        b"x-forwarded-proto",
        b"x-forwarded-for",
        b"http2-settings",
    }
)
# Guard (SPEC §4, added by the guard helper): a request_token call must come back uncompressed
# so that its 403 "Invalid PIN" can be read and counted; forwarding the client's
# Accept-Encoding would let an attacker ask for gzip and hide every failure from the guard.
_REQ_DROP_PIN = _REQ_DROP | {b"accept-encoding"}
_RESP_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PIN_BUFFER_LIMIT = 64 * 1024

# pause() reasons for client reading
_PAUSE_UPSTREAM = 1  # the node's write buffer is full (request body backpressure)
_PAUSE_PIPELINE = 2  # a pipelined request waits for the current one

# client timeout modes
_T_IDLE, _T_HEAD, _T_BODY, _T_NONE, _T_TUNNEL = range(5)


class Request:
    """One parsed request; body chunks are kept while a failover may still replay them."""

    __slots__ = (
        "body",
        "body_size",
        "chunked",
        "complete",
        "conn_tokens",
        "content_length",
        "expect_continue",
        "header_bytes",
        "headers",
        "host",
        "keep_alive",
        "method",
        "path",
        "pin",
        "referer",
        "retain",
        "target",
        "ua",
        "url",
        "version",
        "websocket",
        "xff",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.header_bytes = 0
        self.host: bytes | None = None
        self.content_length: bytes | None = None
        self.chunked = False
        self.xff: bytes | None = None
        self.pin: bytes | None = None
        self.referer: bytes | None = None
        self.ua: bytes | None = None
        self.conn_tokens: bytes | None = None
        self.websocket = False
        self.expect_continue = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.complete = False
        self.retain = True
        self.keep_alive = True
        self.method = b""
        self.target = ""
        self.path = ""
        self.version = "1.1"


class ClientConnection(asyncio.Protocol):
    """One client connection (TLS already terminated by the transport)."""

    __slots__ = (
        "activity",
        "core",
        "cur",
        "deadline",
        "discard",
        "exchange",
        "head_raw",
        "in_head",
        "parser",
        "paused",
        "peer",
        "pending",
        "refusal",
        "static_iter",
        "timeout",
        "tmode",
        "transport",
        "tunnel",
        "tunnel_buffer",
        "writing_paused",
    )

    def __init__(self, core: ProxyCore) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.cur: Request | None = None
        self.exchange: Exchange | None = None
        self.pending: deque[Request] = deque()
        self.peer = ""
        self.head_raw = 0
        self.in_head = False
        self.paused = 0
        self.writing_paused = False
        self.refusal: Refused | None = None
        self.static_iter: Any = None
        self.tunnel = False
        self.tunnel_buffer: list[bytes] | None = None
        self.discard = False
        self.activity = False
        self.deadline = _INF
        self.timeout = 0.0
        self.tmode = _T_IDLE

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from confedge.proxy.core import normalise_peer

        core = self.core
        self.transport = transport  # type: ignore[assignment]
        if len(core.clients) >= core.max_connections or core.closing:
            transport.abort()  # type: ignore[attr-defined]
            return
        core.clients.add(self)
        self.peer = normalise_peer(transport.get_extra_info("peername"))
        # The first request's head must arrive within header_timeout of the connection.
        self._set_timeout(_T_HEAD, core.header_timeout, absolute=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.clients.discard(self)
        self.static_iter = None
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone()

    def pause_writing(self) -> None:
        self.writing_paused = True
        ex = self.exchange
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        ex = self.exchange
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.resume_reading()
        if self.static_iter is not None:
            self._pump_static()

    def data_received(self, data: bytes) -> None:
        self.activity = True
        if self.tunnel:
            ex = self.exchange
            if ex is not None and ex.up is not None and ex.up.transport is not None:
                ex.up.transport.write(data)
            elif self.tunnel_buffer is not None:
                self.tunnel_buffer.append(data)
            return
        if self.discard:
            return
        if self.in_head:
            # Coarse guard against one endless header line (httptools only calls on_header when
            # a header is complete); the precise limit is enforced per header below.
            self.head_raw += len(data)
            if self.head_raw > 2 * self.core.max_header_bytes:
                self.refuse(431, "request head too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :])
        except httptools.HttpParserInvalidMethodError:
            self.refuse(501, "unknown method")
        except httptools.HttpParserError as exc:
            r = self.refusal
            if r is not None:
                self.refuse(r.status, r.reason)
            elif self.transport is not None and not self.transport.is_closing():
                self.refuse(400, f"malformed request: {exc}")

    def eof_received(self) -> bool | None:
        # A client half-close while a response is due: keep our side open to deliver it.
        return self.exchange is not None

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.cur = Request()
        self.in_head = True
        self.head_raw = 0
        if self.exchange is None and self.tmode == _T_IDLE:
            self._set_timeout(_T_HEAD, self.core.header_timeout, absolute=True)

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
        core = self.core
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > core.max_header_bytes or len(req.headers) >= core.max_headers:
            self.refusal = Refused(431, "request headers too large or too many")
            raise self.refusal
        lname = name.lower()
        req.headers.append((lname, name, value))
        # Note the few headers that steer the proxy; everything else passes untouched.
        if lname == b"host":
            if req.host is not None:
                self.refusal = Refused(400, "more than one Host header")  # RFC 9112 §3.2
                raise self.refusal
            req.host = value
        elif lname == b"content-length":
            req.content_length = value
        elif lname == b"transfer-encoding":
            if req.chunked or value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: only "chunked" alone is accepted (no stacked codings).
                self.refusal = Refused(501, "unsupported transfer coding")
                raise self.refusal
            req.chunked = True
        elif lname == b"connection":
            req.conn_tokens = (
                value.lower() if req.conn_tokens is None else req.conn_tokens + b"," + value.lower()
            )
        elif lname == b"x-forwarded-for":
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif lname == b"upgrade":
            req.websocket = value.strip().lower() == b"websocket"
        elif lname == b"expect":
            req.expect_continue = value.strip().lower() == b"100-continue"
        elif lname == b"user-agent":
            req.ua = value
        elif lname == b"referer":
            req.referer = value
        elif lname == b"pin":
            req.pin = value

    def on_headers_complete(self) -> None:
        req = self.cur
        assert req is not None
        self.in_head = False
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
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

    def on_body(self, body: bytes) -> None:
        req = self.cur
        assert req is not None
        self.activity = True
        req.body_size += len(body)
        if req.body_size > self.core.max_body:
            self.refusal = Refused(413, "request body too large")
            raise self.refusal
        if req.retain:
            req.body.append(body)
        ex = self.exchange
        if ex is not None and ex.req is req:
            ex.on_request_body(body)

    def on_message_complete(self) -> None:
        req = self.cur
        assert req is not None
        req.complete = True
        ex = self.exchange
        if ex is not None and ex.req is req:
            ex.on_request_done()

    # -- request vetting ------------------------------------------------------------------------

    def _vet(self, req: Request) -> None:
        """Refuse what must never reach a node (SPEC §2); raise Refused with the status."""
        core = self.core
        method = req.method
        if method not in ALLOWED_METHODS:
            if method in NOT_ALLOWED_METHODS:
                raise Refused(405, f"method {method.decode()} refused")
            raise Refused(501, f"method {method.decode()} not implemented")
        try:
            req.target = normalise_target(req.url.decode("ascii"))
        except UnicodeDecodeError:
            raise Refused(400, "non-ASCII request target") from None
        if req.host is None:
            if req.version != "1.0":
                raise Refused(400, "missing Host header")  # RFC 9112 §3.2
        elif not host_allowed(req.host.decode("latin-1"), core.allowed_hosts):
            raise Refused(400, "Host names another server")
        if req.chunked and req.version == "1.0":
            raise Refused(400, "chunked body in an HTTP/1.0 request")
        if req.content_length is not None and int(req.content_length) > core.max_body:
            raise Refused(413, "request body too large")
        if req.websocket and (req.conn_tokens is None or b"upgrade" not in req.conn_tokens):
            req.websocket = False  # RFC 9110 §7.8: Upgrade only counts when Connection names it

    # -- request dispatch -----------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        core = self.core
        expecting = not req.complete and self._body_expected(req)
        self._set_timeout(_T_BODY if expecting else _T_NONE, core.body_timeout)
        client_ip = core.client_ip(self.peer, req.xff) if core.trusted else self.peer
        guard = core.guard
        if guard is not None:
            remaining = guard.check(client_ip)
            if remaining is not None:
                retry = b"Retry-After: %d\r\n" % max(1, math.ceil(remaining))
                self.local_response(req, guard.ban_status, extra=retry)
                return
        path = req.target
        static = core.static
        if static is not None and static.match(path.partition("?")[0]):
            self._serve_static(req)
            return
        if not path_allowed(path, core.allowlist):
            self.local_response(req, 404)
            return
        ex = Exchange(self, req, client_ip)
        self.exchange = ex
        if req.expect_continue and not req.complete and req.version != "1.0":
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]  # RFC 9110 §10.1.1
        ex.attempt()

    @staticmethod
    def _body_expected(req: Request) -> bool:
        return req.chunked or (req.content_length is not None and req.content_length != b"0")

    def finished(self, ex: Exchange, *, close: bool) -> None:
        """The response to `ex` is fully written: next request, keep-alive idle, or close."""
        self.exchange = None
        t = self.transport
        if t is None or t.is_closing():
            return
        req = ex.req
        if close or not req.keep_alive or not req.complete:
            t.close()
            return
        self.cur = None if self.cur is req else self.cur
        if self.pending:
            nxt = self.pending.popleft()
            if not self.pending:
                self.resume(_PAUSE_PIPELINE)
            self._start(nxt)
            return
        self._set_timeout(_T_IDLE, self.core.idle_timeout)

    def local_response(
        self,
        req: Request | None,
        status: int,
        *,
        extra: bytes = b"",
        retry_page: bool = False,
        ex: Exchange | None = None,
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
            data = error_response(status, date, extra=extra, close=True, head_only=head_only)
        t.write(data)
        t.close()
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
            ex.cancel()
        self.local_response(self.cur, status)

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
        if mode == _T_NONE:
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
        if mode == _T_IDLE:
            self.abort()
        elif mode == _T_HEAD:
            self.local_response(self.cur if self.in_head else None, 408)
        elif mode == _T_BODY:
            ex = self.exchange
            if ex is not None and ex.committed:
                self.abort()
            else:
                if ex is not None:
                    ex.cancel()
                self.local_response(self.cur, 408)
        elif mode == _T_TUNNEL:
            self.abort()

    # -- WebSocket ------------------------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """The parser stopped at an Upgrade request; bytes after it wait for the node's 101."""
        ex = self.exchange
        if ex is not None and ex.upgrading and ex.req is self.cur:
            self.tunnel = True
            self.tunnel_buffer = [rest] if rest else []
            return
        # Not a WebSocket upgrade (h2c, ...): the parser cannot go on after it, so that request
        # is served without the upgrade and the connection closes after it; later input is
        # ignored.
        if self.cur is not None:
            self.cur.keep_alive = False
        self.discard = True

    def start_tunnel(self) -> None:
        ex = self.exchange
        assert ex is not None and ex.up is not None and ex.up.transport is not None
        buffered, self.tunnel_buffer = self.tunnel_buffer or [], None
        for chunk in buffered:
            ex.up.transport.write(chunk)
        self._set_timeout(_T_TUNNEL, self.core.ws_idle)

    # -- static mounts --------------------------------------------------------------------------

    def _serve_static(self, req: Request) -> None:
        core = self.core
        headers = {lname.decode("latin-1"): v.decode("latin-1") for lname, _, v in req.headers}
        resp = core.static.respond(req.method.decode(), req.target, headers)
        parts = [status_line(resp.status), core.date.header]
        for name, value in resp.headers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        keep = req.keep_alive
        parts.append(b"\r\n" if keep else b"Connection: close\r\n\r\n")
        t = self.transport
        assert t is not None
        t.write(b"".join(parts))
        ex = Exchange(self, req, self.peer)
        ex.status = resp.status
        ex.committed = True
        ex.static_length = resp.length
        self.exchange = ex
        if req.method == b"HEAD" or resp.length == 0:
            ex.finish_static(keep)
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
        while not self.writing_paused:
            try:
                chunk = next(it)
            except StopIteration:
                self.static_iter = None
                ex.finish_static(keep and ex.sent == ex.static_length)
                return
            except OSError:
                self.static_iter = None
                self.abort()
                return
            ex.sent += len(chunk)
            t.write(chunk)


class Exchange:
    """One request's journey: attempts on nodes, then the response streamed to the client."""

    __slots__ = (
        "addrs",
        "chunked_out",
        "client",
        "client_ip",
        "close_after",
        "committed",
        "connect_timeout",
        "dead",
        "head",
        "head_only",
        "node",
        "pin_alias",
        "pin_buf",
        "req",
        "sent",
        "sse",
        "start",
        "static_length",
        "status",
        "statuses",
        "times",
        "tried",
        "until_close",
        "up",
        "upgrading",
        "upstream_time",
    )

    def __init__(self, client: ClientConnection, req: Request, client_ip: str) -> None:
        self.client = client
        self.req = req
        self.client_ip = client_ip
        self.up: UpstreamConnection | None = None
        self.node = -1
        self.tried = 0
        self.committed = False
        self.dead = False
        self.status = 0
        self.sent = 0
        self.chunked_out = False
        self.close_after = False
        self.head_only = req.method == b"HEAD"
        self.sse = False
        self.upgrading = req.websocket and req.method == b"GET"
        self.addrs: list[str] = []
        self.statuses: list[str] = []
        self.start = client.core.loop.time()
        self.upstream_time = 0.0
        self.static_length = 0
        self.head = b""
        self.pin_alias: str | None = None
        self.pin_buf: bytearray | None = None
        self.connect_timeout = 0.0
        self.until_close = False
        self.times: list[str] = []

    # -- request side ---------------------------------------------------------------------------

    def _build_head(self) -> bytes:
        """The request head for the nodes (built once, replayed on failover)."""
        req = self.req
        client = self.client
        drop = _REQ_DROP if self.pin_alias is None else _REQ_DROP_PIN
        extra: frozenset[bytes] | None = None
        if req.conn_tokens is not None:
            # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop too.
            extra = frozenset(t.strip() for t in req.conn_tokens.split(b","))
        parts = [req.method, b" ", req.target.encode(), b" HTTP/1.1\r\n"]
        for lname, name, value in req.headers:
            if lname in drop or (extra is not None and lname in extra):
                continue
            parts += (name, b": ", value, b"\r\n")
        if req.host is None:
            parts.append(b"Host: " + client.core.cfg.server.fqdn.encode() + b"\r\n")
        ip = self.client_ip.encode()
        peer = client.peer.encode()
        parts += (b"X-Real-IP: ", ip, b"\r\nX-Forwarded-For: ")
        if req.xff is not None:
            parts += (req.xff, b", ")
        parts += (peer, b"\r\nX-Forwarded-Proto: https\r\n")
        if self.upgrading:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts += (b"Content-Length: ", req.content_length.strip(), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def attempt(self) -> None:
        """Send the request to the next node, or answer the error page when none is left."""
        client = self.client
        core = client.core
        i = core.balancer.pick(self.client_ip, self.tried)
        if i is None:
            if self.tried:
                status = 504 if self.statuses and self.statuses[-1] == "504" else 502
            else:
                status = 503
            self.dead = True
            client.exchange = None
            client.local_response(self.req, status, retry_page=True, ex=self)
            return
        if not self.head:
            path = self.req.target
            self.connect_timeout = (
                core.api_connect_timeout if path.startswith("/api") else core.connect_timeout
            )
            if (
                self.req.method == b"POST"
                and core.guard is not None
                and "request_token" in path.lower()
            ):
                self.pin_alias = pin_alias(path)
            self.head = self._build_head()  # after pin_alias: it drops Accept-Encoding then
        self.tried |= 1 << i
        self.node = i
        core.balancer.active[i] += 1
        pool = core.pools[i]
        self.addrs.append(pool.node.netloc)
        self.upstream_time = core.loop.time()
        conn = pool.take()
        if conn is not None:
            self.upstream_ready(conn)
        else:
            pool.connect(self, self.connect_timeout)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        core = self.client.core
        if self.dead:
            core.pools[conn.pool.index].release(conn)
            return
        self.up = conn
        conn.exchange = self
        conn.headers = []
        conn.timeout = core.read_timeout
        conn.activity = False
        conn.deadline = core.loop.time() + core.read_timeout
        t = conn.transport
        assert t is not None
        req = self.req
        if req.chunked:
            parts = [self.head]
            for chunk in req.body:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            if req.complete:
                parts.append(b"0\r\n\r\n")
            t.write(b"".join(parts))
        elif req.body:
            t.writelines([self.head, *req.body])
        else:
            t.write(self.head)

    def on_request_body(self, body: bytes) -> None:
        up = self.up
        if up is None or up.transport is None:
            return  # retained in req.body; sent when a connection is ready
        if self.req.chunked:
            up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            up.transport.write(body)

    def on_request_done(self) -> None:
        client = self.client
        if client.tmode == _T_BODY:
            client._set_timeout(_T_NONE, 0.0)
        up = self.up
        if up is not None and up.transport is not None and self.req.chunked:
            up.transport.write(b"0\r\n\r\n")
        if not self.committed:
            return
        self.req.body = []

    # -- failures -------------------------------------------------------------------------------

    def _release_attempt(self) -> None:
        if self.node >= 0:
            core = self.client.core
            core.balancer.active[self.node] -= 1
            self.times.append(f"{core.loop.time() - self.upstream_time:.3f}")
            self.node = -1

    def _retry(self, reason_status: str) -> None:
        self.statuses.append(reason_status)
        self._release_attempt()
        self.up = None
        if not self.req.retain:
            self.client.abort()
            return
        self.attempt()

    def connect_failed(self, i: int, reason: str) -> None:
        core = self.client.core
        core.passive_failure(i, reason)
        if self.dead:
            return
        self._retry("502")

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The node's connection closed while this exchange used it."""
        if self.dead:
            return
        if self.committed:
            if conn.tunnel:
                self.dead = True
                self._release_attempt()
                if self.client.transport is not None:
                    self.client.transport.close()
                return
            if self.until_close:
                # RFC 9112 §6.3 item 8: the body was delimited by the close.
                self.on_response_done(conn)
                return
            # Truncated response: the client must notice, so close without a clean end.
            self._release_attempt()
            self.dead = True
            self.client.abort()
            self.client.core.log_exchange(self, truncated=True)
            return
        if conn.reused and not conn.got_bytes:
            # A keep-alive connection the node had already closed: not the node's fault, replay
            # on a fresh connection to the same node (RFC 9112 §9.3.1 allows this retry).
            self.tried &= ~(1 << self.node)
            self._release_attempt()
            self.addrs.pop()
            self.times.pop()
            self.up = None
            self.attempt()
            return
        self.client.core.passive_failure(conn.pool.index, "connection closed before a response")
        self._retry("502")

    def upstream_failed(self, conn: UpstreamConnection, reason: str) -> None:
        if self.dead:
            return
        if self.committed:
            self.dead = True
            self._release_attempt()
            self.client.abort()
            return
        self.client.core.passive_failure(conn.pool.index, reason)
        self._retry("502")

    def upstream_timeout(self, conn: UpstreamConnection) -> None:
        if self.committed:
            # SSE lifetime reached or a node stalled mid-body: end the response.
            self.dead = True
            self._release_attempt()
            conn.close()
            self.client.abort()
            self.client.core.log_exchange(self, truncated=True)
            return
        self.client.core.passive_failure(conn.pool.index, "no response within proxy.read_timeout")
        conn.close()
        self._retry("504")

    def cancel(self) -> None:
        """The client side failed (refusal, timeout) before the response: drop the attempt."""
        self.dead = True
        self._release_attempt()
        up = self.up
        if up is not None:
            up.close()
            self.up = None

    def client_gone(self) -> None:
        if self.dead:
            return
        self.dead = True
        self._release_attempt()
        up = self.up
        if up is not None:
            up.close()
            self.up = None
        if not self.committed or self.status:
            self.client.core.log_exchange(self, truncated=True)

    # -- response side --------------------------------------------------------------------------

    def on_response_head(self, conn: UpstreamConnection) -> None:
        status = conn.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            conn.informational = (
                True  # RFC 9110 §15.2: 1xx are not forwarded (we sent 100 ourselves)
            )
            return
        client = self.client
        core = client.core
        req = self.req
        if status in _RETRY_STATUSES and not self.committed:
            if status != 500:
                core.passive_failure(
                    conn.pool.index, f"answered {status}", maintenance=status == 503
                )
            if (
                req.complete
                and req.retain
                and core.balancer.pick(self.client_ip, self.tried) is not None
            ):
                conn.close()
                self._retry(str(status))
                return
        self.status = status
        self.statuses.append(str(status))
        self.committed = True
        req.retain = False
        if req.complete:
            req.body = []
        t = client.transport
        if t is None:
            return
        parts = [status_line(status)]
        has_csp = False
        chunked_in = False
        length: bytes | None = None
        extra: frozenset[bytes] | None = None
        drop = _RESP_DROP
        for name, value in conn.headers:
            lname = name.lower()
            if lname in drop:
                if lname == b"transfer-encoding":
                    chunked_in = True
                elif lname == b"connection":
                    toks = frozenset(x.strip() for x in value.lower().split(b","))
                    extra = toks if extra is None else extra | toks
                continue
            if lname == b"content-length":
                length = value
            elif lname == b"content-type":
                if value.startswith(b"text/event-stream"):
                    self.sse = True
            elif lname == b"content-security-policy":
                has_csp = True
            parts += (name, b": ", value, b"\r\n")
        if extra is not None and extra - {b"keep-alive", b"close", b"upgrade"}:
            parts = [p for p in self._filter(conn.headers, extra)]
        if core.csp_line and not has_csp:
            parts.append(core.csp_line)
        if status == 101:
            if not self.upgrading:
                self.dead = True
                client.abort()
                return
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            t.write(b"".join(parts))
            return
        self.upgrading = False
        no_body = self.head_only or status in (204, 304)
        if not no_body and length is None:
            self.until_close = not chunked_in
            if req.version == "1.0":
                self.close_after = True
            else:
                self.chunked_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
        if client.tunnel:
            self.close_after = True  # an upgrade the node declined: the client stream is unusable
            client.tunnel = False
        if self.close_after or not req.keep_alive:
            parts.append(b"Connection: close\r\n\r\n")
        else:
            parts.append(b"\r\n")
        t.write(b"".join(parts))
        if self.sse:
            conn.timeout = 0.0
            conn.deadline = core.loop.time() + core.sse_lifetime
        if self.pin_alias is not None and status == 403:
            self.pin_buf = bytearray()
        if self.head_only:
            # httptools cannot be told a response answers HEAD, so it would wait for a body
            # of Content-Length bytes: finish now and retire the connection.
            self._complete(conn, reuse=False)

    def _filter(self, headers: list[tuple[bytes, bytes]], extra: frozenset[bytes]) -> list[bytes]:
        out = [status_line(self.status)]
        for name, value in headers:
            lname = name.lower()
            if lname in _RESP_DROP or lname in extra:
                continue
            out += (name, b": ", value, b"\r\n")
        return out

    def on_tunnel(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The node switched protocols (101): pipe bytes both ways from now on."""
        client = self.client
        if self.status != 101 or not client.tunnel or client.transport is None:
            self.dead = True
            conn.close()
            client.abort()
            return
        conn.tunnel = True
        conn.timeout = 0.0
        conn.deadline = _INF
        if rest:
            client.transport.write(rest)
        client.start_tunnel()
        client.core.log_exchange(self)

    def on_response_body(self, body: bytes) -> None:
        t = self.client.transport
        if t is None:
            return
        self.sent += len(body)
        if self.chunked_out:
            t.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            t.write(body)
        pb = self.pin_buf
        if pb is not None and len(pb) < _PIN_BUFFER_LIMIT:
            pb += body

    def on_response_done(self, conn: UpstreamConnection) -> None:
        if self.status == 101:
            return  # the tunnel starts when the parser reports the upgrade
        if self.chunked_out and self.client.transport is not None:
            self.client.transport.write(b"0\r\n\r\n")
        self._complete(conn, reuse=not self.until_close and conn.parser.should_keep_alive())

    def _complete(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        client = self.client
        core = client.core
        self._release_attempt()
        self.up = None
        conn.exchange = None
        if reuse and self.req.complete and not conn.tunnel:
            conn.pool.release(conn)
        else:
            conn.close()
        if self.pin_buf is not None:
            self._check_pin()
        self.dead = True
        core.log_exchange(self)
        client.finished(self, close=self.close_after)

    def _check_pin(self) -> None:
        """Guard API: a 403 "Invalid PIN" on request_token is a PIN failure (SPEC §4)."""
        guard = self.client.core.guard
        if guard is None or self.pin_alias is None or self.pin_buf is None:
            return
        try:
            result = json.loads(bytes(self.pin_buf)).get("result")
        except (ValueError, AttributeError):
            return
        if result == "Invalid PIN":
            pin = self.req.pin.decode("latin-1") if self.req.pin is not None else None
            guard.record_pin_failure(self.client_ip, self.pin_alias, pin)

    def finish_static(self, keep: bool) -> None:
        self.dead = True
        self.client.core.log_exchange(self)
        self.client.finished(self, close=not keep)


class RedirectConnection(asyncio.Protocol):
    """Port 80: every request gets 301 to the same host and path on https (SPEC §2)."""

    __slots__ = ("_https_port", "_timer", "core", "host", "parser", "transport", "url")

    def __init__(self, core: ProxyCore, https_port: int) -> None:
        self.core = core
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.host: bytes | None = None
        self._https_port = https_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Port 80 is not a hot path: a plain timer bounds slow clients here.
        self._timer = self.core.loop.call_later(self.core.header_timeout, transport.abort)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._answer()
        except httptools.HttpParserError:
            self._send(400, b"")

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.core.max_url_bytes:
            raise ValueError("target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value

    def on_headers_complete(self) -> None:
        self._answer()

    def _answer(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        try:
            target = normalise_target(self.url.decode("ascii"))
        except (Refused, UnicodeDecodeError):
            self._send(400, b"")
            return
        core = self.core
        host = core.cfg.server.fqdn
        if self.host is not None:
            h = self.host.decode("latin-1").strip()
            if host_allowed(h, core.allowed_hosts):
                # Keep the name the client used (never an unknown one: no open redirect),
                # without its port-80 part.
                host = split_host(h)
        port = self._https_port
        netloc = host if port == 443 else f"{host}:{port}"
        location = f"https://{netloc}{target}".encode()
        self._send(301, b"Location: " + location + b"\r\n")

    def _send(self, status: int, extra: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(
            status_line(status)
            + self.core.date.header
            + extra
            + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        t.close()
