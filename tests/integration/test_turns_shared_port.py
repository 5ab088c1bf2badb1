"""TURN over TLS on the HTTPS port (turn.tls_on_https), with real sockets and real clients.

The whole runtime (TURN, then the proxy in front of a node) runs on loopback; on the one HTTPS
port, aioice's TURN client allocates over TLS and relays both ways while HTTPS requests are
proxied to the node, with the proxy in process (workers = 1: the connection is handed to TURN)
and in two worker processes (workers = 2: the worker relays the plaintext to TURN in the main
process over a Unix socket). Both ways of being recognised are used: ALPN "stun.turn" (what
coturn's uclient offers) and no ALPN at all (what Chromium sends), where the first bytes decide.

That TURN sees the client's own address, not the worker's, is checked where it shows: the
XOR-MAPPED-ADDRESS of a Binding answer is the client socket's address, and the allocation's log
line names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aioice.turn import create_turn_endpoint
from msgspec.structs import replace
from proxy_upstream import Upstream, client_ssl, get

from confedge.runtime import Runtime
from confedge.stun import Attr, Method, MsgClass, parse_message
from confedge.stun.attributes import decode_xor_address, encode_requested_transport
from confedge.stun.message import MessageBuilder, new_transaction_id
from confedge.turn.portshare import FIRST_TURN, classify, encode_proxy_v2
from confedge.turn.service import TurnService
from confedge.turn.testing import shared_port_config, turn_config
from ports import has_ipv6_loopback

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

RELAY_LO, RELAY_HI = 39200, 39299  # this area's relay ports
RELAY_PORTS = f"{RELAY_LO}-{RELAY_HI}"


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()  # as `confedge run` (the in-process handover needs uvloop)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *, workers: int = 1, on: bool = True, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[Runtime, Upstream]]:
    node = await Upstream("n0").start()
    cfg = shared_port_config(
        str(tmp_path), [node.address], workers=workers, relay_ports=RELAY_PORTS, on=on, host=host
    )
    rt = Runtime(cfg)
    try:
        await rt.start()
        yield rt, node
    finally:
        await rt.close()
        await node.kill()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


def tls_client(alpn: list[str] | None) -> ssl.SSLContext:
    ctx = client_ssl()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def relay_with_aioice(port: int, alpn: list[str] | None, rounds: int = 10) -> int:
    """Allocate over TLS on `port`, relay `rounds` packets each way; the client's local port."""
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    turn_t, client = await create_turn_endpoint(
        _Collector,
        server_addr=("127.0.0.1", port),
        username="turnuser",
        password="turnpass",
        transport="tcp",
        ssl=tls_client(alpn),
    )
    try:
        relay = turn_t.get_extra_info("sockname")
        assert RELAY_LO <= relay[1] <= RELAY_HI
        peer_addr = peer_t.get_extra_info("sockname")
        for i in range(rounds):
            turn_t.sendto(b"to-peer-%d" % i, peer_addr)
            data, src = await asyncio.wait_for(peer.received.get(), 5)
            assert (data, src) == (b"to-peer-%d" % i, tuple(relay))
            peer_t.sendto(b"to-client-%d" % i, src)
            data, src = await asyncio.wait_for(client.received.get(), 5)
            assert (data, src) == (b"to-client-%d" % i, peer_addr)
        inner: Any = turn_t._TurnTransport__inner_protocol  # type: ignore[attr-defined]
        local_port: int = inner.transport.get_extra_info("sockname")[1]
    finally:
        turn_t.close()
        peer_t.close()
    await asyncio.sleep(0.2)  # aioice's Refresh(0) and the close reach the server
    return local_port


