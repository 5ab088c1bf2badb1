"""TurnService on loopback with a hand-written client: the data-plane paths packet by packet.

Covers what the real clients do not isolate: Data indications (no channel), drops for peers
without permission and for unknown channels, ChannelData padding over TCP (RFC 8656 §12.5),
counters, relay port range, and TCP framing of several messages in one segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    decode_xor_address,
    encode_channel_number,
    encode_requested_transport,
    encode_xor_address,
    long_term_key,
    new_transaction_id,
    parse_message,
)
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config

KEY = long_term_key("turnuser", "example.test", "turnpass")


class _Queue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.q: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.q.put_nowait((data, addr))


class UdpTurn:
    """Just enough client to drive the server: authenticated requests over one UDP socket."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: _Queue) -> None:
        self.t, self.p = transport, proto
        self.nonce = b""
        self.key = KEY

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> UdpTurn:
        loop = asyncio.get_running_loop()
        t, p = await loop.create_datagram_endpoint(_Queue, remote_addr=(host, port))
        return cls(t, p)

    async def recv(self, timeout: float = 1.0) -> bytes:
        return (await asyncio.wait_for(self.p.q.get(), timeout))[0]

    async def request(self, method: int, attrs: list[tuple[int, bytes]]) -> Message:
        """The answer, after learning a nonce from a 401/438 once (as real clients do)."""
        for attempt in range(2):
            tid = new_transaction_id()
            b = MessageBuilder(method, MsgClass.REQUEST, tid)
            for a, v in attrs:
                b.add(a, v(tid) if callable(v) else v)
            if self.nonce:
                b.add(Attr.USERNAME, b"turnuser").add(Attr.REALM, b"example.test")
                b.add(Attr.NONCE, self.nonce)
            self.t.sendto(b.build(key=self.key if self.nonce else None))
            resp = parse_message(await self.recv())
            if attempt == 0 and resp.msg_class == MsgClass.ERROR and resp.get(Attr.NONCE):
                self.nonce = resp.get(Attr.NONCE) or b""
                continue
            return resp
        raise AssertionError("unreachable")

    async def allocate(self) -> tuple[str, int]:
        resp = await self.request(
            Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]
        )
        assert resp.msg_class == MsgClass.SUCCESS
        return decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)


def _peer_attr(addr: tuple[str, int]) -> Any:
    return lambda tid: encode_xor_address(addr[0], addr[1], tid)


async def _peer(
    host: str = "127.0.0.1",
) -> tuple[asyncio.DatagramTransport, _Queue, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(_Queue, local_addr=(host, 0))
    return t, p, t.get_extra_info("sockname")[:2]


async def test_udp_data_indication_channel_and_drops() -> None:
    svc = TurnService(turn_config(relay_ports="22000-22999"))
    await svc.start()
    cli = await UdpTurn.open(svc.port)
    pt, peer, paddr = await _peer()
    ot, _, _ = await _peer()
    try:
        relay = await cli.allocate()
        assert relay[0] == "127.0.0.1" and 22000 <= relay[1] <= 22999
        # No permission yet: the peer's packet is dropped and counted.
        pt.sendto(b"too early", relay)
        await asyncio.sleep(0.05)
        assert cli.p.q.empty()
        resp = await cli.request(
            Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, _peer_attr(paddr))]
        )
        assert resp.msg_class == MsgClass.SUCCESS
        # Send indication -> peer.
        tid = new_transaction_id()
        send = (
            MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
            .add(Attr.XOR_PEER_ADDRESS, encode_xor_address(paddr[0], paddr[1], tid))
            .add(Attr.DATA, b"hello peer")
            .build()
        )
        cli.t.sendto(send)
        data, src = await asyncio.wait_for(peer.q.get(), 2)
        assert (data, src) == (b"hello peer", relay)
        # Peer -> client without a channel: a Data indication (RFC 8656 §10.3).
        pt.sendto(b"odd-sized!", relay)
        ind = parse_message(await cli.recv())
        assert (ind.method, ind.msg_class) == (Method.DATA, MsgClass.INDICATION)
        assert ind.get(Attr.DATA) == b"odd-sized!"
        assert (
            decode_xor_address(ind.get(Attr.XOR_PEER_ADDRESS) or b"", ind.transaction_id) == paddr
        )
        # A peer on the same IP but another port shares the IP permission (RFC 8656 §9).
        ot.sendto(b"same ip", relay)
        ind = parse_message(await cli.recv())
        assert ind.get(Attr.DATA) == b"same ip"
        # Channel: both directions as ChannelData.
        resp = await cli.request(
            Method.CHANNEL_BIND,
            [
                (Attr.CHANNEL_NUMBER, encode_channel_number(0x4001)),
                (Attr.XOR_PEER_ADDRESS, _peer_attr(paddr)),
            ],
        )
        assert resp.msg_class == MsgClass.SUCCESS
        cli.t.sendto(struct.pack("!HH", 0x4001, 5) + b"abcde" + b"junk-after-length")
        data, _ = await asyncio.wait_for(peer.q.get(), 2)
        assert data == b"abcde"
        pt.sendto(b"xyz", relay)
        assert await cli.recv() == struct.pack("!HH", 0x4001, 3) + b"xyz"  # no padding on UDP
        # Unknown channel and truncated ChannelData: dropped.
        cli.t.sendto(struct.pack("!HH", 0x4002, 3) + b"abc")
        cli.t.sendto(struct.pack("!HH", 0x4001, 30) + b"short")
        await asyncio.sleep(0.05)
        assert peer.q.empty()
        stats = svc.stats()
        assert stats["allocations"] == 1
        assert stats["packets_to_peer"] == 2 and stats["bytes_to_peer"] == 15
        assert stats["packets_to_client"] == 3 and stats["bytes_to_client"] == 20
        assert stats["dropped_no_permission"] == 1
    finally:
        cli.t.close()
        pt.close()
        ot.close()
        await svc.close()
    assert svc.stats()["allocations"] == 0  # closed with reason=shutdown


