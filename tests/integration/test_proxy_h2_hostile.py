"""Hostile HTTP/2 clients against the real proxy (TLS, ALPN h2), frames written by hand
(hyperframe, hpack) so that nothing on the client side corrects them: what the adapter and
either engine (CONFEDGE_H2_ENGINE; `make test` runs this file once per engine) do with request
bodies that contradict their Content-Length, floods of frames the engine answers by itself, flow
control overflows, streams that were never opened, HPACK table games, and the HTTP/2 preface
where HTTP/2 was not negotiated. Each case ends with a normal request on a new connection.
docs/QA.md ("HTTP/2") lists what was tried and what was seen."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from typing import Any

import hpack
import hyperframe.frame as hf
import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, proxy_config

from confedge.proxy.h2 import STREAM_BUFFER, H2Client
from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR = 1
FLOW_CONTROL_ERROR = 3
COMPRESSION_ERROR = 9


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def node():
    up = await Upstream("n0").start()
    yield up
    await up.kill()


@pytest.fixture
async def proxy(node, tmp_path):
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), http_port=spare_port(), read_timeout=5.0)
    )
    await svc.start()
    yield svc
    await svc.close()


class Raw:
    """One TLS connection speaking HTTP/2 frame by frame."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port = port
        self.reader = reader
        self.writer = writer
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.frames: list[Any] = []
        self.eof = False

    @classmethod
    async def open(cls, port: int, settings: dict[int, int] | None = None) -> Raw:
        ctx = client_ssl()
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        raw = cls(port, reader, writer)
        f = hf.SettingsFrame(0)
        f.settings = settings or {}
        raw.send(PREFACE + f.serialize())
        await raw.read_until(lambda f: isinstance(f, hf.SettingsFrame) and "ACK" in f.flags)
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def fields(self, path: str, method: str = "GET", *extra: tuple[str, str]) -> list[Any]:
        return [
            (":method", method),
            (":scheme", "https"),
            (":authority", f"localhost:{self.port}"),
            (":path", path),
            *extra,
        ]

    def headers(
        self, sid: int, fields: list[Any], *, end: bool, block: bytes | None = None
    ) -> None:
        f = hf.HeadersFrame(sid)
        f.data = self.enc.encode(fields) if block is None else block
        f.flags.add("END_HEADERS")
        if end:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    def data(self, sid: int, payload: bytes, *, end: bool = False) -> None:
        f = hf.DataFrame(sid)
        f.data = payload
        if end:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    async def read_until(self, done: Any, timeout: float = 5.0) -> bool:
        """Read frames (answering SETTINGS, giving DATA its window back) until done(frame),
        EOF or `timeout`; True when done(frame) was seen."""
        end = time.monotonic() + timeout
        while True:
            while len(self.buf) >= 9:  # (frames left over from the last call first)
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                f, _ = hf.Frame.parse_frame_header(memoryview(self.buf[:9]))
                f.parse_body(memoryview(self.buf[9 : 9 + n]))
                self.buf = self.buf[9 + n :]
                self.frames.append(f)
                if isinstance(f, hf.SettingsFrame) and "ACK" not in f.flags:
                    ack = hf.SettingsFrame(0)
                    ack.flags.add("ACK")
                    self.send(ack.serialize())
                elif isinstance(f, hf.DataFrame) and f.flow_controlled_length:
                    for sid in (0, f.stream_id):
                        w = hf.WindowUpdateFrame(sid)
                        w.window_increment = f.flow_controlled_length
                        self.send(w.serialize())
                if done(f):
                    return True
            left = end - time.monotonic()
            if self.eof or left <= 0:
                return False
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk

    async def goaway(self, timeout: float = 5.0) -> int | None:
        """The error code of the GOAWAY the proxy sends; it must then close."""
        await self.read_until(lambda f: isinstance(f, hf.GoAwayFrame), timeout)
        codes = [f.error_code for f in self.frames if isinstance(f, hf.GoAwayFrame)]
        if codes:
            await self.read_until(lambda f: False, timeout)  # then EOF
            assert self.eof, "GOAWAY but the connection stayed open"
        return codes[0] if codes else None

    def status(self, sid: int) -> int | None:
        for f in self.frames:
            if isinstance(f, hf.HeadersFrame) and f.stream_id == sid:
                return int(dict(self.dec.decode(f.data))[":status"])
        return None

    def close(self) -> None:
        self.writer.close()