async def binding_over_tls(
    port: int, alpn: list[str] | None, host: str = "127.0.0.1"
) -> tuple[tuple[str, int], Any]:
    """One STUN Binding over TLS: (XOR-MAPPED-ADDRESS, this client's own address)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls_client(alpn))
    try:
        tid = new_transaction_id()
        writer.write(MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build())
        head = await asyncio.wait_for(reader.readexactly(20), 5)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[2:4], "big")), 5)
        msg = parse_message(head + body)
        assert msg.msg_class == MsgClass.SUCCESS, msg
        mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
        assert mapped is not None
        return decode_xor_address(mapped, tid), writer.get_extra_info("sockname")
    finally:
        writer.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("alpn", [None, ["stun.turn"]], ids=["first-bytes", "alpn"])
async def test_turn_and_https_on_one_port(
    tmp_path: Path, workers: int, alpn: list[str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="confedge.turn")
    async with running(tmp_path, workers=workers) as (rt, node):
        port = rt.proxy.https_port
        assert rt.turn.tls_port == 0  # no separate turns: listener: only the HTTPS port
        for _ in range(50):  # the node is up once the first health checks passed
            if (await get(port, "/echo")).status == 200:
                break
            await asyncio.sleep(0.1)
        # TURN and HTTPS at the same time, on the same port.
        relayed, answers = await asyncio.gather(
            relay_with_aioice(port, alpn),
            asyncio.gather(*(get(port, f"/echo?{i}") for i in range(10))),
        )
        assert [r.status for r in answers] == [200] * 10
        assert sum(1 for r in node.requests() if r.target.startswith("/echo?")) == 10
        # TURN saw the client's own address (not the worker's socket), in the Binding answer ...
        mapped, me = await binding_over_tls(port, alpn)
        assert mapped == (me[0], me[1])
        # ... and in the allocation (its 5-tuple: the client's TCP port).
        for _ in range(20):
            if "allocation ended" in caplog.text:
                break
            await asyncio.sleep(0.1)
        assert f"client=127.0.0.1:{relayed}/tls-https" in caplog.text, caplog.text
        assert rt.turn.stats()["packets_to_peer"] >= 10


async def test_alpn_offered_only_with_the_option(tmp_path: Path) -> None:
    """RFC 7443 §4: "stun.turn" is selected when offered, and only with tls_on_https on; without
    it a STUN message on the HTTPS port is just a bad HTTP request."""

    async def selected(port: int) -> str | None:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_client(["stun.turn", "http/1.1"])
        )
        alpn: str | None = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.close()
        return alpn

    for on in (True, False):
        async with running(tmp_path, on=on) as (rt, _):
            port = rt.proxy.https_port
            assert await selected(port) == ("stun.turn" if on else "http/1.1")
            await rt.reload_and_wait()  # SIGHUP: the certificate is reloaded, the ALPN list stays
            assert await selected(port) == ("stun.turn" if on else "http/1.1")
            if not on:
                assert rt.proxy.core.turn_share is None
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
                tid = new_transaction_id()
                writer.write(MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build())
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                assert line.split()[:2] in ([b"HTTP/1.1", b"400"], [b"HTTP/1.1", b"501"]), line


async def test_first_bytes_in_pieces(tmp_path: Path) -> None:
    """A request line and a STUN header trickled a byte at a time are still told apart."""
    async with running(tmp_path) as (rt, _node):
        port = rt.proxy.https_port
        for _ in range(50):
            if (await get(port, "/echo")).status == 200:
                break
            await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
        for b in b"GET /echo?slow HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n":
            writer.write(bytes([b]))
            await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert line.startswith(b"HTTP/1.1 200 "), line

        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
        tid = new_transaction_id()
        for b in MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build():
            writer.write(bytes([b]))
            await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(20), 5)
        writer.close()
        assert head[4:8] == b"\x21\x12\xa4\x42" and head[8:20] == tid


async def test_channeldata_first_goes_to_turn_and_is_closed(tmp_path: Path) -> None:
    """ChannelData cannot open a connection (no allocation yet): TURN takes it and closes it,
    and no HTTP answer is written."""
    async with running(tmp_path) as (rt, _):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", rt.proxy.https_port, ssl=client_ssl()
        )
        writer.write(b"\x40\x00\x00\x04abcd")
        data = await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        assert data == b""


async def _allocate_via_relay(path: str, header: bytes) -> bytes:
    """An Allocate (no credentials) on TURN's relay socket after `header`: the answer's head."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        tid = new_transaction_id()
        req = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, tid)
        req.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
        writer.write(header + req.build())
        return await asyncio.wait_for(reader.read(200), 5)
    finally:
        writer.close()


