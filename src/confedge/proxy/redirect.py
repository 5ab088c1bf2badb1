"""Port 80: every request gets 301 to the same host and path on https (SPEC §2).

The one exception, when `proxy.acme_webroot` is set: GET and HEAD of
/.well-known/acme-challenge/<token> are answered from that directory (ACME HTTP-01 for certbot's
webroot mode, proxy/acme.py); a token with no file there is a 404, any other method a 405.

Keep-alive like the reference's nginx (`return 301 https://$host$request_uri;` keeps the
connection): a browser or monitor that reuses its connection pays no new TCP handshake per
redirect. Every answer gets an access-log line in the reference format, as nginx logs its 301s
(fail2ban recipes and log shippers see port-80 traffic too).

Timeouts (confedge/timers.py, swept by the worker with its other connections): the head of each
request must arrive within `proxy.header_timeout` of its first byte; an idle keep-alive
connection is closed after `proxy.idle_timeout`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Final

import httptools

from confedge.proxy import acme
from confedge.proxy.accesslog import remote_user
from confedge.proxy.pages import status_line
from confedge.proxy.request import (
    MEMO_SIZE,
    Refused,
    host_allowed,
    normalise_peer,
    normalise_target,
    split_host,
)
from confedge.timers import arm, disarm

if TYPE_CHECKING:
    from confedge.proxy.core import WorkerRuntime

__all__ = ["RedirectConnection"]

_INF: Final = math.inf
_TAIL_KEEP: Final = b"Content-Length: 0\r\n\r\n"
_TAIL_KEEP_10: Final = b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"  # RFC 9112 §9.3
_TAIL_CLOSE: Final = b"Content-Length: 0\r\nConnection: close\r\n\r\n"
_wall_clock: Final = time.time  # (a constant: no lookup of `time` and its attribute per line)


class RedirectConnection(asyncio.Protocol):
    """Port 80: every request gets 301 to the same host and path on https (SPEC §2)."""

    __slots__ = (
        "_https_port",
        "activity",
        "answered",
        "auth",
        "core",
        "deadline",
        "host",
        "idle_at",
        "method",
        "method_raw",
        "parser",
        "peer",
        "referer",
        "timeout",
        "transport",
        "ua",
        "url",
        "version",
    )

    def __init__(self, core: WorkerRuntime, https_port: int) -> None:
        self.core = core
        self.activity = False
        self.timeout = 0.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.host: bytes | None = None
        self.ua: bytes | None = None
        self.referer: bytes | None = None
        self.auth: bytes | None = None  # Authorization, for the access log's $remote_user
        self.peer = ""
        self.method = ""
        self.method_raw = b""
        self.version = ""
        self.answered = False
        self.deadline = _INF
        self.idle_at = 0.0
        self._https_port = https_port

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = normalise_peer(transport.get_extra_info("peername"))
        core = self.core
        core.redirects.add(self)
        arm(self, core.loop.time(), core.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.redirects.discard(self)
        disarm(self)

    def on_timeout(self) -> None:
        self.abort()

    def pause_writing(self) -> None:
        # A client that pipelines requests and never reads the 301s: stop reading it until
        # they drain (was: every answer queued, the write buffer without bound). One that
        # reads nothing is aborted at its idle deadline.
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def abort(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The parser cannot continue after an Upgrade request: answer it, then close.
            if not self.answered:
                self._answer(close=True)
            self._close()
        except (httptools.HttpParserError, ValueError):
            if not self.answered:
                if self.url and not self.method:
                    # A bad header after a complete request line: nginx logs that line.
                    version = self.parser.get_http_version()
                    if version != "0.0":
                        self.method_raw = self.parser.get_method()
                        self.method = self.method_raw.decode("latin-1")
                        self.version = version
                too_long = len(self.url) > self.core.max_url_bytes
                self._send(414 if too_long else 400, b"", close=True)
            self._close()

    def _close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            self.core.close_after(t)

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.host = self.ua = self.referer = self.auth = None
        self.method = self.version = ""
        self.method_raw = b""
        self.answered = False
        core = self.core
        now = core.loop.time()
        # The idle deadline after this answer, taken from the same clock reading (the answer
        # follows within microseconds unless a request body trickles in).
        self.idle_at = now + core.idle_timeout
        self.deadline = now + core.header_timeout  # timers.arm, inlined (once per request)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.core.max_url_bytes:
            raise ValueError("target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"host":
            self.host = value
        elif n == b"user-agent":
            self.ua = value
        elif n == b"referer":
            self.referer = value
        elif n == b"authorization" and self.auth is None:
            self.auth = value

    def on_headers_complete(self) -> None:
        # A request body (rare on port 80) is parsed and dropped; the answer goes out now.
        parser = self.parser
        self.method_raw = method = parser.get_method()
        self.method = method.decode("latin-1")
        self.version = parser.get_http_version()
        self._answer(close=not self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self.deadline = self.idle_at

    # -- answers --------------------------------------------------------------------------------

    def _answer(self, *, close: bool) -> None:
        core = self.core
        if core.acme_webroot and self.url.startswith(acme.PREFIX):
            self._acme(core.acme_webroot, close=close)
            return
        key = (self.host, self.url)
        location = core.locations.get(key)
        if location is None:
            try:
                location = self._location()
            except (Refused, UnicodeDecodeError):
                self._send(400, b"", close=True)
                return
            if len(core.locations) >= MEMO_SIZE:
                core.locations.clear()
            core.locations[key] = location
        self._send(301, location, close=close)

    def _acme(self, webroot: str, *, close: bool) -> None:
        """RFC 8555 §8.3: the key authorization certbot left for this token, as it is (the CA
        compares the body; the Content-Type is not part of the check)."""
        if self.method not in ("GET", "HEAD"):
            self._send(405, b"Allow: GET, HEAD\r\n", close=close)
            return
        body = acme.read_challenge(webroot, self.url)
        if body is None:
            self._send(404, b"", close=close)
            return
        self._send(200, b"Content-Type: text/plain\r\n", close=close, body=body)

    def _location(self) -> bytes:
        """The Location header line for this request's Host and target."""
        core = self.core
        target = normalise_target(self.url.decode("ascii"))
        host = core.cfg.server.fqdn
        if self.host is not None:
            h = self.host.decode("latin-1").strip()
            if host_allowed(h, core.allowed_hosts):
                # Keep the name the client used (never an unknown one: no open redirect),
                # without its port-80 part.
                host = split_host(h)
        port = self._https_port
        netloc = host if port == 443 else f"{host}:{port}"
        return b"Location: " + f"https://{netloc}{target}".encode() + b"\r\n"

    def _send(self, status: int, extra: bytes, *, close: bool, body: bytes = b"") -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self.answered = True
        method, version = self.method, self.version
        if body:
            # (only an ACME challenge has one; HEAD gets its length and no body, RFC 9110 §9.3.2)
            tail = b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            if close:
                tail += b"Connection: close\r\n"
            elif version == "1.0":
                tail += b"Connection: keep-alive\r\n"
            tail += b"\r\n"
            if method != "HEAD":
                tail += body
            else:
                body = b""
        elif close:
            tail = _TAIL_CLOSE
        elif version == "1.0":
            tail = _TAIL_KEEP_10
        else:
            tail = _TAIL_KEEP
        data = b"".join((status_line(status), self.core.date.header, extra, tail))
        if close:
            self.core.close_after(t, data)
        else:
            self.core.send(t, data)  # coalesced with the other answers of this iteration
        sink = self.core.access_log
        if sink is not None:
            # nginx logs `return 301` answers like any other request (SPEC §2 access log).
            if method:
                line = self.core.request_line(self.method_raw, self.url, version)  # memoised
            else:
                line = self.url.decode("latin-1") or "-"
            user = None if self.auth is None else remote_user(self.auth)
            sink.log(
                self.peer,
                _wall_clock(),
                line,
                status,
                len(body),
                self.referer,
                self.ua,
                None,
                None,
                None,
                user,
            )