async def _still_serves(
    port: int, node: Upstream, target: str = "/api/client/v2/echo?ok=1"
) -> None:
    """A normal request on a new connection gets the node's own answer to it."""
    raw = await Raw.open(port)
    raw.headers(1, raw.fields(target), end=True)
    body = b""
    ended = await raw.read_until(
        lambda f: f.stream_id == 1 and "END_STREAM" in f.flags, timeout=5.0
    )
    for f in raw.frames:
        if isinstance(f, hf.DataFrame) and f.stream_id == 1:
            body += f.data
    raw.close()
    assert ended and raw.status(1) == 200
    assert json.loads(body)["target"] == target


def _node_targets(node: Upstream) -> list[str]:
    return [r.target for r in node.requests()]


# -- request bodies that contradict their Content-Length (RFC 9113 §8.1.1) ----------------------


async def test_data_beyond_content_length_never_reaches_the_node(proxy, node):
    """HTTP/2-to-HTTP/1.1 request smuggling: DATA past the announced Content-Length would go
    on to the node's keep-alive connection as the start of a second request. It is a
    malformed request: GOAWAY PROTOCOL_ERROR, and nothing of the extra bytes reaches a node."""
    port = proxy.https_port
    raw = await Raw.open(port)
    raw.headers(1, raw.fields("/api/client/v2/echo", "POST", ("content-length", "5")), end=False)
    smuggled = b"GET /api/client/v2/echo?SMUGGLED=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    raw.data(1, b"12345")  # (separate frames: the body is already streaming to the node)
    raw.data(1, smuggled[:20])
    raw.data(1, smuggled[20:], end=True)
    assert await raw.goaway() == PROTOCOL_ERROR
    raw.close()
    await _still_serves(port, node)
    assert not [t for t in _node_targets(node) if "SMUGGLED" in t]


async def test_body_shorter_than_content_length_is_refused_at_once(proxy, node):
    """END_STREAM before the announced length: refused at once (a node would otherwise wait
    for the rest until read_timeout, answer nothing and be marked down)."""
    port = proxy.https_port
    raw = await Raw.open(port)
    raw.headers(1, raw.fields("/api/client/v2/echo", "POST", ("content-length", "10")), end=False)
    raw.data(1, b"12345", end=True)
    start = time.monotonic()
    assert await raw.goaway() == PROTOCOL_ERROR
    assert time.monotonic() - start < 2.0
    raw.close()
    await _still_serves(port, node)


@pytest.mark.parametrize(
    "fields",
    [
        [("content-length", "5")],  # END_STREAM on HEADERS: a body announced, none sent
        [("content-length", "5, 5")],
        [("content-length", "+5")],
        [("content-length", "5"), ("content-length", "6")],
    ],
    ids=["announced-none-sent", "list", "sign", "conflicting"],
)
async def test_bad_content_length_is_a_connection_error(proxy, node, fields):
    """The same answer from both engines (hyper-h2 checks these itself, the adapter for
    libnghttp2), and nothing reaches the node."""
    port = proxy.https_port
    raw = await Raw.open(port)
    raw.headers(1, raw.fields("/api/client/v2/echo?BAD=1", "POST", *fields), end=True)
    assert await raw.goaway() == PROTOCOL_ERROR
    raw.close()
    await _still_serves(port, node)
    assert not [t for t in _node_targets(node) if "BAD" in t]


