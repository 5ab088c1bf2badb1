"""Adversarial QA of TURN authentication on real sockets: REST credential forms, secret
rotation, nonces replayed from another address or kept past their lifetime, MESSAGE-INTEGRITY
vs MESSAGE-INTEGRITY-SHA256, another user's credentials on an allocation, restricted mode over
TCP, a forged PROXY header behind the HTTPS port's relay, and what the guard is told.

The guard here is a recorder (every ``record_turn_auth_failure`` is kept), so each test can say
exactly which requests count as a wrong credential. Sources are loopback addresses: 127.0.0.2 is
the attacker, 127.0.0.3 an innocent client whose address the attacker writes on its datagrams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import shutil
import struct
import time
from typing import Any

import pytest
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint
from stun_udp import StunUdp

from confedge.guard import create_guard
from confedge.guard.hook import NullGuard
from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    decode_error_code,
    decode_xor_address,
    encode_channel_number,
    encode_requested_transport,
    encode_u32,
    long_term_key,
    new_transaction_id,
    parse_message,
)
from confedge.turn.auth import NonceManager, RestCredentials
from confedge.turn.portshare import FIRST_HTTP, classify, encode_proxy_v2
from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config

REALM = "example.test"
RELAYS = "38600-38639"
ATTACKER = "127.0.0.2"
VICTIM = "127.0.0.3"
SECRETS = ["s3cret-current", "s3cret-previous"]


class _Recorder(NullGuard):
    """The guard as TURN sees it, keeping every reported failure."""

    enabled = True

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def record_turn_auth_failure(self, client_ip: str) -> None:
        self.failures.append(client_ip)


class _Tcp:
    """A TCP client connection for raw STUN exchanges."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str) -> _Tcp:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(r, w)

    async def ask(self, wire: bytes) -> Message:
        self.writer.write(wire)
        head = await asyncio.wait_for(self.reader.readexactly(20), 2)
        body = await asyncio.wait_for(self.reader.readexactly(struct.unpack("!H", head[2:4])[0]), 2)
        return parse_message(head + body)

    def close(self) -> None:
        self.writer.close()


def _request(method: int = Method.ALLOCATE) -> MessageBuilder:
    b = MessageBuilder(method, MsgClass.REQUEST, new_transaction_id())
    if method == Method.ALLOCATE:
        b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    return b


def _sign(b: MessageBuilder, user: str, password: str, nonce: bytes, sha256: bool = False) -> bytes:
    b.add(Attr.USERNAME, user.encode())
    b.add(Attr.REALM, REALM.encode())
    b.add(Attr.NONCE, nonce)
    return b.build(key=long_term_key(user, REALM, password), sha256=sha256)


def _code(msg: Message | None) -> int | None:
    """200 for a success, the error code of an error, None for silence."""
    if msg is None:
        return None
    if msg.msg_class == MsgClass.SUCCESS:
        return 200
    err = msg.get(Attr.ERROR_CODE)
    assert err is not None
    return decode_error_code(err)[0]


def _nonce(msg: Message | None) -> bytes:
    assert msg is not None
    nonce = msg.get(Attr.NONCE)
    assert nonce is not None
    return nonce


async def _challenge(c: StunUdp | _Tcp) -> bytes:
    return _nonce(await c.ask(_request().build()))


@contextlib.asynccontextmanager
async def _server(mode: str = "restricted", **turn: Any) -> Any:
    guard = _Recorder()
    cfg = turn_config(mode=mode, relay_ports=RELAYS, domain=REALM, secrets=SECRETS, **turn)
    svc = TurnService(cfg, guard=guard)
    await svc.start()
    try:
        yield svc, guard
    finally:
        await svc.close()


# -- counting -----------------------------------------------------------------------------------


