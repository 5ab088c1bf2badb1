"""The native data plane (confedge.turn._native) on real sockets: the parts only it has.

Every TURN suite runs on both backends (Makefile: `test-pure` with CONFEDGE_DATAPLANE=python,
`test-native` with CONFEDGE_DATAPLANE=native). This file covers what is native-only: choosing
the backend, several relay threads (a client's packets always reach the thread that holds its
allocation), Send indications forwarded without the control plane, GSO batches, counters read
while traffic flows, the control-plane queue's drop counter, IPv6, and a fuzz run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from test_turn_dataplane import UdpTurn, _peer, _peer_attr

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    decode_xor_address,
    encode_channel_number,
    encode_requested_transport,
    encode_xor_address,
    new_transaction_id,
    parse_message,
)
from confedge.turn import native
from confedge.turn.dataplane import UdpDataPlane
from confedge.turn.native import NativeDataPlane, native_available
from confedge.turn.service import TurnService, TurnStartError
from confedge.turn.testing import turn_config

pytestmark = pytest.mark.skipif(
    not native_available()[0] and os.environ.get(native.ENV) != "native",
    reason=f"native data plane not built: {native_available()[1]}",
)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pick the backend in the configuration themselves."""
    monkeypatch.delenv(native.ENV, raising=False)


async def _service(**turn: Any) -> TurnService:
    turn.setdefault("dataplane", "native")
    svc = TurnService(turn_config(**turn))
    await svc.start()
    return svc


def _dp(svc: TurnService) -> NativeDataPlane:
    assert isinstance(svc.dataplane, NativeDataPlane)
    return svc.dataplane


async def _bind_channel(cli: UdpTurn, peer: tuple[str, int], number: int = 0x4000) -> None:
    resp = await cli.request(
        Method.CHANNEL_BIND,
        [
            (Attr.CHANNEL_NUMBER, encode_channel_number(number)),
            (Attr.XOR_PEER_ADDRESS, _peer_attr(peer)),
        ],
    )
    assert resp.msg_class == MsgClass.SUCCESS


def _send_indication(peer: tuple[str, int], data: bytes) -> bytes:
    tid = new_transaction_id()
    return (
        MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
        .add(Attr.XOR_PEER_ADDRESS, encode_xor_address(peer[0], peer[1], tid))
        .add(Attr.DATA, data)
        .build()
    )


def _sock(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, 0))
    s.settimeout(2)
    return s


async def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = await _service(dataplane="python")
    assert svc.backend == "python" and type(svc.dataplane) is UdpDataPlane
    await svc.close()
    svc = await _service(dataplane="auto", dataplane_threads=3)
    assert svc.backend == "native" and len(_dp(svc).transports) == 3
    await svc.close()
    # The environment override (how the test suites pick a backend) wins over the file.
    monkeypatch.setenv(native.ENV, "python")
    svc = await _service(dataplane="native")
    assert svc.backend == "python"
    await svc.close()
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(TurnStartError, match="CONFEDGE_DATAPLANE='fast'"):
        await _service()
    monkeypatch.delenv(native.ENV)
    # Not built: "native" is a start error naming the key, "auto" falls back to Python.
    monkeypatch.setattr(native, "_native", None)
    with pytest.raises(TurnStartError, match=r'turn\.dataplane = "native": .*not built'):
        await _service(dataplane="native")
    svc = await _service(dataplane="auto")
    assert svc.backend == "python"
    await svc.close()


def _thread_names() -> list[str]:
    return sorted(
        (Path("/proc/self/task") / t / "comm").read_text().strip()
        for t in os.listdir("/proc/self/task")
    )


async def test_relay_threads_are_named_for_operators() -> None:
    """`top -H`, `ps -L` and perf show which threads relay media: confedge-relay0..N-1,
    started with the engine and gone after close."""
    before = _thread_names()
    svc = await _service(dataplane_threads=3)
    try:
        relays = [n for n in _thread_names() if n.startswith("confedge-rel")]
        assert relays == ["confedge-relay0", "confedge-relay1", "confedge-relay2"]
    finally:
        await svc.close()
    assert not [n for n in _thread_names() if n.startswith("confedge-rel")]
    assert [n for n in before if n.startswith("confedge-rel")] == []


async def _round_trip(
    clients: list[UdpTurn], relays: list[tuple[str, int]], pt: Any, peer: Any, tag: str
) -> None:
    """Every client's ChannelData reaches the peer from its relayed address, and the peer's
    answer comes back on the channel."""
    for i, cli in enumerate(clients):
        payload = f"{tag}{i}".encode()
        cli.t.sendto(struct.pack("!HH", 0x4000, len(payload)) + payload)
        data, src = await asyncio.wait_for(peer.q.get(), 2)
        assert (data, src) == (payload, relays[i])
        pt.sendto(b"back" + payload, relays[i])
        assert await cli.recv() == struct.pack("!HH", 0x4000, len(payload) + 4) + b"back" + payload


