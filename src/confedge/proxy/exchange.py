"""One proxied request, sans-I/O: the exchange core (h11 / hyper-h2 style).

Theory of operation
-------------------
An `Exchange` is one request's journey: attempts on nodes (failover), then the response to the
client. It never touches a socket, a transport, a timer or an event loop (a test asserts that
importing this module imports no asyncio). Adapters feed it *events* and then carry out what it
queued:

  events in (methods, each with `now` where time matters)
      start, request_body, request_end, guard_session, guard_admitted, node_connected,
      node_connect_failed, response_head, response_body, response_end, node_upgraded,
      node_lost, node_failed, node_timeout, client_lost, client_cancelled, client_upgrade,
      flush_head; for an answer the proxy makes itself (health, static file):
      served_locally, local_body_sent, finish_local
  out (read and cleared by the adapter after every event)
      `to_client` / `to_node`: bytes to write, in order, to the client and to the current node;
      `actions`: decisions, each `(kind, argument)` with kind one of the A_* constants below
      (connect to node i, mark node i failed, keep or close the node connection, arm the node
      timer, answer locally, finish or abort the client, start a tunnel, ask the guard, log).

`state` is one `State`; every change goes through `_go`, which checks `TRANSITIONS` (a change
the table does not allow is a bug and raises `ExchangeError`). The adapters read `state` and
the log fields but write none of the core's fields: what they learn reaches the core as an
event (the guard's ban verdict as `start(banned=)`, static-file bytes as `local_body_sent`).
tests/unit/exchange/test_transitions.py holds both rules (a source check and, interpreted, a
guard on every write of `state`). The adapters in this package are
server.py (HTTP/1.1 client side, httptools) and upstream.py (HTTP/1.1 node side); an HTTP/2
adapter (proxy/h2.py) drives one Exchange per stream the same way: its requests have version
"2.0", for which `plan_response` frames nothing (no chunked coding), and it turns the head in
`to_client` into a HEADERS frame and the body bytes into DATA frames.

Failover (SPEC §2, `may_retry`): the request head for the nodes is built once as bytes; body
chunks are written through as they arrive *and* retained until the response head is committed,
so a failed attempt (connect error/timeout, a 500/502/503/504 head, a lost connection) replays
head and body on the next node, POST included, as long as the body was fully buffered and
nothing reached the client. After commit the retained copy is dropped.

Node choice goes through `ExchangeSettings.nodes`, a concrete `Balancer` (mypyc calls it
natively); node pools per path prefix each have their own ExchangeSettings (their own Balancer
and netlocs), which the adapter picks before it makes the Exchange
(`WorkerRuntime.settings_for`). Response planning (framing, header filtering, CSP, SSE) is the
pure function `plan_response`.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Final

from confedge.guard.inflight import issued_token, session_token, token_call
from confedge.proxy.balancer import Balancer
from confedge.proxy.pages import STATUS_LINES, status_line
from confedge.proxy.request import Request, pin_alias

__all__ = [
    "BUFFERING",
    "CONNECTING",
    "DONE",
    "GUARD",
    "START",
    "STREAMING",
    "TRANSITIONS",
    "TUNNEL",
    "WAITING",
    "Exchange",
    "ExchangeError",
    "ExchangeSettings",
    "ResponsePlan",
    "State",
    "build_request_head",
    "guard_pin",
    "may_retry",
    "plan_response",
]

_INF: Final = math.inf


# The states as plain int constants (mypyc inlines Final ints: a state test is one machine
# comparison on the hot path); `State` names them for people, logs and tests.
START: Final = 0  # created, nothing decided
BUFFERING: Final = 1  # the request body is read before the first attempt (failover needs it)
GUARD: Final = 2  # waiting for the guard's answer (reservation or session check)
CONNECTING: Final = 3  # a node was chosen; waiting for a connection to it
WAITING: Final = 4  # the request went to the node; waiting for its response head
STREAMING: Final = 5  # the response head is committed (by a node or the proxy itself)
TUNNEL: Final = 6  # 101 Switching Protocols: bytes are piped both ways
DONE: Final = 7  # finished, refused, failed or abandoned: events are ignored


class State(enum.IntEnum):
    """Where one exchange is (see TRANSITIONS); equal to the int constants above."""

    START = 0
    BUFFERING = 1
    GUARD = 2
    CONNECTING = 3
    WAITING = 4
    STREAMING = 5
    TUNNEL = 6
    DONE = 7


S = State
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    # START -> STREAMING: an answer the proxy makes itself (served_locally: health, static).
    S.START: frozenset({S.BUFFERING, S.GUARD, S.CONNECTING, S.STREAMING, S.DONE}),
    S.BUFFERING: frozenset({S.GUARD, S.CONNECTING, S.DONE}),
    S.GUARD: frozenset({S.CONNECTING, S.DONE}),
    S.CONNECTING: frozenset({S.WAITING, S.CONNECTING, S.DONE}),
    S.WAITING: frozenset({S.CONNECTING, S.STREAMING, S.DONE}),
    S.STREAMING: frozenset({S.TUNNEL, S.DONE}),
    S.TUNNEL: frozenset({S.DONE}),
    S.DONE: frozenset(),
}
# TRANSITIONS as a table of allowed[state][next] (what _go tests: two indexings, which the
# interpreter specialises, where a bit mask's shift and "and" are two generic number calls).
_ALLOWED: Final[tuple[tuple[bool, ...], ...]] = tuple(
    tuple(State(n) in TRANSITIONS[State(i)] for n in range(8)) for i in range(8)
)


class ExchangeError(Exception):
    """A state change TRANSITIONS does not allow (a bug in an adapter or in the core)."""


# Decisions (Exchange.actions: (kind, argument)).
A_CONNECT: Final = 1  # (node index, connect timeout): take a pooled connection or open one
A_MARK_FAILED: Final = 2  # (node index, reason, maintenance): passive health failure
A_NODE_DONE: Final = 3  # keep: bool — release the current node connection to its pool, or close
A_NODE_TIMER: Final = 4  # (idle timeout or 0, absolute deadline): the node connection's timer
# The node side's decisions are the kinds 1..A_NODE_LAST, carried out by upstream.node_action
# for both client adapters (one comparison tells them from the client side's).
A_NODE_LAST: Final = 4
A_LOCAL: Final = 5  # (status, extra header bytes, retry_page): answer from the proxy and close
A_FINISH: Final = 6  # close: bool — complete: one access-log line, then next request or close
A_ABORT_CLIENT: Final = 7  # None — cut the client connection (truncated response)
A_CLOSE_CLIENT: Final = 8  # None — close the client after what is queued
A_TUNNEL: Final = 9  # None — 101 relayed: pipe bytes both ways from now on
A_LOG: Final = 10  # truncated: bool — one access-log line
A_ASK_SESSION: Final = 11  # token — guard.session_known -> guard_session(known)
A_RESERVE_PIN: Final = 12  # (alias, ttl) — guard.reserve_pin -> guard_admitted(ticket, retry)
A_SETTLE_PIN: Final = 13  # (ticket, alias, pin, failed)
A_REMEMBER: Final = 14  # (token, lifetime)
A_RECORD_FAILURE: Final = 15  # (alias, pin)
A_NO_TUNNEL: Final = 16  # None — the node declined the client's upgrade
# The two decisions every proxied response ends with, made once: equal to the tuples they
# stand for, without building two tuples per response.
_DONE_KEEP: Final = (A_NODE_DONE, True)
_DONE_CLOSE: Final = (A_NODE_DONE, False)
_FINISH_KEEP: Final = (A_FINISH, False)
_FINISH_CLOSE: Final = (A_FINISH, True)

# RFC 9110 §7.6.1 / RFC 9112 §9.6: hop-by-hop fields, never forwarded. Content-Length is
# handled separately (re-emitted from the parsed value). X-Real-IP/X-Forwarded-Proto from the
# client are dropped because the proxy sets them (a client must not choose its own address).
_REQ_DROP: Final = frozenset(
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
_FORWARDING: Final = frozenset(
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
# Guard (SPEC §4): a request_token call must come back uncompressed so that its 403 "Invalid
# PIN" can be read and counted; forwarding the client's Accept-Encoding would let an attacker
# ask for gzip and hide every failure from the guard.
_REQ_DROP_PIN: Final = _REQ_DROP | {b"accept-encoding"}
_REQ_DROP_UNTRUSTED: Final = _REQ_DROP | _FORWARDING
_REQ_DROP_PIN_UNTRUSTED: Final = _REQ_DROP_PIN | _FORWARDING
_RESP_DROP: Final = frozenset(
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
# What plan_response does with each response header, by its name as the node spelt it
# (memoised: nodes send the same dozen names in the same spelling on every response, so one
# dict lookup replaces a lower() and a chain of comparisons).
# (Final, as every module constant of the compiled modules: read from a C static or inlined
# instead of looked up in the module's dict on each use.)
_R_PASS: Final = 0
_R_DROP: Final = 1
_R_TRANSFER_ENCODING: Final = 2
_R_CONNECTION: Final = 3
_R_CONTENT_LENGTH: Final = 4
_R_CONTENT_TYPE: Final = 5
_R_CSP: Final = 6
_RESP_KINDS: Final[dict[bytes, int]] = {}
_RESP_SPECIAL: Final = {
    b"transfer-encoding": _R_TRANSFER_ENCODING,
    b"connection": _R_CONNECTION,
    b"content-length": _R_CONTENT_LENGTH,
    b"content-type": _R_CONTENT_TYPE,
    b"content-security-policy": _R_CSP,
}


# Whether a name of each length may be one _resp_kind does not pass through as it is: a name
# of any other length is _R_PASS without the memo's lookup, which hashes the name (a new bytes
# object per header): Server, Date, ETag, Vary... as nodes send them. (A tuple indexed by the
# length: cheap in both builds, where a set lookup costs the compiled build nearly what it
# saves and a bit mask's shift is a generic long operation, interpreted.)
_KIND_LENGTHS: Final[tuple[bool, ...]] = tuple(
    any(len(k) == n for k in (*_RESP_SPECIAL, *_RESP_DROP))
    for n in range(1 + max(len(k) for k in (*_RESP_SPECIAL, *_RESP_DROP)))
)
_KIND_LENGTHS_N: Final = len(_KIND_LENGTHS)


def _resp_kind(name: bytes) -> int:
    lname = name.lower()
    kind = _RESP_SPECIAL.get(lname)
    if kind is None:
        kind = _R_DROP if lname in _RESP_DROP else _R_PASS
    if len(_RESP_KINDS) >= 1024:
        _RESP_KINDS.clear()  # a node inventing header names only loses the shortcut
    _RESP_KINDS[name] = kind
    return kind


# The node statuses as the access log shows them, one str object per status: the log's memo of
# formatted fields (accesslog.AccessLog.log) then hashes a string it has seen before.
_STATUS_TEXT: Final[list[str]] = [str(i) for i in range(600)]


# $upstream_response_time texts by whole milliseconds (nginx logs seconds with three decimals),
# made once each (at most 10,001 of them: longer attempts, SSE streams and long polls, are
# formatted each time): formatting a float per attempt cost as much as the access-log line.
_MS_TEXT: Final[dict[int, str]] = {}


def seconds_text(seconds: float) -> str:
    """`seconds` as nginx's $upstream_response_time: "0.012" (milliseconds, rounded)."""
    x = seconds * 1000.0
    ms = int(x + 0.5)  # (x rounded half up; ms - x is then in (-0.5, 0.5])
    # Near a tie (within a millionth of a millisecond) x's own rounding error could round the
    # other way than "%.3f" does: formatted exactly, as is anything outside 0-10 s.
    if 0.0 <= x < 10000.0 and -0.499999 <= ms - x <= 0.499999:
        text = _MS_TEXT.get(ms)
        if text is None:
            text = _MS_TEXT[ms] = f"{ms // 1000}.{ms % 1000:03d}"
        return text
    return f"{seconds:.3f}"


