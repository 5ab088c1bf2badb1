"""A stop with WebSockets open: each side gets a Close frame 1001 "going away" (RFC 6455 §7.4.1)
where its direction of the stream is between frames, and nothing is put inside a frame.

Why: before, a stop (SIGTERM, the end of a drain) cut the tunnels' TCP connections, so the
browser saw 1006 ("abnormal closure", what a network fault looks like) and the node a vanished
peer. The first test uses real WebSocket implementations at both ends (the `websockets`
library as the browser and as the node) and the proxy as operators run it, in process and with
two worker processes (which a stop reaches as SIGTERM). The second sends half a frame from one
side and checks byte for byte that the other side gets exactly that and no Close frame after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import uvloop
import websockets
from proxy_upstream import client_ssl, proxy_config
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

_GOING_AWAY_FRAME = b"\x88\x02\x03\xe9"  # FIN + Close, unmasked, status 1001


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


class WsNode:
    """A node that echoes on /ws (the `websockets` server) and records how each WebSocket
    ended: the close code it received, or None when the connection ended without one."""

    def __init__(self) -> None:
        self.codes: list[int | None] = []
        self.server: Any = None
        self.port = 0

    async def start(self) -> WsNode:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, process_request=self._health, ping_interval=None
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @staticmethod
    def _health(conn: ServerConnection, req: Request) -> Response | None:
        if req.path == "/api/client/v2/status":  # the proxy's health check
            return conn.respond(HTTPStatus.OK, "ok\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async for msg in ws:
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        self.codes.append(None if rcvd is None else rcvd.code)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def ws_node() -> AsyncIterator[WsNode]:
    node = await WsNode().start()
    yield node
    await node.close()


async def _until(pred: Any, seconds: float) -> None:
    for _ in range(int(seconds / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stop_says_going_away_to_the_browser_and_the_node(
    ws_node: WsNode, tmp_path: Path, workers: int
) -> None:
    svc = ProxyService(
        proxy_config([f"http://127.0.0.1:{ws_node.port}"], str(tmp_path), workers=workers)
    )
    await svc.start()
    closed = False
    try:
        url = f"wss://127.0.0.1:{svc.https_port}/ws"
        socks = []
        for i in range(3):  # one per worker at least, whichever takes it
            ws = await websockets.connect(url, ssl=client_ssl(), ping_interval=None)
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"
            socks.append(ws)
        await svc.close()
        closed = True
        for ws in socks:
            with pytest.raises(websockets.ConnectionClosed) as caught:
                await asyncio.wait_for(ws.recv(), 5)
            # Received from the proxy (not our own): 1001, "going away".
            assert caught.value.rcvd is not None, caught.value
            assert caught.value.rcvd.code == 1001
        await _until(lambda: len(ws_node.codes) == 3, 5)
        assert ws_node.codes == [1001, 1001, 1001]
    finally:
        if not closed:
            await svc.close()


async def test_an_idle_websocket_is_ended_with_going_away(ws_node: WsNode, tmp_path: Path) -> None:
    """proxy.websocket_idle_timeout ends a silent tunnel the same way (both ends get 1001, as
    servers that close idle WebSockets send); traffic either way keeps it open until then."""
    cfg = proxy_config(
        [f"http://127.0.0.1:{ws_node.port}"], str(tmp_path), websocket_idle_timeout=1.0
    )
    svc = ProxyService(cfg)
    await svc.start()
    try:
        url = f"wss://127.0.0.1:{svc.https_port}/ws"
        async with websockets.connect(url, ssl=client_ssl(), ping_interval=None) as ws:
            for i in range(5):  # 2 s of traffic, every 0.5 s: never idle for 1 s
                await asyncio.sleep(0.5 if i else 0)
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
            t0 = asyncio.get_running_loop().time()  # (silence from here)
            with pytest.raises(websockets.ConnectionClosed) as caught:
                await asyncio.wait_for(ws.recv(), 10)
            waited = asyncio.get_running_loop().time() - t0
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1001
        assert 0.9 < waited < 5, waited
        await _until(lambda: ws_node.codes == [1001], 5)
        assert ws_node.codes == [1001]
    finally:
        await svc.close()


async def _raw_node(
    behave: str, got: list[bytes]
) -> tuple[asyncio.AbstractServer, int, asyncio.Event]:
    """A node that accepts the upgrade by hand, then (behave == "half") writes half a frame
    (the header of a 4,096-byte binary frame and 100 bytes of it) or nothing ("quiet"), and
    records every byte it receives until the end of the connection."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /api/client/v2/status"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await writer.drain()
            writer.close()
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
        )
        if behave == "half":
            writer.write(b"\x82\x7e\x10\x00" + b"n" * 100)
        await writer.drain()
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
        got.append(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


def _masked_half_frame() -> bytes:
    """A client's masked text frame header announcing 1,000 bytes, and 10 of them."""
    key = os.urandom(4)
    return (
        b"\x81\xfe"
        + struct.pack("!H", 1000)
        + key
        + bytes(b ^ key[i % 4] for i, b in enumerate(b"c" * 10))
    )


@pytest.mark.parametrize("inside", ["node-to-client", "client-to-node"])
async def test_no_close_frame_inside_a_frame(tmp_path: Path, inside: str) -> None:
    got: list[bytes] = []
    server, port, done = await _raw_node("half" if inside == "node-to-client" else "quiet", got)
    svc = ProxyService(proxy_config([f"http://127.0.0.1:{port}"], str(tmp_path)))
    await svc.start()
    closed = False
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", svc.https_port, ssl=client_ssl()
        )
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        sent = b""
        if inside == "client-to-node":
            sent = _masked_half_frame()
            writer.write(sent)
            await writer.drain()
        else:  # the node's half frame has reached the client before the stop
            partial = await asyncio.wait_for(reader.readexactly(104), 5)
            assert partial == b"\x82\x7e\x10\x00" + b"n" * 100
        await asyncio.sleep(0.2)  # (the client's bytes through the proxy to the node)
        await svc.close()
        closed = True
        rest = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            rest = await asyncio.wait_for(reader.read(), 5)
        await asyncio.wait_for(done.wait(), 5)
        if inside == "node-to-client":
            assert rest == b""  # the stream ended inside the node's frame: no Close after it
            # The other direction was between frames: the node got the proxy's masked Close.
            frame = got[0]
            assert len(frame) == 8 and frame[0] == 0x88 and frame[1] == 0x82, frame
            code = bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:]))
            assert code == b"\x03\xe9"
        else:
            assert rest == _GOING_AWAY_FRAME  # to the client: between frames
            assert got[0] == sent  # to the node: the half frame, and nothing put after it
        writer.close()
    finally:
        if not closed:
            await svc.close()
        server.close()
