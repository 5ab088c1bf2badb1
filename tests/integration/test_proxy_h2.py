"""HTTP/2 to clients (proxy/h2.py) through the real proxy to the recording node: GET, POST,
failover, SSE, flow control, limits and hostile paths, with httpx (hyper-h2 underneath) and raw
hyper-h2 over ssl as the clients, and curl --http2 / h2load as users meet them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import httpx
import hyperframe.frame as hf
import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, guarded_config, proxy_config

from confedge.proxy.h2 import RESET_LIMIT
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


async def _proxy(nodes, tmp_path, **kw):
    svc = ProxyService(
        proxy_config([u.address for u in nodes], str(tmp_path), http_port=spare_port(), **kw)
    )
    await svc.start()
    return svc


@pytest.fixture
async def proxy(nodes, tmp_path):
    svc = await _proxy(nodes, tmp_path, read_timeout=5.0)
    yield svc
    await svc.close()


def _client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True, verify=client_ssl(), base_url=f"https://localhost:{port}", timeout=10
    )


async def test_get_and_post_over_h2(proxy, nodes, tmp_path):
    async with _client(proxy.https_port) as c:
        r = await c.get(
            "/api/client/v2/echo?x=1", headers={"X-Forwarded-Host": "evil", "User-Agent": "t/2"}
        )
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        body = r.json()
        assert body["target"] == "/api/client/v2/echo?x=1"
        rec = [x for n in nodes for x in n.requests()][-1]
        assert rec.header("host") == f"localhost:{proxy.https_port}"
        assert rec.header("x-forwarded-host") is None  # forwarding headers stripped
        assert rec.header("x-real-ip") == "127.0.0.1"
        assert "content-security-policy" in r.headers
        payload = json.dumps({"k": "v" * 5000}).encode()
        r = await c.post("/api/client/v2/echo", content=payload)
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.json()["body_sha"] == hashlib.sha256(payload).hexdigest()
        # several streams at once on the one connection
        rs = await asyncio.gather(*[c.get(f"/api/client/v2/echo?i={i}") for i in range(20)])
        assert all(x.status_code == 200 for x in rs)
        assert [x.json()["target"] for x in rs] == [f"/api/client/v2/echo?i={i}" for i in range(20)]
    await proxy.close()
    log = (tmp_path / "access.log").read_text()
    line = [x for x in log.splitlines() if "echo?x=1" in x][-1]
    assert '"GET /api/client/v2/echo?x=1 HTTP/2.0" 200' in line and '"t/2"' in line


async def test_failover_over_h2(nodes, tmp_path):
    nodes[0].fail_status = 502
    svc = await _proxy(nodes, tmp_path, health_interval=30)
    try:
        async with _client(svc.https_port) as c:
            for _ in range(4):
                r = await c.post("/api/client/v2/echo", content=b"hello")
                assert r.status_code == 200
                assert r.json()["body_len"] == 5
    finally:
        await svc.close()


async def _raw_get(port: int, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One request on a fresh hyper-h2 connection: (status, body); the headers go as given."""
    reader, writer, conn = await _raw_h2(port)
    conn.send_headers(1, headers, end_stream=True)
    writer.write(conn.data_to_send())
    status, body = 0, b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            done = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            writer.write(conn.data_to_send())
            if done:
                break
    finally:
        writer.close()
    return status, body


async def test_hostile_paths_and_hosts_over_h2(proxy, nodes):
    port = proxy.https_port
    before = len([x for n in nodes for x in n.requests()])
    for path, want in (
        ("/api/../../etc/passwd", 400),
        ("/a/%2e%2e/%2e%2e/x", 400),
        ("/x%00y", 400),
        ("/x#frag", 400),
        ("http://evil.example/x", 400),
        ("*", 400),
    ):
        status, _ = await _raw_get(port, _req(path, port))
        assert status == want, path
    hdrs = _req("/api/client/v2/echo", port)
    status, _ = await _raw_get(
        port, [(k, "evil.example" if k == ":authority" else v) for k, v in hdrs]
    )
    assert status == 400
    no_authority = [(k, v) for k, v in hdrs if k != ":authority"]
    status, _ = await _raw_get(port, [*no_authority, ("host", "evil.example")])
    assert status == 400
    trace = [(k, "TRACE" if k == ":method" else v) for k, v in hdrs]
    assert (await _raw_get(port, trace))[0] == 405
    connect = [(":method", "CONNECT"), (":authority", f"localhost:{port}")]
    assert (await _raw_get(port, connect))[0] == 405
    many = [*hdrs, *[(f"x-h{i}", "v") for i in range(150)]]
    assert (await _raw_get(port, many))[0] == 431
    after = [x for n in nodes for x in n.requests()][before:]
    assert after == []  # nothing hostile reached a node
    status, body = await _raw_get(port, _req("/api/client/v2/echo?ok=1", port))
    assert status == 200 and json.loads(body)["target"] == "/api/client/v2/echo?ok=1"