RETRY_STATUSES: Final = frozenset({500, 502, 503, 504})
_PIN_BUFFER_LIMIT: Final = 64 * 1024


class ExchangeSettings:
    """What the core reads from the configuration, made once per worker (plain data)."""

    __slots__ = (
        "api_connect_timeout",
        "ban_status",
        "connect_timeout",
        "csp_line",
        "fqdn",
        "guard",
        "netlocs",
        "nodes",
        "pool",
        "read_timeout",
        "request_buffer",
        "sse_lifetime",
    )

    def __init__(
        self,
        *,
        nodes: Balancer,
        netlocs: list[str],
        fqdn: bytes,
        connect_timeout: float = 5.0,
        api_connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        sse_lifetime: float = 3600.0,
        csp_line: bytes = b"",
        request_buffer: int = 64 * 1024,
        guard: bool = False,
        ban_status: int = 429,
        pool: int = 0,
    ) -> None:
        self.nodes = nodes
        self.pool = pool  # index of its node pool (proxy/pools.py), for per-pool counters
        self.netlocs = netlocs
        self.fqdn = fqdn
        self.connect_timeout = connect_timeout
        self.api_connect_timeout = api_connect_timeout
        self.read_timeout = read_timeout
        self.sse_lifetime = sse_lifetime
        self.csp_line = csp_line
        self.request_buffer = request_buffer
        self.guard = guard
        self.ban_status = ban_status


