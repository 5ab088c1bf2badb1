"""Issue 11, spoofed-source denial of TURN service, on real sockets and the real kernel.

A forger with a raw socket (IP_HDRINCL) sends unauthenticated Allocate requests whose IPv4
source is the media node's address -- and the node's own UDP port -- so that confedge spends
the 401 budget (``turn.unauth_budget``) on the node.  confedge cannot tell these datagrams from
the node's.  While the flood goes on:

* coturn's ``turnutils_uclient -t -m 50`` from the node's address allocates over TCP and relays
  every message (on 96b57bc the TCP challenges were dropped by the spent budget and it hung);
* the node's UDP socket that holds a nonce still allocates (proof: nonce + integrity), while an
  unauthenticated request from that socket gets nothing -- the budget really is spent;
* a new UDP socket of the node (a port the forger did not hit) gets its 401 and allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from test_turn_uclient import _TOTALS, UCLIENT, _turnutils_peer, _uclient

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    encode_requested_transport,
    new_transaction_id,
)
from confedge.turn.service import TurnService
from confedge.turn.testing import UdpTurnClient, response_code, turn_config

NODE = "127.0.0.2"

pytestmark = [
    pytest.mark.coturn,
    pytest.mark.skipif(UCLIENT is None, reason="coturn's turnutils_uclient is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="forging source addresses needs CAP_NET_RAW"),
]


def _forged_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet with any source (RFC 791, RFC 768; the kernel fills the IP
    checksum, an IPv4 UDP checksum of 0 means "none")."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    return ip + udp


def _unauthenticated_allocate() -> bytes:
    b = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    return b.build()


@contextlib.asynccontextmanager
async def _forger(server: tuple[str, int], node_port: int) -> AsyncIterator[list[int]]:
    """Forged datagrams from NODE: 20 from the node's own port and 40 from other ports every
    100 ms, for at most 60 s.  Yields the running count of datagrams sent."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = [0]
    rng = random.Random(11)

    async def flood() -> None:
        for _ in range(600):  # bounded: 60 s
            for i in range(60):
                port = node_port if i < 20 else rng.randrange(30000, 60000)
                raw.sendto(_forged_udp((NODE, port), server, _unauthenticated_allocate()), server)
                sent[0] += 1
            await asyncio.sleep(0.1)

    task = asyncio.create_task(flood())
    try:
        yield sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raw.close()


async def test_forged_node_source_cannot_deny_the_node() -> None:
    svc = TurnService(turn_config(media_nodes=[NODE], allowed_peers=["127.0.0.1"]))
    await svc.start()
    info = svc.info()
    server = (svc.host, svc.port)
    node = UdpTurnClient(server, info["username"], info["password"], info["realm"], local=(NODE, 0))
    fresh: UdpTurnClient | None = None
    try:
        # The node's socket learns a nonce (the 401 to its first Allocate), as it would at any
        # time before an attack; then the forger takes its address and port.
        tid = new_transaction_id()
        first = await node.transact(
            node.build(
                Method.ALLOCATE,
                [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))],
                tid,
                False,
            ),
            tid,
        )
        assert first is not None and response_code(first) == 401
        node.nonce = first.get(Attr.NONCE)
        async with (
            _turnutils_peer("127.0.0.1") as peer_port,
            _forger(server, node.local[1]) as sent,
        ):
            for _ in range(100):  # at least 100 forged datagrams from the node's port (5 bursts)
                if sent[0] >= 300:
                    break
                await asyncio.sleep(0.1)
            assert sent[0] >= 300
            # The budget of the node's socket is spent: an unauthenticated request from it is
            # dropped (the test would prove nothing otherwise).
            node.retries = 1
            tid = new_transaction_id()
            probe = await node.transact(node.build(Method.REFRESH, [], tid, False), tid)
            assert probe is None, "the forged flood did not spend the budget"
            # The node with its nonce allocates over UDP and gets a permission.
            resp = await node.request(
                Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]
            )
            with_nonce = response_code(resp) if resp is not None else 0
            permission = await node.create_permission("127.0.0.1")
            # A new UDP socket of the node is challenged and allocates.
            fresh = UdpTurnClient(
                server, info["username"], info["password"], info["realm"], local=(NODE, 0)
            )
            resp = await fresh.allocate()
            new_socket = response_code(resp) if resp is not None else 0
            # 50 TCP clients from the node's address, each allocating and relaying.
            flags = f"-t -m 50 -n 2 -L {NODE} -u turnuser -w turnpass -e 127.0.0.1".split()
            out = await _uclient(svc.port, *flags, "-r", str(peer_port), timeout=40)
        totals = _TOTALS.findall(out)
        relayed = tuple(map(int, totals[-1])) if totals else None
        # All outcomes first, then one assertion: a failure shows every part at once.
        outcome = {
            "udp allocate with nonce": with_nonce,
            "udp permission with nonce": permission,
            "udp allocate from a new socket": new_socket,
            "tcp uclient -m 50 sent/received bytes": relayed,
        }
        assert outcome == {
            "udp allocate with nonce": 200,
            "udp permission with nonce": 200,
            "udp allocate from a new socket": 200,
            "tcp uclient -m 50 sent/received bytes": (50 * 2 * 100, 50 * 2 * 100),
        }, out[-1500:]
    finally:
        node.close()
        if fresh is not None:
            fresh.close()
        await svc.close()
