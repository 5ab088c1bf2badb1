"""Adversarial QA of the TURN server on real sockets: hostile datagrams and streams, then a
real client (aioice) must still be served, and nothing may be logged as a crash.

The fuzz is seeded (reproducible) and bounded in count; the attacker sends from 127.0.0.2 so
that its 401 budget (turn.unauth_budget, per source) does not starve the real client on
127.0.0.1 -- exactly the separation the budget exists for.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aioice.turn import create_turn_endpoint
from msgspec import structs
from stun_udp import StunUdp

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    decode_error_code,
    decode_xor_address,
    encode_channel_number,
    encode_even_port,
    encode_requested_transport,
    encode_u32,
    encode_xor_address,
    long_term_key,
    new_transaction_id,
    parse_message,
)
from confedge.turn import listeners
from confedge.turn.auth import RestCredentials
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config
from ports import free_port, port_free, spare_port

REALM = "example.test"
ATTACKER = "127.0.0.2"

# -- helpers ------------------------------------------------------------------------------------


def _crashes(records: list[logging.LogRecord]) -> list[str]:
    """Log records that mean "an exception escaped": any ERROR, or anything with a traceback."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR or r.exc_info is not None
    ]


def _allocate_wire(extra: list[tuple[int, bytes]] = ()) -> MessageBuilder:  # type: ignore[assignment]
    b = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    for a, v in extra:
        b.add(a, v)
    return b


def _signed(b: MessageBuilder, user: str, password: str, nonce: bytes, realm: str = REALM) -> bytes:
    b.add(Attr.USERNAME, user.encode())
    b.add(Attr.REALM, realm.encode())
    b.add(Attr.NONCE, nonce)
    return b.build(key=long_term_key(user, realm, password))


def _hostile_datagrams(
    rng: random.Random, user: str, password: str, nonce: bytes
) -> Iterator[bytes]:
    """Every category of the QA brief, interleaved."""
    methods = [*list(range(0, 16)), 255, 256, 2748, 4095]
    attrs = [int(a) for a in Attr] + [0x0000, 0x7FFF, 0x8000, 0xFFFF]
    good = _signed(_allocate_wire(), user, password, nonce)
    rest_users = [":", "abc:def", "99999999999999999999:x", "-5:x", "²:x", "٣٣٣٣٣٣٣٣٣٣:x", ""]
    for i in range(1500):
        kind = i % 12
        if kind == 0:  # random bytes
            yield rng.randbytes(rng.choice([0, 1, 3, 4, 19, 20, 21, 64, 548, 1400]))
        elif kind == 1:  # truncated STUN
            yield good[: rng.randrange(len(good))]
        elif kind == 2:  # bad length field
            w = bytearray(good)
            w[2:4] = rng.randrange(65536).to_bytes(2, "big")
            yield bytes(w)
        elif kind == 3:  # huge attribute counts (zero-length attributes)
            n = rng.choice([65, 200, 1000, 5000])
            body = b"".join(rng.choice(attrs).to_bytes(2, "big") + b"\0\0" for _ in range(n))
            head = b"\x00\x03" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42"
            yield head + new_transaction_id() + body
        elif kind == 4:  # ChannelData: length beyond the datagram, unbound channels, odd sizes
            ch = rng.randrange(0x4000, 0x8000)
            declared = rng.choice([0, 1, 100, 65535])
            yield (
                ch.to_bytes(2, "big")
                + declared.to_bytes(2, "big")
                + rng.randbytes(rng.choice([0, 1, 4, 50]))
            )
        elif kind == 5:  # every method x class, no attributes or junk ones
            b = MessageBuilder(rng.choice(methods), rng.randrange(4), new_transaction_id())
            for _ in range(rng.randrange(4)):
                b.add(rng.choice(attrs), rng.randbytes(rng.choice([0, 4, 8, 20])))
            yield b.build(fingerprint=rng.random() < 0.5)
        elif kind == 6:  # MESSAGE-INTEGRITY but no USERNAME
            b = _allocate_wire()
            b.add(Attr.REALM, REALM.encode())
            b.add(Attr.NONCE, nonce)
            yield b.build(key=b"k" * 16)
        elif kind == 7:  # USERNAME not UTF-8
            b = _allocate_wire()
            b.add(Attr.USERNAME, b"\xff\xfe\xc3\x28" + rng.randbytes(8))
            b.add(Attr.REALM, REALM.encode())
            b.add(Attr.NONCE, nonce)
            yield b.build(key=b"k" * 16)
        elif kind == 8:  # very long USERNAME / REALM / NONCE
            b = _allocate_wire()
            b.add(Attr.USERNAME, b"u" * rng.choice([513, 1000, 4000]))
            b.add(Attr.REALM, b"r" * rng.choice([763, 2000]))
            b.add(Attr.NONCE, b"n" * rng.choice([763, 9000]))
            yield b.build(key=b"k" * 16)
        elif kind == 9:  # REST-shaped usernames, correctly signed for themselves
            u = rng.choice(rest_users)
            yield _signed(_allocate_wire(), u, RestCredentials.password_for("s3", u), nonce)
        elif kind == 10:  # well-signed requests with junk attributes (past authentication)
            method = rng.choice(
                [Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND]
            )
            tid = new_transaction_id()
            b = MessageBuilder(method, MsgClass.REQUEST, tid)
            choices = [
                (Attr.XOR_PEER_ADDRESS, encode_xor_address("127.0.0.1", 9, tid)),
                (Attr.XOR_PEER_ADDRESS, rng.randbytes(rng.choice([0, 4, 8, 20]))),
                (Attr.CHANNEL_NUMBER, encode_channel_number(0x4000)),
                (Attr.CHANNEL_NUMBER, rng.randbytes(4)),
                (Attr.LIFETIME, encode_u32(rng.choice([0, 1, 2**32 - 1]))),
                (Attr.EVEN_PORT, encode_even_port(True)),
                (Attr.RESERVATION_TOKEN, rng.randbytes(rng.choice([0, 8]))),
                (Attr.REQUESTED_TRANSPORT, rng.randbytes(4)),
                (Attr.REQUESTED_ADDRESS_FAMILY, rng.randbytes(4)),
            ]
            for a, v in rng.sample(choices, rng.randrange(1, 5)):
                b.add(a, v)
            yield _signed(b, user, password, nonce)
        else:  # bit flips of a valid signed request
            w = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                w[rng.randrange(len(w))] ^= 1 << rng.randrange(8)
            yield bytes(w)


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