async def test_relay_socket_trusts_only_its_header(tmp_path: Path) -> None:
    """The relay socket (workers > 1): the PROXY v2 header's address is the one TURN judges
    (restricted mode: 10.9.9.9 is a media node, 127.0.0.1 is not), a stream without a valid
    header is closed unanswered, and the socket's directory is private."""
    cfg = turn_config(media_nodes=["10.9.9.9/32"], relay_ports=RELAY_PORTS, state_dir=str(tmp_path))
    svc = TurnService(cfg)
    await svc.start()
    try:
        path = await svc.open_relay_listener()
        assert await svc.open_relay_listener() == path  # opened once
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        node = await _allocate_via_relay(path, encode_proxy_v2(("10.9.9.9", 40000), HERE))
        stranger = await _allocate_via_relay(path, encode_proxy_v2(("127.0.0.1", 40001), HERE))
        garbage = await _allocate_via_relay(path, b"GET / HTTP/1.1\r\n\r\n")
    finally:
        await svc.close()
    assert _error_code(node) == 401  # a media node: asked for credentials
    assert _error_code(stranger) == 403  # not a media node
    assert garbage == b""
    assert not os.path.exists(os.path.dirname(path))  # removed on close


HERE = ("127.0.0.1", 443)


@pytest.mark.parametrize("alpn", [None, ["stun.turn"]], ids=["first-bytes", "alpn"])
async def test_a_client_cannot_forge_its_proxy_header(
    tmp_path: Path, alpn: list[str] | None
) -> None:
    """proxy.workers = 2: a TLS client that sends its own PROXY v2 header (naming 10.9.9.9)
    before a Binding is HTTP to the proxy when its first bytes decide (501, unknown method), and TURN garbage
    after the worker's real header when ALPN chose TURN (closed unanswered): never a Binding
    answered for the forged address. Its next, honest connection is answered with its own."""
    async with running(tmp_path, workers=2) as (rt, _):
        port = rt.proxy.https_port
        forged = encode_proxy_v2(("10.9.9.9", 40000), HERE)
        binding = MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_client(alpn))
        try:
            writer.write(forged + binding)
            answer = await asyncio.wait_for(reader.read(), 5)  # until closed
        finally:
            writer.close()
        if alpn is None:
            assert answer.startswith(b"HTTP/1.1 501"), answer[:80]  # "unknown method"
        else:
            assert answer == b""
        mapped, me = await binding_over_tls(port, alpn)
        assert mapped == (me[0], me[1])


def _error_code(answer: bytes) -> int:
    msg = parse_message(answer[:20] + answer[20 : 20 + int.from_bytes(answer[2:4], "big")])
    assert msg.msg_class == MsgClass.ERROR, msg
    value = msg.get(Attr.ERROR_CODE)
    assert value is not None
    return value[2] * 100 + value[3]


