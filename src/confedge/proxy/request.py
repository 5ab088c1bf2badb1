"""Request vetting, sans-I/O: which requests may reach a node, and the normalised target.

Theory of operation: the proxy is never an open proxy (SPEC §2). Every request target and Host
header passes through here before any upstream work; each refusal raises `Refused` carrying the
status to answer (h11 style: the error says which status it maps to). The functions are pure
and cheap on the common path (a target whose path has no `%`, `;`, `//` or `/.` is returned
unchanged after one scan), because they run for every request. What the path means is defined
once, in paths.py (`canonical_path`); this module adds the request-target forms around it.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote

from confedge.proxy.paths import BadPath, canonical_path

__all__ = [
    "ALLOWED_METHODS",
    "LOCAL_BANNED",
    "LOCAL_HEALTH",
    "LOCAL_NOT_ALLOWED",
    "LOCAL_STATIC",
    "MEMO_SIZE",
    "TO_NODE",
    "Refused",
    "Request",
    "canonical_length",
    "h2_fields_problem",
    "host_allowed",
    "normalise_peer",
    "normalise_target",
    "path_allowed",
    "pin_alias",
    "split_host",
]

# RFC 9110 §9: the methods a conferencing web app and its REST API use. CONNECT (a tunnel, §9.3.6)
# and TRACE (§9.3.8, reflects headers such as cookies) are refused with 405; anything else that
# the parser knows (WebDAV, PURGE, ...) with 501 (§15.6.2: method not recognised/implemented).
ALLOWED_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"}
)
NOT_ALLOWED_METHODS: Final = frozenset({b"CONNECT", b"TRACE", b"TRACK"})

# Entries kept by each memo of a pure check that every request repeats (the worker's Host checks,
# normalised targets and access-log request lines; the port-80 redirect's Location lines):
# bounded and emptied when full, so a client inventing values only loses the shortcut.
MEMO_SIZE: Final = 2048

# WorkerRuntime.triage: where a vetted request is answered (the same for both client adapters).
TO_NODE: Final = 0  # an exchange with a node
LOCAL_BANNED: Final = 1  # the guard's ban answer (WorkerRuntime.ban_answer)
LOCAL_HEALTH: Final = 2  # proxy.health_path (pages.health_response)
LOCAL_STATIC: Final = 3  # a [[proxy.static]] mount
LOCAL_NOT_ALLOWED: Final = 4  # 404: outside proxy.path_allowlist

# The query may hold "?" and "\\" (only the path is read as a file-system-like name).
_QUERY_CHARS = re.compile(r'[!"$-~]*')


class Refused(Exception):
    """A request that must not be forwarded; `status` is the answer (RFC 9110 §15.5/15.6)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def canonical_length(digits: bytes) -> bytes | None:
    """A Content-Length's digits as the number they spell, for both HTTP/1.1 and HTTP/2: leading
    zeros off (Python's int() refuses more than 4300 digits; RFC 9110 §8.6 asks for no overflow
    whatever the length); None past 18 digits, more than any body limit (the caller's 413).
    int() of a result is always safe."""
    value = digits.lstrip(b"0") or b"0"
    return value if len(value) <= 18 else None


def normalise_target(target: str) -> str:
    """Return the origin-form target to forward (normalised path + unchanged query).

    RFC 9112 §3.2: a server MUST accept absolute-form, but a reverse proxy that did so would be
    one step from an open proxy, so absolute-form and authority-form are refused here (400), as
    are asterisk-form and fragments. The query string is kept byte for byte: the node parses it.
    """
    if not target.startswith("/"):
        if target == "*":
            raise Refused(400, "asterisk-form target")
        raise Refused(400, "absolute-form or authority-form target (not an open proxy)")
    path, sep, query = target.partition("?")
    if "#" in target:
        raise Refused(400, "fragment in the request target")
    if sep and _QUERY_CHARS.fullmatch(query) is None:
        raise Refused(400, "invalid character in the query")
    try:
        canonical = canonical_path(path)
    except BadPath as exc:
        raise Refused(400, exc.reason) from None
    if canonical == path:
        return target  # already canonical: the client's own bytes go to the node
    return canonical + sep + query


def _is_port(text: str) -> bool:
    """RFC 3986 §3.2.3 port: ASCII digits (str.isdigit() alone also takes "²", "¹", ...)."""
    return text.isdigit() and text.isascii()


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """True when the Host header names this server (any port), per RFC 9110 §7.2.

    `allowed` holds lower-case names and addresses, IPv6 without brackets.
    """
    h = host.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        if end < 0:
            return False
        rest = h[end + 1 :]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return False
        return h[1:end] in allowed
    name, colon, port = h.rpartition(":")
    if colon:
        if not _is_port(port):
            return False
        h = name
    if h.endswith("."):
        h = h[:-1]
    return h in allowed


def split_host(host: str) -> str:
    """The Host header without its port ("[::1]:80" -> "[::1]", "a.b:80" -> "a.b")."""
    h = host.strip()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    name, colon, port = h.rpartition(":")
    return name if colon and _is_port(port) else h