async def _real_client_relays(svc: TurnService, transport: str, user: str, pw: str) -> None:
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    turn_t, client = await asyncio.wait_for(
        create_turn_endpoint(
            _Collector,
            server_addr=("127.0.0.1", svc.port),
            username=user,
            password=pw,
            transport=transport,
        ),
        10,
    )
    try:
        peer_addr = peer_t.get_extra_info("sockname")
        turn_t.sendto(b"still alive", peer_addr)
        data, src = await asyncio.wait_for(peer.received.get(), 5)
        assert data == b"still alive"
        peer_t.sendto(b"and back", src)
        data, _ = await asyncio.wait_for(client.received.get(), 5)
        assert data == b"and back"
    finally:
        turn_t.close()
        peer_t.close()


# -- UDP fuzz -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["restricted", "permissive"])
async def test_udp_fuzz_then_real_client(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = turn_config(
        mode=mode, relay_ports="38100-38199", secrets=["s3"], allowed_peers=["127.0.0.0/8"]
    )
    svc = TurnService(cfg)
    await svc.start()
    attacker = StunUdp(("127.0.0.1", svc.port))
    try:
        challenge = parse_message(await attacker.request(_allocate_wire().build()))
        nonce = challenge.get(Attr.NONCE)
        assert nonce is not None
        if mode == "restricted":
            user, pw = "turnuser", "turnpass"
        else:
            user = f"{int(time.time()) + 3600}:mallory"
            pw = RestCredentials.password_for("s3", user)
        rng = random.Random(0xC0FFEE)
        for n, wire in enumerate(_hostile_datagrams(rng, user, pw, nonce)):
            attacker.send(wire)
            if n % 50 == 49:
                await asyncio.sleep(0.002)  # let the server read; keep the socket buffer small
                attacker.drain()
        await asyncio.sleep(0.2)
        attacker.drain()
        # The server is still a STUN server ...
        binding = MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build()
        assert parse_message(await attacker.request(binding)).msg_class == MsgClass.SUCCESS
        # ... and a real TURN client still allocates and relays, over UDP and TCP.
        if mode == "restricted":
            real_user, real_pw = "turnuser", "turnpass"
        else:
            real_user = f"{int(time.time()) + 3600}:alice"
            real_pw = RestCredentials.password_for("s3", real_user)
        for transport in ("udp", "tcp"):
            await _real_client_relays(svc, transport, real_user, real_pw)
    finally:
        attacker.close()
        await svc.close()
    assert _crashes(caplog.records) == []


# -- TCP ------------------------------------------------------------------------------------------


@pytest.fixture
def short_tcp_setup(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(listeners, "TCP_SETUP_TIMEOUT", 1.0)
    return 1.0


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Read until EOF/reset; return how long it took (TimeoutError if it stays open)."""
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


async def test_tcp_hostile_streams(
    short_tcp_setup: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    svc = TurnService(turn_config(relay_ports="38200-38209", max_allocations=4))
    await svc.start()
    binding = MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", svc.port, local_addr=(ATTACKER, 0))

    try:
        # Not TURN at all: closed at the first bytes, not after the setup timeout.
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # "G" looks like ChannelData
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
            b"\x00\x01\x00\x00\xde\xad\xbe\xef",  # STUN-shaped, wrong magic cookie
            b"\xff" * 10,
        ):
            r, w = await connect()
            w.write(garbage)
            assert await _closed_within(r, 0.5) < 0.5, garbage
            w.close()
        # A header announcing 65535 bytes, then nothing: closed by the setup timeout.
        r, w = await connect()
        w.write(b"\x00\x01\xff\xfc\x21\x12\xa4\x42" + bytes(12))
        assert await _closed_within(r, short_tcp_setup * 3) >= short_tcp_setup * 0.9
        w.close()
        # Slowloris: a Binding one byte every 20 ms is answered, and the idle connection is
        # closed by the setup timeout all the same.
        r, w = await connect()
        for byte in binding:
            w.write(bytes([byte]))
            await asyncio.sleep(0.02)
        answer = await asyncio.wait_for(r.readexactly(32), 2)
        assert parse_message(answer).msg_class == MsgClass.SUCCESS
        await _closed_within(r, short_tcp_setup * 3)
        w.close()
        # Half-close: the answer still arrives, then the server closes too.
        r, w = await connect()
        w.write(binding)
        w.write_eof()
        assert parse_message(await asyncio.wait_for(r.readexactly(32), 2)).msg_class == 2
        await _closed_within(r, 2)
        w.close()
        # Connection cap (max_allocations + 256): the excess is refused, and once the flood
        # goes away new connections work again.
        conns = [await connect() for _ in range(280)]
        await asyncio.sleep(0.1)
        assert len(svc._tcp_conns) <= 4 + 256
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.2)
        r, w = await connect()
        w.write(binding)
        assert parse_message(await asyncio.wait_for(r.readexactly(32), 2)).msg_class == 2
        w.close()
        await _real_client_relays(svc, "tcp", "turnuser", "turnpass")
    finally:
        await svc.close()
    assert _crashes(caplog.records) == []


async def test_tcp_connection_closed_after_its_allocation_ends(short_tcp_setup: float) -> None:
    """Refresh(0) ends the allocation; the connection then goes like any idle one."""
    svc = TurnService(turn_config(relay_ports="38210-38219"))
    await svc.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", svc.port)

        async def ask(wire: bytes) -> bytes:
            w.write(wire)
            head = await asyncio.wait_for(r.readexactly(20), 2)
            return head + await r.readexactly(int.from_bytes(head[2:4], "big"))

        nonce = parse_message(await ask(_allocate_wire().build())).get(Attr.NONCE)
        assert nonce is not None
        ok = parse_message(await ask(_signed(_allocate_wire(), "turnuser", "turnpass", nonce)))
        assert ok.msg_class == MsgClass.SUCCESS
        await asyncio.sleep(short_tcp_setup * 1.5)  # allocated: the check re-arms, stays open
        assert not w.is_closing() and svc.stats()["allocations"] == 1
        b = MessageBuilder(Method.REFRESH, MsgClass.REQUEST, new_transaction_id())
        b.add(Attr.LIFETIME, encode_u32(0))
        gone = parse_message(await ask(_signed(b, "turnuser", "turnpass", nonce)))
        assert gone.msg_class == MsgClass.SUCCESS and svc.stats()["allocations"] == 0
        assert await _closed_within(r, short_tcp_setup * 3) <= short_tcp_setup * 2.5
        w.close()
    finally:
        await svc.close()


# -- state on real sockets --------------------------------------------------------------------


async def test_relay_range_exhaustion_508_then_recovery() -> None:
    """relay_ports 38300-38303: four allocations, the fifth gets 508; freeing one lets the next
    client in, on the freed port."""
    svc = TurnService(turn_config(relay_ports="38300-38303"))
    await svc.start()
    clients = [StunUdp(("127.0.0.1", svc.port), "127.0.0.1") for _ in range(5)]
    try:
        nonces = []
        for c in clients:
            ch = parse_message(await c.request(_allocate_wire().build()))
            nonces.append(ch.get(Attr.NONCE) or b"")
        ports = []
        for c, nonce in zip(clients[:4], nonces, strict=False):
            ok = parse_message(
                await c.request(_signed(_allocate_wire(), "turnuser", "turnpass", nonce))
            )
            assert ok.msg_class == MsgClass.SUCCESS
            from confedge.stun import decode_xor_address

            ports.append(
                decode_xor_address(ok.get(Attr.XOR_RELAYED_ADDRESS) or b"", ok.transaction_id)[1]
            )
        assert sorted(ports) == [38300, 38301, 38302, 38303]
        full = parse_message(
            await clients[4].request(_signed(_allocate_wire(), "turnuser", "turnpass", nonces[4]))
        )
        assert full.msg_class == MsgClass.ERROR
        from confedge.stun import decode_error_code

        assert decode_error_code(full.get(Attr.ERROR_CODE) or b"")[0] == 508
        b = MessageBuilder(Method.REFRESH, MsgClass.REQUEST, new_transaction_id())
        b.add(Attr.LIFETIME, encode_u32(0))
        freed = parse_message(
            await clients[0].request(_signed(b, "turnuser", "turnpass", nonces[0]))
        )
        assert freed.msg_class == MsgClass.SUCCESS
        ok = parse_message(
            await clients[4].request(_signed(_allocate_wire(), "turnuser", "turnpass", nonces[4]))
        )
        assert ok.msg_class == MsgClass.SUCCESS
        assert (
            decode_xor_address(ok.get(Attr.XOR_RELAYED_ADDRESS) or b"", ok.transaction_id)[1]
            == ports[0]
        )
    finally:
        for c in clients:
            c.close()
        await svc.close()


def _free_run(n: int, lo: int = 24000, hi: int = 32000) -> int:
    """The first port of ``n`` consecutive UDP ports on 127.0.0.1 that are all free now, below
    the kernel's ephemeral range (32768-60999): the test's own client sockets, bound to port
    0, can then never land on one of them."""
    for base in range(lo, hi - n):
        if all(port_free(p, tcp=False) for p in range(base, base + n)):
            return base
    pytest.skip(f"no {n} consecutive free UDP ports in {lo}-{hi}")


async def test_a_nearly_full_range_finds_its_last_ports_and_skips_another_programs() -> None:
    """turn/portdraw.py PortTable: 64 relay ports, one held by another program. Every one of
    the other 63 is granted (random draws alone gave up after 64 misses: at 62 of 64 held that
    happened to 1 Allocate in 3), never the foreign one; the 64th client gets 508."""
    n = 64
    base = _free_run(n)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # "another program" on the range
    other.bind(("127.0.0.1", base + 17))
    svc = TurnService(turn_config(relay_ports=f"{base}-{base + n - 1}"))
    await svc.start()
    clients = [StunUdp(("127.0.0.1", svc.port), "127.0.0.1") for _ in range(n)]
    try:
        granted = []
        for c in clients[: n - 1]:
            nonce = parse_message(await c.request(_allocate_wire().build())).get(Attr.NONCE)
            ok = parse_message(
                await c.request(_signed(_allocate_wire(), "turnuser", "turnpass", nonce or b""))
            )
            assert ok.msg_class == MsgClass.SUCCESS, decode_error_code(
                ok.get(Attr.ERROR_CODE) or b""
            )
            granted.append(
                decode_xor_address(ok.get(Attr.XOR_RELAYED_ADDRESS) or b"", ok.transaction_id)[1]
            )
        assert sorted(granted) == [p for p in range(base, base + n) if p != base + 17]
        last = clients[-1]
        nonce = parse_message(await last.request(_allocate_wire().build())).get(Attr.NONCE)
        full = parse_message(
            await last.request(_signed(_allocate_wire(), "turnuser", "turnpass", nonce or b""))
        )
        assert full.msg_class == MsgClass.ERROR
        assert decode_error_code(full.get(Attr.ERROR_CODE) or b"")[0] == 508
    finally:
        for c in clients:
            c.close()
        other.close()
        await svc.close()


async def test_real_timers_expire_allocations_and_free_ports() -> None:
    """Expiry with injected time is unit-tested; here the service's own 1 s tick does it."""
    relay = free_port(38310, 38320, udp=True)  # one relay port, free now
    svc = TurnService(turn_config(relay_ports=f"{relay}-{relay}"))
    await svc.start()
    assert svc.core is not None
    svc.core.s = replace(svc.core.s, default_lifetime=1, max_lifetime=1, permission_lifetime=1)
    c = StunUdp(("127.0.0.1", svc.port), "127.0.0.1")
    try:
        nonce = parse_message(await c.request(_allocate_wire().build())).get(Attr.NONCE) or b""
        ok = parse_message(
            await c.request(_signed(_allocate_wire(), "turnuser", "turnpass", nonce))
        )
        assert ok.msg_class == MsgClass.SUCCESS
        assert svc.stats()["allocations"] == 1
        deadline = time.monotonic() + 4
        while svc.stats()["allocations"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert svc.stats()["allocations"] == 0
        await asyncio.sleep(0.05)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", relay))  # the relay port is free again
        probe.close()
    finally:
        c.close()
        await svc.close()


# -- start-up errors name the key -----------------------------------------------------------------


async def test_start_errors_name_the_key(tmp_path: Path) -> None:
    from confedge.turn.service import TurnStartError

    # UDP port in use.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        svc = TurnService(turn_config(port=port, relay_ports="38400-38409"))
        with pytest.raises(TurnStartError) as info:
            await svc.start()
        assert str(info.value).startswith(
            f"turn.port: cannot listen for TURN/STUN (udp) on 127.0.0.1:{port}"
        )
        assert "already in use" in str(info.value)
    # TCP port in use (UDP free).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = TurnService(turn_config(port=port, relay_ports="38400-38409"))
        with pytest.raises(TurnStartError, match=r"turn.port: .* \(tcp\) .*already in use"):
            await svc.start()
    # Relay address not on this host (a NAT's public address): refused at start, not 508 later.
    cfg = turn_config(relay_ports="38400-38409", sections={})
    server = structs.replace(cfg.server, external_address="192.0.2.55")
    svc = TurnService(structs.replace(cfg, server=server))
    with pytest.raises(
        TurnStartError,
        match=r"^server.external_address: cannot bind TURN relay sockets on 192.0.2.55: the address is not an address of this host",
    ):
        await svc.start()
    # TURN over TLS with an unusable certificate.
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    cfg = turn_config(relay_ports="38400-38409", tls_port=spare_port(), state_dir=str(tmp_path))
    cfg = structs.replace(cfg, tls=structs.replace(cfg.tls, cert=str(bad)))
    svc = TurnService(cfg)
    with pytest.raises(
        TurnStartError,
        match=r"^tls.cert \(.*bad.pem\): no PEM certificate found.*\(needed by turn.tls_port\)$",
    ):
        await svc.start()
    # Each failed start released what it had bound: a clean start on the same ports works.
    svc = TurnService(turn_config(relay_ports="38400-38409"))
    await svc.start()
    await svc.close()


async def test_tls_port_stalled_and_garbage_handshakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the TLS handshake completes there is no TcpConnection (no cap, no setup timer):
    a silent client is cut by the handshake timeout, garbage at once."""
    from confedge.turn import service

    monkeypatch.setattr(service, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    caplog.set_level(logging.DEBUG)
    cfg = turn_config(relay_ports="38500-38509", tls_port=spare_port(), state_dir=str(tmp_path))
    svc = TurnService(cfg)
    await svc.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", svc.tls_port)
        assert await _closed_within(r, 3) < 2.5  # silent: closed by the handshake timeout
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", svc.tls_port)
        w.write(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))  # plain STUN on the TLS port
        assert await _closed_within(r, 3) < 1.0
        w.close()
        await _real_client_relays_tls(svc)
    finally:
        await svc.close()
    assert [r for r in caplog.records if r.exc_info is not None] == []


async def _real_client_relays_tls(svc: TurnService) -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    turn_t, _ = await create_turn_endpoint(
        _Collector,
        server_addr=("127.0.0.1", svc.tls_port),
        username="turnuser",
        password="turnpass",
        transport="tcp",
        ssl=ctx,
    )
    try:
        turn_t.sendto(b"over tls", peer_t.get_extra_info("sockname"))
        data, _ = await asyncio.wait_for(peer.received.get(), 5)
        assert data == b"over tls"
    finally:
        turn_t.close()
        peer_t.close()
