"""One request's journey: attempts on nodes (failover), then the response to the client.

Theory of operation: the request head for the nodes is built once as bytes. Request body chunks
are written through as they arrive *and* retained until the response head is committed to the
client, so a failed attempt (connect error/timeout, a 500/502/503/504 head, a lost connection)
replays head and body on the next node: failover for POST included, as long as nothing reached
the client (SPEC §2). After commit the retained copy is dropped.

Response bytes flow from the upstream protocol's httptools callbacks straight into the client
transport. The response head is held back until the first body bytes (or the end of the read
that carried it) so a small response leaves in one write: one TLS record and one syscall, not
two. WebSocket: on a 101 both parsers are left behind and bytes are piped both ways.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from confedge.guard.addresses import in_networks
from confedge.guard.inflight import issued_token, session_token, token_call
from confedge.proxy.pages import status_line
from confedge.proxy.request import pin_alias

if TYPE_CHECKING:
    from confedge.proxy.server import ClientConnection, Request
    from confedge.proxy.upstream import UpstreamConnection

__all__ = ["Exchange"]

_INF = math.inf

# client timeout modes (ClientConnection.tmode)
T_IDLE, T_HEAD, T_BODY, T_NONE, T_TUNNEL = range(5)

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
# What a proxy in front saw (RFC 7239 Forwarded, the X-Forwarded-* family) and the rewrite
# headers some back ends route on instead of the request target: a client that is not in
# trusted_proxies would be choosing what the node believes about host, scheme and path, so
# they are dropped unless the peer is a trusted balancer (then they pass as it sent them).
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
# Guard (SPEC §4, added by the guard helper): a request_token call must come back uncompressed
# so that its 403 "Invalid PIN" can be read and counted; forwarding the client's
# Accept-Encoding would let an attacker ask for gzip and hide every failure from the guard.
_REQ_DROP_PIN = _REQ_DROP | {b"accept-encoding"}
_REQ_DROP_UNTRUSTED = _REQ_DROP | _FORWARDING
_REQ_DROP_PIN_UNTRUSTED = _REQ_DROP_PIN | _FORWARDING
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
# What on_response_head does with each response header, by its name as the node spelt it
# (memoised: nodes send the same dozen names in the same spelling on every response, so one
# dict lookup replaces a lower() and a chain of comparisons).
_R_PASS, _R_DROP, _R_TRANSFER_ENCODING, _R_CONNECTION, _R_CONTENT_LENGTH = range(5)
_R_CONTENT_TYPE, _R_CSP = 5, 6
_RESP_KINDS: dict[bytes, int] = {}
_RESP_SPECIAL = {
    b"transfer-encoding": _R_TRANSFER_ENCODING,
    b"connection": _R_CONNECTION,
    b"content-length": _R_CONTENT_LENGTH,
    b"content-type": _R_CONTENT_TYPE,
    b"content-security-policy": _R_CSP,
}


def _resp_kind(name: bytes) -> int:
    lname = name.lower()
    kind = _RESP_SPECIAL.get(lname)
    if kind is None:
        kind = _R_DROP if lname in _RESP_DROP else _R_PASS
    if len(_RESP_KINDS) >= 1024:
        _RESP_KINDS.clear()  # a node inventing header names only loses the shortcut
    _RESP_KINDS[name] = kind
    return kind


_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_PIN_BUFFER_LIMIT = 64 * 1024


class Exchange:
    """One request's journey: attempts on nodes, then the response streamed to the client."""

    __slots__ = (
        "addrs",
        "banned",
        "chunked_out",
        "client",
        "client_ip",
        "close_after",
        "committed",
        "connect_timeout",
        "dead",
        "head",
        "head_only",
        "head_out",
        "node",
        "pin_alias",
        "pin_buf",
        "req",
        "seek_session",
        "sent",
        "sse",
        "start",
        "static_length",
        "status",
        "statuses",
        "ticket",
        "times",
        "token_call",
        "tried",
        "until_close",
        "up",
        "upgrading",
        "upstream_time",
        "waiting_body",
    )

    def __init__(self, client: ClientConnection, req: Request, client_ip: str) -> None:
        self.client = client
        self.req = req
        self.client_ip = client_ip
        self.up: UpstreamConnection | None = None
        self.node = -1
        self.tried = 0
        # After a node answered 403 to a request carrying a conference token: the token may
        # belong to another node (one in maintenance keeps its sessions), so look there too.
        self.seek_session = False
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
        self.head_out: bytes | None = None
        self.pin_alias: str | None = None
        self.pin_buf: bytearray | None = None
        # Guard: seconds of ban left when a banned address sent a token-bearing request; the
        # in-flight reservation of a request_token; a call whose 200 answer issues a token.
        self.banned: float | None = None
        self.ticket: str | None = None
        self.token_call = False
        self.connect_timeout = 0.0
        self.until_close = False
        self.waiting_body = False
        self.times: list[str] = []

    # -- request side ---------------------------------------------------------------------------

    def _build_head(self) -> bytes:
        """The request head for the nodes (built once, replayed on failover)."""
        req = self.req
        client = self.client
        # Without trusted_proxies (the usual case) in_networks answers False at once.
        trusted = in_networks(client.peer, client.core.trusted)
        if self.pin_alias is None and not self.token_call:
            drop = _REQ_DROP if trusted else _REQ_DROP_UNTRUSTED
        else:
            drop = _REQ_DROP_PIN if trusted else _REQ_DROP_PIN_UNTRUSTED
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
        if not self.head:
            path = self.req.target
            self.connect_timeout = (
                core.api_connect_timeout if path.startswith("/api") else core.connect_timeout
            )
            if self.req.method == b"POST" and core.guard is not None and "_token" in path.lower():
                self.pin_alias = pin_alias(path)
                self.token_call = token_call(path) is not None
            self.head = self._build_head()  # after pin_alias: it drops Accept-Encoding then
            if core.guard is not None and self._ask_guard(path):
                return  # the guard answers first: _session_checked / _admitted call us again
        if self.seek_session:
            i = core.balancer.pick_serving(self.client_ip, self.tried)
        else:
            i = core.balancer.pick(self.client_ip, self.tried)
        if i is None:
            if self.tried:
                status = 504 if self.statuses and self.statuses[-1] == "504" else 502
            else:
                status = 503
                self._settle(False)  # nothing went out: give the reservation back
            self.dead = True
            client.exchange = None
            client.local_response(self.req, status, retry_page=True, ex=self)
            return
        self.tried |= 1 << i
        self.node = i
        core.balancer.active[i] += 1
        pool = core.pools[i]
        self.addrs.append(pool.netloc)
        self.upstream_time = core.loop.time()
        conn = pool.take()
        if conn is not None:
            self.upstream_ready(conn)
        else:
            pool.connect(self, self.connect_timeout)

    # -- guard (docs/GUARD.md "Guesses in flight", confedge.guard.inflight) ---------------------

    def _ask_guard(self, path: str) -> bool:
        """Before anything goes to a node: a banned address passes only with a token a node
        issued to it (and never for request_token, which is a guess whatever it carries); a
        request_token needs a reservation. True when the guard's answer is awaited."""
        core = self.client.core
        guard = core.guard
        assert guard is not None
        if self.banned is not None:
            token = session_token(self.req.headers, self.req.url)
            if token is None or pin_alias(path) is not None:
                self._refuse(guard.ban_status, self.banned)
            else:
                guard.session_known(self.client_ip, token, self._session_checked)
            return True
        if self.pin_alias is not None:
            # The longest the proxy may wait for the answer (every node tried once): an
            # unanswered reservation lapses no earlier, so a late answer is still counted.
            ttl = len(core.pools) * (core.api_connect_timeout + core.read_timeout)
            guard.reserve_pin(self.client_ip, self.pin_alias, ttl, self._admitted)
            return True
        return False

    def _session_checked(self, known: bool) -> None:
        if self.dead:
            return
        guard = self.client.core.guard
        assert guard is not None and self.banned is not None
        if not known:
            self._refuse(guard.ban_status, self.banned)
            return
        self.banned = None
        self.attempt()

    def _admitted(self, ticket: str | None, retry_after: float) -> None:
        self.ticket = ticket
        if self.dead or self.client.transport is None:
            self._settle(False)  # the client left while we asked
            return
        if ticket is None:
            self._refuse(429, retry_after)
            return
        self.attempt()

    def _refuse(self, status: int, retry_after: float) -> None:
        self.dead = True
        client = self.client
        client.exchange = None
        extra = b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after))
        client.local_response(self.req, status, extra=extra, ex=self)

    def _settle(self, failed: bool) -> None:
        """Hand the reservation back to the guard: answered (`failed`: Invalid PIN), or never
        sent. Unanswered reservations are left to lapse (guard.inflight)."""
        ticket, self.ticket = self.ticket, None
        guard = self.client.core.guard
        if ticket is None or guard is None:
            return
        pin = self.req.pin.decode("latin-1") if self.req.pin is not None else None
        guard.settle_pin(ticket, self.client_ip, self.pin_alias or "", pin, failed)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        core = self.client.core
        if self.dead:
            core.pools[conn.pool.index].release(conn)
            return
        self.up = conn
        conn.exchange = self
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
            core.send(t, b"".join(parts))
        elif req.body:
            core.send(t, b"".join([self.head, *req.body]))
        else:
            core.send(t, self.head)

    def on_request_body(self, body: bytes) -> None:
        up = self.up
        if up is None or up.transport is None:
            return  # retained in req.body; sent when a connection is ready
        core = self.client.core
        if self.req.chunked:
            core.send(up.transport, b"".join((b"%x\r\n" % len(body), body, b"\r\n")))
        else:
            core.send(up.transport, body)

    def on_request_done(self) -> None:
        client = self.client
        if client.tmode == T_BODY:
            client._set_timeout(T_NONE, 0.0)
        if self.waiting_body:
            self.waiting_body = False
            self.attempt()  # the whole buffered body goes out with the head
            return
        up = self.up
        if up is not None and up.transport is not None and self.req.chunked:
            client.core.send(up.transport, b"0\r\n\r\n")
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
                    self.client.core.close_after(self.client.transport)
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
        if (
            status == 403
            and not self.committed
            and req.complete
            and req.retain
            and (req.session or b"?token=" in req.url or b"&token=" in req.url)
            # Never for a join: each retry would be one more PIN guess on another node.
            and "request_token" not in req.target.lower()
            and core.balancer.pick_serving(self.client_ip, self.tried) is not None
        ):
            # A token is valid only on the node that issued it. ip-hash normally sends a
            # client's requests there, but not while that node is in maintenance (it refuses
            # new joins, yet keeps its calls, as a real node does) or after its clients were
            # rebalanced. So a 403 to a token-bearing request is retried on the other nodes
            # that still hold sessions, maintenance ones included; the last 403 reaches the
            # client when the token is truly invalid. Stateless, so every worker agrees.
            conn.close()
            self.seek_session = True
            self._retry("403")
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
        kinds = _RESP_KINDS
        for name, value in conn.headers:
            kind = kinds.get(name)
            if kind is None:
                kind = _resp_kind(name)
            if kind == _R_PASS:
                parts += (name, b": ", value, b"\r\n")
            elif kind == _R_DROP:
                pass
            elif kind == _R_TRANSFER_ENCODING:
                chunked_in = True
            elif kind == _R_CONNECTION:
                v = value.lower()
                if v != b"keep-alive" and v != b"close":  # the usual values: nothing named
                    toks = frozenset(x.strip() for x in v.split(b","))
                    extra = toks if extra is None else extra | toks
            else:
                if kind == _R_CONTENT_LENGTH:
                    length = value
                elif kind == _R_CONTENT_TYPE:
                    if value.startswith(b"text/event-stream"):
                        self.sse = True
                else:  # _R_CSP
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
            core.send(t, b"".join(parts))
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
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")  # RFC 9112 §9.3: 1.0 must be told
        else:
            parts.append(b"\r\n")
        if self.head_only:
            core.send(t, b"".join(parts))
        else:
            # Held back until the body's first bytes or the end of this read (flush_head).
            self.head_out = b"".join(parts)
        if self.sse:
            conn.timeout = 0.0
            conn.deadline = core.loop.time() + core.sse_lifetime
        if (self.pin_alias is not None and status == 403) or (self.token_call and status == 200):
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
            client.core.send(client.transport, rest)
        client.start_tunnel()
        client.core.log_exchange(self)

    def flush_head(self) -> None:
        """Write a held-back response head (SSE: the head must not wait for the first event)."""
        head, self.head_out = self.head_out, None
        t = self.client.transport
        if head is not None and t is not None:
            self.client.core.send(t, head)

    def on_response_body(self, body: bytes) -> None:
        t = self.client.transport
        if t is None:
            return
        self.sent += len(body)
        send = self.client.core.send
        head = self.head_out
        if head is not None:
            self.head_out = None
            if self.chunked_out:
                send(t, b"".join((head, b"%x\r\n" % len(body), body, b"\r\n")))
            else:
                send(t, head + body)
        elif self.chunked_out:
            send(t, b"".join((b"%x\r\n" % len(body), body, b"\r\n")))
        else:
            send(t, body)
        pb = self.pin_buf
        if pb is not None and len(pb) < _PIN_BUFFER_LIMIT:
            pb += body

    def on_response_done(self, conn: UpstreamConnection) -> None:
        if self.status == 101:
            return  # the tunnel starts when the parser reports the upgrade
        t = self.client.transport
        if t is not None:
            head, self.head_out = self.head_out, None
            if head is not None:
                self.client.core.send(t, head + b"0\r\n\r\n" if self.chunked_out else head)
            elif self.chunked_out:
                self.client.core.send(t, b"0\r\n\r\n")
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
        if self.pin_buf is not None or self.ticket is not None:
            self._check_pin()
        self.dead = True
        core.log_exchange(self)
        client.finished(self, close=self.close_after)

    def _check_pin(self) -> None:
        """Guard API: a 403 "Invalid PIN" on request_token is a PIN failure (SPEC §4); a 200
        to request_token/refresh_token issues a token the guard remembers; either way the
        answer settles the request's reservation."""
        guard = self.client.core.guard
        body = bytes(self.pin_buf) if self.pin_buf is not None else b""
        failed = False
        if guard is not None and self.status == 403 and self.pin_alias is not None:
            try:
                failed = json.loads(body).get("result") == "Invalid PIN"
            except (ValueError, AttributeError, RecursionError):
                failed = False
        elif guard is not None and self.status == 200 and self.token_call:
            issued = issued_token(body)
            if issued is not None:
                guard.remember_session(self.client_ip, *issued)
        if self.ticket is not None:
            self._settle(failed)
        elif failed and guard is not None and self.pin_alias is not None:
            pin = self.req.pin.decode("latin-1") if self.req.pin is not None else None
            guard.record_pin_failure(self.client_ip, self.pin_alias, pin)

    def finish_static(self, keep: bool) -> None:
        self.dead = True
        self.client.core.log_exchange(self)
        self.client.finished(self, close=not keep)