async def test_a_challenge_is_not_counted_and_a_wrong_password_counts_once() -> None:
    """Over UDP and TCP: the 401 that precedes every Allocate is no failure; each request with a
    wrong password is exactly one; the right password after them is none."""
    async with _server() as (svc, guard):
        for transport in ("udp", "tcp"):
            guard.failures.clear()
            c: StunUdp | _Tcp = (
                StunUdp(("127.0.0.1", svc.port))
                if transport == "udp"
                else await _Tcp.connect(svc.port, ATTACKER)
            )
            try:
                nonce = await _challenge(c)
                assert guard.failures == [], transport
                for n in range(1, 4):
                    assert _code(await c.ask(_sign(_request(), "turnuser", "wrong", nonce))) == 401
                    assert guard.failures == [ATTACKER] * n, transport
                assert _code(await c.ask(_sign(_request(), "turnuser", "turnpass", nonce))) == 200
                assert guard.failures == [ATTACKER] * 3, transport
            finally:
                c.close()


async def test_a_stale_nonce_does_not_make_guesses_free() -> None:
    """A nonce kept past ``nonce_lifetime`` got 438 before any integrity check, and a wrong
    password with it was never reported to the guard: unlimited guesses. Over UDP it was an
    oracle too: once the guesser's own 401 budget is spent, the right password still gets its
    (budget-free) 438 and a wrong one silence. Each such guess now counts."""
    async with _server(unauth_budget=3) as (svc, guard):
        c = StunUdp(("127.0.0.1", svc.port))
        try:
            nonce = await _challenge(c)
            assert svc.core is not None
            svc.core.wall_offset += svc.cfg.turn.nonce_lifetime + 1  # the nonce is stale now
            wrong = _sign(_request(), "turnuser", "wrong", nonce)
            assert _code(await c.ask(wrong)) == 438
            assert guard.failures == [ATTACKER]
            right = _sign(_request(), "turnuser", "turnpass", nonce)
            assert _code(await c.ask(right)) == 438
            assert guard.failures == [ATTACKER]  # the right password is no failure
            while await c.ask(_request().build(), timeout=0.2) is not None:
                pass  # spend the rest of the budget
            assert await c.ask(_sign(_request(), "turnuser", "wrong", nonce), 0.2) is None
            assert guard.failures == [ATTACKER] * 2  # unanswered, but counted
            answer = await c.ask(_sign(_request(), "turnuser", "turnpass", nonce))
            assert _code(answer) == 438  # the proven client is still answered
            fresh = _nonce(answer)
            assert _code(await c.ask(_sign(_request(), "turnuser", "turnpass", fresh))) == 200
            assert guard.failures == [ATTACKER] * 2
        finally:
            c.close()


async def test_forged_sources_and_foreign_nonces_never_ban_anyone() -> None:
    """Ban poisoning: the attacker can write any source on a UDP datagram but receives only
    the nonces sent to its own address. Its nonce under the victim's address, its captured
    (valid) Allocate replayed from another port, and a nonce of an instance with another key
    all get 438 and are never counted, with right or wrong passwords; the victim then
    allocates. (coturn and fail2ban count coturn's 401 log lines, whatever the source.)"""
    async with _server() as (svc, guard):
        attacker = StunUdp(("127.0.0.1", svc.port))
        forger = StunUdp(("127.0.0.1", svc.port), VICTIM)  # writes the victim's address
        replayer = StunUdp(("127.0.0.1", svc.port))  # the attacker's address, another port
        victim = StunUdp(("127.0.0.1", svc.port), VICTIM)
        try:
            nonce = await _challenge(attacker)
            captured = _sign(_request(), "turnuser", "turnpass", nonce)
            other = NonceManager(600).issue(time.time(), VICTIM, 1).encode()  # another key
            for _ in range(10):
                assert _code(await forger.ask(_sign(_request(), "turnuser", "x", nonce))) == 438
                assert _code(await forger.ask(_sign(_request(), "turnuser", "x", other))) == 438
                assert _code(await replayer.ask(captured)) == 438
            assert guard.failures == []
            assert svc.core is not None and not svc.core.allocations
            nonce = await _challenge(victim)
            assert _code(await victim.ask(_sign(_request(), "turnuser", "turnpass", nonce))) == 200
        finally:
            for s in (attacker, forger, replayer, victim):
                s.close()


# -- REST credentials ---------------------------------------------------------------------------