async def test_sse_over_h2_event_by_event(proxy):
    async with _client(proxy.https_port) as c:
        async with c.stream("GET", "/sse?n=8&interval=0.1") as r:
            assert r.http_version == "HTTP/2"
            assert r.headers["content-type"].startswith("text/event-stream")
            delays = []
            buf = b""
            async for chunk in r.aiter_raw():
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    data = json.loads(ev.split(b"data: ", 1)[1])
                    delays.append(time.time() - data["t"])
        assert len(delays) == 8
        assert max(delays) < 0.1, delays


async def test_body_limit_over_h2(nodes, tmp_path):
    svc = await _proxy(nodes, tmp_path, max_body_bytes=1000)
    try:
        async with _client(svc.https_port) as c:
            r = await c.post("/api/client/v2/echo", content=b"x" * 5000)
            assert r.status_code == 413

            async def gen():
                for _ in range(5):
                    yield b"y" * 500

            r = await c.post("/api/client/v2/echo", content=gen())
            assert r.status_code == 413
            r = await c.get("/api/client/v2/echo")  # the connection is still good
            assert r.status_code == 200
    finally:
        await svc.close()


async def _raw_h2(port: int):
    ctx = client_ssl()
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    ssl_obj = writer.get_extra_info("ssl_object")
    assert ssl_obj.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    return reader, writer, conn


def _req(path: str, port: int) -> list[tuple[str, str]]:
    return [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", f"localhost:{port}"),
        (":path", path),
    ]


async def test_slow_h2_client_backpressures_the_node(proxy, nodes):
    """A client that never opens its window: the node stops being read after the stream's
    window plus STREAM_BUFFER, instead of the proxy buffering the whole 32 MB response."""
    reader, writer, conn = await _raw_h2(proxy.https_port)
    conn.send_headers(1, _req("/big?size=33554432", proxy.https_port), end_stream=True)
    writer.write(conn.data_to_send())
    got = held = 0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.3)
        except TimeoutError:
            continue
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                got += len(ev.data)  # not acknowledged yet: the window stays shut
                held += ev.flow_controlled_length
        writer.write(conn.data_to_send())
    sent = max(n.big_sent for n in nodes)
    assert got <= 65535
    # the node sent at most the window + STREAM_BUFFER + socket buffers (a few MB), not 32 MB
    assert sent < 8 * 1024 * 1024, sent
    # now read it all: acknowledging lets the rest through
    conn.acknowledge_received_data(held, 1)
    writer.write(conn.data_to_send())
    while got < 33554432:
        data = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert data
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                got += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        writer.write(conn.data_to_send())
    assert got == 33554432
    writer.close()


async def test_rapid_reset_closes_the_connection(proxy):
    """CVE-2023-44487: open-and-reset streams past RESET_LIMIT gets GOAWAY ENHANCE_YOUR_CALM."""
    reader, writer, conn = await _raw_h2(proxy.https_port)
    sid = 1
    for _ in range(RESET_LIMIT + 20):
        conn.send_headers(sid, _req("/sse?n=100&interval=1", proxy.https_port), end_stream=True)
        conn.reset_stream(sid)
        sid += 2
    writer.write(conn.data_to_send())
    goaway = None
    try:
        while goaway is None:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    goaway = ev
    except (ConnectionError, ssl.SSLError):
        pass
    assert goaway is not None and goaway.error_code == 11  # ENHANCE_YOUR_CALM
    writer.close()