@pytest.mark.parametrize("steer", ["1", "0"], ids=["steered", "hashed"])
async def test_clients_spread_over_threads_each_on_its_own(
    steer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 clients on 4 relay threads: each allocation lives on the thread whose listener socket
    the kernel sends its client's media to, and relays both ways from there (were a client's
    packets to reach another thread, its ChannelData would find no channel and be dropped).

    Steered (the default): the kernel's program picks thread (source port % 4) for media and
    the control socket for every request, so no request crosses a relay thread; hashed
    (CONFEDGE_DATAPLANE_STEER=0): the kernel's own hash, requests through the threads' queue."""
    monkeypatch.setenv(native.STEER_ENV, steer)
    svc = await _service(dataplane_threads=4)
    pt, peer, paddr = await _peer()
    clients = [await UdpTurn.open(svc.port) for _ in range(24)]
    try:
        relays = []
        for cli in clients:
            relays.append(await cli.allocate())
            await _bind_channel(cli, paddr)
        engine = _dp(svc).engine
        threads = {engine.worker_of(a) for a in svc.core.allocations}
        assert len(threads) > 1 and threads <= {0, 1, 2, 3}
        for round_ in range(3):
            await _round_trip(clients, relays, pt, peer, f"r{round_}c")
        assert svc.stats()["packets_to_peer"] == 72 and svc.stats()["packets_to_client"] == 72
        st = engine.stats()
        if steer == "1":
            assert st["steered"] == 1 and st["upcalls"] == 0
            assert st["control_rx"] >= 24 * 3  # 401, Allocate, ChannelBind per client
            for alloc_id, a in svc.core.allocations.items():
                assert engine.worker_of(alloc_id) == a.client.port % 4
        else:
            assert st["steered"] == 0 and st["control_rx"] == 0 and st["upcalls"] >= 24 * 3
    finally:
        for cli in clients:
            cli.t.close()
        pt.close()
        await svc.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_steering_program_picks_the_socket_by_first_bytes_and_source_port(host: str) -> None:
    """The kernel runs _native.steer's program on every datagram to the port: ChannelData and
    Send indications reach worker socket (source port % 2), requests, other indications and
    junk the control socket (the group's third), over IPv4 and IPv6."""
    socks, control = native.bind_listeners(host, 0, 2)
    assert control is not None
    group = [*socks, control]
    port = socks[0].getsockname()[1]
    cookie = b"\x21\x12\xa4\x42"
    kinds = {
        "channel data": (struct.pack("!HH", 0x4000, 4) + b"abcd", True),
        "send indication": (b"\x00\x16\x00\x00" + cookie + b"t" * 12, True),
        "binding request": (b"\x00\x01\x00\x00" + cookie + b"t" * 12, False),
        "allocate request": (b"\x00\x03\x00\x00" + cookie + b"t" * 12, False),
        "rtp-looking junk": (b"\x80\x00" + b"j" * 10, False),
    }
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        for _ in range(8):  # clients on various source ports
            with socket.socket(family, socket.SOCK_DGRAM) as c:
                c.bind((host, 0))
                cport = c.getsockname()[1]
                for kind, (wire, media) in kinds.items():
                    c.sendto(wire, (host, port))
                    ready, _, _ = select.select(group, [], [], 2)
                    assert len(ready) == 1, kind
                    assert ready[0].recvfrom(2048)[0] == wire
                    want = socks[cport % 2] if media else control
                    assert ready[0] is want, (kind, cport)
    finally:
        for s in group:
            s.close()


def test_steering_refused_by_the_kernel_leaves_the_hash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel without SO_ATTACH_REUSEPORT_CBPF (or a seccomp profile that refuses it): no
    control socket, the relay threads' sockets alone, one INFO line that says why."""

    def refuse(fd: int, threads: int) -> None:
        raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))

    monkeypatch.setattr(native._native, "steer", refuse)
    caplog.set_level("INFO", logger="confedge.turn")
    socks, control = native.bind_listeners("127.0.0.1", 0, 2)
    try:
        assert control is None and len(socks) == 2
        assert "refused the steering program (Protocol not available)" in caplog.text
        monkeypatch.setenv(native.STEER_ENV, "0")  # and the switch for comparisons
        more, none = native.bind_listeners("127.0.0.1", 0, 3)
        assert none is None and len(more) == 3
        for s in more:
            s.close()
    finally:
        for s in socks:
            s.close()