@pytest.mark.parametrize(
    "first",
    [
        b"\x00\x01\x00",  # a STUN header cut short, then silence
        b"GETGETGETGET",  # a token that never ends, then silence
        b"\x00\x01\x00\x00\x00\x00\x00\x00" + bytes(12),  # bits 00 without the cookie
        b"\x41\xff\xff\xff" + bytes(64),  # ChannelData-like, no allocation
        b"\x00\x01\xff\xfc\x21\x12\xa4\x42" + bytes(12),  # STUN claiming 65532 bytes
        bytes(range(256)),
    ],
    ids=["short-stun", "endless-token", "no-cookie", "channeldata", "huge-stun", "binary"],
)
async def test_hostile_first_bytes_cost_one_connection(tmp_path: Path, first: bytes) -> None:
    """Whatever a client sends first costs it only its own connection: an HTTP error and a
    close (408 after the 1 s header timeout, 400, 501), TURN's close, or TURN holding an
    incomplete frame; the port keeps serving both services meanwhile."""
    node = await Upstream("n0").start()
    cfg = shared_port_config(str(tmp_path), [node.address], relay_ports=RELAY_PORTS)
    cfg = replace(cfg, proxy=replace(cfg.proxy, header_timeout=1.0))
    rt = Runtime(cfg)
    try:
        await rt.start()
        port = rt.proxy.https_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
        writer.write(first)
        try:
            answer: bytes | None = await asyncio.wait_for(reader.read(), 3)  # until closed
        except TimeoutError:
            answer = None
        writer.close()
        if answer is None:
            # Only TURN holds a connection longer (a frame still incomplete: its 30 s setup
            # timeout, as on turn.port); the proxy's header timeout here is 1 s.
            assert classify(first) == FIRST_TURN
        else:
            assert answer == b"" or answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5"), answer[:80]
        assert (await get(port, "/echo")).status in (200, 502, 503)
        mapped, me = await binding_over_tls(port, None)
        assert mapped == (me[0], me[1])
    finally:
        await rt.close()
        await node.kill()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_relay_does_not_buffer_for_a_client_that_stops_reading(tmp_path: Path) -> None:
    """proxy.workers = 2: a TURN client on the HTTPS port stops reading while its peer sends
    20 MB. The worker pauses reading from TURN's socket, TURN's own buffer fills and TURN drops
    the media (it is loss-tolerant); no process buffers the flood."""
    async with running(tmp_path, workers=2) as (rt, _):
        port = rt.proxy.https_port
        loop = asyncio.get_running_loop()
        peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
        turn_t, _client = await create_turn_endpoint(
            _Collector,
            server_addr=("127.0.0.1", port),
            username="turnuser",
            password="turnpass",
            transport="tcp",
            ssl=tls_client(None),
        )
        try:
            relay = turn_t.get_extra_info("sockname")
            turn_t.sendto(b"hello", peer_t.get_extra_info("sockname"))  # permission + channel
            data, _ = await asyncio.wait_for(peer.received.get(), 5)
            assert data == b"hello"
            inner: Any = turn_t._TurnTransport__inner_protocol  # type: ignore[attr-defined]
            inner.transport.pause_reading()  # the client stops reading
            workers = [p.pid for p in rt.proxy._procs]
            before = {pid: _rss_kb(pid) for pid in workers}
            chunk = b"m" * 1000
            for i in range(20_000):  # 20 MB, paced so that loopback UDP does not drop it
                peer_t.sendto(chunk, relay)
                if i % 200 == 199:
                    await asyncio.sleep(0.002)
            await asyncio.sleep(0.5)
            stats = rt.turn.stats()
            grown = {pid: _rss_kb(pid) - before[pid] for pid in workers}
            inner.transport.resume_reading()
        finally:
            turn_t.close()
            peer_t.close()
    # What was not dropped sits in kernel socket buffers (loopback TCP autotunes to a few MB).
    assert stats["dropped_no_permission"] > 1_000, stats  # dropped at TURN, not queued
    assert stats["bytes_to_client"] < 10_000_000, stats
    assert max(grown.values()) < 8 * 1024, grown  # KB: the workers held no flood


@pytest.mark.skipif(not has_ipv6_loopback(), reason="host has no IPv6 loopback (::1)")
@pytest.mark.parametrize("workers", [1, 2])
async def test_ipv6_client_address_reaches_turn(tmp_path: Path, workers: int) -> None:
    """An IPv6 client on the shared port: TURN answers its own [::1]:port (through a worker,
    the PROXY v2 header's IPv6 form)."""
    async with running(tmp_path, workers=workers, host="::1") as (rt, _):
        mapped, me = await binding_over_tls(rt.proxy.https_port, None, host="::1")
    assert mapped == ("::1", me[1])


async def test_h2_alongside_turn_on_the_https_port(tmp_path: Path) -> None:
    """With turn.tls_on_https, ALPN is stun.turn, h2, http/1.1: a browser offering h2 gets
    HTTP/2 (never sniffed as TURN: "PRI * HTTP/2.0" is neither STUN nor ChannelData), and
    TURN by first bytes keeps working next to it."""
    import httpx

    assert classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") != FIRST_TURN
    async with running(tmp_path) as (rt, _node):
        port = rt.proxy.https_port
        async with httpx.AsyncClient(http2=True, verify=client_ssl()) as c:
            r = await c.get(f"https://localhost:{port}/api/client/v2/echo")
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        mapped, _ = await binding_over_tls(port, None)
        assert mapped[0] == "127.0.0.1"
