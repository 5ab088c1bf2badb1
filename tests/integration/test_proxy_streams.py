"""Streaming through the proxy: SSE event by event, WebSocket echo, big bodies with backpressure,
curl over TLS, and the port-80 redirect."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import time

import pytest
import uvloop
import websockets
from proxy_upstream import Upstream, client_ssl, get, proxy_config, read_response

from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def nodes():
    ups = [await Upstream(f"n{i}").start() for i in range(2)]
    yield ups
    for u in ups:
        await u.kill()


@pytest.fixture
async def proxy(nodes, tmp_path):
    svc = ProxyService(
        proxy_config(
            [u.address for u in nodes],
            str(tmp_path),
            http_port=spare_port(),
            idle_timeout=0.5,
            read_timeout=0.5,
        )
    )
    await svc.start()
    yield svc
    await svc.close()


async def test_sse_events_arrive_one_by_one(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    # 12 events 0.1 s apart: longer than idle_timeout and read_timeout (0.5 s) in total, so a
    # timeout that applied to streams would cut it.
    writer.write(
        b"GET /sse?n=12&interval=0.1 HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"200" in head.split(b"\r\n")[0] and b"text/event-stream" in head
    delays = []
    buf = b""
    while len(delays) < 12:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        buf += chunk[:-2]
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            data = json.loads(ev.split(b"data: ", 1)[1])
            delays.append(time.time() - data["t"])
    writer.close()
    assert max(delays) < 0.05, delays


@pytest.mark.slow
async def test_long_sse_stream_outlives_every_timeout(nodes, tmp_path):
    """A 40 s stream with 8 s gaps between events, every timeout set to 2 s: nothing cuts it."""
    svc = ProxyService(
        proxy_config(
            [u.address for u in nodes],
            str(tmp_path),
            idle_timeout=2,
            read_timeout=2,
            header_timeout=2,
            body_timeout=2,
            health_interval=1,
        )
    )
    await svc.start()
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", svc.https_port, ssl=client_ssl()
        )
        writer.write(b"GET /sse?n=6&interval=8 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = await asyncio.wait_for(read_response(reader), 70)
        assert r.status == 200 and r.body.count(b"event: tick") == 6
        writer.close()
    finally:
        await svc.close()


async def test_sse_with_curl_no_buffer(proxy):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sNk",
        f"https://127.0.0.1:{proxy.https_port}/sse?n=5&interval=0.1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    delays = []
    while len(delays) < 5:
        line = await asyncio.wait_for(proc.stdout.readline(), 5)
        if line.startswith(b"data: "):
            delays.append(time.time() - json.loads(line[6:])["t"])
    await proc.wait()
    assert max(delays) < 0.05, delays


async def test_websocket_echo(proxy):
    ctx = client_ssl()
    async with websockets.connect(f"wss://127.0.0.1:{proxy.https_port}/ws", ssl=ctx) as ws:
        for msg in ["hello", "x" * 70_000, b"\x00\x01binary"]:
            await ws.send(msg)
            assert await ws.recv() == msg
        # idle longer than proxy.idle_timeout: WebSocket has its own (long) idle timeout
        await asyncio.sleep(0.8)
        await ws.send("still there")
        assert await ws.recv() == "still there"


async def test_large_response_streams_with_backpressure(proxy, nodes):
    size = 64 * 1024 * 1024
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.https_port, ssl=client_ssl(), limit=1 << 16
    )
    writer.transport.set_write_buffer_limits(0)
    writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
    await reader.readuntil(b"\r\n\r\n")
    # A slow client: it reads a little and pauses. The proxy must stop reading from the node
    # instead of buffering the body: the node's writes stall far below the body size.
    got = len(await reader.read(65536))
    await asyncio.sleep(0.5)
    sent_while_paused = sum(u.big_sent for u in nodes)
    buffered = sum(c.transport.get_write_buffer_size() for c in proxy.core.clients if c.transport)
    assert sent_while_paused < 16 * 1024 * 1024, sent_while_paused
    assert buffered < 4 * 1024 * 1024, buffered
    while got < size:
        data = await reader.read(1 << 20)
        assert data
        got += len(data)
    writer.close()
    assert got == size


async def test_small_chunks_to_a_slow_client_are_not_queued_without_bound(proxy, nodes):
    """Write coalescing (WorkerRuntime.send) queues small writes until the end of the loop
    iteration; a node streaming a large body in 1 KiB chunks to a client that stops reading
    must still be paused by backpressure, not buffered in the proxy."""
    size = 32 * 1024 * 1024
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.https_port, ssl=client_ssl(), limit=1 << 16
    )
    writer.write(b"GET /bigchunked?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
    await reader.readuntil(b"\r\n\r\n")

    async def chunk() -> int:
        n = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(n + 2)
        assert data == b"y" * n + b"\r\n"
        return n

    got = 0
    while got < 65536:  # read a little, then stop reading
        got += await chunk()
    await asyncio.sleep(0.5)
    sent_while_paused = sum(u.big_sent for u in nodes)
    buffered = sum(c.transport.get_write_buffer_size() for c in proxy.core.clients if c.transport)
    # (Measured: 11 MB sent, under 1 MB buffered; 21 MB and 4.3 MB before the queue was
    # bounded by COALESCE_BATCH, when libuv's read loop could run ahead of backpressure.)
    assert sent_while_paused < 16 * 1024 * 1024, sent_while_paused
    assert buffered < 2 * 1024 * 1024, buffered
    assert sum(len(data) for _, data in proxy.core.out) == 0  # nothing left queued
    # Then the client reads everything: all of it arrives, in order, de-chunked and re-chunked.
    while n := await chunk():
        got += n
    writer.close()
    assert got == size


async def test_request_body_to_a_slow_node_is_not_buffered_in_the_proxy(nodes, tmp_path):
    """A body larger than request_buffer_bytes streams to the node; while the node does not
    read it, the proxy stops reading from the client (the other direction of backpressure,
    through the write queue). What it did read stays retained for a failover replay until the
    node answers, so what matters is that the reading stops."""
    svc = ProxyService(
        proxy_config(
            [u.address for u in nodes],
            str(tmp_path),
            request_buffer_bytes=64 * 1024,
            max_body_bytes=64 * 1024 * 1024,
        )
    )
    await svc.start()
    try:
        # More than the loopback socket buffers on both sides can absorb (several MB each).
        size = 40 * 1024 * 1024
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", svc.https_port, ssl=client_ssl()
        )
        writer.write(
            b"POST /slowupload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % size
        )
        writer.write(b"z" * size)  # all of it handed to the client's transport at once
        await asyncio.sleep(0.6)
        assert any(u.slow_upload_waiting for u in nodes)
        held = sum(
            u.transport.get_write_buffer_size() for u in svc.core.upstreams if u.transport
        ) + sum(len(d) for _, d in svc.core.out)
        (client,) = svc.core.clients
        assert client.cur is not None
        read = client.cur.body_size
        # Measured: about 6 MB read, then client reading paused; without backpressure the
        # proxy would have read all 40 MB within a few milliseconds on loopback.
        assert read < 16 * 1024 * 1024, read  # the proxy stopped reading the client...
        assert client.paused and not client.transport.is_reading()  # type: ignore[attr-defined]
        assert held < 2 * 1024 * 1024, held  # ...and little waits in its write buffers
        resp = await asyncio.wait_for(read_response(reader), 20)
        writer.close()
        assert resp.status == 200
        rec = [r for u in nodes for r in u.received if r.target == "/slowupload"]
        assert len(rec) == 1 and rec[0].body == b"z" * size  # all of it, intact
    finally:
        await svc.close()


async def test_chunked_and_close_delimited_responses(proxy):
    r = await get(proxy.https_port, "/chunked")
    assert r.status == 200 and r.body == b"hello world"
    r = await get(proxy.https_port, "/close-delimited")
    assert r.status == 200 and r.body == b"until the end"
    # a keep-alive connection survives the close-delimited answer of the node
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    for path in (b"/close-delimited", b"/echo"):
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = await read_response(reader)
        assert r.status == 200
    writer.close()


async def test_head_and_csp_and_hop_by_hop(proxy):
    r = await get(proxy.https_port, "/echo", method="HEAD")
    assert r.status == 200 and r.body == b"" and int(r.header("Content-Length")) > 0
    r = await get(proxy.https_port, "/csp")
    assert r.header("Content-Security-Policy") == "default-src 'none'"  # the node's own wins
    r = await get(proxy.https_port, "/hop")
    assert r.header("X-Secret") is None and r.header("Keep-Alive") is None


async def test_http10_keep_alive_and_close(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    for _ in range(2):
        writer.write(b"GET /echo HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        r = await asyncio.wait_for(read_response(reader), 3)
        assert r.status == 200 and r.header("Connection") == "keep-alive"
    # plain HTTP/1.0 and an unknown-length answer: delimited by the close
    writer.write(b"GET /chunked HTTP/1.0\r\nHost: localhost\r\n\r\n")
    r = await asyncio.wait_for(read_response(reader), 3)
    assert r.status == 200 and r.body == b"hello world" and r.header("Transfer-Encoding") is None
    writer.close()


async def test_chunked_request_body(proxy):
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    from proxy_upstream import exchange

    r = await exchange(proxy.https_port, raw)
    assert r is not None and r.status == 200 and r.json()["body_len"] == 11


async def test_expect_100_continue(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abcd")
    r = await read_response(reader)
    assert r.status == 200 and r.json()["body_len"] == 4
    assert all(k.lower() != "expect" for k, _ in r.json()["headers"])
    writer.close()


async def test_curl_verbose_over_tls(proxy):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-vk",
        "--http1.1",
        f"https://localhost:{proxy.https_port}/webapp/index.html",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0
    assert b"< HTTP/1.1 200" in err
    assert b"SSL connection using TLSv1.3" in err or b"SSL connection using TLSv1.2" in err
    assert b"ALPN: server accepted http/1.1" in err
    assert json.loads(out)["target"] == "/webapp/index.html"


async def test_http_redirects_to_https(proxy, tmp_path):
    port = proxy.http_port
    cases = [
        ("/webapp/?x=1", "localhost"),
        ("/a/b", "edge.localdomain"),
        ("/", "evil.example"),
    ]
    # One keep-alive connection for all three, like the reference's nginx (no Connection: close).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for target, host in cases:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: probe/1\r\n"
            "Referer: http://x/?code=42\r\n\r\n".encode()
        )
        r = await read_response(reader)
        assert r.status == 301
        assert r.header("Connection") is None
        expect_host = host if host != "evil.example" else "edge.localdomain"  # no open redirect
        assert r.header("Location") == f"https://{expect_host}:{proxy.https_port}{target}"
    # HTTP/1.0 without keep-alive, and a malformed request: answered, then closed.
    writer.write(b"GET /old?token=t HTTP/1.0\r\n\r\n")
    r = await read_response(reader)
    assert r.status == 301 and r.header("Connection") == "close"
    assert await reader.read() == b""
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nbad header\r\n\r\n")
    r = await read_response(reader)
    assert r.status == 400
    writer.close()
    # Each answer has its access-log line in the reference format, as nginx logs its 301s.
    await proxy.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    pattern = re.compile(
        r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]  "
        r'"(?P<req>[^"]*)" (?P<status>\d{3}) 0 "(?P<ref>[^"]*)" "(?P<ua>[^"]*)" "-" "-" "-"$'
    )
    got = []
    for line in lines:
        m = pattern.match(line)
        assert m is not None, line
        got.append((m["req"], m["status"], m["ref"], m["ua"]))
    assert got == [
        ("GET /webapp/?x=1 HTTP/1.1", "301", "http://x/?code=[FILTERED]", "probe/1"),
        ("GET /a/b HTTP/1.1", "301", "http://x/?code=[FILTERED]", "probe/1"),
        ("GET / HTTP/1.1", "301", "http://x/?code=[FILTERED]", "probe/1"),
        ("GET /old?token=[FILTERED] HTTP/1.0", "301", "", "-"),
        ("GET /x HTTP/1.1", "400", "", "-"),
    ]


async def test_http_redirect_connection_timeouts(nodes, tmp_path):
    svc = ProxyService(
        proxy_config(
            [u.address for u in nodes],
            str(tmp_path),
            http_port=spare_port(),
            idle_timeout=0.5,
            header_timeout=1.0,
        )
    )
    await svc.start()
    port = svc.http_port
    try:
        # Idle keep-alive: closed after proxy.idle_timeout (0.5 s here).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await read_response(reader)).status == 301
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.3 < time.monotonic() - t0 < 3
        writer.close()
        # A second request whose head is trickled forever is cut at proxy.header_timeout
        # (1 s, from the request's first byte) even though bytes keep coming.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nGET /b HTTP/1.1\r\n")
        assert (await read_response(reader)).status == 301
        t0 = time.monotonic()
        closed = False
        for _ in range(40):
            writer.write(b"X-A: b\r\n")
            try:
                data = await asyncio.wait_for(reader.read(100), 0.1)
            except TimeoutError:
                continue
            if data == b"":
                closed = True
                break
        writer.close()
        assert closed and 0.8 < time.monotonic() - t0 < 3
    finally:
        await svc.close()


async def test_tls_versions(proxy):
    for version, ok in [
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ]:
        ctx = client_ssl()
        ctx.minimum_version = ctx.maximum_version = version
        if version == ssl.TLSVersion.TLSv1_1:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=ctx)
            assert ok, f"{version} was accepted"
            assert writer.get_extra_info("ssl_object").version() == version.name.replace(
                "_", "."
            ).replace("TLSv1.", "TLSv1.")
            writer.close()
        except (ssl.SSLError, ConnectionResetError):
            assert not ok, f"{version} was refused"


async def test_node_connection_paused_for_a_slow_client_is_not_pooled_paused(tmp_path):
    """A slow client makes the proxy pause reading from the node (pause_writing); when the read
    that completes the response is also the one that fills the client's write buffer again, the
    exchange ends with the node connection paused. It goes back to the keep-alive pool, and the
    next request on it must be answered at once, not hang until read_timeout because nobody
    resumes its reading (issue 16)."""
    node = await Upstream("n0").start()  # one node: the next request reuses its pooled connection
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), read_timeout=5, health_interval=30)
    )
    await svc.start()
    try:
        size = 8 * 1024 * 1024
        # A small receive buffer, so that what the client has not read yet stays in the proxy's
        # write buffer (loopback's autotuned buffers would otherwise absorb megabytes).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", svc.https_port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_ssl(), server_hostname="localhost", limit=1 << 16
        )
        writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        while got < size:  # a slow reader to the end: the proxy's node reading stays throttled
            data = await reader.read(32 * 1024)
            assert data
            got += len(data)
            await asyncio.sleep(0.002)
        assert got == size
        await asyncio.sleep(0.05)  # the proxy's last write drains; the exchange is over
        pooled = [c for p in svc.core.pools for c in p.idle]
        assert pooled, "the node connection was not kept alive"
        assert all(c.transport.is_reading() for c in pooled), "pooled with its reading paused"
        # The next request (same client connection, keep-alive) takes that pooled connection.
        writer.write(b"GET /api/next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = await asyncio.wait_for(read_response(reader), 2)
        assert r.status == 200
        writer.close()
    finally:
        await svc.close()
        await node.kill()