async def test_tcp_framing_and_channel_padding() -> None:
    svc = TurnService(turn_config(relay_ports="23000-23999"))
    await svc.start()
    pt, peer, paddr = await _peer()
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)

    async def read_frame() -> bytes:
        head = await asyncio.wait_for(reader.readexactly(4), 2)
        length = int.from_bytes(head[2:4], "big")
        if head[0] < 0x40:
            return head + await reader.readexactly(16 + length)
        return head + await reader.readexactly((length + 3) & ~3)

    nonce = b""

    async def request(method: int, attrs: list[tuple[int, Any]]) -> Message:
        nonlocal nonce
        for _ in range(2):
            tid = new_transaction_id()
            b = MessageBuilder(method, MsgClass.REQUEST, tid)
            for a, v in attrs:
                b.add(a, v(tid) if callable(v) else v)
            if nonce:
                b.add(Attr.USERNAME, b"turnuser").add(Attr.REALM, b"example.test")
                b.add(Attr.NONCE, nonce)
            wire = b.build(key=KEY if nonce else None)
            # Split the request across two writes: framing must reassemble.
            writer.write(wire[:7])
            await writer.drain()
            writer.write(wire[7:])
            resp = parse_message(await read_frame())
            if resp.msg_class == MsgClass.ERROR and resp.get(Attr.NONCE):
                nonce = resp.get(Attr.NONCE) or b""
                continue
            return resp
        raise AssertionError("no answer")

    try:
        resp = await request(
            Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]
        )
        relay = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
        resp = await request(
            Method.CHANNEL_BIND,
            [
                (Attr.CHANNEL_NUMBER, encode_channel_number(0x4000)),
                (Attr.XOR_PEER_ADDRESS, _peer_attr(paddr)),
            ],
        )
        assert resp.msg_class == MsgClass.SUCCESS
        # Two padded ChannelData frames in one segment.
        writer.write(
            struct.pack("!HH", 0x4000, 5) + b"first\0\0\0" + struct.pack("!HH", 0x4000, 4) + b"2nd!"
        )
        assert (await asyncio.wait_for(peer.q.get(), 2))[0] == b"first"
        assert (await asyncio.wait_for(peer.q.get(), 2))[0] == b"2nd!"
        pt.sendto(b"seven!!", relay)
        assert await read_frame() == struct.pack("!HH", 0x4000, 7) + b"seven!!\0"  # §12.5 padding
        # Garbage closes the connection, which ends the allocation (tcp-closed).
        writer.write(b"\xff" * 8)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        for _ in range(50):
            if svc.stats()["allocations"] == 0:
                break
            await asyncio.sleep(0.02)
        assert svc.stats()["allocations"] == 0
    finally:
        writer.close()
        pt.close()
        await svc.close()


async def test_info_and_port_zero() -> None:
    svc = TurnService(turn_config(mode="permissive"))
    await svc.start()
    try:
        info = svc.info()
        assert info["host"] == "127.0.0.1" and info["port"] == svc.port > 0
        assert info["realm"] == "example.test"
        assert info["username"].endswith(":confedge")
        # Both transports on the same port.
        with socket.create_connection(("127.0.0.1", svc.port), timeout=2):
            pass
    finally:
        await svc.close()


