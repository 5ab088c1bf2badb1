"""What the worker asks of each client adapter (core.ClientSide), over real TLS connections of
both kinds to the recording node: the status page's sessions table (`WorkerRuntime.sessions`
through `in_progress`: an HTTP/2 SSE stream, an HTTP/1.1 WebSocket tunnel) and the drain's
"closing" phase (`WorkerRuntime.close_idle` through `close_if_idle`: idle connections of either
kind are closed, an HTTP/2 one after a GOAWAY; connections with something in progress go on,
and are closed once it ends)."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from typing import Any

import h2.events
import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, proxy_config
from test_proxy_h2 import _raw_h2, _req

from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


class H2Reader:
    """A raw hyper-h2 client connection's events, read as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any, conn: Any) -> None:
        self.reader, self.writer, self.conn = reader, writer, conn
        self.events: list[h2.events.Event] = []
        self.eof = False

    async def until(self, want: Any, timeout: float = 5.0) -> h2.events.Event | None:
        """Read until an event of type `want` arrives (returned) or the proxy closes (None)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for ev in self.events:
                if isinstance(ev, want):
                    self.events.remove(ev)
                    return ev
            if self.eof:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(65536), end - loop.time())
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                self.eof = True
                continue
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.events.append(ev)
            out = self.conn.data_to_send()
            if out:
                self.writer.write(out)


async def _h1(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = client_ssl()
    ctx.set_alpn_protocols(["http/1.1"])
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx)


async def _head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def test_sessions_and_drain_close_through_each_client_adapter(tmp_path: Any) -> None:
    node = await Upstream("n0").start()
    svc = ProxyService(proxy_config([node.address], str(tmp_path), http_port=spare_port()))
    await svc.start()
    port = svc.https_port
    netloc = node.address.split("://", 1)[1]
    try:
        # Idle connections of both kinds: HTTP/2 after its handshake, HTTP/1.1 after a request.
        idle2 = H2Reader(*await _raw_h2(port))
        assert await idle2.until(h2.events.RemoteSettingsChanged) is not None
        r1, w1 = await _h1(port)
        w1.write(b"GET /api/client/v2/echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await _head(r1)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        await asyncio.wait_for(r1.readexactly(length), 5)

        # In progress: an SSE stream over HTTP/2 and a WebSocket tunnel over HTTP/1.1.
        sse = H2Reader(*await _raw_h2(port))
        sse.conn.send_headers(1, _req("/sse?n=12&interval=0.1", port), end_stream=True)
        sse.writer.write(sse.conn.data_to_send())
        assert await sse.until(h2.events.DataReceived) is not None
        rw, ww = await _h1(port)
        key = base64.b64encode(os.urandom(16)).decode()
        ww.write(
            f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await _head(rw)).startswith(b"HTTP/1.1 101")

        rows = svc.sessions()
        assert sorted((s["kind"], s["path"], s["node"]) for s in rows) == [
            ("sse", "/sse", netloc),
            ("websocket", "/ws", netloc),
        ], rows
        assert all(s["client"] == "127.0.0.1" and s["age"] >= 0 for s in rows)

        svc.set_drain("closing")
        # The idle HTTP/2 connection: GOAWAY (NO_ERROR, RFC 9113 §6.8), then closed.
        goaway = await idle2.until(h2.events.ConnectionTerminated)
        assert goaway is not None and goaway.error_code == 0
        assert await idle2.until(h2.events.DataReceived) is None and idle2.eof
        # The idle HTTP/1.1 keep-alive connection: closed.
        assert await asyncio.wait_for(r1.read(), 5) == b""
        # The SSE stream goes on to its end, then its connection is closed the same way.
        ended = await sse.until(h2.events.StreamEnded)
        assert ended is not None
        assert await sse.until(h2.events.ConnectionTerminated) is not None
        # The WebSocket tunnel is still open and still listed.
        assert [s["kind"] for s in svc.sessions()] == ["websocket"]
        assert not rw.at_eof()
        for w in (idle2.writer, sse.writer, w1, ww):
            w.close()
    finally:
        await svc.close()
        await node.kill()