async def test_continuation_flood_is_refused(proxy):
    """Endless CONTINUATION frames (CVE-2024-27316 family): the connection is closed."""
    reader, writer, _ = await _raw_h2(proxy.https_port)
    await asyncio.sleep(0.05)
    # HEADERS without END_HEADERS, then many CONTINUATION frames with junk header data.
    f = hf.HeadersFrame(1)
    f.data = b""
    f.flags.add("END_STREAM")
    writer.write(f.serialize())
    for _ in range(200):
        c = hf.ContinuationFrame(1)
        c.data = b"\x00" * 1000
        writer.write(c.serialize())
    closed = False
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                closed = True
                break
    except (ConnectionError, ssl.SSLError, TimeoutError):
        closed = True
    assert closed
    writer.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_http2(proxy):
    port = proxy.https_port
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sk",
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        f"https://localhost:{port}/api/client/v2/status",
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert out.decode() == "2 200"


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
async def test_h2load(proxy):
    port = proxy.https_port
    proc = await asyncio.create_subprocess_exec(
        "h2load",
        "-n",
        "200",
        "-c",
        "4",
        "-m",
        "10",
        f"https://localhost:{port}/api/client/v2/status",
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert "Application protocol: h2" in text
    assert "200 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 200 2xx" in text, text


async def test_guard_counts_pin_guesses_over_h2(nodes, tmp_path):
    """The guard on HTTP/2: PIN guesses on several streams of one connection (sent at once, so
    the in-flight reservations cap them) are counted, then the address is banned."""
    from confedge.guard import create_guard

    svc = ProxyService(
        guarded_config([nodes[0].address], str(tmp_path)), guard_factory=create_guard
    )
    await svc.start()
    try:
        path = "/api/client/v2/conferences/meet/request_token"
        async with _client(svc.https_port) as c:
            r = await c.post(path, headers={"pin": "1234"}, content=b"{}")
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            rs = await asyncio.gather(
                *[c.post(path, headers={"pin": f"99{i:02d}"}, content=b"{}") for i in range(6)]
            )
            codes = sorted(x.status_code for x in rs)
            assert set(codes) <= {403, 429} and 429 in codes, codes
            before = len(nodes[0].requests())
            r = await c.post(path, headers={"pin": "1234"}, content=b"{}")
            assert r.status_code == 429 and "retry-after" in r.headers
            r = await c.get("/api/client/v2/echo")
            assert r.status_code == 429
            assert len(nodes[0].requests()) == before  # banned: nothing reaches the node
    finally:
        await svc.close()


async def test_stalled_request_body_times_out_over_h2(nodes, tmp_path):
    """body_timeout on HTTP/2: a stream that announces a body and never sends it gets 408,
    and nothing reaches a node."""
    svc = await _proxy(nodes, tmp_path, body_timeout=0.5)
    try:
        port = svc.https_port
        reader, writer, conn = await _raw_h2(port)
        hdrs = [*_req("/api/client/v2/echo", port), ("content-length", "100")]
        hdrs[0] = (":method", "POST")
        conn.send_headers(1, hdrs, end_stream=False)
        conn.send_data(1, b"x" * 10)
        writer.write(conn.data_to_send())
        status = 0
        start = time.monotonic()
        while not status and time.monotonic() - start < 5:
            data = await asyncio.wait_for(reader.read(65536), 5)
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
            writer.write(conn.data_to_send())
        assert status == 408
        assert 0.4 < time.monotonic() - start < 3
        assert [r for n in nodes for r in n.requests()] == []
        writer.close()
    finally:
        await svc.close()


async def test_fast_upload_to_a_slow_node_is_held_back(nodes, tmp_path):
    """Request-body backpressure on HTTP/2: while the node does not read (/slowupload waits
    1 s), the proxy stops giving the client window once the node connection's buffers are
    full, so the client cannot push the whole 32 MB into the proxy's memory."""
    size = 32 * 1024 * 1024
    svc = await _proxy(
        nodes, tmp_path, max_body_bytes=size, request_buffer_bytes=65536, read_timeout=10
    )
    try:
        port = svc.https_port
        reader, writer, conn = await _raw_h2(port)
        hdrs = [*_req("/slowupload", port), ("content-length", str(size))]
        hdrs[0] = (":method", "POST")
        conn.send_headers(1, hdrs, end_stream=False)
        writer.write(conn.data_to_send())
        sent = 0
        sent_while_waiting = 0
        status = 0
        body = b""
        chunk = b"u" * 16384
        start = time.monotonic()
        while not status or body[-1:] != b"}":
            window = conn.local_flow_control_window(1) if sent < size else 0
            if window > 0:
                n = min(window, len(chunk), size - sent)
                sent += n
                conn.send_data(1, chunk[:n], end_stream=sent == size)
                writer.write(conn.data_to_send())
                await writer.drain()
                if any(n.slow_upload_waiting for n in nodes):
                    sent_while_waiting = sent
                continue
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "connection closed"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            writer.write(conn.data_to_send())
            if any(n.slow_upload_waiting for n in nodes):
                sent_while_waiting = sent
            assert time.monotonic() - start < 30
        assert status == 200 and json.loads(body)["body_len"] == size
        # held back: window + node connection buffers (a few MB), not the 32 MB
        assert 0 < sent_while_waiting < 12 * 1024 * 1024, sent_while_waiting
        writer.close()
    finally:
        await svc.close()


async def test_static_mount_and_head_over_h2(nodes, tmp_path):
    """Static mounts (a file bigger than the stream window, read as the window opens), HEAD
    (headers only, END_STREAM on HEADERS) and 304 revalidation over HTTP/2."""
    www = tmp_path / "www"
    www.mkdir()
    big = bytes(range(256)) * 4096  # 1 MiB
    (www / "big.bin").write_bytes(big)
    (www / "index.html").write_bytes(b"<!doctype html><title>brand</title>")
    svc = await _proxy(nodes, tmp_path, static=[{"prefix": "/branding/", "path": str(www)}])
    try:
        async with _client(svc.https_port) as c:
            r = await c.get("/branding/big.bin")
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            assert r.content == big
            r = await c.get("/branding/")
            assert b"<title>brand</title>" in r.content
            etag = r.headers.get("etag")
            if etag:
                r = await c.get("/branding/", headers={"If-None-Match": etag})
                assert r.status_code == 304 and r.content == b""
            r = await c.head("/branding/big.bin")
            assert r.status_code == 200 and r.content == b""
            assert r.headers["content-length"] == str(len(big))
            r = await c.head("/api/client/v2/echo")
            assert r.status_code == 200 and r.content == b""
        assert [x for n in nodes for x in n.requests() if "branding" in x.target] == []
    finally:
        await svc.close()
    # One access-log line per static answer, with the bytes that went out (the exchange is
    # ended through the core, as over HTTP/1.1).
    lines = [ln for ln in (tmp_path / "access.log").read_text().splitlines() if "branding" in ln]
    got = [(ln.split('"')[1], ln.split('"')[2].split()[:2]) for ln in lines]
    assert got[0] == ("GET /branding/big.bin HTTP/2.0", ["200", str(len(big))]), got
    assert ("HEAD /branding/big.bin HTTP/2.0", ["200", "0"]) in got, got
    assert len(got) == (4 if etag else 3), got


async def test_body_over_the_limit_stops_the_upload(nodes, tmp_path):
    """A chunked (no Content-Length) upload past max_body_bytes: 413, then RST_STREAM
    NO_ERROR so the client stops sending; the connection serves the next stream."""
    svc = await _proxy(nodes, tmp_path, max_body_bytes=50000)
    try:
        port = svc.https_port
        reader, writer, conn = await _raw_h2(port)
        hdrs = [*_req("/api/client/v2/echo", port)]
        hdrs[0] = (":method", "POST")
        conn.send_headers(1, hdrs, end_stream=False)
        for _ in range(4):
            conn.send_data(1, b"z" * 16000)  # 64000 bytes, within the initial window
        writer.write(conn.data_to_send())
        status, reset = 0, None
        while reset is None:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.StreamReset):
                    reset = ev.error_code
            writer.write(conn.data_to_send())
        assert status == 413 and reset == 0  # NO_ERROR
        writer.close()
        assert [r for n in nodes for r in n.requests()] == []
        async with _client(port) as c:
            assert (await c.get("/api/client/v2/echo")).status_code == 200
    finally:
        await svc.close()