# -- pure functions -------------------------------------------------------------------------------


def build_request_head(
    req: Request,
    client_ip: str,
    peer: str,
    trusted: bool,
    guarded: bool,
    upgrading: bool,
    fqdn: bytes,
) -> bytes:
    """The request head for the nodes (built once, replayed on failover). `guarded`: a PIN or
    token call the guard reads (Accept-Encoding dropped); `trusted`: the peer is a trusted
    balancer (its forwarding headers pass)."""
    if guarded:
        drop = _REQ_DROP_PIN if trusted else _REQ_DROP_PIN_UNTRUSTED
    else:
        drop = _REQ_DROP if trusted else _REQ_DROP_UNTRUSTED
    if req.conn_tokens is not None:
        # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop too.
        drop = drop | frozenset(t.strip() for t in req.conn_tokens.split(b","))
    parts = [req.method, b" ", req.target.encode(), b" HTTP/1.1\r\n"]
    # (one append per part, here and in _plan: the compiled build appends natively, where
    # `parts += (a, b, c, d)` makes a tuple and extends through the generic sequence protocol;
    # the interpreter specialises list.append too)
    for lname, name, value in req.headers:
        if lname in drop:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if req.host is None:
        parts.append(b"Host: " + fqdn + b"\r\n")
    # (without trusted_proxies the client's address is the peer's: encoded once)
    peer_b = peer.encode()
    parts.append(b"X-Real-IP: ")
    parts.append(peer_b if client_ip is peer else client_ip.encode())
    parts.append(b"\r\nX-Forwarded-For: ")
    if req.xff is not None:
        parts.append(req.xff)
        parts.append(b", ")
    parts.append(peer_b)
    parts.append(b"\r\nX-Forwarded-Proto: https\r\n")
    if upgrading:
        parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    if req.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        parts.append(b"Content-Length: ")
        parts.append(req.content_length.strip())
        parts.append(b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def guard_pin(req: Request) -> str | None:
    """The PIN a request_token shows the node, as the guard hashes it (guard.distinct_pins
    counts a repeated wrong PIN once); None when the node does not get a `pin` field.

    The adapters join repeated `pin` fields (a node may read the first, the last or all of
    them), so every PIN the node could read is in the hash. A `pin` named in `Connection` is
    hop-by-hop (RFC 9110 §7.6.1) and is not forwarded (build_request_head), so the node reads
    its PIN from somewhere else (nodesim: the JSON body): hashing the dropped field let one
    constant `pin` header make every guess "the same PIN" and escape distinct_pins' count.
    None makes each failure count on its own."""
    pin = req.pin
    if pin is None:
        return None
    tokens = req.conn_tokens
    if tokens is not None and b"pin" in [t.strip() for t in tokens.split(b",")]:
        return None
    return pin.decode("latin-1")


def may_retry(
    status: int | None, *, committed: bool, body_complete: bool, retained: bool, more: bool
) -> bool:
    """SPEC §2 failover policy: retry on the next node after a connect error/timeout or a lost
    connection (`status` None) or a 500/502/503/504 head, for any method (POST included), only
    while nothing was sent to the client (`committed`), the request body is still held whole
    (`retained`; for a head, also fully read: `body_complete`) and another node is left
    (`more`)."""
    if committed or not retained or not more:
        return False
    if status is None:
        return True
    return status in RETRY_STATUSES and body_complete


class ResponsePlan:
    """What to send the client for a node's response head (see plan_response)."""

    __slots__ = ("chunked", "close", "head", "sse", "until_close")

    def __init__(
        self, head: bytes, *, chunked: bool, until_close: bool, close: bool, sse: bool
    ) -> None:
        self.head = head  # the complete head for the client (HTTP/1.1 bytes)
        self.chunked = chunked  # re-frame the body as chunked to the client
        self.until_close = until_close  # the node delimits the body by closing (RFC 9112 §6.3)
        self.close = close  # close the client connection after this response (it says so)
        self.sse = sse  # text/event-stream: no read timeout, a lifetime instead


def _filter(
    status: int, headers: list[tuple[bytes, bytes]], extra: frozenset[bytes]
) -> list[bytes]:
    out = [status_line(status)]
    for name, value in headers:
        lname = name.lower()
        if lname in _RESP_DROP or lname in extra:
            continue
        out += (name, b": ", value, b"\r\n")
    return out


def plan_response(
    status: int,
    headers: list[tuple[bytes, bytes]],
    *,
    head_only: bool,
    version: str,
    keep_alive: bool,
    csp_line: bytes,
    close: bool = False,
) -> ResponsePlan:
    """The client's response head for a node's non-1xx, non-101 head: hop-by-hop fields dropped
    (RFC 9110 §7.6.1, including those Connection names), the CSP added when the node sent none,
    framing chosen (RFC 9112 §6.3: Content-Length kept; else chunked to 1.1 clients, or close
    to 1.0 ones), Connection for the client's keep-alive. An empty head: the node used a
    transfer coding other than chunked, which cannot be passed on (Exchange: 502)."""
    head, chunked, until_close, close, sse = _plan(
        status, headers, head_only, version, keep_alive, csp_line, close
    )
    return ResponsePlan(head, chunked=chunked, until_close=until_close, close=close, sse=sse)


def _plan(
    status: int,
    headers: list[tuple[bytes, bytes]],
    head_only: bool,
    version: str,
    keep_alive: bool,
    csp_line: bytes,
    close: bool,
) -> tuple[bytes, bool, bool, bool, bool]:
    """plan_response as a tuple (head, chunked, until_close, close, sse), which is what
    Exchange.response_head calls: positional arguments and no ResponsePlan object are two
    calls fewer per proxied response in the interpreted build."""
    parts = [STATUS_LINES.get(status) or status_line(status)]
    has_csp = False
    chunked_in = False
    sse = False
    length: bytes | None = None
    extra: frozenset[bytes] | None = None
    kinds = _RESP_KINDS
    for name, value in headers:
        n = len(name)
        if n < _KIND_LENGTHS_N and _KIND_LENGTHS[n]:
            kind = kinds.get(name)
            if kind is None:
                kind = _resp_kind(name)
        else:
            kind = _R_PASS
        # (the kinds in the order of how often a response has them: each comparison passed
        # is a few bytecodes per header in the interpreted build)
        # (what a kind needs besides being forwarded; the kinds that are not forwarded go
        # to the next header)
        if kind == _R_PASS:
            pass
        elif kind == _R_CONTENT_LENGTH:
            length = value
        elif kind == _R_CONTENT_TYPE:
            # RFC 9110 §8.3.1: the type and subtype are case-insensitive. (Its sixth byte
            # first, "e" or "E": no slice and lower() for text/html, application/json, ...)
            if (
                len(value) >= 17
                and value[5] | 0x20 == 0x65
                and value[:17].lower() == b"text/event-stream"
            ):
                sse = True
        elif kind == _R_CONNECTION:
            # (the usual values, as nodes spell them, without a lower() first)
            if value != b"keep-alive" and value != b"close":
                v = value.lower()
                if v != b"keep-alive" and v != b"close":  # the usual values: nothing named
                    toks = frozenset(x.strip() for x in v.split(b","))
                    extra = toks if extra is None else extra | toks
            continue
        elif kind == _R_TRANSFER_ENCODING:
            if value != b"chunked" and value.strip().lower() != b"chunked":
                return b"", False, False, close, False  # (response_head refuses it)
            chunked_in = True
            continue
        elif kind == _R_CSP:
            has_csp = True
        else:  # _R_DROP: hop-by-hop, never forwarded
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if extra is not None and extra - {b"keep-alive", b"close", b"upgrade"}:
        parts = _filter(status, headers, extra)
    if csp_line and not has_csp:
        parts.append(csp_line)
    chunked = until_close = False
    if not (head_only or status in (204, 304)) and length is None:
        until_close = not chunked_in
        if version == "1.0":
            close = True
        elif version != "2.0":  # HTTP/2 (proxy/h2.py) frames the body itself: DATA frames
            chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
    if close or not keep_alive:
        close = True  # (A_FINISH then says so: the core decides, not only the head)
        parts.append(b"Connection: close\r\n\r\n")
    elif version == "1.0":
        parts.append(b"Connection: keep-alive\r\n\r\n")  # RFC 9112 §9.3: 1.0 must be told
    else:
        parts.append(b"\r\n")
    return b"".join(parts), chunked, until_close, close, sse


def _upgrade_head(status: int, headers: list[tuple[bytes, bytes]], csp_line: bytes) -> bytes:
    parts = [status_line(status)]
    has_csp = False
    for name, value in headers:
        lname = name.lower()
        if lname in _RESP_DROP:
            continue
        if lname == b"content-security-policy":
            has_csp = True
        parts += (name, b": ", value, b"\r\n")
    if csp_line and not has_csp:
        parts.append(csp_line)
    parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    return b"".join(parts)


# -- the exchange -------------------------------------------------------------------------------


class Exchange:
    """One request's journey: attempts on nodes, then the response streamed to the client."""

    __slots__ = (
        "actions",
        "addrs",
        "banned",
        "chunked_out",
        "client_ip",
        "close_after",
        "committed",
        "got_bytes",
        "head",
        "head_only",
        "head_out",
        "informational",
        "node",
        "peer",
        "pin_alias",
        "pin_buf",
        "req",
        "reused",
        "seek_session",
        "sent",
        "settings",
        "sse",
        "start_time",
        "state",
        "static_length",
        "status",
        "statuses",
        "ticket",
        "times",
        "to_client",
        "to_node",
        "token_call",
        "tried",
        "trusted",
        "until_close",
        "upgrade_requested",
        "upgrading",
        "upstream_time",
    )

    def __init__(
        self,
        settings: ExchangeSettings,
        req: Request,
        client_ip: str,
        peer: str,
        trusted: bool = False,
        now: float = 0.0,
    ) -> None:
        self.settings = settings
        self.req = req
        self.client_ip = client_ip
        self.peer = peer
        self.trusted = trusted
        self.state: int = START  # a State
        self.to_client: list[bytes] = []
        self.to_node: list[bytes] = []
        self.actions: list[tuple[int, Any]] = []
        self.node = -1
        self.tried = 0
        # After a node answered 403 to a request carrying a conference token: the token may
        # belong to another node (one in maintenance keeps its sessions), so look there too.
        self.seek_session = False
        self.committed = False
        self.status = 0
        self.sent = 0
        self.chunked_out = False
        self.close_after = False
        self.head_only = req.method == b"HEAD"
        self.sse = False
        self.informational = False
        self.upgrading = req.websocket and req.method == b"GET"
        self.upgrade_requested = False
        self.addrs: list[str] = []
        self.statuses: list[str] = []
        self.times: list[str] = []
        self.start_time = now
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
        self.until_close = False
        # The current node connection: a reused keep-alive one; any response bytes on it yet.
        self.reused = False
        self.got_bytes = False

    @property
    def dead(self) -> bool:
        return self.state == DONE

    def _go(self, new: int) -> None:
        if not _ALLOWED[self.state][new]:
            raise ExchangeError(
                f"exchange: {State(self.state).name} -> {State(new).name} is not allowed"
            )
        self.state = new

    def _end(self) -> None:
        # Every state may end (TRANSITIONS); ending twice is no change (a 101 nobody asked for
        # ends the exchange at its head, then the parser's upgrade ends it again).
        if self.state != DONE:
            self._go(DONE)

    # -- request side ---------------------------------------------------------------------------

    def start(self, now: float, buffer_body: bool, banned: float | None = None) -> None:
        """The request head was vetted: wait for a small body (`buffer_body`) or attempt.
        `banned`: the guard's verdict on the client's address, seconds of ban left (None: not
        banned); a banned address's token-bearing request is checked with the guard first."""
        self.banned = banned
        if buffer_body:
            self._go(BUFFERING)
            return
        self.attempt(now)

    def attempt(self, now: float) -> None:
        """Send the request to the next node, or answer the error page when none is left."""
        st = self.settings
        req = self.req
        if not self.head:
            path = req.target
            if st.guard and req.method == b"POST" and "_token" in path.lower():
                self.pin_alias = pin_alias(path)
                self.token_call = token_call(path) is not None
            self.head = build_request_head(  # (positional: the cheaper call, interpreted)
                req,
                self.client_ip,
                self.peer,
                self.trusted,
                st.guard and (self.pin_alias is not None or self.token_call),
                self.upgrading,
                st.fqdn,
            )
            if st.guard and self._ask_guard(path):
                return  # guard_session / guard_admitted call attempt again
        nodes = st.nodes
        if self.seek_session:
            i = nodes.pick_serving(self.client_ip, self.tried)
        else:
            i = nodes.pick(self.client_ip, self.tried)
        if i is None:
            if self.tried:
                status = 504 if self.statuses and self.statuses[-1] == "504" else 502
            else:
                status = 503
                self._settle(False)  # nothing went out: give the reservation back
            self._end()
            self.actions.append((A_LOCAL, (status, b"", True)))
            return
        self._go(CONNECTING)
        self.tried |= 1 << i
        self.node = i
        nodes.active[i] += 1
        self.addrs.append(st.netlocs[i])
        self.upstream_time = now
        timeout = st.api_connect_timeout if req.target.startswith("/api") else st.connect_timeout
        self.actions.append((A_CONNECT, (i, timeout)))

    def request_body(self, body: bytes, now: float) -> None:
        """A request body chunk (already counted against the body limit by the adapter)."""
        req = self.req
        if req.retain:
            req.body.append(body)
        state = self.state
        if state == BUFFERING:
            if req.body_size > self.settings.request_buffer:
                # Too big to hold back: stream from here (retained chunks go first).
                self.attempt(now)
            return
        if WAITING <= state <= STREAMING:
            if req.chunked:
                self.to_node.append(b"".join((b"%x\r\n" % len(body), body, b"\r\n")))
            else:
                self.to_node.append(body)
        # otherwise retained in req.body; sent when a connection is ready

    def request_end(self, now: float) -> None:
        req = self.req
        req.complete = True
        state = self.state
        if state == BUFFERING:
            self.attempt(now)  # the whole buffered body goes out with the head
            return
        if req.chunked and WAITING <= state <= STREAMING:
            self.to_node.append(b"0\r\n\r\n")
        if self.committed:
            req.body = []

    # -- guard (docs/GUARD.md "Guesses in flight", confedge.guard.inflight) ---------------------

    def _ask_guard(self, path: str) -> bool:
        """Before anything goes to a node: a banned address passes only with a token a node
        issued to it (and never for request_token, which is a guess whatever it carries); a
        request_token needs a reservation. True when the guard's answer is awaited."""
        st = self.settings
        if self.banned is not None:
            token = session_token(self.req.headers, self.req.url)
            if token is None or pin_alias(path) is not None:
                self._refuse(st.ban_status, self.banned)
            else:
                self._go(GUARD)
                self.actions.append((A_ASK_SESSION, token))
            return True
        if self.pin_alias is not None:
            # The longest the proxy may wait for the answer (every node tried once): an
            # unanswered reservation lapses no earlier, so a late answer is still counted.
            ttl = (st.nodes.hi - st.nodes.lo) * (st.api_connect_timeout + st.read_timeout)
            self._go(GUARD)
            self.actions.append((A_RESERVE_PIN, (self.pin_alias, ttl)))
            return True
        return False

    def guard_session(self, known: bool, now: float) -> None:
        if self.state != GUARD:
            return
        if not known:
            self._refuse(self.settings.ban_status, self.banned or 1.0)
            return
        self.banned = None
        self.attempt(now)

    def guard_admitted(self, ticket: str | None, retry_after: float, now: float) -> None:
        self.ticket = ticket
        if self.state != GUARD:
            self._settle(False)  # the client left while we asked
            return
        if ticket is None:
            self._refuse(429, retry_after)
            return
        self.attempt(now)

    def _refuse(self, status: int, retry_after: float) -> None:
        self._end()
        extra = b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after))
        self.actions.append((A_LOCAL, (status, extra, False)))

    def _settle(self, failed: bool) -> None:
        """Hand the reservation back to the guard: answered (`failed`: Invalid PIN), never
        sent, or abandoned by the client (_settle_abandoned). One whose answer never comes
        otherwise (a silent node, a crashed worker) is left to lapse (guard.inflight)."""
        ticket, self.ticket = self.ticket, None
        if ticket is None:
            return
        self.actions.append(
            (A_SETTLE_PIN, (ticket, self.pin_alias or "", guard_pin(self.req), failed))
        )

    def _settle_abandoned(self) -> None:
        """The client left (a closed connection, an HTTP/2 RST_STREAM) or was cut off before
        its request_token's answer was complete: settle the reservation now instead of leaving
        it to lapse (docs/GUARD.md "Guesses in flight").

        Why: the node connection is closed with the client (A_NODE_DONE), so no late answer
        can come; but the node may already have judged the PIN. Left to lapse, each such
        reservation held an address slot and a conference slot (`inflight_per_conference`)
        for `ttl`, 140 s by default, and counted no failure: a few addresses that sent a
        request_token and hung up at once locked a conference's real participants out of
        joining (429) indefinitely, and each hung-up guess escaped the count (while a right
        one still joined the conference, where a participant sees it). So a complete
        request that reached a node counts as a wrong PIN unless the answer's head already
        said otherwise (a non-403); one that never went out, or went out without its whole
        body (no node can have judged it), is just given back.
        """
        if self.ticket is None:
            return
        state = self.state
        judged = self.req.complete and (
            state == WAITING or (state == STREAMING and self.status == 403)
        )
        self._settle(judged)

    # -- node connection ------------------------------------------------------------------------

    def node_connected(self, now: float, reused: bool = False) -> None:
        """A connection to the chosen node is ready: the head and the retained body go out."""
        self._go(WAITING)  # (the adapter keeps a connection that came too late)
        self.reused = reused
        self.got_bytes = False
        st = self.settings
        self.actions.append((A_NODE_TIMER, (st.read_timeout, now + st.read_timeout)))
        req = self.req
        if req.chunked:
            parts = [self.head]
            for chunk in req.body:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            if req.complete:
                parts.append(b"0\r\n\r\n")
            self.to_node.append(b"".join(parts))
        elif req.body:
            self.to_node.append(b"".join([self.head, *req.body]))
        else:
            self.to_node.append(self.head)

    def node_connect_failed(self, i: int, reason: str, now: float) -> None:
        self.actions.append((A_MARK_FAILED, (i, reason, False)))
        if self.state != CONNECTING:
            return
        self._retry("502", now)

    # -- failures -------------------------------------------------------------------------------

    def _release_attempt(self, now: float) -> None:
        node = self.node
        if node >= 0:
            self.settings.nodes.active[node] -= 1
            self.times.append(seconds_text(now - self.upstream_time))
            self.node = -1

    def _retry(self, reason_status: str, now: float) -> None:
        self.statuses.append(reason_status)
        self._release_attempt(now)
        if not self.req.retain:
            self._end()
            self.actions.append((A_ABORT_CLIENT, None))
            return
        self.attempt(now)  # WAITING/CONNECTING -> CONNECTING (or DONE when no node is left)

    def node_lost(self, now: float, *, got_bytes: bool = True) -> None:
        """The node's connection closed while this exchange used it (`got_bytes`: it had sent
        something since the request went out)."""
        state = self.state
        if state in (DONE, CONNECTING):
            return
        if state == TUNNEL:
            self._end()
            self._release_attempt(now)
            self.actions.append((A_CLOSE_CLIENT, None))
            return
        if self.committed:
            if self.until_close:
                # RFC 9112 §6.3 item 8: the body was delimited by the close.
                self.response_end(False, now)
                return
            # Truncated response: the client must notice, so close without a clean end.
            self._release_attempt(now)
            self._end()
            self.actions.append((A_ABORT_CLIENT, None))
            self.actions.append((A_LOG, True))
            return
        if self.reused and not got_bytes and not self.got_bytes:
            # A keep-alive connection the node had already closed: not the node's fault, replay
            # on a fresh connection to the same node (RFC 9112 §9.3.1 allows this retry).
            self.tried &= ~(1 << self.node)
            self._release_attempt(now)
            self.addrs.pop()
            self.times.pop()
            self.attempt(now)
            return
        self.actions.append(
            (A_MARK_FAILED, (self.node, "connection closed before a response", False))
        )
        self._retry("502", now)

    def node_failed(self, reason: str, now: float) -> None:
        """The node's response could not be parsed (the adapter closed the connection)."""
        if self.state in (DONE, CONNECTING):
            # CONNECTING: the exchange already left this connection in the same read (a
            # 5xx or 403 retried, an invalid head) and the bytes after that head were bad;
            # the next attempt's node did nothing wrong.
            return
        if self.committed:
            self._end()
            self._release_attempt(now)
            self.actions.append((A_ABORT_CLIENT, None))
            return
        self.actions.append((A_MARK_FAILED, (self.node, reason, False)))
        self._retry("502", now)

    def node_timeout(self, now: float) -> None:
        """The node timer (A_NODE_TIMER) expired."""
        if self.state == DONE:
            return
        self.actions.append((A_NODE_DONE, False))
        if self.committed:
            # SSE lifetime reached or a node stalled mid-body: end the response.
            self._end()
            self._release_attempt(now)
            self.actions.append((A_ABORT_CLIENT, None))
            self.actions.append((A_LOG, True))
            return
        self.actions.append(
            (A_MARK_FAILED, (self.node, "no response within proxy.read_timeout", False))
        )
        self._retry("504", now)

    def client_cancelled(self, now: float) -> None:
        """The client side failed (refusal, timeout) before the response: drop the attempt."""
        if self.state == DONE:
            return
        had_node = self.state in (WAITING, STREAMING, TUNNEL)
        self._settle_abandoned()
        self._end()
        self._release_attempt(now)
        if had_node:
            self.actions.append((A_NODE_DONE, False))

    def client_lost(self, now: float) -> None:
        if self.state == DONE:
            return
        had_node = self.state in (WAITING, STREAMING, TUNNEL)
        self._settle_abandoned()
        self._end()
        self._release_attempt(now)
        if had_node:
            self.actions.append((A_NODE_DONE, False))
        if not self.committed or self.status:
            self.actions.append((A_LOG, True))

    # -- response side --------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], now: float) -> None:
        if self.state != WAITING:
            return
        self.got_bytes = True
        st = self.settings
        req = self.req
        # (`text`: the status as the access log shows it, taken with the tests made anyway)
        if status < 200:
            if status >= 100 and status != 101:
                self.informational = True  # RFC 9110 §15.2: 1xx are not forwarded
                return
            if status != 101 or not self.upgrading:
                # RFC 9110 §15: a status outside 100-599 is invalid; §15.2.2: a server must
                # not switch protocols unless the request asked (Upgrade).
                self._invalid_response(
                    "101 without an upgrade request" if status == 101 else f"status {status}",
                    now,
                )
                return
            text = "101"
        elif status < 300:
            text = _STATUS_TEXT[status]  # (the usual answer: one test fewer than below)
        elif status > 599:
            self._invalid_response(f"status {status}", now)
            return
        elif status in RETRY_STATUSES:
            if status != 500:
                self.actions.append(
                    (A_MARK_FAILED, (self.node, f"answered {status}", status == 503))
                )
            if may_retry(
                status,
                committed=False,
                body_complete=req.complete,
                retained=req.retain,
                more=st.nodes.pick(self.client_ip, self.tried) is not None,
            ):
                self.actions.append((A_NODE_DONE, False))
                self._retry(str(status), now)
                return
        elif (
            status == 403
            and req.complete
            and req.retain
            and (req.session or b"?token=" in req.url or b"&token=" in req.url)
            # Never for a join: each retry would be one more PIN guess on another node.
            and "request_token" not in req.target.lower()
            and st.nodes.pick_serving(self.client_ip, self.tried) is not None
        ):
            # A token is valid only on the node that issued it. ip-hash normally sends a
            # client's requests there, but not while that node is in maintenance (it refuses
            # new joins, yet keeps its calls, as a real node does) or after its clients were
            # rebalanced. So a 403 to a token-bearing request is retried on the other nodes
            # that still hold sessions, maintenance ones included; the last 403 reaches the
            # client when the token is truly invalid. Stateless, so every worker agrees.
            self.actions.append((A_NODE_DONE, False))
            self.seek_session = True
            self._retry("403", now)
            return
        if status >= 300:
            text = _STATUS_TEXT[status]
        if status == 101:  # (asked for: see above)
            self._commit(status, text)
            self.to_client.append(_upgrade_head(status, headers, st.csp_line))
            return
        declined = self.upgrade_requested
        head, chunked_out, until_close, close_after, sse = _plan(
            status, headers, self.head_only, req.version, req.keep_alive, st.csp_line, declined
        )
        if not head:
            # RFC 9112 §6.1: a transfer coding other than chunked, which the proxy cannot
            # take off and must not pass on as if the body were not coded (nginx: 502).
            self._invalid_response("a transfer coding other than chunked", now)
            return
        # (_commit, inlined: once per proxied response)
        self._go(STREAMING)
        self.status = status
        self.statuses.append(text)
        self.committed = True
        req.retain = False
        if req.complete and req.body:  # (an empty list stays: no new one per response)
            req.body = []
        self.chunked_out = chunked_out
        self.until_close = until_close
        self.close_after = close_after
        self.upgrading = False
        if declined:
            # An upgrade the node declined: the client's stream is unusable after this.
            self.upgrade_requested = False
            self.actions.append((A_NO_TUNNEL, None))
        self.sse = sse
        if sse:
            self.actions.append((A_NODE_TIMER, (0.0, now + st.sse_lifetime)))
        if (self.pin_alias is not None and status == 403) or (self.token_call and status == 200):
            self.pin_buf = bytearray()
        if self.head_only:
            self.to_client.append(head)
            # httptools cannot be told a response answers HEAD, so it would wait for a body
            # of Content-Length bytes: finish now and retire the connection.
            self._complete(now, False)
        else:
            # Held back until the body's first bytes or the end of this read (flush_head).
            self.head_out = head

    def _commit(self, status: int, text: str) -> None:
        """The node's final head is accepted: it goes to the client, so no failover now."""
        self._go(STREAMING)
        self.status = status
        self.statuses.append(text)
        self.committed = True
        req = self.req
        req.retain = False
        if req.complete and req.body:  # (an empty list stays: no new one per response)
            req.body = []

    def _invalid_response(self, reason: str, now: float) -> None:
        """A response head the proxy must not pass on: like a response that cannot be parsed
        (node_failed: failover or 502), and the connection is closed (the adapter still has it)."""
        self.actions.append((A_NODE_DONE, False))
        self.node_failed(f"invalid response from node: {reason}", now)

    def client_upgrade(self) -> bool:
        """The client's parser stopped at an Upgrade request; True when it is this exchange's
        WebSocket upgrade (bytes after it wait for the node's 101)."""
        if self.upgrading and self.state != DONE:
            self.upgrade_requested = True
            return True
        return False

    def flush_head(self) -> None:
        """Queue a held-back response head (SSE: the head must not wait for the first event);
        the adapter calls this at the end of the read that carried the head."""
        head, self.head_out = self.head_out, None
        if head is not None:
            self.to_client.append(head)

    def response_body(self, body: bytes) -> None:
        if self.state != STREAMING:
            return
        self.sent += len(body)
        head = self.head_out
        if head is not None:
            self.head_out = None
            if self.chunked_out:
                self.to_client.append(b"".join((head, b"%x\r\n" % len(body), body, b"\r\n")))
            else:
                self.to_client.append(head + body)
        elif self.chunked_out:
            self.to_client.append(b"".join((b"%x\r\n" % len(body), body, b"\r\n")))
        else:
            self.to_client.append(body)
        pb = self.pin_buf
        if pb is not None and len(pb) < _PIN_BUFFER_LIMIT:
            pb += body

    def response_end(self, keep_alive: bool, now: float) -> None:
        """The node's response is complete; `keep_alive`: its connection may be reused."""
        if self.informational:
            self.informational = False
            return
        if self.state != STREAMING or self.status == 101:
            return  # a tunnel starts with node_upgraded
        head = self.head_out  # (usually None: the body's first bytes took it)
        if head is not None:
            self.head_out = None
            self.to_client.append(head + b"0\r\n\r\n" if self.chunked_out else head)
        elif self.chunked_out:
            self.to_client.append(b"0\r\n\r\n")
        self._complete(now, not self.until_close and keep_alive)

    def node_upgraded(self, rest: bytes, now: float) -> None:
        """The node switched protocols (101): pipe bytes both ways from now on."""
        if self.state in (DONE, CONNECTING):
            return  # (a 101 refused at its head: _invalid_response closed the connection)
        if self.status != 101 or not self.upgrade_requested or self.state != STREAMING:
            self._end()
            self.actions.append((A_NODE_DONE, False))
            self.actions.append((A_ABORT_CLIENT, None))
            return
        self._go(TUNNEL)
        self.actions.append((A_NODE_TIMER, (0.0, _INF)))
        if rest:
            self.to_client.append(rest)
        self.actions.append((A_TUNNEL, None))
        self.actions.append((A_LOG, False))

    def _complete(self, now: float, reuse: bool) -> None:
        """The response is complete: the node connection back to its pool (`reuse`, when the
        whole request went out too) or closed, the guard's part, then A_FINISH."""
        node = self.node
        if node >= 0:  # (_release_attempt, without the call: once per proxied response)
            self.settings.nodes.active[node] -= 1
            self.times.append(seconds_text(now - self.upstream_time))
            self.node = -1
        self.actions.append(_DONE_KEEP if reuse and self.req.complete else _DONE_CLOSE)
        if self.pin_buf is not None or self.ticket is not None:
            self._check_pin()
        self._go(DONE)  # (from STREAMING, always: _end's test is not needed)
        self.actions.append(_FINISH_CLOSE if self.close_after else _FINISH_KEEP)

    def _check_pin(self) -> None:
        """Guard API: a 403 "Invalid PIN" on request_token is a PIN failure (SPEC §4); a 200
        to request_token/refresh_token issues a token the guard remembers; either way the
        answer settles the request's reservation."""
        body = bytes(self.pin_buf) if self.pin_buf is not None else b""
        failed = False
        if self.status == 403 and self.pin_alias is not None:
            try:
                failed = json.loads(body).get("result") == "Invalid PIN"
            except (ValueError, AttributeError, RecursionError):
                failed = False
        elif self.status == 200 and self.token_call:
            issued = issued_token(body)
            if issued is not None:
                self.actions.append((A_REMEMBER, issued))
        if self.ticket is not None:
            self._settle(failed)
        elif failed and self.pin_alias is not None:
            self.actions.append((A_RECORD_FAILURE, (self.pin_alias, guard_pin(self.req))))

    # -- answers the proxy makes itself ---------------------------------------------------------

    def served_locally(self, status: int, length: int) -> None:
        """The proxy answers this request itself (health, a static file: proxy/static.py) with
        `length` body bytes: committed at once, no node; only counting and logging remain."""
        self._go(STREAMING)
        self.status = status
        self.committed = True
        self.static_length = length

    def local_body_sent(self, nbytes: int) -> None:
        """The adapter wrote `nbytes` more of a local answer's body (the access log's size;
        a short count at the end means a truncated file). No `now`: nothing is timed."""
        self.sent += nbytes

    def finish_local(self, keep: bool) -> None:
        self._end()
        self.actions.append((A_FINISH, not keep))