@pytest.mark.parametrize("value", ["9" * 5000, "0" * 5000 + "5"], ids=["huge", "zero-padded"])
async def test_content_length_past_pythons_digit_limit(proxy, node, caplog, value):
    """RFC 9110 §8.6: a Content-Length of any length must not overflow the recipient. Python's
    int() refuses strings of more than 4300 digits (a ValueError, which killed the connection
    with an asyncio ERROR on libnghttp2): a huge value is 413 (or hyper-h2's own GOAWAY), a
    zero-padded one is the number it spells."""
    port = proxy.https_port
    raw = await Raw.open(port)
    raw.headers(
        1, raw.fields("/api/client/v2/echo?CL=1", "POST", ("content-length", value)), end=False
    )
    raw.data(1, b"12345", end=True)
    await raw.read_until(
        lambda f: isinstance(f, hf.GoAwayFrame) or (f.stream_id == 1 and "END_STREAM" in f.flags)
    )
    goaway = [f.error_code for f in raw.frames if isinstance(f, hf.GoAwayFrame)]
    raw.close()
    if value.startswith("9"):
        assert goaway == [PROTOCOL_ERROR] or raw.status(1) == 413
        assert not [t for t in _node_targets(node) if "CL=1" in t]
    else:
        assert goaway == [PROTOCOL_ERROR] or raw.status(1) == 200
    await _still_serves(port, node)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# -- floods of frames the engine answers itself (CVE-2019-9512, -9515) ---------------------------


async def test_ping_flood_without_reading_holds_no_backlog(node, tmp_path):
    """PING frames sent without ever reading the ACKs: the proxy stops reading the client
    once its write buffer is full (or libnghttp2 calls it a flood and closes), instead of
    queueing ACKs without bound; and a connection whose client reads nothing is dropped when
    its timer runs out (a GOAWAY and a close would wait for ever on the full buffer)."""
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), header_timeout=2.0, idle_timeout=1.0)
    )
    await svc.start()
    try:
        port = svc.https_port
        core = svc.core
        assert core is not None
        ctx = client_ssl()
        ctx.set_alpn_protocols(["h2"])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # (before connect)
        sock.connect(("127.0.0.1", port))
        _, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
        ping = hf.PingFrame(0)
        ping.opaque_data = b"12345678"
        burst = ping.serialize() * 500
        writer.write(PREFACE + hf.SettingsFrame(0).serialize())
        most = 0
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            writer.write(burst)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break  # the proxy no longer reads us
            except (ConnectionError, ssl.SSLError):
                break  # (libnghttp2: flood detected, GOAWAY and close)
            for c in list(core.clients):
                t = getattr(c, "transport", None)
                if t is not None:
                    most = max(most, t.get_write_buffer_size())
        assert most < 1024 * 1024, most  # about the transport's high-water mark, not megabytes
        end = time.monotonic() + 5.0
        while [c for c in core.clients if isinstance(c, H2Client)]:
            assert time.monotonic() < end, "the connection of a client that reads nothing stays"
            await asyncio.sleep(0.1)
        writer.transport.abort()
        await _still_serves(port, node)
    finally:
        await svc.close()


# -- flow control (RFC 9113 §6.9.1) -------------------------------------------------------------


async def test_window_update_overflow(proxy, node):
    """A stream window past 2^31-1: RST_STREAM FLOW_CONTROL_ERROR on that stream, the others
    go on; the connection window past it: GOAWAY FLOW_CONTROL_ERROR."""
    port = proxy.https_port
    raw = await Raw.open(port)
    raw.headers(1, raw.fields("/sse?n=50&interval=0.2"), end=True)
    await raw.read_until(lambda f: isinstance(f, hf.DataFrame) and f.stream_id == 1)
    w = hf.WindowUpdateFrame(1)
    w.window_increment = 2**31 - 1
    raw.send(w.serialize())
    raw.headers(3, raw.fields("/api/client/v2/echo?s=3"), end=True)
    assert await raw.read_until(lambda f: f.stream_id == 3 and "END_STREAM" in f.flags)
    resets = [f.error_code for f in raw.frames if isinstance(f, hf.RstStreamFrame)]
    assert resets == [FLOW_CONTROL_ERROR]
    w = hf.WindowUpdateFrame(0)
    w.window_increment = 2**31 - 1
    raw.send(w.serialize())
    assert await raw.goaway() == FLOW_CONTROL_ERROR
    raw.close()
    await _still_serves(port, node)