async def test_health_endpoint_answered_by_the_proxy_over_h2(proxy, nodes, tmp_path):
    """proxy.health_path over HTTP/2 is the proxy's own answer, as over HTTP/1.1: 200
    "serving", 503 "draining" once a drain begins; no node sees it."""
    before = sum(len(n.requests()) for n in nodes)
    async with _client(proxy.https_port) as c:
        r = await c.get("/health")
        assert (r.http_version, r.status_code, r.content) == ("HTTP/2", 200, b"serving\n")
        assert r.headers["cache-control"] == "no-store"
        r = await c.head("/health")
        assert (r.status_code, r.content) == (200, b"")
        proxy.set_drain("grace")
        for _ in range(50):  # the workers hear of the drain through their command pipe
            r = await c.get("/health")
            if r.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert (r.http_version, r.status_code, r.content) == ("HTTP/2", 503, b"draining\n")
    assert sum(len(n.requests()) for n in nodes) == before
    await proxy.close()
    lines = [x for x in (tmp_path / "access.log").read_text().splitlines() if "/health" in x]
    # $body_bytes_sent is the body alone, as nginx logs it ("serving\n" is 8 bytes)
    assert '"GET /health HTTP/2.0" 200 8 ' in lines[0]
    assert '"HEAD /health HTTP/2.0" 200 0 ' in lines[1]