async def test_threads_fold_at_low_rates_and_split_under_load() -> None:
    """turn.dataplane_fold_pps: while the relay threads together move fewer packets a second
    than the threshold, relay thread 0 serves every thread's sockets and the others sleep; above
    twice the threshold each serves its own again. Media and control-plane changes keep
    working through every transition, and close() wakes the sleeping threads."""
    svc = await _service(dataplane_threads=4, dataplane_fold_pps=2000, dataplane_coalesce_us=0)
    pt, peer, paddr = await _peer()
    clients: list[UdpTurn] = []
    relays: list[tuple[str, int]] = []
    try:
        engine = _dp(svc).engine
        # Clients until thread 0 (which decides) and at least one other hold allocations.
        while len(clients) < 64:
            cli = await UdpTurn.open(svc.port)
            clients.append(cli)
            relays.append(await cli.allocate())
            await _bind_channel(cli, paddr)
            threads = {engine.worker_of(a) for a in svc.core.allocations}  # type: ignore[union-attr]
            if len(clients) >= 8 and 0 in threads and len(threads) > 1:
                break
        assert engine.stats()["folded"] == 0
        # ~1,000 packets/s for a while: below 2,000, so the threads fold.
        deadline = time.monotonic() + 5
        sent = 0
        while engine.stats()["folded"] == 0 and time.monotonic() < deadline:
            for cli in clients:
                cli.t.sendto(struct.pack("!HH", 0x4000, 4) + b"slow")
                sent += 1
            await asyncio.sleep(len(clients) / 1000)
        st = engine.stats()
        assert st["folded"] == 1 and st["folds"] == 1, st
        while not peer.q.empty():
            peer.q.get_nowait()
        await _round_trip(clients, relays, pt, peer, "folded")
        # A new allocation and a removed one while folded (control plane against thread 0).
        extra = await UdpTurn.open(svc.port)
        await extra.allocate()
        await _bind_channel(extra, paddr)
        extra.t.close()
        # A burst far above 4,000 packets/s: the threads split again.
        for _ in range(40):
            for cli in clients:
                for _ in range(25):
                    cli.t.sendto(struct.pack("!HH", 0x4000, 5) + b"flood")
            await asyncio.sleep(0.002)
            if engine.stats()["unfolds"]:
                break
        st = engine.stats()
        assert st["unfolds"] == 1, st
        await asyncio.sleep(0.2)
        while not peer.q.empty():
            peer.q.get_nowait()
        await _round_trip(clients, relays, pt, peer, "split")
        assert engine.stats()["folded"] == 0
        # Slow again: folds a second time; still relays.
        deadline = time.monotonic() + 5
        while engine.stats()["folds"] < 2 and time.monotonic() < deadline:
            for cli in clients:
                cli.t.sendto(struct.pack("!HH", 0x4000, 4) + b"slow")
            await asyncio.sleep(len(clients) / 1000)
        assert engine.stats()["folds"] == 2
        while not peer.q.empty():
            peer.q.get_nowait()
        await _round_trip(clients, relays, pt, peer, "again")
    finally:
        for cli in clients:
            cli.t.close()
        pt.close()
        # close() with three threads asleep: must return (a hang fails the test's timeout)
        await asyncio.wait_for(svc.close(), 10)


@pytest.mark.slow
async def test_fold_transitions_under_allocation_churn() -> None:
    """Folding and splitting many times while allocations come and go on every thread (each
    removal frees memory at the end of the next round of whichever thread serves the set):
    run once under AddressSanitizer (docs/TURN.md has the command). Media still relays after."""
    svc = await _service(dataplane_threads=4, dataplane_fold_pps=2000, dataplane_coalesce_us=0)
    pt, peer, paddr = await _peer()
    clients = [await UdpTurn.open(svc.port) for _ in range(16)]
    relays = [await cli.allocate() for cli in clients]
    for cli in clients:
        await _bind_channel(cli, paddr)
    engine = _dp(svc).engine
    stop = time.monotonic() + 6

    async def churn() -> int:
        n = 0
        while time.monotonic() < stop and n < 2000:
            cli = await UdpTurn.open(svc.port)
            try:
                await cli.allocate()
                await _bind_channel(cli, paddr)
                cli.t.sendto(struct.pack("!HH", 0x4000, 5) + b"churn")
                ended = await cli.request(Method.REFRESH, [(Attr.LIFETIME, struct.pack("!I", 0))])
                assert ended.msg_class == MsgClass.SUCCESS
            finally:
                cli.t.close()
            n += 1
        return n

    task = asyncio.ensure_future(churn())
    try:
        while time.monotonic() < stop:
            for _ in range(8):  # a burst (far above 4,000 pkt/s)
                for cli in clients:
                    for _ in range(10):
                        cli.t.sendto(struct.pack("!HH", 0x4000, 5) + b"burst")
                await asyncio.sleep(0.001)
            for _ in range(30):  # then slow (~1,000 pkt/s)
                for cli in clients[:2]:
                    cli.t.sendto(struct.pack("!HH", 0x4000, 4) + b"slow")
                await asyncio.sleep(0.002)
        churned = await task
        st = engine.stats()
        assert churned > 20 and st["folds"] >= 3 and st["unfolds"] >= 3, (churned, st)
        await asyncio.sleep(0.3)
        while not peer.q.empty():
            peer.q.get_nowait()
        await _round_trip(clients, relays, pt, peer, "after")
    finally:
        task.cancel()
        for cli in clients:
            cli.t.close()
        pt.close()
        await asyncio.wait_for(svc.close(), 10)


async def test_threads_never_fold_when_turned_off_or_single() -> None:
    """dataplane_fold_pps = 0, or one relay thread: nothing folds however slow the media."""
    for turn in ({"dataplane_threads": 2, "dataplane_fold_pps": 0}, {"dataplane_threads": 1}):
        svc = await _service(**turn, dataplane_coalesce_us=0)
        pt, peer, paddr = await _peer()
        clients = [await UdpTurn.open(svc.port) for _ in range(6)]
        try:
            relays = [await cli.allocate() for cli in clients]
            for cli in clients:
                await _bind_channel(cli, paddr)
            for _ in range(30):
                for cli in clients:
                    cli.t.sendto(struct.pack("!HH", 0x4000, 4) + b"slow")
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            while not peer.q.empty():
                peer.q.get_nowait()
            await _round_trip(clients, relays, pt, peer, "x")
            st = _dp(svc).engine.stats()
            assert st["folded"] == 0 and st["folds"] == 0, (turn, st)
        finally:
            for cli in clients:
                cli.t.close()
            pt.close()
            await svc.close()