# -- stream states, HPACK ------------------------------------------------------------------------


async def test_rst_stream_on_an_idle_stream_is_a_connection_error(proxy, node):
    """RFC 9113 §6.4: RST_STREAM for a stream never opened: GOAWAY PROTOCOL_ERROR."""
    raw = await Raw.open(proxy.https_port)
    r = hf.RstStreamFrame(99)
    r.error_code = 8
    raw.send(r.serialize())
    assert await raw.goaway() == PROTOCOL_ERROR
    raw.close()
    await _still_serves(proxy.https_port, node)


async def test_hpack_table_games(proxy, node):
    """RFC 7541 §4.2, §6.3: a dynamic table size update above the proxy's
    SETTINGS_HEADER_TABLE_SIZE (4096) is a decoding error (libnghttp2: COMPRESSION_ERROR as
    RFC 9113 §4.3 says; hyper-h2 reports PROTOCOL_ERROR); a field referenced again and again
    from the table (an HPACK bomb) stops at SETTINGS_MAX_HEADER_LIST_SIZE. Nothing reaches
    the node."""
    port = proxy.https_port
    raw = await Raw.open(port)
    update = b"\x3f\xe1\xff\x3f"  # size update to 2^20 (RFC 7541 §6.3)
    raw.headers(1, [], end=True, block=update + raw.enc.encode(raw.fields("/x?T=1")))
    assert await raw.goaway() in (COMPRESSION_ERROR, PROTOCOL_ERROR)
    raw.close()
    raw = await Raw.open(port)
    big = ("x-big", "a" * 4000)
    raw.headers(1, raw.fields("/api/client/v2/echo?T=2", "GET", big), end=True)
    assert await raw.read_until(lambda f: f.stream_id == 1 and "END_STREAM" in f.flags)
    block = raw.enc.encode(raw.fields("/api/client/v2/echo?T=3", "GET", *[big] * 2000))
    assert len(block) < 16384  # ~2 bytes per 4 KB field: 8 MB once decoded
    raw.headers(3, [], end=True, block=block)
    assert await raw.goaway() is not None
    raw.close()
    await _still_serves(port, node)
    assert not [t for t in _node_targets(node) if "T=1" in t or "T=3" in t]


# -- the preface where HTTP/2 was not negotiated (RFC 9113 §3.3, §3.4) --------------------------


