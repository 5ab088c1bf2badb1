#!/usr/bin/env python3
"""The I/O floor under confedge's proxy: uvloop, Python's TLS and one read and one write each way.

Why: issue 16 asks for confedge's CPU per HTTPS request at most nginx's. Before spending work
on the HTTP/1.1 exchange, this says how much of a request's CPU is paid by the stack every
Python proxy on uvloop pays whatever its HTTP code does: the event loop, uvloop's TLS
(`ssl.SSLObject` over memory BIOs, the same server context confedge builds, `tls/context.py`),
the kernel's TCP, and a Protocol callback on each side. What confedge spends above this figure
is its HTTP handling (parsing, checks, the node's request head, the response plan, the access
log, timers); what is left between this figure and nginx's is the price of that stack itself.

This is **not a proxy** and must never serve anything but the benchmark: it does not parse HTTP.
It assumes what `wrk` does on a keep-alive connection (one request at a time, arriving in one
read) and answers each read from the client with a fixed request for the same path to its own
node connection (one per client connection, nodes round-robin), relaying whatever the node
sends back as it comes. The plain HTTP port answers every read with a fixed 301, as the
redirect listener would.

Usage (run.py starts it with ``--servers nginx confedge floor``):
    python bench/proxy/floor.py --cert C --key K --https-port P --http-port Q --nodes 1,2,3
        [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
from typing import cast

import uvloop

from confedge.tls.context import server_context

# What confedge sends the node for wrk's requests, near enough in size (tests/e2e and the
# access log show confedge's own: the forwarding headers, Host and keep-alive).
_HEAD = (
    b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\nX-Forwarded-For: 127.0.0.1\r\n"
    b"X-Forwarded-Proto: https\r\nConnection: keep-alive\r\n\r\n"
)
STATUS_REQUEST = b"GET /api/client/v2/status" + _HEAD
PAGE_REQUEST = b"GET /webapp/home" + _HEAD
REDIRECT = (
    b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://127.0.0.1/webapp/home\r\n"
    b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"
)


class _Node(asyncio.Protocol):
    """A client's own node connection: everything the node sends goes to the client."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """One TLS client connection: each read is one request, answered through the node."""

    def __init__(self, nodes: list[int], turn: list[int]) -> None:
        self.nodes = nodes
        self.turn = turn
        self.node: _Node | None = None
        self.pending: bytes = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.turn[0] += 1
        port = self.nodes[self.turn[0] % len(self.nodes)]
        asyncio.get_running_loop().create_task(self._connect(self.transport, port))

    async def _connect(self, client: asyncio.Transport, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, node = await loop.create_connection(lambda: _Node(client), "127.0.0.1", port)
        except OSError:
            client.close()
            return
        self.node = node
        if self.pending and node.transport is not None:
            node.transport.write(self.pending)
            self.pending = b""

    def data_received(self, data: bytes) -> None:
        request = PAGE_REQUEST if b" /webapp" in data[:64] else STATUS_REQUEST
        node = self.node
        if node is None or node.transport is None:
            self.pending += request
        else:
            node.transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.node is not None and self.node.transport is not None:
            self.node.transport.close()


class _Redirect(asyncio.Protocol):
    """The plain HTTP port: every read is answered with the same 301."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(REDIRECT)


def _listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def _serve(
    https: socket.socket, http: socket.socket, ctx: ssl.SSLContext, nodes: list[int]
) -> None:
    """One worker: both listeners on one uvloop loop until SIGTERM."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        turn = [os.getpid()]  # workers start the round-robin at different nodes
        await loop.create_server(lambda: _Client(nodes, turn), sock=https, ssl=ctx)
        await loop.create_server(_Redirect, sock=http)
        await stop.wait()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--https-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--nodes", required=True, help="node ports on 127.0.0.1, comma-separated")
    ap.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    args = ap.parse_args(argv)
    nodes = [int(p) for p in args.nodes.split(",")]
    ctx = server_context(args.cert, args.key)  # confedge's own TLS settings
    workers = args.workers or os.cpu_count() or 1
    # Each worker its own SO_REUSEPORT listeners, as confedge's workers have.
    sockets = [(_listener(args.https_port), _listener(args.http_port)) for _ in range(workers)]
    children = []
    for https, http in sockets[1:]:
        pid = os.fork()
        if pid == 0:
            _serve(https, http, ctx, nodes)
            os._exit(0)
        children.append(pid)
    try:
        _serve(*sockets[0], ctx, nodes)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