async def test_send_indication_and_data_indication_stay_in_c() -> None:
    svc = await _service()
    cli = await UdpTurn.open(svc.port)
    pt, peer, paddr = await _peer()
    try:
        relay = await cli.allocate()
        resp = await cli.request(
            Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, _peer_attr(paddr))]
        )
        assert resp.msg_class == MsgClass.SUCCESS
        before = _dp(svc).stats()["upcalls"]
        for i in range(20):
            cli.t.sendto(_send_indication(paddr, b"send %d" % i))
            assert await asyncio.wait_for(peer.q.get(), 2) == (b"send %d" % i, relay)
            pt.sendto(b"data %d!" % i, relay)
            ind = parse_message(await cli.recv())
            assert (ind.method, ind.msg_class) == (Method.DATA, MsgClass.INDICATION)
            assert ind.get(Attr.DATA) == b"data %d!" % i
            peer_attr = ind.get(Attr.XOR_PEER_ADDRESS) or b""
            assert decode_xor_address(peer_attr, ind.transaction_id) == paddr
        assert _dp(svc).stats()["upcalls"] == before  # none of it reached the control plane
        # A Send indication to a peer without permission is dropped, not relayed.
        other = ("127.0.0.2", paddr[1])
        cli.t.sendto(_send_indication(other, b"nope"))
        await asyncio.sleep(0.1)
        assert peer.q.empty()
        c = svc.dataplane.counters(next(iter(svc.core.allocations)))  # type: ignore[union-attr]
        assert (c.pkts_to_peer, c.pkts_to_client) == (20, 20)
    finally:
        cli.t.close()
        pt.close()
        await svc.close()


async def test_bursts_leave_in_gso_batches_in_order() -> None:
    """A burst of same-size ChannelData leaves as UDP GSO messages (one sendmsg for many
    datagrams); every packet arrives, in order, both ways."""
    svc = await _service(dataplane_threads=1)
    peer = _sock()
    paddr = peer.getsockname()
    cli = UdpTurn(*await _adopt(_sock(), svc.port))  # a 4 MiB receive buffer for the burst
    try:
        relay = await cli.allocate()
        await _bind_channel(cli, paddr)
        n = 3000
        for i in range(n):
            cli.t.sendto(struct.pack("!HHI", 0x4000, 96, i) + bytes(92))
        got = [struct.unpack("!I", peer.recv(2048)[:4])[0] for _ in range(n)]
        assert got == list(range(n)), _dp(svc).stats()
        for i in range(n):
            peer.sendto(struct.pack("!I", i) + bytes(92), relay)
        back = []
        for _ in range(n):
            data, _ = await asyncio.wait_for(cli.p.q.get(), 2)
            back.append(struct.unpack("!I", data[4:8])[0])
        assert back == list(range(n))
        st = _dp(svc).stats()
        assert st["gso"] == 1 and st["gso_msgs"] > 0 and st["gso_segments"] > st["gso_msgs"], st
        assert st["recv_calls"] < 2 * n, st  # received in batches, not one call per packet
        assert st["drop_send"] == 0, st
    finally:
        peer.close()
        cli.t.close()
        await svc.close()


async def _adopt(sock: socket.socket, port: int) -> tuple[Any, Any]:
    """A UdpTurn transport on an already bound socket (large receive buffer)."""
    from test_turn_dataplane import _Queue

    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(_Queue, sock=sock)


async def test_counters_read_while_traffic_flows() -> None:
    svc = await _service()
    cli = await UdpTurn.open(svc.port)
    pt, _, paddr = await _peer()
    try:
        await cli.allocate()
        await _bind_channel(cli, paddr)
        alloc_id = next(iter(svc.core.allocations))  # type: ignore[union-attr]
        seen = []
        for i in range(400):
            cli.t.sendto(struct.pack("!HH", 0x4000, 10) + b"0123456789")
            if i % 20 == 0:
                seen.append(svc.dataplane.counters(alloc_id).pkts_to_peer)  # type: ignore[union-attr]
                await asyncio.sleep(0.001)
        for _ in range(100):
            if svc.dataplane.counters(alloc_id).pkts_to_peer == 400:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        c = svc.dataplane.counters(alloc_id)  # type: ignore[union-attr]
        assert (c.pkts_to_peer, c.bytes_to_peer) == (400, 4000)
        assert seen == sorted(seen) and seen[-1] > 0
        stats = svc.stats()
        assert stats["packets_to_peer"] == 400 and stats["bytes_to_peer"] == 4000
    finally:
        cli.t.close()
        pt.close()
        await svc.close()
    # Ended allocations stay in the totals.
    assert svc.stats()["allocations"] == 0