async def test_h2_preface_without_h2_is_refused(proxy, node):
    """On the plain-HTTP port, and over TLS without ALPN h2: an HTTP/1.1 400, then close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http_port)
    writer.write(PREFACE + hf.SettingsFrame(0).serialize())
    reply = await asyncio.wait_for(reader.read(), 5)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
    writer.write(PREFACE + hf.SettingsFrame(0).serialize())
    reply = await asyncio.wait_for(reader.read(), 5)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    writer.close()
    await _still_serves(proxy.https_port, node)


# -- a client that opens many streams and no window (RFC 9113 §5.2) -----------------------------


async def test_zero_window_on_many_streams_is_bounded_and_released(node, tmp_path):
    """SETTINGS_INITIAL_WINDOW_SIZE 0 and 20 large responses asked for at once: the proxy
    holds at most about STREAM_BUFFER per stream (the nodes are no longer read), resets the
    streams when read_timeout passes without progress, and closes their node connections."""
    svc = ProxyService(proxy_config([node.address], str(tmp_path), read_timeout=1.0))
    await svc.start()
    try:
        port = svc.https_port
        core = svc.core
        assert core is not None
        raw = await Raw.open(port, settings={hf.SettingsFrame.INITIAL_WINDOW_SIZE: 0})
        n = 20
        for i in range(n):
            raw.headers(1 + 2 * i, raw.fields("/big?size=4194304"), end=True)
        held = 0
        end = time.monotonic() + 6.0
        resets: set[int] = set()
        while len(resets) < n and time.monotonic() < end:
            await raw.read_until(lambda f: isinstance(f, hf.RstStreamFrame), timeout=0.2)
            resets = {f.stream_id for f in raw.frames if isinstance(f, hf.RstStreamFrame)}
            for c in list(core.clients):
                if isinstance(c, H2Client):
                    held = max(held, sum(st.pending_bytes for st in c.streams.values()))
        assert len(resets) == n  # each stream ended (INTERNAL_ERROR: the response was cut)
        assert held <= n * 2 * STREAM_BUFFER, held
        raw.close()
        end = time.monotonic() + 3.0
        while len(node.writers) > 1:  # (a health check may hold one)
            assert time.monotonic() < end, len(node.writers)
            await asyncio.sleep(0.1)
        await _still_serves(port, node)
    finally:
        await svc.close()


async def test_a_refused_complete_request_gets_no_rst_stream(proxy, node):
    """A request refused by the proxy (a space in :path, a lower-case method) whose HEADERS
    carried END_STREAM: its 400/501 ends the stream both ways, and then no RST_STREAM (RFC 9113
    §5.1: nothing but PRIORITY on a closed stream; libnghttp2 sent RST_STREAM NO_ERROR there,
    hyper-h2 did not). Nothing reaches the node, the connection serves on."""
    raw = await Raw.open(proxy.https_port)
    fields = raw.fields("/api/client/v2/echo HTTP/1.1")
    raw.headers(1, fields, end=True)
    lower = [(k, "get" if k == ":method" else v) for k, v in raw.fields("/api/client/v2/echo")]
    raw.headers(3, lower, end=True)
    raw.headers(5, raw.fields("/api/client/v2/echo?after=1"), end=True)
    assert await raw.read_until(lambda f: f.stream_id == 5 and "END_STREAM" in f.flags)
    await raw.read_until(lambda f: False, timeout=0.3)
    assert (raw.status(1), raw.status(3), raw.status(5)) == (400, 501, 200)
    assert [f.stream_id for f in raw.frames if isinstance(f, hf.RstStreamFrame)] == []
    raw.close()
    assert _node_targets(node) == ["/api/client/v2/echo?after=1"]


async def test_a_client_that_never_reads_does_not_mark_its_node_down(
    node: Upstream, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """100 streams of 200 kB, never read: when the write buffer fills, the nodes of streams
    still waiting for their head are not paused (was: their read_timeout expired, the healthy
    node was marked down and the next client got 503, on both engines)."""
    svc = ProxyService(
        proxy_config(
            [node.address], str(tmp_path), read_timeout=0.6, idle_timeout=2.0, health_interval=30
        )
    )
    await svc.start()
    try:
        port = svc.https_port
        ctx = client_ssl()
        ctx.set_alpn_protocols(["h2"])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="localhost"
        )
        raw = Raw(port, reader, writer)
        f = hf.SettingsFrame(0)
        f.settings = {hf.SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
        w = hf.WindowUpdateFrame(0)
        w.window_increment = 2**30
        raw.send(PREFACE + f.serialize() + w.serialize())
        for i in range(100):
            raw.headers(2 * i + 1, raw.fields("/big?size=200000"), end=True)
        await asyncio.sleep(1.5)  # (past read_timeout, never reading)
        writer.transport.abort()
        assert "down" not in caplog.text
        await _still_serves(port, node)
    finally:
        await svc.close()
