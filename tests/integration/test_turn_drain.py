"""Draining TURN (issue 15): new Allocates are redirected, live allocations relay to their end.

Ten clients allocate and relay through a TurnService to a UDP echo peer; the service starts
draining; a new client's Allocate gets 300 Try Alternate with ALTERNATE-SERVER (RFC 8489 §10),
authenticated, and the client follows it to a second TurnService where it allocates; the ten
refresh and keep relaying; when the last one ends the "drained" future resolves.  Without an
alternate the answer is 508.  Runs on the data plane the suite selects (CONFEDGE_DATAPLANE).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    StunError,
    check_integrity,
    decode_address,
    encode_u32,
    new_transaction_id,
    parse_message,
)
from confedge.turn.service import TurnService
from confedge.turn.testing import UdpTurnClient, response_code, turn_config


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(data, addr)


@contextlib.asynccontextmanager
async def _echo_peer() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    try:
        yield t.get_extra_info("sockname")[1]
    finally:
        t.close()


@contextlib.asynccontextmanager
async def _service(**turn: object) -> AsyncIterator[TurnService]:
    svc = TurnService(turn_config(**turn))  # type: ignore[arg-type]
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def _client(svc: TurnService, port: int | None = None) -> UdpTurnClient:
    return UdpTurnClient(("127.0.0.1", port or svc.port), "turnuser", "turnpass", "example.test")


async def _relay_round(client: UdpTurnClient, peer_port: int, payload: bytes) -> bool:
    """One Send indication to the echo peer; True when its Data indication came back."""
    loop = asyncio.get_running_loop()
    b = MessageBuilder(Method.SEND, MsgClass.INDICATION, new_transaction_id())
    b.add_xor_address(Attr.XOR_PEER_ADDRESS, "127.0.0.1", peer_port)
    b.add(Attr.DATA, payload)
    client.sock.send(b.build())
    deadline = loop.time() + 2.0
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(client.sock, 65535), left)
        except TimeoutError:
            return False
        with contextlib.suppress(StunError):
            msg = parse_message(data)
            if msg.method == Method.DATA and msg.get(Attr.DATA) == payload:
                return True
    return False


async def _allocate_and_relay(client: UdpTurnClient, peer_port: int) -> None:
    msg = await client.allocate()
    assert msg is not None and response_code(msg) == 200
    assert await client.create_permission("127.0.0.1") == 200
    assert await _relay_round(client, peer_port, b"hello")


async def _refresh(client: UdpTurnClient, lifetime: int) -> int:
    msg = await client.request(Method.REFRESH, [(Attr.LIFETIME, encode_u32(lifetime))])
    assert msg is not None
    return response_code(msg)


async def test_drain_redirects_new_allocates_and_waits_for_live_ones() -> None:
    async with _echo_peer() as peer, _service() as first, _service() as second:
        clients = [_client(first) for _ in range(10)]
        try:
            await asyncio.gather(*(_allocate_and_relay(c, peer) for c in clients))
            assert first.stats()["allocations"] == 10

            drained = first.start_drain(alternate=f"127.0.0.1:{second.port}")
            state = first.drain_state()
            assert state["draining"] and state["allocations"] == 10
            assert state["alternate"] == f"127.0.0.1:{second.port}"

            # A new client is redirected: 300 with ALTERNATE-SERVER, integrity-protected.
            newcomer = _client(first)
            try:
                msg = await newcomer.allocate()
                assert msg is not None and response_code(msg) == 300
                assert check_integrity(msg, newcomer.key)
                raw = msg.get(Attr.ALTERNATE_SERVER)
                assert raw is not None
                host, port = decode_address(raw)
                assert (host, port) == ("127.0.0.1", second.port)
            finally:
                newcomer.close()
            # ... and follows it, as a client does (RFC 8489 §10: same request, new server).
            follower = _client(second, port)
            try:
                await _allocate_and_relay(follower, peer)
            finally:
                follower.close()
            assert second.stats()["allocations"] == 1
            assert first.drain_state()["redirected"] == 1

            # The ten refresh and keep relaying; nothing new was allocated on the first.
            assert [await _refresh(c, 600) for c in clients] == [200] * 10
            for c in clients:
                assert await _relay_round(c, peer, b"still here")
            assert first.stats()["allocations"] == 10
            assert not drained.done()

            # They end one by one; the future resolves after the last.
            for c in clients[:-1]:
                assert await _refresh(c, 0) == 200
            await asyncio.sleep(0.05)
            assert not drained.done()
            assert first.drain_state()["allocations"] == 1
            assert await _refresh(clients[-1], 0) == 200
            await asyncio.wait_for(drained, 2.0)
            assert first.stats()["allocations"] == 0
            assert first.core is not None
            assert first.core.answers.counts[(300, "draining")] == 1
        finally:
            for c in clients:
                c.close()


async def test_drain_without_alternate_refuses_with_508_and_cancel_restores_service() -> None:
    async with _service() as svc:
        drained = svc.start_drain()
        assert drained.done()  # no allocations: drained at once
        client = _client(svc)
        try:
            msg = await client.allocate()
            assert msg is not None and response_code(msg) == 508
            assert msg.get(Attr.ALTERNATE_SERVER) is None
            assert svc.drain_state()["refused"] == 1
            svc.cancel_drain()
            assert not svc.drain_state()["draining"]
            msg = await client.allocate()
            assert msg is not None and response_code(msg) == 200
        finally:
            client.close()


async def test_alternate_server_from_config_and_ipv6_form() -> None:
    async with _service(alternate_server="[2001:db8::6]:3479") as svc:
        svc.start_drain()
        assert svc.drain_state()["alternate"] == "[2001:db8::6]:3479"
        client = _client(svc)
        try:
            msg = await client.allocate()
            assert msg is not None and response_code(msg) == 300
            raw = msg.get(Attr.ALTERNATE_SERVER)
            assert raw is not None and decode_address(raw) == ("2001:db8::6", 3479)
        finally:
            client.close()
        with pytest.raises(ValueError, match="not an IP address"):
            svc.start_drain(alternate="turn.example.com:3478")


def test_alternate_server_config_errors_name_the_key() -> None:
    from confedge.config import ConfigError

    for bad in ("turn.example.com", "10.0.0.1:70000", "[2001:db8::1"):
        with pytest.raises(ConfigError, match=r"turn\.alternate_server"):
            turn_config(alternate_server=bad)
    assert turn_config(alternate_server="10.0.0.6").turn.alternate_server == "10.0.0.6:3478"