async def test_rest_credential_forms() -> None:
    """Every username signed with the current secret, so only its form decides. No cap on the
    expiry beyond 12 digits (as coturn: whoever holds the secret chooses the lifetime); signs,
    spaces and 13-digit (zero-padded) expiries are refused and counted; a credential expired by
    one second is refused but not counted (a legitimate client late, not a guess)."""
    now = int(time.time())
    ok = [
        f"{now + 30}:alice",
        f"{now + 50 * 365 * 86400}:alice",  # 50 years
        "999999999999:alice",  # the longest expiry accepted (year 33658)
        f"00{now + 30}:alice",  # leading zeros within 12 digits: the number they spell
        f"{now + 30}:a:b:c",  # the expiry ends at the first colon
        f"{now + 30}:",
        f"{now + 30}",
    ]
    counted = [
        f"+{now + 30}:alice",
        f" {now + 30}:alice",
        f"{now + 30} :alice",
        f"-{now + 30}:alice",
        f"0{now + 30:012d}:alice",  # 13 digits
        f"0x{now + 30:x}:alice",
        ":alice",
    ]
    async with _server("permissive") as (svc, guard):
        for user in ok + counted + [f"{now - 1}:alice"]:
            c = StunUdp(("127.0.0.1", svc.port))
            try:
                nonce = await _challenge(c)
                pw = RestCredentials.password_for(SECRETS[0], user)
                got = _code(await c.ask(_sign(_request(), user, pw, nonce)))
                assert got == (200 if user in ok else 401), user
            finally:
                c.close()
            await asyncio.sleep(0.01)
        assert guard.failures == [ATTACKER] * len(counted)


async def test_rotated_secrets() -> None:
    """During rotation both secrets sign; after the old one is removed (reload) a new Allocate
    with it is refused but not counted (a client late, not a guesser), while the allocation it
    made keeps refreshing, also through a stale nonce; a secret never configured still counts,
    and so does a removed secret's username that was never used while it was current."""
    now = int(time.time())
    user = f"{now + 3600}:bob"
    old_pw = RestCredentials.password_for(SECRETS[1], user)
    async with _server("permissive") as (svc, guard):
        holder = StunUdp(("127.0.0.1", svc.port))
        late = StunUdp(("127.0.0.1", svc.port))
        try:
            nonce = await _challenge(holder)
            assert _code(await holder.ask(_sign(_request(), user, old_pw, nonce))) == 200
            svc.reload_config(
                turn_config(mode="permissive", relay_ports=RELAYS, domain=REALM, secrets=["new"])
            )
            refresh = _request(Method.REFRESH)
            refresh.add(Attr.LIFETIME, encode_u32(600))
            assert _code(await holder.ask(_sign(refresh, user, old_pw, nonce))) == 200
            # Its nonce gone stale: the owner's old-secret request is proven, not a failure.
            assert svc.core is not None
            svc.core.wall_offset += svc.cfg.turn.nonce_lifetime + 1
            refresh = _request(Method.REFRESH)
            answer = await holder.ask(_sign(refresh, user, old_pw, nonce))
            assert _code(answer) == 438
            refresh = _request(Method.REFRESH)
            assert _code(await holder.ask(_sign(refresh, user, old_pw, _nonce(answer)))) == 200
            assert guard.failures == []
            nonce = await _challenge(late)
            assert _code(await late.ask(_sign(_request(), user, old_pw, nonce))) == 401
            assert guard.failures == []
            # A username never used while the removed secret was current is not looked up
            # with it (no key derivations per retired secret for made-up usernames): counted.
            unseen = f"{now + 3600}:eve"
            unseen_pw = RestCredentials.password_for(SECRETS[1], unseen)
            assert _code(await late.ask(_sign(_request(), unseen, unseen_pw, nonce))) == 401
            assert guard.failures == [ATTACKER]
            never_pw = RestCredentials.password_for("never", user)
            assert _code(await late.ask(_sign(_request(), user, never_pw, nonce))) == 401
            assert guard.failures == [ATTACKER] * 2
            new_pw = RestCredentials.password_for("new", user)
            assert _code(await late.ask(_sign(_request(), user, new_pw, nonce))) == 200
        finally:
            holder.close()
            late.close()


