"""The codec against a real, independent STUN client: coturn's ``turnutils_stunclient``.

A minimal Binding responder (this file; the real server is confedge.turn) answers on an
ephemeral loopback UDP port using only confedge.stun to parse and build. The coturn client must
accept the answer and print the reflexive address we put in XOR-MAPPED-ADDRESS.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import cast

import pytest

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    StunError,
    encode_address,
    parse_message,
    unknown_comprehension_required,
)

pytestmark = pytest.mark.coturn

CLIENT = shutil.which("turnutils_stunclient")


class BindingResponder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.requests = 0
        self.errors: list[str] = []
        self.last_client: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not a DatagramTransport subclass at run time; cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        try:
            msg = parse_message(data)
        except StunError as e:
            self.errors.append(str(e))
            return
        if msg.method != Method.BINDING or msg.msg_class != MsgClass.REQUEST:
            self.errors.append(f"unexpected {msg.method:#x}/{msg.msg_class}")
            return
        self.requests += 1
        self.last_client = addr
        b = MessageBuilder(Method.BINDING, MsgClass.SUCCESS, msg.transaction_id)
        unknown = unknown_comprehension_required(msg)
        if unknown:
            b = MessageBuilder(Method.BINDING, MsgClass.ERROR, msg.transaction_id)
            b.add_error(420)
        else:
            b.add_xor_address(Attr.XOR_MAPPED_ADDRESS, addr[0], addr[1])
            b.add(Attr.MAPPED_ADDRESS, encode_address(addr[0], addr[1]))
        self.transport.sendto(b.build(fingerprint=True), addr)


@pytest.mark.skipif(CLIENT is None, reason="coturn's turnutils_stunclient is not installed")
async def test_turnutils_stunclient_accepts_our_binding_response() -> None:
    assert CLIENT is not None
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        BindingResponder, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        proc = await asyncio.create_subprocess_exec(
            CLIENT,
            "-p",
            str(port),
            "127.0.0.1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        transport.close()
    text = out.decode(errors="replace")
    assert proto.errors == []
    assert proto.requests >= 1, text
    assert proto.last_client is not None
    assert f"UDP reflexive addr: 127.0.0.1:{proto.last_client[1]}" in text, text
