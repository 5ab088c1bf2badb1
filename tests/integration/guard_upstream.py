"""A small PIN-protected conferencing node for the guard tests (SPEC §7 request_token only).

Deliberately lenient in routing, like many web frameworks: the path is percent-decoded,
lower-cased, "//" collapsed and a trailing slash ignored, so any spelling an attacker might
try reaches the PIN check. If the proxy fails to count such a spelling, the tests see it. It
compresses answers with gzip when the client asks, as a node behind a compressing front end
would, and answers in chunks when asked to (`chunked = True`).

For the in-flight tests it can take `delay` seconds over each request_token (and records how
many were in progress at once, per address and per conference), and it issues real tokens:
`refresh_token`, `release_token` and `participants/<uuid>/disconnect` need one (`token` header
or `?token=`), and every such call is recorded in `calls`.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

_ROUTE = re.compile(r"/api/client/v2/conferences/([^/]+)/request_token")
_SESSION_ROUTE = re.compile(
    r"/api/client/v2/conferences/([^/]+)/(refresh_token|release_token|participants/[^/]+/disconnect)"
)


@dataclass
class PinNode:
    conferences: dict[str, str] = field(default_factory=lambda: {"meet": "1234"})
    chunked: bool = False
    server: asyncio.AbstractServer | None = None
    port: int = 0
    attempts: list[tuple[str, str, str | None]] = field(
        default_factory=list
    )  # (real ip, alias, pin)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    delay: float = 0.0
    busy: dict[str, int] = field(default_factory=dict)  # request_tokens in progress, by key
    max_busy: dict[str, int] = field(default_factory=dict)  # the most at once, by key
    tokens: dict[str, str] = field(default_factory=dict)  # live token -> alias
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (real ip, call, status)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> PinNode:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()

    def attempts_from(self, ip: str) -> int:
        return sum(1 for a in self.attempts if a[0] == ip)

    def wrong_pins_from(self, ip: str) -> int:
        """The guesses from ip the node answered "Invalid PIN"."""
        return sum(
            1
            for real, alias, pin in self.attempts
            if real == ip and pin is not None and pin != self.conferences.get(alias)
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                if "content-length" in headers:
                    await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                m = _ROUTE.fullmatch(_route_path(target))
                if m is not None and method == "POST" and self.delay:
                    keys = (f"ip:{headers.get('x-real-ip', '?')}", f"conf:{m.group(1)}")
                    for k in keys:
                        self.busy[k] = self.busy.get(k, 0) + 1
                        self.max_busy[k] = max(self.max_busy.get(k, 0), self.busy[k])
                    try:
                        await asyncio.sleep(self.delay)
                    finally:
                        for k in keys:
                            self.busy[k] -= 1
                status, body = self._route(method, target, headers)
                self._write(writer, status, body, headers)
                await writer.drain()
                if version == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def _route(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        path = _route_path(target)
        if path == "/api/client/v2/status":
            return 200, b'{"status":"success","result":"OK"}'
        s = _SESSION_ROUTE.fullmatch(path)
        if s is not None and method == "POST":
            return self._session(s.group(1), s.group(2), target, headers)
        m = _ROUTE.fullmatch(path)
        if method != "POST" or m is None:
            return 404, b'{"status":"success","result":"Not found"}'
        alias = m.group(1)
        pin = headers.get("pin")
        self.attempts.append((headers.get("x-real-ip", "?"), alias, pin))
        want = self.conferences.get(alias)
        if want is None:
            return 404, b'{"status":"success","result":"Neither conference nor gateway found"}'
        if pin is None:
            body = {"status": "success", "result": {"pin": "required", "guest_pin": "required"}}
            return 403, json.dumps(body).encode()
        if pin != want:
            return 403, b'{"status":"success","result":"Invalid PIN"}'
        return 200, self._issue(alias)

    def _issue(self, alias: str) -> bytes:
        token = secrets.token_hex(16)
        self.tokens[token] = alias
        result = {"token": token, "expires": "120", "role": "HOST"}
        return json.dumps({"status": "success", "result": result}).encode()

    def _session(
        self, alias: str, call: str, target: str, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        token = headers.get("token")
        if token is None:
            query = dict(parse_qsl(target.partition("?")[2]))
            token = query.get("token")
        ip = headers.get("x-real-ip", "?")
        kind = call.rsplit("/", 1)[-1]
        if token is None or self.tokens.get(token) != alias:
            self.calls.append((ip, kind, "invalid"))
            return 403, b'{"status":"success","result":"Invalid token"}'
        self.calls.append((ip, kind, "ok"))
        if kind == "refresh_token":
            del self.tokens[token]
            return 200, self._issue(alias)
        if kind == "release_token":
            del self.tokens[token]
        return 200, b'{"status":"success","result":true}'

    def _write(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        extra = ""
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            extra += "Content-Encoding: gzip\r\n"
        reason = {200: "OK", 403: "Forbidden", 404: "Not Found"}[status]
        if self.chunked:
            half = len(body) // 2
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]) if c
            )
            writer.write(
                (
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                + chunks
                + b"0\r\n\r\n"
            )
        else:
            writer.write(
                (
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )


def _route_path(target: str) -> str:
    path = unquote(target.partition("?")[0]).lower()
    return re.sub("/+", "/", path).rstrip("/") or "/"
