"""A bound channel whose permission lapses relays nothing, either way, until it is renewed.

RFC 8656 §9 and §12: the server relays ChannelData only while the peer's IP holds a permission;
a permission lasts 300 s, a channel binding 600 s, so a client that refreshes neither by
CreatePermission nor by ChannelBind keeps a bound channel without a permission for half its life.
Real sockets on loopback through TurnService, on the data plane CONFEDGE_DATAPLANE selects (the
suite runs once per backend), with one relay port per allocation and on a shared relay socket
(``turn.relay_multiplex``, whose demultiplexer must not deliver the peer either).
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from typing import Any

import pytest
from test_turn_dataplane import UdpTurn, _peer, _peer_attr

from confedge.stun import Attr, Method, MsgClass, encode_channel_number
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config

LIFETIME = 1  # seconds: the permission's, shortened as in the offload scenario


async def _quiet(q: asyncio.Queue[Any], wait: float = 0.3) -> bool:
    """True when nothing arrives on ``q`` within ``wait`` seconds."""
    await asyncio.sleep(wait)
    return q.empty()


@pytest.mark.parametrize("turn", [{}, {"relay_multiplex": 1, "dataplane_threads": 1}])
async def test_lapsed_permission_stops_bound_channel_until_renewed(turn: dict[str, Any]) -> None:
    svc = TurnService(turn_config(**turn))
    await svc.start()
    svc.core.s = dataclasses.replace(svc.core.s, permission_lifetime=LIFETIME)
    cli = await UdpTurn.open(svc.port)
    pt, peer, paddr = await _peer()
    bind = [
        (Attr.CHANNEL_NUMBER, encode_channel_number(0x4001)),
        (Attr.XOR_PEER_ADDRESS, _peer_attr(paddr)),
    ]

    async def both_ways(tag: bytes) -> None:
        cli.t.sendto(struct.pack("!HH", 0x4001, len(tag)) + tag)
        data, _ = await asyncio.wait_for(peer.q.get(), 2)
        assert data == tag
        pt.sendto(tag, relay)
        assert await cli.recv() == struct.pack("!HH", 0x4001, len(tag)) + tag

    try:
        relay = await cli.allocate()
        assert (await cli.request(Method.CHANNEL_BIND, bind)).msg_class == MsgClass.SUCCESS
        await both_ways(b"bound")
        # The permission lapses; the channel (600 s) stays bound.
        await asyncio.sleep(LIFETIME + 1.0)
        alloc = next(iter(svc.core.allocations.values()))
        assert paddr[0] not in alloc.permissions and 0x4001 in alloc.channels
        dropped = svc.stats()["dropped_no_permission"]
        cli.t.sendto(struct.pack("!HH", 0x4001, 5) + b"to-pe")
        pt.sendto(b"to-client", relay)
        assert await _quiet(peer.q) and await _quiet(cli.p.q, 0.0)
        assert svc.stats()["dropped_no_permission"] == dropped + 1  # the peer's, counted
        # A CreatePermission for the IP renews it: the same channel relays again both ways.
        perm = [(Attr.XOR_PEER_ADDRESS, _peer_attr(paddr))]
        assert (await cli.request(Method.CREATE_PERMISSION, perm)).msg_class == MsgClass.SUCCESS
        await both_ways(b"renewed")
        # It lapses again; this time a ChannelBind refresh (§11.2 installs the permission).
        await asyncio.sleep(LIFETIME + 1.0)
        cli.t.sendto(struct.pack("!HH", 0x4001, 4) + b"gone")
        pt.sendto(b"gone", relay)
        assert await _quiet(peer.q) and await _quiet(cli.p.q, 0.0)
        assert (await cli.request(Method.CHANNEL_BIND, bind)).msg_class == MsgClass.SUCCESS
        await both_ways(b"rebound")
    finally:
        cli.t.close()
        pt.close()
        await svc.close()
