"""The guard behind the real TURN server: wrong long-term credentials from one source ban it
(its requests are then dropped unanswered) while another source still gets served."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from confedge.config import parse_config
from confedge.guard import Guard
from confedge.guard.store import MemoryStore
from confedge.stun.attributes import decode_error_code, encode_requested_transport
from confedge.stun.constants import Attr, Method, MsgClass
from confedge.stun.integrity import long_term_key
from confedge.stun.message import MessageBuilder, new_transaction_id, parse_message
from confedge.turn.service import TurnService


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait(data)


async def _client(source: str, port: int) -> tuple[asyncio.DatagramTransport, _Client]:
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(
        _Client, local_addr=(source, 0), remote_addr=("127.0.0.1", port)
    )
    return t, p


async def _allocate(
    t: asyncio.DatagramTransport, p: _Client, password: str, realm: str
) -> tuple[int, int] | None:
    """One Allocate with a fresh nonce: (class, error code) of the authenticated answer, or None
    when the server stays silent."""
    b = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    t.sendto(b.build(fingerprint=True))
    try:
        challenge = parse_message(await asyncio.wait_for(p.answers.get(), 0.5))
    except TimeoutError:
        return None
    nonce = challenge.get(Attr.NONCE)
    assert nonce is not None
    b = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    b.add(Attr.USERNAME, b"turnuser")
    b.add(Attr.REALM, realm.encode())
    b.add(Attr.NONCE, nonce)
    t.sendto(b.build(key=long_term_key("turnuser", realm, password), fingerprint=True))
    try:
        answer = parse_message(await asyncio.wait_for(p.answers.get(), 0.5))
    except TimeoutError:
        return None
    err = answer.get(Attr.ERROR_CODE)
    return answer.msg_class, decode_error_code(err)[0] if err is not None else 0


async def test_wrong_turn_credentials_ban_the_source(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path), "domain": "example.com"},
            "proxy": {"enabled": False},
            "turn": {
                "port": 0,
                "tls_port": 0,  # the default 5349 is fixed: parallel runs collide
                "relay_ports": "34600-34699",
                "username": "turnuser",
                "password": "right",
                "media_nodes": ["127.0.0.0/8"],
            },
            "guard": {"enabled": True, "store": "memory", "turn_maxretry": 3, "ignore": []},
        }
    )
    guard = Guard(cfg.guard, MemoryStore())
    await guard.start()
    turn = TurnService(cfg, guard=guard)
    await turn.start()
    realm = "example.com"
    bad_t, bad = await _client("127.0.0.1", turn.port)
    good_t, good = await _client("127.0.0.2", turn.port)
    try:
        for _ in range(3):
            assert await _allocate(bad_t, bad, "wrong", realm) == (MsgClass.ERROR, 401)
        assert guard.check("127.0.0.1") is not None
        # Banned: no answer at all, not even to the right password.
        assert await _allocate(bad_t, bad, "right", realm) is None
        # Another source is unaffected.
        assert await _allocate(good_t, good, "right", realm) == (MsgClass.SUCCESS, 0)
    finally:
        bad_t.close()
        good_t.close()
        await turn.close()
        await guard.close()