async def test_restricted_password_rotation_does_not_ban_the_node() -> None:
    """Restricted mode, the real guard (``turn_maxretry`` 3): the operator reloads a new
    password before the media node has it. The node's new Allocates with the old one are
    refused (401) but not counted, so the node is not banned and its live allocation keeps
    refreshing, as a rotation promises (was: banned after 3, the allocation's Refreshes then
    dropped until it expired). A password that was never configured still bans."""
    guard_section = {"enabled": True, "store": "memory", "turn_maxretry": 3, "ignore": []}
    cfg = turn_config(relay_ports=RELAYS, domain=REALM, sections={"guard": guard_section})
    guard = create_guard(cfg)
    await guard.start()
    svc = TurnService(cfg, guard=guard)
    await svc.start()
    holder = StunUdp(("127.0.0.1", svc.port), "127.0.0.1")
    sockets = [holder]
    try:
        nonce = await _challenge(holder)
        assert _code(await holder.ask(_sign(_request(), "turnuser", "turnpass", nonce))) == 200
        svc.reload_config(
            turn_config(
                relay_ports=RELAYS,
                domain=REALM,
                sections={"guard": guard_section},
                password="rotated",
            )
        )
        for _ in range(5):
            c = StunUdp(("127.0.0.1", svc.port), "127.0.0.1")
            sockets.append(c)
            fresh = await _challenge(c)
            assert _code(await c.ask(_sign(_request(), "turnuser", "turnpass", fresh))) == 401
        await asyncio.sleep(0.3)  # a ban would reach the hook's table by now
        assert guard.check("127.0.0.1") is None
        refresh = _request(Method.REFRESH)
        refresh.add(Attr.LIFETIME, encode_u32(600))
        assert _code(await holder.ask(_sign(refresh, "turnuser", "turnpass", nonce))) == 200
        for _ in range(3):
            c = StunUdp(("127.0.0.1", svc.port), "127.0.0.1")
            sockets.append(c)
            fresh = await _challenge(c)
            assert _code(await c.ask(_sign(_request(), "turnuser", "guess", fresh))) == 401
        for _ in range(40):
            if guard.check("127.0.0.1") is not None:
                break
            await asyncio.sleep(0.05)
        assert guard.check("127.0.0.1") is not None
    finally:
        for c in sockets:
            c.close()
        await svc.close()
        await guard.close()


# -- integrity algorithms -----------------------------------------------------------------------


def _append_sha256(wire: bytes, key: bytes, size: int = 32) -> bytes:
    """`wire` with a MESSAGE-INTEGRITY-SHA256 made with `key` appended, truncated to `size`
    bytes (RFC 8489 §14.6: the length field covers it, the HMAC what precedes it)."""
    body_len = len(wire) - 20 + 4 + size
    head = wire[:2] + struct.pack("!H", body_len) + wire[4:]
    mac = hmac.new(key, head, hashlib.sha256).digest()[:size]
    return head + struct.pack("!HH", Attr.MESSAGE_INTEGRITY_SHA256, size) + mac


async def test_sha256_integrity_is_the_one_checked() -> None:
    """MESSAGE-INTEGRITY-SHA256 alone is accepted, also truncated to 16 bytes. With both, the SHA-256 one decides (RFC 8489
    §9.2.4): a valid SHA-1 MESSAGE-INTEGRITY beside a forged SHA-256 one is refused, so the
    stronger MAC cannot be stripped to a weaker one that verifies. USERHASH (not offered:
    confedge sends no nonce cookie or PASSWORD-ALGORITHMS) without USERNAME is a 400."""
    async with _server() as (svc, guard):
        key = long_term_key("turnuser", REALM, "turnpass")
        c = StunUdp(("127.0.0.1", svc.port))
        try:
            nonce = await _challenge(c)
            both = _append_sha256(_sign(_request(), "turnuser", "turnpass", nonce), b"forged")
            assert _code(await c.ask(both)) == 401
            assert guard.failures == [ATTACKER]
            weak = _append_sha256(_sign(_request(), "turnuser", "wrong", nonce), key)
            answer = await c.ask(weak)
            assert _code(answer) == 200
            assert answer is not None and answer.integrity_sha256_offset >= 0
        finally:
            c.close()
        c = StunUdp(("127.0.0.1", svc.port))
        try:
            nonce = await _challenge(c)
            assert _code(await c.ask(_sign(_request(), "turnuser", "turnpass", nonce, True))) == 200
            # Truncated to 16 bytes: accepted (RFC 8489 §14.6 leaves truncation to the usage;
            # a 128-bit MAC is not forgeable in practice), and a wrong one is still refused.
            for mac_key, expected in ((b"forged", 401), (key, 200)):
                b = _request(Method.REFRESH)
                b.add(Attr.USERNAME, b"turnuser")
                b.add(Attr.REALM, REALM.encode())
                b.add(Attr.NONCE, nonce)
                assert _code(await c.ask(_append_sha256(b.build(), mac_key, 16))) == expected
            assert guard.failures == [ATTACKER] * 2
            b = _request(Method.REFRESH)
            b.add(Attr.USERHASH, bytes(32))
            b.add(Attr.REALM, REALM.encode())
            b.add(Attr.NONCE, nonce)
            assert _code(await c.ask(b.build(key=key))) == 400
            assert guard.failures == [ATTACKER] * 2
        finally:
            c.close()