@pytest.mark.parametrize("steer", ["1", "0"], ids=["steered", "hashed"])
async def test_control_plane_overflow_is_counted_and_recovers(
    steer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of requests while the event loop is busy: what does not fit is dropped and
    counted (the control socket's receive buffer, steered; the relay threads' queue, hashed),
    and the next request is answered."""
    monkeypatch.setenv(native.STEER_ENV, steer)
    svc = await _service(dataplane_threads=1)
    s = _sock()
    counter = "kernel_drops_listener" if steer == "1" else "drop_queue"
    try:
        wire = MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build()
        # The event loop is busy here (sending), so nothing reads the requests: beyond
        # native.QUEUE_LIMIT (or LISTENER_BUFFER's worth) they wait, the rest is dropped and
        # counted.
        for _ in range(3 * native.QUEUE_LIMIT):
            s.sendto(wire, ("127.0.0.1", svc.port))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and _dp(svc).stats()[counter] == 0:
            time.sleep(0.01)  # the relay threads run without the GIL meanwhile
        st = _dp(svc).stats()
        assert st[counter] > 0
        await asyncio.sleep(0.3)
        _discard(s)  # the answers
        s.settimeout(2)
        tid = new_transaction_id()
        s.sendto(
            MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build(), ("127.0.0.1", svc.port)
        )
        resp = parse_message(await asyncio.get_running_loop().run_in_executor(None, s.recv, 2048))
        assert resp.transaction_id == tid and resp.msg_class == MsgClass.SUCCESS
    finally:
        s.close()
        await svc.close()


async def test_ipv6_relay() -> None:
    svc = await _service(host="::1", allowed_peers=["::1"], media_nodes=["::1"])
    cli = await UdpTurn.open(svc.port, host="::1")
    pt, peer, paddr = await _peer("::1")
    try:
        relay = await cli.allocate()
        assert relay[0] == "::1"
        await _bind_channel(cli, paddr, 0x4123)
        cli.t.sendto(struct.pack("!HH", 0x4123, 3) + b"six")
        data, src = await asyncio.wait_for(peer.q.get(), 2)
        assert (data, src[:2]) == (b"six", relay)
        pt.sendto(b"from v6 peer", relay)
        assert await cli.recv() == struct.pack("!HH", 0x4123, 12) + b"from v6 peer"
        # Another port of the same peer IP: a Data indication, XOR-ed with the transaction ID.
        ot, oq, oaddr = await _peer("::1")
        ot.sendto(b"odd", relay)
        ind = parse_message(await cli.recv())
        assert ind.get(Attr.DATA) == b"odd"
        peer_attr = ind.get(Attr.XOR_PEER_ADDRESS) or b""
        assert decode_xor_address(peer_attr, ind.transaction_id) == oaddr
        cli.t.sendto(_send_indication(oaddr, b"send6"))
        data, _ = await asyncio.wait_for(oq.q.get(), 2)
        assert data == b"send6"
        ot.close()
    finally:
        cli.t.close()
        pt.close()
        await svc.close()


def _discard(sock: socket.socket, cli: UdpTurn | None = None) -> None:
    """Throw away what waits on a socket (and in a client's queue)."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(65536)
    while cli is not None and not cli.p.q.empty():
        cli.p.q.get_nowait()


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    b = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:  # flip bits
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del b[rng.randrange(len(b) + 1) :]
        elif op == 2:  # append junk
            b += rng.randbytes(rng.randrange(1, 64))
        elif op == 3 and len(b) >= 4:  # lie in a length field
            off = rng.choice([2, 22, 34]) if len(b) > 35 else 2
            struct.pack_into("!H", b, min(off, len(b) - 2), rng.randrange(65536))
        elif op == 4 and b:  # random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 5 and b:  # ChannelData-looking first byte
            b[0] = rng.randrange(0x40, 0x80)
    return bytes(b)


@pytest.mark.slow
@pytest.mark.parametrize("multiplex", [0, 1], ids=["own-ports", "relay_multiplex"])
async def test_fuzz_native_path_then_relay_still_works(multiplex: int) -> None:
    """CONFEDGE_FUZZ_COUNT (default 10**6) mutated ChannelData / STUN datagrams from the
    allocated client and from a peer at its relay: no crash, every drop accounted, and the
    relay works afterwards.  (Run once under ASan: docs/TURN.md, "Testing the native data
    plane".)  With turn.relay_multiplex the relay socket is shared with a second allocation
    that has a permission for the peer's IP too, and the peer's datagrams also come from a
    port nobody named and from an IP nobody permitted: the demultiplexing (claims made and
    refused by mutated Send indications, unknown and ambiguous peers) is fuzzed as well.  The
    channel's permission lapses and returns every 100,000 datagrams (its channel held aside)."""
    count = int(os.environ.get("CONFEDGE_FUZZ_COUNT", str(10**6)))
    svc = await _service(dataplane_threads=1 if multiplex else 2, relay_multiplex=multiplex)
    client, peer = _sock(), _sock()
    cli = UdpTurn(*await _adopt(client, svc.port))
    others = [peer, _sock(), _sock("127.0.0.2")] if multiplex else [peer]
    cli2 = await UdpTurn.open(svc.port)
    try:
        relay = await cli.allocate()
        paddr = peer.getsockname()
        await _bind_channel(cli, paddr)
        if multiplex:
            assert await cli2.allocate() == relay  # the same shared socket
            resp = await cli2.request(
                Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, _peer_attr(("127.0.0.1", 9)))]
            )
            assert resp.msg_class == MsgClass.SUCCESS
        tid = new_transaction_id()
        seeds_client = [
            struct.pack("!HH", 0x4000, 8) + b"payload!",
            struct.pack("!HH", 0x4001, 3) + b"abc\0",
            _send_indication(paddr, b"fuzzing send"),
            _send_indication(("127.0.0.2", 9), b"x"),
            MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build(fingerprint=True),
            MessageBuilder(Method.REFRESH, MsgClass.REQUEST, tid)
            .add(Attr.LIFETIME, struct.pack("!I", 600))
            .build(),
            MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, tid)
            .add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
            .build(),
        ]
        seeds_peer = [b"", b"x", bytes(1200), struct.pack("!HH", 0x4000, 4) + b"abcd"]
        rng = random.Random(1406)
        sent = 0
        peer.setblocking(False)
        # The channel's permission lapses and returns while the threads relay (RFC 8656 §9:
        # its channel moves out of the tables and back), as the core's timers would do it.
        alloc_id = next(iter(svc.core.allocations.values())).id
        lapsed = False
        while sent < count:
            if sent % 100_000 == 0 and svc.stats()["allocations"]:
                toggle = _dp(svc).add_permission if lapsed else _dp(svc).remove_permission
                with contextlib.suppress(KeyError):  # a mutated Refresh ended the allocation
                    toggle(alloc_id, paddr[0])
                lapsed = not lapsed
            for _ in range(2000):
                if rng.random() < 0.8:
                    cli.t.sendto(_mutate(rng, rng.choice(seeds_client)))
                else:
                    with contextlib.suppress(BlockingIOError):  # peer buffer full: skip one
                        rng.choice(others).sendto(_mutate(rng, rng.choice(seeds_peer)), relay)
            sent += 2000
            await asyncio.sleep(0)  # let the control plane drain its queue
            _discard(peer, cli)  # keep the receive queues short
            while not cli2.p.q.empty():
                cli2.p.q.get_nowait()
        if lapsed and svc.stats()["allocations"]:
            with contextlib.suppress(KeyError):
                _dp(svc).add_permission(alloc_id, paddr[0])
        await asyncio.sleep(0.5)
        _discard(peer, cli)
        st = _dp(svc).stats()
        if multiplex:
            assert st["mux_sockets"] == 1 and st["drop_mux_unknown"] > 0, st
            assert st["drop_mux_ambiguous"] > 0, st
        print("native data plane after the fuzz run:", st)  # shown with pytest -s
        assert st["rx_client"] + st["kernel_drops_listener"] > 0.5 * 0.8 * count
        # Still relaying, both ways, on the same allocation.
        peer.settimeout(2)
        if svc.stats()["allocations"] == 0:  # a mutated Refresh may have set lifetime 0
            relay = await cli.allocate()
            await _bind_channel(cli, paddr)
        cli.t.sendto(struct.pack("!HH", 0x4000, 5) + b"after")
        assert peer.recv(2048) == b"after"
        peer.sendto(b"back", relay)
        want = struct.pack("!HH", 0x4000, 4) + b"back"
        while True:  # fuzz datagrams still in flight (a backlog under ASan) may come first
            data, _ = await asyncio.wait_for(cli.p.q.get(), 2)
            if data == want:
                break
    finally:
        cli.t.close()
        cli2.t.close()
        for s_ in others:
            s_.close()
        await svc.close()


