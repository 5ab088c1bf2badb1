"""Shared relay sockets (``turn.relay_multiplex``) through TurnService on loopback.

Runs on the data plane the suite runs on (``CONFEDGE_DATAPLANE``: python in ``make test-pure``,
native in ``make test-native``), so both implementations of the demultiplexing rules
(turn/multiplex.py, _native.c "mux") meet the same clients: more allocations than the relay
port range holds, a peer two allocations want (508 / counted drop), a peer nobody named
(delivered when unambiguous), and claims freed by permission and channel expiry.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from test_turn_dataplane import UdpTurn, _peer, _peer_attr

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    decode_error_code,
    encode_channel_number,
    encode_u32,
    encode_xor_address,
    new_transaction_id,
    parse_message,
)
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config

# One relay thread on the native plane, so that every allocation shares the one socket (with
# more threads each thread has sockets of its own and a client lands on one by its address).
ONE_SOCKET = {"relay_multiplex": 1, "dataplane_threads": 1}


async def _bind(c: UdpTurn, number: int, peer: tuple[str, int]) -> int:
    resp = await c.request(
        Method.CHANNEL_BIND,
        [
            (Attr.CHANNEL_NUMBER, encode_channel_number(number)),
            (Attr.XOR_PEER_ADDRESS, _peer_attr(peer)),
        ],
    )
    if resp.msg_class == MsgClass.SUCCESS:
        return 200
    return decode_error_code(resp.get(Attr.ERROR_CODE) or b"")[0]


async def _permit(c: UdpTurn, ip: str) -> bool:
    resp = await c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, _peer_attr((ip, 9)))])
    return resp.msg_class == MsgClass.SUCCESS


def _send_indication(c: UdpTurn, peer: tuple[str, int], payload: bytes) -> None:
    tid = new_transaction_id()
    b = MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
    b.add(Attr.XOR_PEER_ADDRESS, encode_xor_address(peer[0], peer[1], tid))
    b.add(Attr.DATA, payload)
    c.t.sendto(b.build())


def _payload_to_client(data: bytes) -> bytes:
    """The relayed bytes of a ChannelData message or a Data indication."""
    if 0x40 <= data[0] <= 0x7F:
        (n,) = struct.unpack("!H", data[2:4])
        return data[4 : 4 + n]
    msg = parse_message(data)
    assert msg.method == Method.DATA
    return msg.get(Attr.DATA) or b""


async def _nothing(q: Any, timeout: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(q.get(), timeout)
    except TimeoutError:
        return True
    return False


async def test_more_allocations_than_relay_ports() -> None:
    """A relay range of 2 ports carries 24 allocations, each relaying to its own peer both
    ways with its own counters; without multiplexing the third Allocate gets 508."""
    svc = TurnService(turn_config(relay_ports="23990-23991", **ONE_SOCKET))
    await svc.start()
    clients: list[UdpTurn] = []
    peers: list[Any] = []
    try:
        relays = set()
        for i in range(24):
            c = await UdpTurn.open(svc.port)
            clients.append(c)
            relays.add(await c.allocate())
            peers.append(await _peer())
            assert await _bind(c, 0x4000 + i, peers[i][2]) == 200
        assert len(relays) == 1  # one shared socket, one relayed transport address for all
        (relay,) = relays
        for round_ in range(3):
            for i, c in enumerate(clients):
                c.t.sendto(struct.pack("!HH", 0x4000 + i, 8) + b"up%02d-r%02d" % (i, round_))
            for i, (pt, pq, _) in enumerate(peers):
                data, src = await asyncio.wait_for(pq.q.get(), 2)
                assert data == b"up%02d-r%02d" % (i, round_)
                assert src[:2] == relay
                pt.sendto(b"down%02d-%d" % (i, round_), src)
            for i, c in enumerate(clients):
                assert _payload_to_client(await c.recv(2)) == b"down%02d-%d" % (i, round_)
        assert svc.core is not None
        for alloc in svc.core.allocations.values():  # each counted exactly its own traffic
            counters = svc.core.dp.counters(alloc.id)
            assert (counters.pkts_to_peer, counters.pkts_to_client) == (3, 3)
            assert (counters.bytes_to_peer, counters.bytes_to_client) == (24, 24)
        stats = svc.dataplane_stats()
        assert stats["drop_mux_unknown"] == stats["drop_mux_ambiguous"] == 0
    finally:
        for c in clients:
            c.t.close()
        for pt, _, _ in peers:
            pt.close()
        await svc.close()
    # The same range without multiplexing: one port per allocation, two allocations.
    svc = TurnService(turn_config(relay_ports="23990-23991"))
    await svc.start()
    try:
        codes = []
        for _ in range(3):
            c = await UdpTurn.open(svc.port)
            clients.append(c)
            resp = await c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")])
            codes.append(
                200
                if resp.msg_class == MsgClass.SUCCESS
                else decode_error_code(resp.get(Attr.ERROR_CODE) or b"")[0]
            )
        assert codes == [200, 200, 508]
    finally:
        for c in clients:
            c.t.close()
        await svc.close()


async def _two_clients(svc: TurnService) -> tuple[UdpTurn, UdpTurn, tuple[str, int]]:
    a, b = await UdpTurn.open(svc.port), await UdpTurn.open(svc.port)
    relay_a, relay_b = await a.allocate(), await b.allocate()
    assert relay_a == relay_b  # on the same shared socket
    return a, b, relay_a


async def test_peer_wanted_by_two_allocations() -> None:
    """The second allocation naming a claimed peer: its ChannelBind gets 508 and its Send
    indication is dropped (counted); the peer's datagrams reach the first one only."""
    svc = TurnService(turn_config(**ONE_SOCKET))
    await svc.start()
    a, b, relay = await _two_clients(svc)
    pt, pq, peer = await _peer()
    try:
        assert await _bind(a, 0x4001, peer) == 200
        assert await _bind(b, 0x4001, peer) == 508
        assert await _bind(b, 0x4002, peer) == 508  # any number: it is the peer that is taken
        _send_indication(b, peer, b"from-b")  # b has a permission (its 508 bind installed it)
        _send_indication(a, peer, b"from-a")
        data, src = await asyncio.wait_for(pq.q.get(), 2)
        assert (data, src[:2]) == (b"from-a", relay)
        assert await _nothing(pq.q)
        pt.sendto(b"to-a", relay)
        assert _payload_to_client(await a.recv(2)) == b"to-a"
        assert await _nothing(b.p.q)
        assert svc.dataplane_stats()["drop_mux_conflict"] == 1
        # Relaying to each other on one shared socket: each is the other's peer at the one
        # relayed address; the second to name it is refused (docs/TURN.md: the trade-off).
        assert await _bind(a, 0x4003, relay) == 200
        assert await _bind(b, 0x4003, relay) == 508
    finally:
        a.t.close()
        b.t.close()
        pt.close()
        await svc.close()


