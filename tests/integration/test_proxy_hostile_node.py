"""A broken or hostile conferencing node, and WebSocket/SSE clients that misbehave.

The node here is a small asyncio server that answers each request with the bytes its path names
(`SCRIPTS`), and records its connections, so that a test can tell whether the proxy reused one.
What must hold after each attack (RFC 9110 §15, RFC 9112 §6 and §7): an invalid response gets
the client a 502 (the proxy's page), its node connection is closed and never reused, nothing
reaches another client, and a normal request is answered at once afterwards. The client-side
smuggling and slow-client cases are in test_proxy_hostile.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from proxy_upstream import client_ssl, proxy_config, read_response

from confedge.proxy.service import ProxyService
from confedge.proxy.upstream import MAX_RESPONSE_HEAD

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _resp(extra: bytes, body: bytes = b"ok", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body)


# path -> what the node answers (then it goes on reading requests on the connection)
SCRIPTS: dict[str, bytes] = {
    # header injection and framing (RFC 9112 §5, §5.2, §6.3, §7.1)
    "/cr": _resp(b"X-A: a\rInjected: 1\r\n"),
    "/lf": _resp(b"X-A: a\nInjected: 1\r\n"),
    "/nul": _resp(b"X-A: a\x00b\r\n"),
    "/cookie-ctl": _resp(b"Set-Cookie: a=b\x01; Path=/\r\n"),
    "/location-ctl": _resp(b"Location: /x\x0bhttp://evil.example/\r\n", status=b"302 Found"),
    "/fold": _resp(b"X-A: a\r\n folded\r\n"),
    "/cl-twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "/cl-conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nokok",
    "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "/chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "/chunk-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffffff\r\nok\r\n0\r\n\r\n",
    "/chunk-ext-ctl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a\x00\r\nok\r\n0\r\n\r\n",
    "/te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    # RFC 9110 §15: a status outside 100-599; §15.2.2: 101 when no upgrade was asked for
    "/status-99": b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok",
    "/status-600": b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok",
    "/unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\nhello",
    "/bare-101": b"HTTP/1.1 101 Switching Protocols\r\n\r\nhello",
    # a head over the limit: one huge field, or many fields
    "/big-field": b"HTTP/1.1 200 OK\r\nX-Big: "
    + b"b" * (1 << 20)
    + b"\r\nContent-Length: 2\r\n\r\nok",
    "/many-fields": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(4000))
    + b"Content-Length: 2\r\n\r\nok",
    # 1xx: a few are skipped (RFC 9110 §15.2), a flood is not waited out
    "/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 3 + OK,
    "/hint-flood": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 5000 + OK,
    # more than was asked for, in the same read as the response
    "/after-304": b"HTTP/1.1 304 Not Modified\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 40\r\n\r\nEVIL",
    "/second": OK + _resp(b"X-Evil: 1\r\n", b"EVIL"),
    "/after-head": _resp(b"", b"body-after-HEAD"),
}
BAD = [
    "/cr",
    "/lf",
    "/nul",
    "/cookie-ctl",
    "/location-ctl",
    "/fold",
    "/cl-twice",
    "/cl-conflict",
    "/cl-te",
    "/te-gzip-chunked",
    "/status-99",
    "/status-600",
    "/unasked-101",
    "/bare-101",
    "/big-field",
    "/many-fields",
    "/hint-flood",
]


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class HostileNode:
    """Answers `SCRIPTS[path]` (or a handler's doing, or OK); records (connection, target)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.seen: list[tuple[int, str]] = []
        self.closed: list[int] = []
        self.count = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> HostileNode:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def conn_of(self, target: str) -> int:
        return next(c for c, t in reversed(self.seen) if t == target)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        cid = self.count
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                target = head.split(b" ", 2)[1].decode()
                self.seen.append((cid, target))
                handler = self.handlers.get(target)
                if handler is not None:
                    if not await handler(reader, writer, head):
                        break
                    continue
                writer.write(SCRIPTS.get(target, OK))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self.closed.append(cid)
            writer.close()


@pytest.fixture
async def node():
    n = await HostileNode().start()
    yield n
    await n.stop()


@pytest.fixture
async def proxy(node, tmp_path):
    svc = ProxyService(
        proxy_config(
            [node.address], str(tmp_path), read_timeout=5, health_interval=0.1, health_rise=1
        )
    )
    await svc.start()
    yield svc
    await svc.close()


async def _h1(port: int, raw: bytes, *, head: bool = False):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            return await read_response(reader, head=head)
    finally:
        writer.transport.abort()


def _get(target: str, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


async def _h2(port: int, target: str) -> tuple[int, bytes, bool]:
    """One GET over HTTP/2 (ALPN h2): (status, body, ended cleanly)."""
    ctx = client_ssl()
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", target), (":scheme", "https"), (":authority", "localhost")],
        end_stream=True,
    )
    writer.write(conn.data_to_send())
    status, body, ended = 0, b"", False
    try:
        async with asyncio.timeout(5):
            while not ended:
                data = await reader.read(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(ev, h2.events.StreamReset):
                        return status, body, False
                writer.write(conn.data_to_send())
    finally:
        writer.transport.abort()
    return status, body, ended


async def _closed(node: HostileNode, target: str) -> None:
    """The node connection that answered `target` last is (soon) closed."""
    for _ in range(100):
        if node.conn_of(target) in node.closed:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the node connection of {target} is still open")


async def _served_normally(svc: ProxyService) -> None:
    """A normal request is answered (the node may be marked down for a moment: passive health)."""
    for _ in range(50):
        r = await _h1(svc.https_port, _get("/fine"))
        if r.status == 200:
            assert r.body == b"ok"
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no normal answer after the attack")


@pytest.mark.parametrize("target", BAD)
async def test_invalid_response_gets_502_and_its_connection_is_closed(proxy, node, target, caplog):
    caplog.set_level(logging.WARNING, "confedge.proxy")
    r = await _h1(proxy.https_port, _get(target))
    assert r.status == 502, (target, r)
    assert b"Injected" not in r.body and r.header("Injected") is None
    assert r.header("X-Big") is None and r.header("Set-Cookie") is None
    await _closed(node, target)  # the node connection that sent it, never pooled
    assert "invalid response from node" in caplog.text
    assert "Traceback" not in caplog.text
    await _served_normally(proxy)


@pytest.mark.parametrize("target", ["/chunk-size", "/chunk-overflow", "/chunk-ext-ctl"])
async def test_bad_chunking_after_the_head_cuts_the_client(proxy, node, target):
    """The head was valid and accepted (committed: no failover from here), the body's framing
    is not: the client's connection is closed without a complete response (HTTP/2: reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(_get(target))
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.IncompleteReadError):
            await read_response(reader)
    writer.transport.abort()
    assert (await _h2(proxy.https_port, target))[2] is False
    await _closed(node, target)
    await _served_normally(proxy)


@pytest.mark.parametrize(
    "target", ["/cr", "/cl-conflict", "/status-99", "/unasked-101", "/many-fields", "/hint-flood"]
)
async def test_invalid_response_gets_502_over_h2(proxy, node, target):
    status, _, ended = await _h2(proxy.https_port, target)
    assert (status, ended) == (502, True)
    await _served_normally(proxy)


async def test_a_few_early_hints_are_skipped(proxy, node):
    r = await _h1(proxy.https_port, _get("/hints"))
    assert (r.status, r.body) == (200, b"ok")
    assert (await _h2(proxy.https_port, "/hints")) == (200, b"ok", True)


async def test_a_head_just_under_the_limit_passes(proxy, node):
    value = b"v" * (MAX_RESPONSE_HEAD - 1024)
    SCRIPTS["/near-limit"] = _resp(b"X-Near: " + value + b"\r\n")
    try:
        r = await _h1(proxy.https_port, _get("/near-limit"))
    finally:
        del SCRIPTS["/near-limit"]
    assert r.status == 200 and r.header("X-Near") == value.decode()


async def test_endless_head_is_cut_without_growing_the_worker(proxy, node):
    """A node that never ends its head: before the limit the worker grew by 1.5 GB in 4 s."""
    sent = 0

    async def endless(reader, writer, head):
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < 64 << 20:
            writer.write(line)
            sent += len(line)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
        return False

    node.handlers["/endless"] = endless
    t0 = time.monotonic()
    r = await _h1(proxy.https_port, _get("/endless"))
    assert r.status == 502
    assert time.monotonic() - t0 < 3
    await _served_normally(proxy)
    assert sent < 32 << 20  # the proxy stopped reading: what is left sits in socket buffers


@pytest.mark.parametrize("target", ["/after-304", "/second"])
async def test_bytes_after_a_response_retire_its_connection(proxy, node, target):
    """Response queue poisoning: what a node sends beyond the response (a body after a 304, a
    second response) in the same read must not stay in a pooled connection's parser, where it
    used to turn the next client's answer into a 502 (or swallow it)."""
    r = await _h1(proxy.https_port, _get(target))
    assert r.status in (200, 304) and r.header("X-Evil") is None and b"EVIL" not in r.body
    for _ in range(5):
        r = await _h1(proxy.https_port, _get("/next"))
        assert (r.status, r.body) == (200, b"ok")
        assert r.header("X-Evil") is None
    assert node.conn_of("/next") != node.conn_of(target)
    assert node.conn_of(target) in node.closed


async def test_body_after_a_head_response_is_not_reused(proxy, node):
    r = await _h1(proxy.https_port, _get("/after-head", "HEAD"), head=True)
    assert r.status == 200
    r = await _h1(proxy.https_port, _get("/next"))
    assert (r.status, r.body) == (200, b"ok")
    assert node.conn_of("/next") != node.conn_of("/after-head")


@pytest.mark.parametrize("chunked", [False, True])
async def test_node_closing_mid_body_truncates_for_the_client(proxy, node, chunked):
    async def half(reader, writer, head):
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        return False

    node.handlers["/half"] = half
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(_get("/half"))
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.IncompleteReadError):  # closed, not a clean end
            await read_response(reader)
    writer.transport.abort()
    assert await _h2(proxy.https_port, "/half") == (200, b"half", False)  # RST_STREAM
    await _served_normally(proxy)


async def test_http10_response_delimited_by_close(proxy, node):
    async def old(reader, writer, head):
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close")
        await writer.drain()
        return False

    node.handlers["/old"] = old
    r = await _h1(proxy.https_port, _get("/old"))
    assert (r.status, r.body) == (200, b"until-close")
    assert await _h2(proxy.https_port, "/old") == (200, b"until-close", True)


async def test_node_that_never_reads_the_body_gets_504_and_is_dropped(node, tmp_path):
    async def deaf(reader, writer, head):
        await asyncio.sleep(3)
        return False

    node.handlers["/deaf"] = deaf
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), read_timeout=0.5, health_interval=30)
    )
    await svc.start()
    try:
        body = b"x" * (4 << 20)
        raw = (
            b"POST /deaf HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        r = await _h1(svc.https_port, raw + body)
        assert r.status == 504
        await asyncio.sleep(0.05)
        assert not svc.core.upstreams  # (the deaf node does not read: it cannot see the close)
    finally:
        await svc.close()


async def test_garbage_after_a_retried_503_does_not_blame_the_next_node(tmp_path, caplog):
    """A 503 is retried on the next node; bytes after it that cannot be parsed used to be
    reported against the attempt already under way, marking the healthy node down and opening
    a second attempt beside it."""
    bad, good = await HostileNode().start(), await HostileNode().start()

    async def garbage(reader, writer, head):
        writer.write(b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\nGARBAGE\r\n\r\n")
        await writer.drain()
        return True

    bad.handlers["/garbage-after-503"] = garbage
    svc = ProxyService(proxy_config([bad.address, good.address], str(tmp_path), health_interval=30))
    await svc.start()
    caplog.set_level(logging.INFO, "confedge.proxy")
    try:
        r = await _h1(svc.https_port, _get("/garbage-after-503"))
        assert (r.status, r.body) == (200, b"ok")
        await asyncio.sleep(0.1)
        assert [t for _, t in good.seen if t != "/api/client/v2/status"] == ["/garbage-after-503"]
        good_port = good.address.rsplit(":", 1)[1]
        assert not [x for x in caplog.messages if good_port in x and "-> down" in x]
    finally:
        await svc.close()
        await bad.stop()
        await good.stop()


# -- WebSocket and SSE clients -------------------------------------------------------------------


def _ws_request(target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _accept(head: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
    return base64.b64encode(hashlib.sha1(key + magic).digest())


def _slow_ws(delay: float, got: list[int]) -> Handler:
    """Answers the upgrade after `delay`, then echoes (counting what it got) until EOF."""

    async def handler(reader, writer, head):
        await asyncio.sleep(delay)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + _accept(head) + b"\r\n\r\n"
        )
        await writer.drain()
        while data := await reader.read(65536):
            got.append(len(data))
            writer.write(data)
            await writer.drain()
        return False

    return handler


async def test_bytes_before_the_101_are_held_and_then_tunnelled(proxy, node):
    got: list[int] = []
    node.handlers["/ws"] = _slow_ws(0.3, got)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(_ws_request("/ws") + b"early")  # RFC 6455 §4.1 says wait; this one does not
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"-late")
        echoed = b""
        while echoed != b"early-late":
            echoed += await reader.read(100)
    writer.transport.abort()


async def test_a_client_flooding_before_the_101_is_not_buffered(proxy, node):
    """Bytes sent before the node's 101 used to be buffered without bound (600 MB in 4 s while
    the node took its time); now the client is not read until the 101."""
    got: list[int] = []
    node.handlers["/ws"] = _slow_ws(3.0, got)
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(_ws_request("/ws"))
    chunk = b"\x82\x7e\xff\xff" + b"q" * 65535
    pushed = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and pushed < 128 << 20:
        writer.write(chunk)
        pushed += len(chunk)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.2)
    assert pushed < 48 << 20, pushed  # socket buffers only (loopback's are a few MB)
    writer.transport.abort()
    await _served_normally(proxy)


async def test_sse_client_that_never_reads_frees_the_node_when_it_goes(proxy, node):
    """A stalled SSE client stalls its node stream (backpressure: the node's writes block) and
    its node connection is closed as soon as the client goes."""
    sent = 0

    async def stream(reader, writer, head):
        nonlocal sent
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b"data: " + b"e" * 8000 + b"\n\n"
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and sent < 256 << 20:
            writer.write(frame)
            sent += len(frame)
            try:
                await asyncio.wait_for(writer.drain(), 8)
            except (ConnectionError, TimeoutError):
                break
        return False

    node.handlers["/events"] = stream
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    before = -1
    for _ in range(20):  # stalled (socket buffers full), not buffered in the proxy
        await asyncio.sleep(0.3)
        if sent == before:
            break
        before = sent
    assert sent == before and sent < 48 << 20, sent
    writer.transport.abort()
    await _closed(node, "/events")


@pytest.mark.parametrize(
    "answer",
    [b"x" * 100_000, b"HTTP/1.1 " + b"9" * 5000 + b" OK\r\n\r\n"],
    ids=["no-line-end", "5000-digit-status"],
)
async def test_a_broken_status_answer_does_not_stop_health_checks(node, tmp_path, answer):
    """The active check reads one line (asyncio's 64 KiB limit); an answer with no line end in
    it raised ValueError out of check_node, which ended the checker's task: no node of the pool
    was checked again, so a node marked down by a failed request stayed down for good. A status
    code of thousands of digits did the same through int() (RFC 9112 §4: three digits)."""
    status = "/api/client/v2/status"

    async def no_line_end(reader, writer, head):
        writer.write(answer)
        await writer.drain()
        return False

    node.handlers[status] = no_line_end
    svc = ProxyService(
        proxy_config(
            [node.address], str(tmp_path), health_interval=0.1, health_rise=1, health_fall=1
        )
    )
    await svc.start()
    try:
        for _ in range(100):
            if sum(1 for _, t in node.seen if t == status) >= 2:
                break
            await asyncio.sleep(0.05)
        del node.handlers[status]
        await _served_normally(svc)
        assert (await _h1(svc.https_port, _get("/cr"))).status == 502  # passive: node down
        await _served_normally(svc)  # the checks go on and bring it back
    finally:
        await svc.close()
