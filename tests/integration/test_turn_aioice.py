"""aioice's TURN client (a real client implementation) against TurnService on loopback.

Both client transports (UDP and TCP to the server) relay to and from a plain UDP peer socket.
aioice binds a channel for each peer, so this exercises Allocate with 401/nonce, ChannelBind
(with its implicit permission), ChannelData both ways, Refresh(0) on close, and the
end-of-allocation log line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

import pytest
from aioice.turn import create_turn_endpoint

from confedge.turn.auth import RestCredentials
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config
from ports import free_port


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


async def _relay_both_ways(svc: TurnService, transport: str, username: str, password: str) -> None:
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    turn_t, client = await create_turn_endpoint(
        _Collector,
        server_addr=("127.0.0.1", svc.port),
        username=username,
        password=password,
        transport=transport,
    )
    try:
        relay = turn_t.get_extra_info("sockname")  # the relayed address
        assert relay[0] == "127.0.0.1"
        assert 21000 <= relay[1] <= 24999
        for i in range(20):
            turn_t.sendto(b"to-peer-%d" % i, peer_addr)
            data, src = await asyncio.wait_for(peer.received.get(), 5)
            assert data == b"to-peer-%d" % i
            assert src == tuple(relay)
            peer_t.sendto(b"to-client-%d" % i, src)
            data, src = await asyncio.wait_for(client.received.get(), 5)
            assert data == b"to-client-%d" % i
            assert src == peer_addr
        stats = svc.stats()
        assert stats["allocations"] == 1
        assert stats["packets_to_peer"] == 20
        assert stats["packets_to_client"] == 20
    finally:
        turn_t.close()
        peer_t.close()
    # aioice sends Refresh(lifetime=0) on close: the allocation goes away.
    for _ in range(100):
        if svc.stats()["allocations"] == 0:
            break
        await asyncio.sleep(0.02)
    assert svc.stats()["allocations"] == 0


@pytest.mark.parametrize("multiplex", [0, 2], ids=["own-ports", "relay_multiplex"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_aioice_restricted_long_term(
    transport: str, multiplex: int, caplog: pytest.LogCaptureFixture
) -> None:
    svc = TurnService(turn_config(relay_multiplex=multiplex))
    await svc.start()
    try:
        with caplog.at_level(logging.INFO, logger="confedge.turn"):
            await _relay_both_ways(svc, transport, "turnuser", "turnpass")
    finally:
        await svc.close()
    ended = [r.getMessage() for r in caplog.records if "allocation ended" in r.getMessage()]
    assert len(ended) == 1
    line = ended[0]
    assert "user=turnuser" in line
    assert "to_peer=" in line and "pkts" in line
    assert ("reason=refreshed-to-0" in line) or ("reason=tcp-closed" in line)
    assert "turnpass" not in caplog.text


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_aioice_permissive_rest(transport: str) -> None:
    cfg = turn_config(mode="permissive")
    svc = TurnService(cfg)
    await svc.start()
    try:
        # A credential minted with the *second* secret (rotation) works as well.
        username = f"{int(time.time()) + 600}:alice"
        password = RestCredentials.password_for("s3cret-previous", username)
        await _relay_both_ways(svc, transport, username, password)
    finally:
        await svc.close()


async def test_aioice_over_tls(tmp_path: Path) -> None:
    """TURN over TLS on turn.tls_port (self-signed certificate generated in state_dir)."""
    port = free_port(20000, 20500, shuffle=True)
    svc = TurnService(turn_config(tls_port=port, state_dir=str(tmp_path)))
    await svc.start()
    try:
        assert svc.tls_port == port
        loop = asyncio.get_running_loop()
        peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        turn_t, client = await create_turn_endpoint(
            _Collector,
            server_addr=("127.0.0.1", port),
            username="turnuser",
            password="turnpass",
            transport="tcp",
            ssl=ctx,
        )
        try:
            relay = turn_t.get_extra_info("sockname")
            peer_addr = peer_t.get_extra_info("sockname")
            turn_t.sendto(b"over tls", peer_addr)
            data, src = await asyncio.wait_for(peer.received.get(), 5)
            assert (data, src) == (b"over tls", tuple(relay))
            peer_t.sendto(b"back", src)
            data, _ = await asyncio.wait_for(client.received.get(), 5)
            assert data == b"back"
        finally:
            turn_t.close()
            peer_t.close()
    finally:
        await svc.close()