# -- allocation ownership -----------------------------------------------------------------------


async def test_another_users_credentials_and_another_5_tuple() -> None:
    """RFC 8656 §5: the allocation's requests must carry the Allocate's username: bob's valid
    credentials on alice's 5-tuple get 441 for Refresh, CreatePermission and ChannelBind; alice's
    own credentials from another 5-tuple get 437. Neither is a wrong credential."""
    exp = int(time.time()) + 3600
    alice, bob = f"{exp}:alice", f"{exp}:bob"
    a_pw, b_pw = (RestCredentials.password_for(SECRETS[0], u) for u in (alice, bob))
    async with _server("permissive") as (svc, guard):
        a = StunUdp(("127.0.0.1", svc.port))
        other = StunUdp(("127.0.0.1", svc.port))
        try:
            nonce = await _challenge(a)
            assert _code(await a.ask(_sign(_request(), alice, a_pw, nonce))) == 200
            refresh = _request(Method.REFRESH)
            perm = _request(Method.CREATE_PERMISSION)
            perm.add_xor_address(Attr.XOR_PEER_ADDRESS, "127.0.0.1", 9)
            bind = _request(Method.CHANNEL_BIND)
            bind.add(Attr.CHANNEL_NUMBER, encode_channel_number(0x4000))
            bind.add_xor_address(Attr.XOR_PEER_ADDRESS, "127.0.0.1", 9)
            for req in (refresh, perm, bind):
                assert _code(await a.ask(_sign(req, bob, b_pw, nonce))) == 441
            o_nonce = await _challenge(other)
            refresh = _request(Method.REFRESH)
            assert _code(await other.ask(_sign(refresh, alice, a_pw, o_nonce))) == 437
            assert guard.failures == []
            assert svc.core is not None and len(svc.core.allocations) == 1
        finally:
            a.close()
            other.close()


# -- restricted mode, stream transports -----------------------------------------------------------


async def test_restricted_mode_judges_stream_clients_by_their_address() -> None:
    """A source outside ``media_nodes`` that knows the username and password gets 403 over UDP
    and TCP before any challenge (no nonce, nothing counted); a node allocates over TCP."""
    async with _server(media_nodes=["127.0.0.1/32"]) as (svc, guard):
        u = StunUdp(("127.0.0.1", svc.port))
        t = await _Tcp.connect(svc.port, ATTACKER)
        node = await _Tcp.connect(svc.port, "127.0.0.1")
        try:
            for c in (u, t):
                answer = await c.ask(_request().build())
                assert _code(answer) == 403 and answer is not None
                assert answer.get(Attr.NONCE) is None
                fake = NonceManager(600).issue(time.time(), ATTACKER, 1).encode()
                assert _code(await c.ask(_sign(_request(), "turnuser", "turnpass", fake))) == 403
            nonce = await _challenge(node)
            assert _code(await node.ask(_sign(_request(), "turnuser", "turnpass", nonce))) == 200
            assert guard.failures == []
        finally:
            u.close()
            t.close()
            node.close()


