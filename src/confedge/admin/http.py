"""The management listener's HTTP/1.1 adapter: access control at accept, bounded parsing.

Theory of operation. Management answers are small and computed synchronously from in-memory
state, so each request is answered inside the parser's ``on_message_complete`` callback: no task
per connection or request, and pipelined requests are answered in order for free. What a
hostile or broken client can do is bounded:

* a source outside ``management.networks`` is closed in ``connection_made``, before a byte is
  read (SPEC §1: management only for the management networks), and logged at most once a
  minute per source so that a scan cannot flood the log;
* at most ``max_connections`` at once; header bytes, header count and target length bounded
  (431 / 414); a request must be complete within ``header_timeout`` and an idle keep-alive
  connection is closed after ``idle_timeout`` (aborted, if the client has left our answer
  unread: a graceful close would wait for it forever);
* GET and HEAD only (405 with ``Allow``, RFC 9110 §15.5.6); no request body (413); a Host that
  names some other host gets 421 (RFC 9110 §15.5.20), which defeats DNS rebinding: a web page
  elsewhere cannot make an operator's browser read the status through a name it controls;
* while the send buffer is above its high-water mark (the client does not read), reading is
  paused and further pipelined requests are held, not answered; a client that piles up more
  than ``max_pipelined`` of them is cut off. So one client costs at most a few page renders of
  event-loop time per read, time that TURN relaying and the proxy share.

After an error answer the connection is half-closed and input is discarded for a moment (a
"lingering close") so the client can read the answer instead of getting a reset.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from confedge.timers import Sweeper, arm, disarm, sweep_interval

__all__ = ["AccessList", "AdminConnection", "AdminServer", "Limits", "Response"]

log = logging.getLogger("confedge.admin")

LINGER = 2.0
LOG_REFUSED_EVERY = 60.0
_MAX_LOGGED_SOURCES = 4096

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Limits:
    max_target: int = 2048
    max_header_bytes: int = 8192
    max_headers: int = 50
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_connections: int = 64
    max_pipelined: int = 16  # requests held while the client does not read our answers
    turn_output: int = 64 * 1024  # answer bytes rendered per read or loop turn, about


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Router = Callable[[str], Response]


def _canonical(addr: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (a dual-stack socket's view of an IPv4 peer) as plain IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class AccessList:
    """management.networks: which peers may talk to the listener at all."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = [ipaddress.ip_network(n) for n in networks]

    def allows(self, host: str) -> bool:
        try:
            addr = _canonical(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            return False
        return any(addr in net for net in self.networks)


class AdminServer:
    """What every connection of one listener shares: access list, limits, router, counters."""

    def __init__(
        self,
        access: AccessList,
        router: Router,
        *,
        allowed_hosts: Iterable[str] = (),
        limits: Limits | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.access = access
        self.router = router
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.limits = limits or Limits()
        self.connections: set[AdminConnection] = set()
        lim = self.limits
        self.sweeper = Sweeper(
            lambda: self.connections, sweep_interval(lim.header_timeout, lim.idle_timeout, LINGER)
        )
        self.refused = 0
        self._clock = clock
        self._logged: dict[str, float] = {}

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def refuse(self, peer: str, why: str) -> None:
        """Count a refused connection; log it unless this source was logged within a minute."""
        self.refused += 1
        now = self.now()
        last = self._logged.get(peer)
        if last is not None and now - last < LOG_REFUSED_EVERY:
            return
        if len(self._logged) >= _MAX_LOGGED_SOURCES:
            self._logged = {p: t for p, t in self._logged.items() if now - t < LOG_REFUSED_EVERY}
            if len(self._logged) >= _MAX_LOGGED_SOURCES:
                self._logged.clear()
        self._logged[peer] = now
        log.warning("management: refused connection from %s: %s", peer, why)

    def host_ok(self, host: str | None) -> bool:
        """True for an IP literal or one of the listener's names (port ignored)."""
        if host is None:
            return False
        h = host.strip()
        if h.startswith("["):
            name, sep, _ = h[1:].partition("]")
            if not sep:
                return False
            try:
                ipaddress.IPv6Address(name.split("%", 1)[0])
            except ValueError:
                return False
            return True
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name.lower().rstrip(".") in self.allowed_hosts
        return True


class _Refuse(Exception):
    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class _Abort(Exception):
    """Raised from a parser callback after the connection was aborted: parse no further."""


_COMMON_HEADERS = (
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'\r\n"
    "Server: confedge\r\n"
)


class AdminConnection(asyncio.Protocol):
    """One management connection."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.target = bytearray()
        self.host: str | None = None
        self.header_bytes = 0
        self.header_count = 0
        self.body_expected = False
        self.discarding = False
        self.write_paused = False
        self.budget = 0  # bytes still answered at once in the current read or loop turn
        self.drain_scheduled = False
        self.pending: deque[tuple[str, bool, bool]] = deque()
        # confedge/timers.py: swept by the server's Sweeper.
        self.activity = False
        self.timeout = 0.0
        self.deadline = math.inf

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: a cast.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        srv = self.server
        if not srv.access.allows(self.peer):
            srv.refuse(self.peer, "source not in management.networks")
            self.transport.abort()
            return
        if len(srv.connections) >= srv.limits.max_connections:
            srv.refuse(self.peer, f"{srv.limits.max_connections} connections already open")
            self.transport.abort()
            return
        srv.connections.add(self)
        srv.sweeper.ensure()
        self.transport.set_write_buffer_limits(high=64 * 1024)
        self._arm(srv.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        disarm(self)
        self.transport = None

    def pause_writing(self) -> None:
        # asyncio flow control: the send buffer is above its high-water mark.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.budget = self.server.limits.turn_output
        try:
            self.parser.feed_data(data)
            if self.pending and self.transport is not None:
                # Held requests are answered from the loop, a batch per turn; read no more
                # until they are.
                self.transport.pause_reading()
                self._schedule_drain()
        except httptools.HttpParserUpgrade:
            # An Upgrade request was answered as a plain GET; nothing after it is HTTP/1.1.
            self._close()
        except _Refuse as exc:
            self._error(exc)
        except _Abort:
            pass
        except httptools.HttpParserError as exc:
            inner = exc.__context__
            if isinstance(inner, _Abort):
                return
            if isinstance(inner, _Refuse):
                self._error(inner)
            else:
                self._error(_Refuse(400, f"malformed HTTP request: {exc}"))

    def eof_received(self) -> bool:
        # Nothing is held here: requests are answered as they complete, and while some are
        # held (see on_message_complete) reading is paused, so the EOF is not seen yet.
        # False = close once what was written is sent.
        return False

    # -- timers -------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        arm(self, asyncio.get_running_loop().time(), seconds)

    def on_timeout(self) -> None:
        # close() would wait for the send buffer to drain, forever if the client never reads:
        # abort then. (Answers are small; a client that cannot take one within the idle
        # timeout is not worth a connection slot.)
        t = self.transport
        if t is not None and t.get_write_buffer_size():
            t.abort()
        else:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.target.clear()
        self.host = None
        self.header_bytes = 0
        self.header_count = 0
        self.body_expected = False
        self._arm(self.server.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > self.server.limits.max_target:
            raise _Refuse(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        lim = self.server.limits
        self.header_bytes += len(name) + len(value) + 4
        self.header_count += 1
        if self.header_bytes > lim.max_header_bytes or self.header_count > lim.max_headers:
            raise _Refuse(431, "request header fields too large")
        if name.lower() == b"host":
            if self.host is not None:
                raise _Refuse(400, "more than one Host header")  # RFC 9112 §3.2
            self.host = value.decode("latin-1")
        elif name.lower() in (b"content-length", b"transfer-encoding"):
            # Refused in on_headers_complete, before any body byte is read.
            self.body_expected = self.body_expected or value.strip() not in (b"0", b"")

    def on_headers_complete(self) -> None:
        disarm(self)
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD"):
            raise _Refuse(
                405, "the management listener only answers GET and HEAD", (("Allow", "GET, HEAD"),)
            )
        # A GET carries no body that means anything (RFC 9110 §9.3.1): refuse rather than read.
        if self.body_expected:
            raise _Refuse(413, "a management request carries no body")
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            # httptools takes "HTTP/2.0" and "HTTP/0.9" request lines; neither is HTTP/1.x.
            raise _Refuse(400, f"HTTP/{version} is not HTTP/1.x")
        if version != "1.0" and self.host is None:
            raise _Refuse(400, "no Host header")  # RFC 9112 §3.2
        if self.host is not None and not self.server.host_ok(self.host):
            raise _Refuse(
                421,
                f"Host {self.host!r} does not name this management listener; "
                "add the name to management.allowed_hosts",
            )
        if not self.target.startswith(b"/"):
            raise _Refuse(400, "the request target must be a path (origin-form)")

    def on_body(self, body: bytes) -> None:
        raise _Refuse(413, "a management request carries no body")

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None:
            return
        path = bytes(self.target).split(b"?", 1)[0].decode("latin-1")
        item = (path, self.parser.get_method() == b"HEAD", self.parser.should_keep_alive())
        if self.write_paused or self.pending or self.budget <= 0:
            # Many requests in one read, or the client is not reading our answers: hold them
            # rather than render pages back to back (each costs event-loop time that TURN and
            # the proxy share; the kernel's send buffer alone takes megabytes on loopback),
            # and give up on a client that piles up more.
            if len(self.pending) >= self.server.limits.max_pipelined:
                self.server.refuse(self.peer, "pipelined requests without reading the answers")
                self.discarding = True
                self.pending.clear()
                transport.abort()
                raise _Abort  # stop parsing the rest of this read
            self.pending.append(item)
            # The header timer was cancelled with this request's headers: without this, a
            # client that never reads would keep the connection (and a slot) forever.
            self._arm(self.server.limits.idle_timeout)
            return
        self._answer(*item)

    def _schedule_drain(self) -> None:
        if not self.drain_scheduled:
            self.drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain_soon)

    def _drain_soon(self) -> None:
        self.drain_scheduled = False
        self._drain()

    def _drain(self) -> None:
        """Answer held requests, about turn_output bytes per loop turn, while the client reads."""
        transport = self.transport
        self.budget = self.server.limits.turn_output
        while self.pending and not self.write_paused and transport is not None and self.budget > 0:
            self._answer(*self.pending.popleft())
            transport = self.transport
        if transport is None or self.discarding or self.write_paused:
            return
        if self.pending:
            self._schedule_drain()
        else:
            transport.resume_reading()

    def _answer(self, path: str, head_only: bool, keep: bool) -> None:
        srv = self.server
        try:
            resp = srv.router(path)
        except Exception:
            log.exception("management: error while answering %s", path)
            resp = Response(500, b"internal error; see the log\n")
        self._send(resp, keep=keep, head_only=head_only)
        if keep:
            self._arm(srv.limits.idle_timeout)
        else:
            self.pending.clear()  # requests after "Connection: close" are not answered
            self.discarding = True
            self._close()
            self._arm(srv.limits.idle_timeout)  # abort if the answer is never read

    # -- writing ------------------------------------------------------------------------------

    def _send(self, resp: Response, *, keep: bool, head_only: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            phrase = HTTPStatus(resp.status).phrase
        except ValueError:
            phrase = "Unknown"
        head = [
            f"HTTP/1.1 {resp.status} {phrase}\r\n",
            f"Date: {formatdate(usegmt=True)}\r\n",
            f"Content-Type: {resp.content_type}\r\n",
            f"Content-Length: {len(resp.body)}\r\n",
            _COMMON_HEADERS,
        ]
        head.extend(f"{k}: {v}\r\n" for k, v in resp.headers)
        if not keep:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        if not head_only:
            data += resp.body
        self.budget -= len(data)
        self.transport.write(data)

    def _error(self, exc: _Refuse) -> None:
        self.pending.clear()
        self._send(
            Response(exc.status, f"{exc}\n".encode(), headers=exc.headers),
            keep=False,
            head_only=False,
        )
        transport = self.transport
        if transport is None:
            return
        # Lingering close: stop answering, keep reading (and discarding) for a moment so that
        # unread input does not turn our close into a reset that destroys the answer.
        self.discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        else:
            self._close()
        self._arm(LINGER)