async def test_datagrams_larger_than_a_slot() -> None:
    """Media fits a slot's first 2 KiB; larger datagrams (to 65,507 bytes) continue in a second
    buffer and are relayed whole, in every form."""
    svc = await _service()
    peer, other = _sock(), _sock()
    paddr, oaddr = peer.getsockname(), other.getsockname()
    cli = UdpTurn(*await _adopt(_sock(), svc.port))
    try:
        relay = await cli.allocate()
        await _bind_channel(cli, paddr)
        for size in (2043, 2044, 2045, 9000, 65000):
            body = random.Random(size).randbytes(size)
            cli.t.sendto(struct.pack("!HH", 0x4000, size) + body)
            assert peer.recv(65536) == body
            peer.sendto(body, relay)
            data, _ = await asyncio.wait_for(cli.p.q.get(), 2)
            assert data == struct.pack("!HH", 0x4000, size) + body
        # No channel for `other` (same IP, other port): Data indications, padded in the second
        # buffer; and a large Send indication (the control plane forwards it).
        for size in (3001, 40003):
            body = random.Random(size).randbytes(size)
            other.sendto(body, relay)
            ind = parse_message((await asyncio.wait_for(cli.p.q.get(), 2))[0])
            assert ind.get(Attr.DATA) == body
            cli.t.sendto(_send_indication(oaddr, body))
            # (off the loop: the control plane must run to forward it)
            assert await asyncio.to_thread(other.recv, 65536) == body
    finally:
        cli.t.close()
        peer.close()
        other.close()
        await svc.close()


async def test_large_requests_reach_the_control_plane_whole() -> None:
    """The control socket's slots hold any UDP datagram: a 60,000-byte Binding request (an
    unknown comprehension-optional attribute, RFC 8489 §15: ignored) is answered, as a
    1,500-byte one is; nothing is counted as truncated."""
    svc = await _service()
    s = _sock()
    try:
        for size in (1500, 60000):
            tid = new_transaction_id()
            wire = (
                MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid)
                .add(0x8123, bytes(size))
                .build()
            )
            s.sendto(wire, ("127.0.0.1", svc.port))
            resp = parse_message(await asyncio.to_thread(s.recv, 65536))
            assert resp.transaction_id == tid and resp.msg_class == MsgClass.SUCCESS
        st = _dp(svc).stats()
        assert st["steered"] == 1 and st["control_rx"] == 2 and st["drop_truncated"] == 0
    finally:
        s.close()
        await svc.close()