async def test_a_forged_proxy_header_cannot_claim_an_address() -> None:
    """TURN over TLS on the HTTPS port with several workers: the worker writes the PROXY v2
    header naming the TLS peer. A client whose own first bytes are such a header is HTTP to the
    proxy (never handed to TURN); one that sends it after the worker's header is TURN garbage
    and closed, unanswered; the worker's header is what TURN believes."""
    binding = MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build()
    forged = encode_proxy_v2(("127.0.0.1", 5000), ("127.0.0.1", 443))
    assert classify(forged + binding) == FIRST_HTTP
    async with _server(media_nodes=["127.0.0.1/32"]) as (svc, _guard):
        path = await svc.open_relay_listener()
        real = encode_proxy_v2((ATTACKER, 40000), ("127.0.0.1", 443))
        r, w = await asyncio.open_unix_connection(path)
        try:
            w.write(real + binding)
            tcp = _Tcp(r, w)
            answer = await tcp.ask(b"")
            mapped = answer.get(Attr.XOR_MAPPED_ADDRESS)
            assert mapped is not None
            assert decode_xor_address(mapped, answer.transaction_id) == (ATTACKER, 40000)
            assert _code(await tcp.ask(_request().build())) == 403  # not a media node
        finally:
            w.close()
        r, w = await asyncio.open_unix_connection(path)
        try:
            w.write(real + forged + _request().build())
            assert await asyncio.wait_for(r.read(), 2) == b""  # closed, nothing answered
        finally:
            w.close()


# -- real clients ---------------------------------------------------------------------------------


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


async def test_aioice_with_the_previous_secret_relays_and_a_wrong_one_is_counted() -> None:
    """aioice, over UDP and TCP: a REST credential signed with the second (rotated-out but
    still listed) secret allocates and relays; once its nonce is stale, the 438 and the retry
    with the fresh nonce get a new peer's permission; nothing counted. One signed with an
    unknown secret fails and counts."""
    loop = asyncio.get_running_loop()
    user = f"{int(time.time()) + 86400}:carol"
    async with _server("permissive") as (svc, guard):
        assert svc.core is not None
        peer_t, peer = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
        later_t, later = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
        try:
            for transport in ("udp", "tcp"):
                turn_t, _ = await create_turn_endpoint(
                    _Sink,
                    server_addr=("127.0.0.1", svc.port),
                    username=user,
                    password=RestCredentials.password_for(SECRETS[1], user),
                    transport=transport,
                )
                try:
                    turn_t.sendto(b"hello", peer_t.get_extra_info("sockname"))
                    assert await asyncio.wait_for(peer.received.get(), 2) == b"hello"
                    svc.core.wall_offset += svc.cfg.turn.nonce_lifetime + 1  # nonce stale
                    turn_t.sendto(b"later", later_t.get_extra_info("sockname"))
                    assert await asyncio.wait_for(later.received.get(), 2) == b"later"
                finally:
                    turn_t.close()
            assert svc.core.answers.counts[(438, "stale-nonce")] == 2  # one per transport
            assert guard.failures == []
            with pytest.raises(TransactionFailed):
                await create_turn_endpoint(
                    _Sink,
                    server_addr=("127.0.0.1", svc.port),
                    username=user,
                    password=RestCredentials.password_for("unknown", user),
                )
            assert guard.failures and set(guard.failures) == {"127.0.0.1"}
        finally:
            peer_t.close()
            later_t.close()


UCLIENT = shutil.which("turnutils_uclient")


@pytest.mark.coturn
@pytest.mark.skipif(UCLIENT is None, reason="coturn's turnutils_uclient is not installed")
async def test_uclient_with_a_wrong_password_is_counted_per_request() -> None:
    """coturn's client retries a refused Allocate with each 401's new nonce (Debian's 4.6.1:
    31 requests for one allocation): every one is a wrong credential and counts, so one run
    is past the default ``turn_maxretry`` (20), as fail2ban counting coturn's 401 log lines."""
    assert UCLIENT is not None
    user = f"{int(time.time()) + 600}:dave"
    async with _server("permissive") as (svc, guard):
        proc = await asyncio.create_subprocess_exec(
            *(UCLIENT, "-c", "-n", "1", "-m", "1", "-p", str(svc.port), "-u", user),
            *("-w", "wrong", "-e", "127.0.0.1", "-r", "9", "127.0.0.1"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert await asyncio.wait_for(proc.wait(), 15) != 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert len(guard.failures) > 20 and set(guard.failures) == {"127.0.0.1"}
        assert svc.core is not None and not svc.core.allocations