def path_allowed(path: str, allowlist: tuple[str, ...]) -> bool:
    """Optional allowlist (proxy.path_allowlist): prefixes matched against the normalised path."""
    if not allowlist:
        return True
    p = path.partition("?")[0]
    return any(p.startswith(prefix) for prefix in allowlist)


_REQUEST_TOKEN = re.compile(r"/api/client/v2/conferences/([^/]+)/request_token/?")


def pin_alias(path: str) -> str | None:
    """The conference alias if `path` is a request_token call (guard API contract), else None.

    Case-insensitive, percent-decoded, dot-segments and "//" already removed by
    normalise_target; the trailing slash is ignored, and so are `;` parameters (RFC 3986 §3.3):
    a node that strips them reads `request_token;x` as `request_token`, and a guess must not
    escape the guard, nor its conference's count, by carrying one.
    """
    p = unquote(path.partition("?")[0]).lower()
    if ";" in p:
        p = "/".join([seg.partition(";")[0] for seg in p.split("/")])
    m = _REQUEST_TOKEN.fullmatch(p)
    return m.group(1) if m else None


class Request:
    """One parsed request; body chunks are kept while a failover may still replay them."""

    __slots__ = (
        "auth",
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
        "pin",
        "referer",
        "retain",
        "session",
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
        self.session = False
        self.referer: bytes | None = None
        self.ua: bytes | None = None
        self.auth: bytes | None = None  # the first Authorization value, for $remote_user only
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
        self.version = "1.1"


# RFC 9113 §8.2.1: a field name is lower-case visible ASCII (0x21-0x7e without 0x41-0x5a); these
# are the bytes bytes.translate deletes, so what is left of a name is what it may not contain.
_H2_NAME_CHARS: Final = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A)
# RFC 9113 §8.2.2: connection-specific fields, malformed in HTTP/2 (TE is handled apart).
_H2_CONNECTION_FIELDS: Final = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
# RFC 9113 §8.3.1 (and RFC 8441 §4's :protocol, which only a CONNECT request may carry).
_H2_REQUEST_PSEUDO: Final = frozenset(
    {b":method", b":scheme", b":authority", b":path", b":protocol"}
)


def h2_fields_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What makes an HTTP/2 request's header block malformed (RFC 9113 §8.1.1), or None.

    Why here and not in hyper-h2: its inbound validation checks every byte of every name and
    value in a Python loop, a sixth of its CPU per request (bench/proxy/h2floor.py); this does
    the same checks with bytes methods, compiled, and the adapter turns a problem into the same
    connection error (GOAWAY PROTOCOL_ERROR) hyper-h2 sent. The rules are those hyper-h2 4.4
    enforces for a request; tests/unit/test_proxy_h2_fields.py compares the two verdicts on
    generated header blocks.
    """
    seen: set[bytes] = set()
    regular = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        # §8.2.1: names
        if not name:
            return "empty field name"
        if name.translate(None, _H2_NAME_CHARS):
            return f"invalid character in field name {name!r}"
        if name[0] == 0x3A:  # ":" -- §8.3: pseudo-header fields
            if name.find(0x3A, 1) != -1:
                return f"invalid character in field name {name!r}"
            if regular:
                return f"pseudo-header field {name!r} after regular fields"
            if name in seen:
                return f"duplicate pseudo-header field {name!r}"
            if name not in _H2_REQUEST_PSEUDO:
                return f"pseudo-header field {name!r} not allowed in a request"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
        else:
            regular = True
            if 0x3A in name:
                return f"invalid character in field name {name!r}"
            if name in _H2_CONNECTION_FIELDS:
                return f"connection-specific field {name!r}"  # §8.2.2
            if name == b"te" and value.lower() != b"trailers":
                return f"TE other than trailers: {value!r}"  # §8.2.2
            if name == b"host":
                if host is not None:
                    return "more than one Host field"
                host = value
        # §8.2.1: values (an empty value is allowed)
        if value:
            # (ints: memchr; a one-byte bytes operand goes through the buffer protocol)
            if 0 in value or 0x0A in value or 0x0D in value:
                return f"invalid character in the value of {name!r}"
            first, last = value[0], value[-1]
            if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
                return f"whitespace around the value of {name!r}"
    # §8.3.1: the pseudo-header fields a request must (not) have
    if b":method" not in seen:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in seen or b":path" not in seen:
            return "no :scheme or no :path"
        if b":protocol" in seen and method != b"CONNECT":
            return ":protocol in a request other than CONNECT"
    # §8.3.1: :authority or Host, and the same when both are sent
    if authority is None and host is None:
        return "neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host differ"
    return None


def normalise_peer(peer: Any) -> str:
    """Peer address text (a transport's "peername"); IPv4-mapped IPv6 (dual-stack sockets)
    shown as IPv4, so the access log, the guard and X-Real-IP see one form of an address."""
    host = str(peer[0]) if isinstance(peer, tuple) else "unknown"
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host