def test_config_errors_name_the_key() -> None:
    from confedge.config import ConfigError

    for kw, text in (
        ({"dataplane": "fast"}, 'turn.dataplane: "fast" is not valid'),
        ({"dataplane_threads": -1}, "turn.dataplane_threads: -1 is not valid"),
        ({"dataplane_threads": 1000}, "turn.dataplane_threads: 1000 is not valid"),
    ):
        with pytest.raises(ConfigError, match=text):
            turn_config(**kw)


async def test_allocations_end_and_service_closes_while_media_flows() -> None:
    """Ending an allocation (its relay socket closed by the control plane) and closing the whole
    service while the relay threads are busy with its packets: no crash, nothing stuck."""
    import threading

    for _ in range(3):
        svc = await _service(dataplane_threads=2)
        peer = _sock()
        paddr = peer.getsockname()
        cli = UdpTurn(*await _adopt(_sock(), svc.port))
        relay = await cli.allocate()
        await _bind_channel(cli, paddr)
        stop = threading.Event()
        frame = struct.pack("!HH", 0x4000, 100) + bytes(100)

        def blast(
            sock: socket.socket = peer, dest: tuple[str, int] = relay, stop: Any = stop
        ) -> None:
            sock.setblocking(False)
            while not stop.is_set():  # media at some 10,000s of packets a second
                for _ in range(50):
                    with contextlib.suppress(OSError):
                        sock.sendto(bytes(100), dest)
                time.sleep(0.001)

        flood = threading.Thread(target=blast)
        flood.start()

        async def recv_stun(timeout: float = 1.0, cli: UdpTurn = cli) -> bytes:
            while True:  # the flood's ChannelData is interleaved with the answers
                data: bytes = (await asyncio.wait_for(cli.p.q.get(), timeout))[0]
                if data[0] < 0x40:
                    return data

        setattr(cli, "recv", recv_stun)  # noqa: B010
        try:
            for _ in range(2000):
                cli.t.sendto(frame)
            await asyncio.sleep(0.05)
            resp = await cli.request(Method.REFRESH, [(Attr.LIFETIME, struct.pack("!I", 0))])
            assert resp.msg_class == MsgClass.SUCCESS
            assert svc.stats()["allocations"] == 0
            for _ in range(2000):  # to a channel that no longer exists: dropped, counted
                cli.t.sendto(frame)
            await asyncio.sleep(0.05)
            assert _dp(svc).stats()["drop_unknown_channel"] > 0
            relay = await cli.allocate()  # the same client allocates again, media flows
            await _bind_channel(cli, paddr)
            _discard(peer, cli)  # (the socket is non-blocking now: the flood set it)
            cli.t.sendto(struct.pack("!HH", 0x4000, 4) + b"live")
            deadline = time.monotonic() + 2
            while True:
                try:
                    if peer.recv(65536) == b"live":
                        break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the new allocation did not relay"
                    await asyncio.sleep(0.01)
        finally:
            await svc.close()  # while the peer still floods the old relay port
            stop.set()
            flood.join()
            cli.t.close()
            peer.close()


async def test_send_indications_to_port_judged_peers_go_through_the_core() -> None:
    """Peers the policy allows only on some ports (the server's own relay addresses) are not
    marked for the C fast path: their Send indications reach the core, which checks the port."""
    svc = await _service()
    cli = await UdpTurn.open(svc.port)
    pt, peer, paddr = await _peer()
    try:
        assert _dp(svc)._send_fast("127.0.0.1")  # allowed_peers: every port
        judged: list[str] = []
        _dp(svc).bind_policy(lambda ip: bool(judged.append(ip)))  # "judged per port" for all
        await cli.allocate()
        resp = await cli.request(
            Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, _peer_attr(paddr))]
        )
        assert resp.msg_class == MsgClass.SUCCESS and judged == ["127.0.0.1"]
        before = _dp(svc).stats()["upcalls"]
        cli.t.sendto(_send_indication(paddr, b"via the core"))
        assert (await asyncio.wait_for(peer.q.get(), 2))[0] == b"via the core"
        assert _dp(svc).stats()["upcalls"] == before + 1
    finally:
        cli.t.close()
        pt.close()
        await svc.close()


