"""Port 80: every request gets 301 to the same host and path on https (SPEC §2).

Not a hot path (browsers follow the redirect once and remember HSTS-less https links), so a
plain timer per connection bounds slow clients here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httptools

from confedge.proxy.pages import status_line
from confedge.proxy.request import Refused, host_allowed, normalise_target, split_host

if TYPE_CHECKING:
    from confedge.proxy.core import ProxyCore

__all__ = ["RedirectConnection"]


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
