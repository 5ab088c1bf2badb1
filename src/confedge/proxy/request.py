"""Request vetting, sans-I/O: which requests may reach a node, and the normalised target.

Theory of operation: the proxy is never an open proxy (SPEC §2). Every request target and Host
header passes through here before any upstream work; each refusal raises `Refused` carrying the
status to answer (h11 style: the error says which status it maps to). The functions are pure
and cheap on the common path (a target with no `%`, `\\`, `//` or `/.` is returned unchanged
after one scan), because they run for every request.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = [
    "ALLOWED_METHODS",
    "Refused",
    "host_allowed",
    "normalise_target",
    "path_allowed",
    "pin_alias",
    "split_host",
]

# RFC 9110 §9: the methods a conferencing web app and its REST API use. CONNECT (a tunnel, §9.3.6)
# and TRACE (§9.3.8, reflects headers such as cookies) are refused with 405; anything else that
# the parser knows (WebDAV, PURGE, ...) with 501 (§15.6.2: method not recognised/implemented).
ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
NOT_ALLOWED_METHODS = frozenset({b"CONNECT", b"TRACE", b"TRACK"})

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Visible ASCII (RFC 9112 §3.2 targets have no spaces or controls) without "#" and, in the path,
# without "\\" (a separator for some back ends: the classic traversal bypass). Browsers send
# characters such as "|" or "[" raw, so the set is wider than RFC 3986 pchar on purpose.
_PATH_CHARS = re.compile(r'[!"$-\[\]-~]*')
_QUERY_CHARS = re.compile(r'[!"$-~]*')


class Refused(Exception):
    """A request that must not be forwarded; `status` is the answer (RFC 9110 §15.5/15.6)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _decode_unreserved(path: str) -> str:
    """RFC 3986 §6.2.2.2: decode percent-encoded unreserved characters; upper-case the rest.

    Encoded "/" (%2F), "\\" (%5C) and NUL (%00) are refused: they are how traversal and
    path-confusion attacks slip a separator past a proxy that checks the encoded form.
    """
    pieces = path.split("%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        hx = piece[:2]
        if len(hx) != 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise Refused(400, "bad percent-encoding in the path")
        code = int(hx, 16)
        if code in (0x2F, 0x5C, 0x00):
            raise Refused(400, f"encoded %{hx.upper()} in the path")
        ch = chr(code)
        if ch in _UNRESERVED:
            out.append(ch + piece[2:])
        else:
            out.append("%" + hx.upper() + piece[2:])
    return "".join(out)


def _remove_dots(path: str) -> str:
    """RFC 3986 §5.2.4 dot-segment removal ("." only: ".." is refused), "//" collapsed."""
    out: list[str] = []
    segments = path.split("/")
    last = segments[-1]
    for seg in segments[1:]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            # Browsers and HTTP libraries remove dot-segments before sending (RFC 3986 §5.2.4),
            # so a ".." (literal or %2e-encoded) on the wire is a probe: refused outright
            # rather than resolved, even when it would stay below "/".
            raise Refused(400, "'..' segment in the path")
        out.append(seg)
    if not out:
        return "/"
    trailing = last in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


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
    if _PATH_CHARS.fullmatch(path) is None:
        raise Refused(400, "invalid character in the path")
    if sep and _QUERY_CHARS.fullmatch(query) is None:
        raise Refused(400, "invalid character in the query")
    if "%" not in path and "//" not in path and "/." not in path:
        return target
    if "%" in path:
        path = _decode_unreserved(path)
    if "//" in path or "/." in path:
        path = _remove_dots(path)
    return path + sep + query


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
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return False
        return h[1:end] in allowed
    name, colon, port = h.rpartition(":")
    if colon:
        if not port.isdigit():
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
    return name if colon and port.isdigit() else h


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
    normalise_target; the trailing slash is ignored.
    """
    p = unquote(path.partition("?")[0]).lower()
    m = _REQUEST_TOKEN.fullmatch(p)
    return m.group(1) if m else None
