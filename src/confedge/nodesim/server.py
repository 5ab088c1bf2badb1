"""HTTP/1.1 adapter of the simulated node: sockets, parsing, keep-alive, SSE, static files.

Not a hot path, but it faces whatever a browser or the proxy sends, so it must be robust:
persistent connections and pipelined requests are served in order, bodies and headers are
bounded, a malformed request gets a 400 and the connection closes, and an event stream is
written with chunked transfer coding (RFC 9112 section 7.1) with a keepalive comment line every
``keepalive`` seconds so that idle streams survive proxies and NATs. Everything about *what* to
answer is decided by :class:`confedge.nodesim.core.NodeState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import mimetypes
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools

from confedge.timers import Sweeper, arm, disarm

from .core import JsonResponse, Request, Subscription

__all__ = ["HttpResponse", "NodeHttpProtocol"]

log = logging.getLogger("confedge.nodesim.http")

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 256 * 1024
HEADER_TIMEOUT = 15.0
IDLE_TIMEOUT = 120.0
LINGER = 2.0
HIGH_WATER = 256 * 1024

STATIC_DIR = Path(__file__).with_name("static")


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_json(cls, resp: JsonResponse) -> HttpResponse:
        return cls(resp.status, resp.encode())

    @classmethod
    def error(cls, status: int, reason: str) -> HttpResponse:
        body = json.dumps({"status": "failure", "result": reason}, separators=(",", ":")).encode()
        return cls(status, body)


Handler = Callable[[Request, "NodeHttpProtocol"], Awaitable["HttpResponse | Subscription"]]


_EOF = None  # queue marker: the client half-closed


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class NodeHttpProtocol(asyncio.Protocol):
    """One client connection. Requests are parsed in callbacks and served by one task, in order."""

    def __init__(
        self,
        handler: Handler,
        node_name: str,
        keepalive: float,
        on_stream_end: Callable[[Subscription], None],
        on_close: Callable[[NodeHttpProtocol], None] | None = None,
        timers: Sweeper | None = None,
    ) -> None:
        self.handler = handler
        self.on_close = on_close
        self.node_name = node_name
        self.keepalive = keepalive
        self.on_stream_end = on_stream_end
        self.transport: asyncio.Transport | None = None
        self.peer: str = ""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: asyncio.Queue[tuple[Request, bool] | _BadRequest | None] = asyncio.Queue()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._header_count = 0
        self._body = bytearray()
        self._last_name = ""
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # confedge/timers.py: header and idle timeouts, swept by `timers` (the node's Sweeper).
        self.timers = timers
        self.activity = False
        self.timeout = 0.0
        self.deadline = math.inf
        self._in_message = False
        self._discard = False
        self._streaming = False

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it, so this is a
        # cast, not an isinstance check (the demo and `confedge run` use uvloop).
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self._worker = asyncio.get_running_loop().create_task(self._serve())
        if self.timers is not None:
            self.timers.ensure()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_close is not None:
            self.on_close(self)
        self._closed.set()
        self._writable.set()
        disarm(self)
        if self._worker is not None:
            self._worker.cancel()

    def eof_received(self) -> bool:
        # The client half-closed (shutdown(SHUT_WR), ``nc -q``): answer what it already sent,
        # then close. Returning True keeps our side open for those answers. During an event
        # stream, EOF means the client went away (EventSource never half-closes): close now.
        if self._streaming:
            return False
        self.queue.put_nowait(_EOF)
        return True

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(_BadRequest(400, "Protocol upgrades are not supported"))
        except _BadRequest as exc:
            self._reject(exc)
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in callbacks (our limits) in its own error.
            inner = exc.__context__ or exc.__cause__
            if isinstance(inner, _BadRequest):
                self._reject(inner)
            else:
                self._reject(_BadRequest(400, f"Malformed HTTP request: {exc}"))

    def _reject(self, exc: _BadRequest) -> None:
        # What follows a framing error cannot be trusted: discard it. Reading goes on (a
        # "lingering close") so that closing with unread input does not reset the connection
        # before the client has read the error response.
        self._discard = True
        self.queue.put_nowait(exc)

    def _arm_idle(self) -> None:
        arm(self, asyncio.get_running_loop().time(), IDLE_TIMEOUT)

    def on_timeout(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._header_count = 0
        self._body = bytearray()
        self._last_name = ""
        arm(self, asyncio.get_running_loop().time(), HEADER_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > 8192:
            raise _BadRequest(414, "Request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if self._header_bytes > MAX_HEADER_BYTES or self._header_count > MAX_HEADERS:
            raise _BadRequest(431, "Request header fields too large")
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        if key in self._headers:
            self._headers[key] += ", " + val
        else:
            self._headers[key] = val

    def on_headers_complete(self) -> None:
        disarm(self)
        if self._headers.get("expect", "").lower() == "100-continue":
            # RFC 9110 section 10.1.1: a client (curl, for bodies over 1 KiB) may wait for this
            # interim answer before it sends the body.
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > MAX_BODY:
            raise _BadRequest(413, "Request body too large")

    def on_message_complete(self) -> None:
        self._in_message = False
        raw = self._url.decode("latin-1")
        path, _, qs = raw.partition("?")
        try:
            query = dict(parse_qsl(qs, keep_blank_values=True))
        except ValueError:
            query = {}
        method = self.parser.get_method().decode("latin-1")
        keep = self.parser.should_keep_alive()
        req = Request(method, path, query, dict(self._headers), bytes(self._body))
        self.queue.put_nowait((req, keep))

    # ---------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [f"HTTP/1.1 {status} {phrase}"]
        lines.append(f"Date: {formatdate(usegmt=True)}")
        lines.append("Server: confedge-nodesim")
        lines.append(f"X-Confedge-Node: {self.node_name}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, resp: HttpResponse, keep: bool, head_only: bool) -> None:
        headers = [
            ("Content-Type", resp.content_type),
            ("Content-Length", str(len(resp.body))),
            ("Cache-Control", "no-cache"),
            *resp.headers,
        ]
        if not keep:
            headers.append(("Connection", "close"))
        self._write(self._head(resp.status, headers) + (b"" if head_only else resp.body))

    async def _drain(self) -> None:
        await self._writable.wait()

    async def _stream(self, sub: Subscription, keep: bool) -> bool:
        """Write an SSE stream until the subscription closes or the client goes; True = the
        connection may carry another request."""
        headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            ("X-Accel-Buffering", "no"),
        ]
        if not keep:
            headers.append(("Connection", "close"))
        self._write(self._head(200, headers))
        self._streaming = True
        wake = asyncio.Event()
        sub.on_event = wake.set
        disarm(self)  # a stream is not idle: no idle timeout
        try:
            while not self._closed.is_set():
                if sub.events:
                    chunk = b"".join(e.encode() for e in _drain_deque(sub))
                    self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await self._drain()
                    continue
                if sub.closed:
                    self._write(b"0\r\n\r\n")
                    return keep
                wake.clear()
                closed = asyncio.ensure_future(self._closed.wait())
                woke = asyncio.ensure_future(wake.wait())
                try:
                    done, _ = await asyncio.wait(
                        {closed, woke}, timeout=self.keepalive, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    closed.cancel()
                    woke.cancel()
                if not done:
                    # SSE comment line (WHATWG HTML 9.2.6: lines starting with ':' are ignored).
                    chunk = b": keepalive\n\n"
                    self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await self._drain()
            return False
        finally:
            self._streaming = False
            sub.on_event = None
            self.on_stream_end(sub)

    # ---------------------------------------------------------------- the request loop

    async def _serve(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if item is _EOF:
                    break
                if isinstance(item, _BadRequest):
                    self._send(HttpResponse.error(item.status, str(item)), False, False)
                    if self.transport is not None and self.transport.can_write_eof():
                        self.transport.write_eof()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LINGER):
                            await self._closed.wait()
                    break
                assert item is not None
                req, keep = item
                try:
                    result = await self.handler(req, self)
                except Exception:
                    log.exception("nodesim: error while handling %s %s", req.method, req.path)
                    result = HttpResponse.error(500, "Internal error")
                if isinstance(result, Subscription):
                    if not await self._stream(result, keep):
                        break
                else:
                    self._send(result, keep, req.method == "HEAD")
                    await self._drain()
                    if not keep:
                        break
                if self.queue.empty():
                    self._arm_idle()
        except asyncio.CancelledError:
            pass
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()


def _drain_deque(sub: Subscription) -> list[Any]:
    out = list(sub.events)
    sub.events.clear()
    return out


def static_response(path: str) -> HttpResponse:
    """Serve a file of the web page from ``static/`` (no directory listing, no traversal)."""
    rel = path[len("/webapp/") :] or "index.html"
    if "/" in rel or "\\" in rel or rel.startswith(".") or "%" in rel:
        return HttpResponse(404, b"Not found", "text/plain; charset=utf-8")
    target = STATIC_DIR / rel
    try:
        data = target.read_bytes()
    except OSError:
        return HttpResponse(404, b"Not found", "text/plain; charset=utf-8")
    ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype == "application/javascript":
        ctype += "; charset=utf-8"
    return HttpResponse(200, data, ctype)


def is_direct_loopback(proto: NodeHttpProtocol, req: Request) -> bool:
    """True when the request comes straight from this host, not through a proxy.

    The proxy also connects from loopback in the demo, so the forwarding headers it adds
    (SPEC §2: X-Real-IP, X-Forwarded-For) mark a request that came from outside.
    """
    try:
        loop = ipaddress.ip_address(proto.peer.split("%")[0]).is_loopback
    except ValueError:
        return False
    forwarded = any(h in req.headers for h in ("x-forwarded-for", "x-real-ip", "forwarded"))
    return loop and not forwarded


def monotonic() -> float:
    return time.monotonic()