@pytest.mark.parametrize("multiplex", [0, 1], ids=["own-ports", "relay_multiplex"])
async def test_shared_socket_batches_across_allocations(multiplex: int) -> None:
    """turn.relay_multiplex: 20 allocations on one shared socket; a burst through all of them
    leaves in a few sendmmsg calls each way (one socket to peers, the listener to clients),
    where with a port each a round needs a call per allocation's socket."""
    svc = await _service(dataplane_threads=1, relay_multiplex=multiplex)
    clients: list[UdpTurn] = []
    peers = [_sock() for _ in range(20)]
    try:
        for i, peer in enumerate(peers):
            cli = UdpTurn(*await _adopt(_sock(), svc.port))
            clients.append(cli)
            relay = await cli.allocate()
            await _bind_channel(cli, peer.getsockname(), 0x4000 + i)
        before = _dp(svc).stats()
        rounds = 100
        for r in range(rounds):
            for i, cli in enumerate(clients):
                cli.t.sendto(struct.pack("!HHI", 0x4000 + i, 4, r))
        for peer in peers:
            assert [peer.recv(64) for _ in range(rounds)] == [
                struct.pack("!I", r) for r in range(rounds)
            ]
        mid = _dp(svc).stats()
        for r in range(rounds):
            for peer in peers:
                peer.sendto(struct.pack("!I", r), relay if multiplex else _relay_of(svc, peer))
        for cli in clients:
            for _ in range(rounds):
                await asyncio.wait_for(cli.p.q.get(), 2)
        after = _dp(svc).stats()
        up = (mid["send_calls"] - before["send_calls"]) / (mid["tx_peer"] - before["tx_peer"])
        down = (after["send_calls"] - mid["send_calls"]) / (after["tx_client"] - mid["tx_client"])
        print(
            f"multiplex={multiplex}: sendmmsg calls per packet to peers {up:.3f}, to clients {down:.3f}"
        )
        if multiplex:
            assert up < 0.5 and down < 0.5, (up, down, after)
            assert after["recv_calls"] - mid["recv_calls"] < 0.5 * 20 * rounds, after
    finally:
        for cli in clients:
            cli.t.close()
        for peer in peers:
            peer.close()
        await svc.close()


def _relay_of(svc: TurnService, peer: socket.socket) -> tuple[str, int]:
    """The relayed address of the allocation whose channel is bound to ``peer``."""
    assert svc.core is not None
    for alloc in svc.core.allocations.values():
        for ch in alloc.channels.values():
            if ch.peer == peer.getsockname()[:2]:
                return (alloc.relay.ip, alloc.relay.port)
    raise AssertionError("no allocation for this peer")


_CLOSE_LOOP = """
import socket, sys, time
from confedge.turn import _native
deadline = time.monotonic() + float(sys.argv[1])
n = 0
while n < 20000 and time.monotonic() < deadline:
    lsn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsn.bind(("127.0.0.1", 0))
    e = _native.Engine([lsn.detach()], queue_limit=64, buffer_bytes=65536, coalesce_us=0)
    e.start()
    for k in range(1, 4):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("127.0.0.1", 0))
        e.add_allocation(k, 0, r.detach(), 4, ("127.0.0.1", 40000 + k))
    for k in range(1, 4):
        e.remove_allocation(k)  # each wakes the relay thread (to free the memory)
    e.close()  # must not wait for good
    n += 1
print(n)
"""


def test_engine_close_right_after_removals_never_hangs() -> None:
    """Engine.close() sets the stop flag and wakes the relay thread; a thread that was already
    reading the wake-up eventfd for a removal consumed that wake-up too, and used to block in
    epoll_wait for good (a CI run hung in TurnService.close; this loop hung the old build
    within 20,000 rounds every time). Now the flag is checked before every wait."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _CLOSE_LOOP, "8"],
        capture_output=True,
        text=True,
        timeout=30,  # the loop stops after 8 s; a hung close() is killed here
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 1000, out.stdout


def test_send_many_answers_in_order_from_each_threads_listener() -> None:
    """Engine.send_many (the control plane's answers to one drain): every answer leaves from
    its relay thread's listener (a client sees its replies come from the address it sent to),
    each thread's answers to a client in order (a client is always one thread's: its source
    port picks it), in one sendmmsg per thread however the threads alternate in the list; an
    item that is not (thread, bytes, addr) raises after the ones before it went."""
    from confedge.turn import _native

    listeners = [_sock(), _sock()]
    ports = [s.getsockname()[1] for s in listeners]
    e = _native.Engine([s.detach() for s in listeners], coalesce_us=0)
    a, b = _sock(), _sock()
    try:
        e.start()
        to_a, to_b = a.getsockname(), b.getsockname()
        items = [(i % 2, f"answer {i}".encode(), to_a if i % 3 else to_b) for i in range(150)]
        e.send_many(items)
        # 75 answers a thread: two sendmmsg each (64 at most a call), not one per answer
        assert e.stats()["control_send_calls"] == 4
        got: dict[tuple[str, int], list[tuple[bytes, int]]] = {to_a: [], to_b: []}
        for sock, addr in ((a, to_a), (b, to_b)):
            want = sum(1 for it in items if it[2] == addr)
            for _ in range(want):
                data, src = sock.recvfrom(100)
                got[addr].append((data, src[1]))
        for addr in (to_a, to_b):
            for t in (0, 1):
                sent = [d for k, d, dst in items if dst == addr and k == t]
                assert [d for d, src in got[addr] if src == ports[t]] == sent
            assert len(got[addr]) == sum(1 for it in items if it[2] == addr)
        with pytest.raises(TypeError):
            e.send_many([(0, b"before", to_a), (1, "not bytes", to_a), (0, b"after", to_a)])
        assert a.recvfrom(100)[0] == b"before"
        a.settimeout(0.3)
        with pytest.raises(TimeoutError):
            a.recvfrom(100)
        with pytest.raises(ValueError, match="no relay thread 2"):
            e.send_many([(2, b"x", to_a)])
        e.send_many([])
    finally:
        e.close()
        a.close()
        b.close()