async def test_unnamed_peer_delivered_only_when_unambiguous() -> None:
    """A peer sending from a port no client named: a Data indication to the one allocation
    with a permission for its IP; with two such allocations, or none, dropped and counted."""
    svc = TurnService(turn_config(**ONE_SOCKET))
    await svc.start()
    a, b, relay = await _two_clients(svc)
    pt, _, _ = await _peer()
    stranger, _, _ = await _peer("127.0.0.2")  # an IP nobody has a permission for
    try:
        stranger.sendto(b"who?", relay)
        await asyncio.sleep(0.1)
        assert svc.dataplane_stats()["drop_mux_unknown"] == 1
        assert await _permit(a, "127.0.0.1")
        pt.sendto(b"hello-a", relay)
        msg = parse_message(await a.recv(2))  # §10.3: a Data indication (no channel)
        assert msg.method == Method.DATA and msg.get(Attr.DATA) == b"hello-a"
        assert await _permit(b, "127.0.0.1")
        pt.sendto(b"whose?", relay)
        assert await _nothing(a.p.q) and await _nothing(b.p.q, 0.05)
        assert svc.dataplane_stats()["drop_mux_ambiguous"] == 1
    finally:
        for t in (a.t, b.t, pt, stranger):
            t.close()
        await svc.close()


async def test_claims_end_with_permission_and_channel_expiry() -> None:
    """A Send claim lasts as long as its permission (§9), a channel claim as long as its
    channel (§11): after each expires (the core's own timers, run ahead in time) the peer is
    free for the other allocation on the socket."""
    svc = TurnService(turn_config(**ONE_SOCKET))
    await svc.start()
    a, b, _ = await _two_clients(svc)
    p1, q1, peer1 = await _peer()
    p2, _, peer2 = await _peer()
    assert svc.core is not None
    try:
        for c in (a, b):  # allocations that outlive the channel (600 s)
            resp = await c.request(Method.REFRESH, [(Attr.LIFETIME, encode_u32(3600))])
            assert resp.msg_class == MsgClass.SUCCESS
        assert await _permit(a, "127.0.0.1")
        _send_indication(a, peer1, b"claim-1")
        assert (await asyncio.wait_for(q1.q.get(), 2))[0] == b"claim-1"
        assert await _bind(a, 0x4005, peer2) == 200
        assert await _bind(b, 0x4005, peer1) == 508
        assert await _bind(b, 0x4006, peer2) == 508
        now = asyncio.get_running_loop().time()
        svc.core.tick(now + 301)  # a's permission lapses: its Send claim of peer1 goes
        assert await _bind(b, 0x4005, peer1) == 200
        assert await _bind(b, 0x4006, peer2) == 508  # the channel still holds peer2
        svc.core.tick(now + 601)  # the channel expires
        assert await _bind(b, 0x4006, peer2) == 200
    finally:
        for t in (a.t, b.t, p1, p2):
            t.close()
        await svc.close()


async def test_bandwidth_cap_per_allocation_on_a_shared_socket() -> None:
    """turn.bandwidth_per_allocation holds each allocation of a shared socket on its own: a
    burst of 100 x 1000 bytes from each of two allocations passes about a full bucket (64 KiB)
    per allocation, and each counts its own drops."""
    svc = TurnService(turn_config(bandwidth_per_allocation=100_000, **ONE_SOCKET))
    await svc.start()
    a, b, _ = await _two_clients(svc)
    sinks = [await _peer(), await _peer()]
    assert svc.core is not None
    try:
        for c, (_, _, addr) in zip((a, b), sinks, strict=True):
            assert await _permit(c, "127.0.0.1")
            for _ in range(100):
                _send_indication(c, addr, b"d" * 1000)
        await asyncio.sleep(0.5)
        burst = 65536 // 1000
        got = [q.q.qsize() for _, q, _ in sinks]
        for n in got:
            assert burst - 2 <= n <= burst + 8, got
        dropped = sorted(
            svc.core.dp.counters(alloc.id).dropped_bandwidth
            for alloc in svc.core.allocations.values()
        )
        assert dropped == sorted(100 - n for n in got), (dropped, got)
    finally:
        for t in (a.t, b.t, *(s[0] for s in sinks)):
            t.close()
        await svc.close()
