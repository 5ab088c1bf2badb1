"""HTTP/1.1 clients that do not read their answers (pipelining, slow read), real TLS sockets.

A client that sends requests and never reads must cost the proxy a bounded write buffer, must
not make a healthy node look dead, and must be dropped at a timeout; one that reads late must
still get every answer, in order.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, get, proxy_config, read_response

from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

H = b"Host: localhost\r\n"


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def node() -> AsyncIterator[Upstream]:
    u = await Upstream("n0").start()
    yield u
    await u.kill()


@pytest.fixture
async def proxy(node: Upstream, tmp_path: Path) -> AsyncIterator[ProxyService]:
    svc = ProxyService(
        proxy_config(
            [node.address],
            str(tmp_path),
            idle_timeout=1.0,
            read_timeout=1.0,
            health_interval=30,
        )
    )
    await svc.start()
    yield svc
    await svc.close()


async def _deaf_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS client with a small receive buffer whose answers are never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect)
    sock.connect(("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, ssl=client_ssl(), server_hostname="localhost")


def _largest_write_buffer(svc: ProxyService) -> int:
    core = svc.core
    assert core is not None
    most = 0
    for c in list(core.clients):
        t = getattr(c, "transport", None)
        if t is not None:
            most = max(most, t.get_write_buffer_size())
    return most


async def _watch(svc: ProxyService, seconds: float) -> tuple[int, float]:
    """(largest client write buffer seen, seconds until no client connection is left)."""
    core = svc.core
    assert core is not None
    most = 0
    async with asyncio.timeout(2):
        while not core.clients:  # (the proxy's side of the handshake ends after the client's)
            await asyncio.sleep(0.01)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        most = max(most, _largest_write_buffer(svc))
        if not core.clients:
            break
        await asyncio.sleep(0.05)
    return most, time.monotonic() - start


async def test_pipelined_requests_never_read_hold_no_backlog(
    proxy: ProxyService, node: Upstream
) -> None:
    """200 pipelined requests for 50 kB each, never read: the answers stop at about the
    transport's high-water mark (was: every answer queued, 10 MB here and without bound as the
    client went on sending), and the connection is dropped at idle_timeout."""
    _, writer = await _deaf_client(proxy.https_port)
    writer.write(b"GET /big?size=50000 HTTP/1.1\r\n" + H + b"\r\n" * 1)
    writer.write((b"GET /big?size=50000 HTTP/1.1\r\n" + H + b"\r\n") * 199)
    most, gone = await _watch(proxy, 5.0)
    writer.transport.abort()
    assert most < 2 * 1024 * 1024, most
    assert gone < 4.0, "the connection was not dropped"
    assert len(node.requests()) < 100
    assert (await get(proxy.https_port, "/after")).status == 200


async def test_a_client_that_never_reads_does_not_mark_its_node_down(
    proxy: ProxyService, node: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Small pipelined answers never read: the node that answers them is not paused before
    its head arrives (was: its read_timeout expired, the node was marked down and the next
    client got 503)."""
    _, writer = await _deaf_client(proxy.https_port)
    for _ in range(3):
        writer.write((b"GET /x HTTP/1.1\r\n" + H + b"\r\n") * 1000)
    most, gone = await _watch(proxy, 4.0)
    writer.transport.abort()
    assert "down" not in caplog.text
    assert most < 2 * 1024 * 1024, most
    assert gone < 3.5
    assert (await get(proxy.https_port, "/after")).status == 200


async def test_pipelined_answers_all_arrive_when_the_client_reads_late(
    proxy: ProxyService, node: Upstream
) -> None:
    """The answers held back while the client did not read go out, in order, when it does."""
    reader, writer = await _deaf_client(proxy.https_port)
    n = 30
    big = b"GET /big?size=50000 HTTP/1.1\r\n" + H + b"\r\n"
    writer.write(b"".join(big + b"GET /x?i=%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(n)))
    writer.write(b"GET /x?last HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    await asyncio.sleep(0.4)
    async with asyncio.timeout(5):
        for i in range(n):
            r = await read_response(reader)
            assert (r.status, len(r.body)) == (200, 50000)
            assert (await read_response(reader)).json()["target"] == f"/x?i={i}"
        r = await read_response(reader)
    assert r.json()["target"] == "/x?last"
    writer.transport.abort()


async def test_a_large_answer_never_read_frees_its_node_at_read_timeout(
    proxy: ProxyService, node: Upstream
) -> None:
    """One request for 50 MB, never read: the node is no longer read (it stops well short of
    50 MB) and the connection and its node connection are dropped at read_timeout."""
    _, writer = await _deaf_client(proxy.https_port)
    writer.write(b"GET /big?size=50000000 HTTP/1.1\r\n" + H + b"\r\n")
    most, gone = await _watch(proxy, 4.0)
    writer.transport.abort()
    assert most < 2 * 1024 * 1024, most
    assert gone < 3.5
    assert node.big_sent < 20_000_000
    core = proxy.core
    assert core is not None
    await asyncio.sleep(0.1)
    assert not [u for u in core.upstreams if u.owner is not None]
    assert (await get(proxy.https_port, "/after")).status == 200


async def test_many_pipelined_requests_split_across_reads_are_not_431(
    proxy: ProxyService, node: Upstream
) -> None:
    """3000 small pipelined requests, read as they come: a read that begins inside a head
    and completes it was counted whole against the head limit, pipelined requests after it
    included (was: 431 after some 2800 requests)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    n = 3000
    writer.write((b"GET /x HTTP/1.1\r\n" + H + b"\r\n") * (n - 1))
    writer.write(b"GET /x HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    statuses: list[int] = []
    async with asyncio.timeout(20):
        for _ in range(n):
            statuses.append((await read_response(reader)).status)
    writer.transport.abort()
    assert set(statuses) == {200}


async def test_port_80_pipelining_without_reading_holds_no_backlog(
    node: Upstream, tmp_path: Path
) -> None:
    """The redirect listener: requests pipelined for 2 s without reading a 301 (was: 123 MB
    of queued answers in 4 s, growing while the client sent); then the connection goes at its
    idle deadline, and a client that reads gets all its answers."""
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), http_port=spare_port(), idle_timeout=1.0)
    )
    await svc.start()
    try:
        core = svc.core
        assert core is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect)
        sock.connect(("127.0.0.1", svc.http_port))
        _, writer = await asyncio.open_connection(sock=sock)
        burst = b"GET /" + b"a" * 40 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        most = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            writer.write(burst * 1000)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break  # the proxy no longer reads us
            for c in list(core.redirects):
                if c.transport is not None:
                    most = max(most, c.transport.get_write_buffer_size())
        assert most < 2 * 1024 * 1024, most
        async with asyncio.timeout(3):
            while core.redirects:
                await asyncio.sleep(0.05)
        writer.transport.abort()

        reader, writer = await asyncio.open_connection("127.0.0.1", svc.http_port)
        writer.write(
            burst * 3000 + b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            for _ in range(3000):
                assert (await read_response(reader)).status == 301
            last = await read_response(reader)
        location = last.header("Location")
        assert location is not None and location.endswith("/last")
        writer.transport.abort()
    finally:
        await svc.close()
