"""A small conferencing-node stand-in for the proxy tests (real sockets, plain asyncio).

It answers the status check (200, or 503 in maintenance), echoes requests as JSON, streams SSE
with send timestamps, speaks just enough WebSocket (RFC 6455) to echo frames, and records every
request it received so hostile-request tests can assert that nothing reached it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class Upstream:
    name: str
    ssl_ctx: ssl.SSLContext | None = None
    maintenance: bool = False
    fail_status: int = 0  # answer this status to everything but the status check
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    status_checks: int = 0
    big_sent: int = 0  # bytes of /big written so far (backpressure tests watch it)
    slow_upload_waiting: bool = False  # /slowupload: not reading the body yet

    @property
    def address(self) -> str:
        scheme = "https" if self.ssl_ctx else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> Upstream:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", port or self.port, ssl=self.ssl_ctx
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def kill(self) -> None:
        """Stop listening and cut every connection at once (a crashed node)."""
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    def requests(self, exclude_status: bool = True) -> list[Received]:
        return [
            r for r in self.received if not (exclude_status and r.target == "/api/client/v2/status")
        ]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
                hmap = {k.lower(): v for k, v in headers}
                body = b""
                if target.startswith("/slowupload"):
                    # A node that is slow to read the request body (busy, or on a slow link).
                    self.slow_upload_waiting = True
                    await asyncio.sleep(1.0)
                    self.slow_upload_waiting = False
                if hmap.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                elif "content-length" in hmap:
                    body = await reader.readexactly(int(hmap["content-length"]))
                rec = Received(method, target, headers, body)  # type: ignore[arg-type]
                self.received.append(rec)
                keep = await self._respond(rec, hmap, reader, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: str = "",
    ) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"X-Node: {self.name}\r\n{extra}\r\n".encode()
            + body
        )
        await writer.drain()

    async def _respond(
        self,
        rec: Received,
        h: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        path, _, query = rec.target.partition("?")
        if path == "/api/client/v2/status":
            self.status_checks += 1
            await self._send(writer, 503 if self.maintenance else 200, b'{"status":"success"}')
            return True
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.maintenance:
            await self._send(writer, 503, b'{"status":"maintenance"}')
            return True
        if self.fail_status:
            await self._send(writer, self.fail_status, b"failed")
            return True
        if path == "/sse":
            params = dict(p.split("=") for p in query.split("&") if p)
            n, interval = int(params.get("n", "5")), float(params.get("interval", "0.05"))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\nX-Node: " + self.name.encode() + b"\r\n\r\n"
            )
            for i in range(n):
                ev = f"event: tick\ndata: {json.dumps({'i': i, 't': time.time(), 'node': self.name})}\n\n".encode()
                writer.write(b"%x\r\n" % len(ev) + ev + b"\r\n")
                await writer.drain()
                await asyncio.sleep(interval)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/ws" and h.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(
                hashlib.sha1(h["sec-websocket-key"].encode() + _WS_GUID).digest()
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await self._ws_echo(reader, writer)
            return False
        if path == "/big":
            size = int(query.split("=")[1]) if query else 1 << 20
            chunk = b"x" * 65536
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nX-Node: {self.name}\r\n\r\n".encode()
            )
            sent = 0
            self.big_sent = 0
            while sent < size:
                part = chunk[: size - sent]
                writer.write(part)
                sent += len(part)
                await writer.drain()
                self.big_sent = sent
            return True
        if path == "/bigchunked":
            # A large body in many small chunks (1 KiB each, as a node streaming a log or an
            # export would send it): every chunk is a separate small write for the proxy.
            size = int(query.split("=")[1]) if query else 1 << 20
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Node: "
                + self.name.encode()
                + b"\r\n\r\n"
            )
            piece = b"400\r\n" + b"y" * 1024 + b"\r\n"
            sent = 0
            self.big_sent = 0
            while sent < size:
                writer.write(piece * 16)
                sent += 16 * 1024
                await writer.drain()
                self.big_sent = sent
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await writer.drain()
            return True
        if path == "/close-delimited":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end"
            )
            await writer.drain()
            return False
        if path == "/csp":
            await self._send(
                writer, 200, b"own", "text/html", "Content-Security-Policy: default-src 'none'\r\n"
            )
            return True
        if path == "/hop":
            await self._send(
                writer,
                200,
                b"hop",
                "text/plain",
                "Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n",
            )
            return True
        # Routed the way servlet containers read a path: ";" parameters stripped per segment
        # (so "request_token;x" is a PIN check here, as it would be on such a back end).
        route = "/".join([seg.partition(";")[0] for seg in path.split("/")])
        if route.startswith("/api/client/v2/conferences/") and route.endswith("/request_token"):
            pin = h.get("pin")
            if pin == "1234":
                await self._send(writer, 200, b'{"status":"success","result":{"token":"t"}}')
            else:
                await self._send(writer, 403, b'{"status":"success","result":"Invalid PIN"}')
            return True
        info: dict[str, Any] = {
            "node": self.name,
            "method": rec.method,
            "target": rec.target,
            "headers": rec.headers,
            "body_len": len(rec.body),
            "body_sha": hashlib.sha256(rec.body).hexdigest(),
        }
        await self._send(writer, 200, json.dumps(info).encode())
        return True

    async def _ws_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            b1, b2 = await reader.readexactly(2)
            opcode = b1 & 0x0F
            length = b2 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
            data = bytearray(await reader.readexactly(length))
            for i in range(length):
                data[i] ^= mask[i % 4]
            if opcode == 8:
                writer.write(b"\x88\x02" + bytes(data[:2] or b"\x03\xe8"))
                await writer.drain()
                return
            if opcode == 9:
                opcode = 10
            hdr = bytes([0x80 | opcode])
            if length < 126:
                hdr += bytes([length])
            elif length < 65536:
                hdr += bytes([126]) + struct.pack("!H", length)
            else:
                hdr += bytes([127]) + struct.pack("!Q", length)
            writer.write(hdr + bytes(data))
            await writer.drain()


# -- helpers shared by the proxy tests ----------------------------------------------------------


def proxy_config(nodes: list[str], state_dir: str, **proxy: Any) -> Any:
    """A Config for an in-process proxy on ephemeral ports with fast health checks."""
    from confedge.config import parse_config

    p: dict[str, Any] = {
        "https_port": 0,
        "http_port": 0,
        "workers": 1,
        "nodes": nodes,
        "access_log": f"{state_dir}/access.log",
        "health_interval": 0.2,
        "health_timeout": 0.5,
    }
    p.update(proxy)
    return parse_config(
        {"server": {"state_dir": state_dir}, "turn": {"enabled": False}, "proxy": p}
    )


def guarded_config(nodes: list[str], state_dir: str, **guard: Any) -> Any:
    """proxy_config with the guard on (memory store, 3 failures ban for 60 s, no ignore list)."""
    from confedge.config import parse_config, to_builtins

    data = to_builtins(proxy_config(nodes, state_dir, health_interval=30))
    data["guard"] = {
        "enabled": True,
        "store": "memory",
        "maxretry": 3,
        "ignore": [],
        "findtime": 60,
        "bantime": 60,
        **guard,
    }
    return parse_config(data)


def client_ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """Read one HTTP/1.1 response (Content-Length, chunked, or until close)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
    hmap = {k.lower(): v for k, v in headers}
    body = b""
    if head or status in (101, 204, 304):
        pass
    elif hmap.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in hmap:
        body = await reader.readexactly(int(hmap["content-length"]))
    else:
        body = await reader.read()
    return Response(status, headers, body)  # type: ignore[arg-type]


async def exchange(
    port: int, raw: bytes, *, timeout: float = 5.0, head: bool = False
) -> Response | None:
    """Send raw bytes over a fresh TLS connection; the response, or None if closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
    try:
        writer.write(raw)
        async with asyncio.timeout(timeout):
            try:
                return await read_response(reader, head=head)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
    finally:
        writer.transport.abort()


async def get(
    port: int, target: str, *, headers: str = "", method: str = "GET", body: bytes = b""
) -> Response:
    cl = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
    raw = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}{cl}Connection: close\r\n\r\n".encode()
        + body
    )
    r = await exchange(port, raw, head=method == "HEAD")
    assert r is not None, f"{method} {target}: connection closed without a response"
    return r