async def test_guard_bans_turn_password_guessing() -> None:
    """Wrong credentials are reported to the real guard; once banned, the source gets nothing."""
    from confedge.guard import create_guard

    cfg = turn_config(
        sections={"guard": {"enabled": True, "store": "memory", "turn_maxretry": 3, "ignore": []}}
    )
    guard = create_guard(cfg)
    await guard.start()
    svc = TurnService(cfg, guard=guard)
    await svc.start()
    cli = await UdpTurn.open(svc.port)
    try:
        cli.key = long_term_key("turnuser", "example.test", "guess")
        answered = 0
        for _ in range(5):  # 3 wrong MESSAGE-INTEGRITY checks ban; then silence
            try:
                resp = await cli.request(
                    Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]
                )
            except TimeoutError:
                break
            assert resp.msg_class == MsgClass.ERROR
            answered += 1
        assert answered == 2  # 401 + 401 (fail 1), 401 (fail 2) + 401 (fail 3), then nothing
        cli.key = KEY
        for _ in range(40):  # bans reach the hook's table within a refresh interval
            if guard.check("127.0.0.1") is not None:
                break
            await asyncio.sleep(0.05)
        assert guard.check("127.0.0.1") is not None
        while not cli.p.q.empty():
            cli.p.q.get_nowait()
        # Even the right password now gets no answer at all.
        cli.t.sendto(
            MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
            .add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
            .build()
        )
        await asyncio.sleep(0.3)
        assert cli.p.q.empty()
        assert svc.stats()["allocations"] == 0
    finally:
        cli.t.close()
        await svc.close()
        await guard.close()


async def test_tcp_connection_cap() -> None:
    """At most max_allocations + 256 TCP connections; the next ones are reset at once."""
    svc = TurnService(turn_config(max_allocations=1))
    await svc.start()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(257):
            conns.append(await asyncio.open_connection("127.0.0.1", svc.port))
        await asyncio.sleep(0.1)
        assert len(svc._tcp_conns) == 257
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        conns.append((reader, writer))
        with contextlib.suppress(ConnectionResetError):  # reset (abort) or EOF: both refusals
            assert await asyncio.wait_for(reader.read(), 2) == b""
        assert len(svc._tcp_conns) == 257
    finally:
        for _, w in conns:
            w.close()
        await svc.close()


async def test_even_port_and_reservation_token_on_real_sockets() -> None:
    """RFC 8656 §7.2: EVEN-PORT with R reserves port+1 (bound, so nobody else gets it)."""
    svc = TurnService(turn_config(relay_ports="23000-23999"))
    await svc.start()
    a = await UdpTurn.open(svc.port)
    b = await UdpTurn.open(svc.port)
    try:
        resp = await a.request(
            Method.ALLOCATE,
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.EVEN_PORT, b"\x80"),
                (Attr.DONT_FRAGMENT, b""),
            ],
        )
        assert resp.msg_class == MsgClass.SUCCESS
        relay = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
        assert relay[1] % 2 == 0
        token = resp.get(Attr.RESERVATION_TOKEN)
        assert token is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", relay[1] + 1))
            raise AssertionError("the reserved port is not held")
        resp = await b.request(
            Method.ALLOCATE,
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.RESERVATION_TOKEN, token),
            ],
        )
        assert resp.msg_class == MsgClass.SUCCESS
        second = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
        assert second == ("127.0.0.1", relay[1] + 1)
    finally:
        a.t.close()
        b.t.close()
        await svc.close()


async def test_stream_protocol_handoff() -> None:
    """A connection accepted by another listener (the HTTPS port) is handed to TURN."""
    svc = TurnService(turn_config())
    await svc.start()
    loop = asyncio.get_running_loop()

    class Sniffer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            assert data[0] < 0x80  # STUN/ChannelData, not a TLS/HTTP request
            proto = svc.stream_protocol("tls")
            self.transport.set_protocol(proto)
            proto.connection_made(self.transport)
            proto.data_received(data)

    server = await loop.create_server(Sniffer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        tid = new_transaction_id()
        writer.write(MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build())
        head = await asyncio.wait_for(reader.readexactly(20), 2)
        body = await reader.readexactly(int.from_bytes(head[2:4], "big"))
        resp = parse_message(head + body)
        assert resp.msg_class == MsgClass.SUCCESS and resp.transaction_id == tid
        writer.close()
    finally:
        server.close()
        await svc.close()
