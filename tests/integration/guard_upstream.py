"""A small PIN-protected conferencing node for the guard tests (SPEC §7 request_token only).

Deliberately lenient in routing, like many web frameworks: the path is percent-decoded,
lower-cased, "//" collapsed and a trailing slash ignored, so any spelling an attacker might
try reaches the PIN check. If the proxy fails to count such a spelling, the tests see it. It
compresses answers with gzip when the client asks, as a node behind a compressing front end
would, and answers in chunks when asked to (`chunked = True`).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import unquote

_ROUTE = re.compile(r"/api/client/v2/conferences/([^/]+)/request_token")


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
        path = unquote(target.partition("?")[0]).lower()
        path = re.sub("/+", "/", path).rstrip("/") or "/"
        if path == "/api/client/v2/status":
            return 200, b'{"status":"success","result":"OK"}'
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
        token = {"token": secrets.token_hex(16), "expires": "120", "role": "HOST"}
        return 200, json.dumps({"status": "success", "result": token}).encode()

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
