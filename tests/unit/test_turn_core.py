"""The sans-I/O TURN core in simulated time, against the in-memory data plane."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest
from msgspec import structs

from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    check_integrity,
    decode_error_code,
    decode_u32,
    decode_unknown_attributes,
    decode_xor_address,
    encode_channel_number,
    encode_even_port,
    encode_requested_address_family,
    encode_requested_transport,
    encode_u32,
    encode_xor_address,
    long_term_key,
    new_transaction_id,
    parse_message,
)
from confedge.turn.auth import LongTermCredentials, NonceManager, RestCredentials
from confedge.turn.core import RETIRED_CREDENTIALS, Client, CoreSettings, TurnCore
from confedge.turn.dataplane import ClientSink
from confedge.turn.policy import ClientPolicy, PeerPolicy
from confedge.turn.testing import MemoryDataPlane

REALM = "example.test"
USER, PASSWORD = "turnuser", "turnpass"
PEER = "198.51.100.20"
T0 = 1000.0


class FakeGuard:
    def __init__(self) -> None:
        self.banned: set[str] = set()
        self.failures: list[str] = []
        self.checked: list[str] = []

    def check(self, client_ip: str) -> float | None:
        self.checked.append(client_ip)
        return 60.0 if client_ip in self.banned else None

    def record_turn_auth_failure(self, client_ip: str) -> None:
        self.failures.append(client_ip)


def make_core(
    *,
    restricted: bool = True,
    media_nodes: tuple[str, ...] = ("10.0.0.0/24",),
    guard: FakeGuard | None = None,
    dp: MemoryDataPlane | None = None,
    secrets: tuple[str, ...] = ("current", "old"),
    **settings: Any,
) -> tuple[TurnCore, MemoryDataPlane]:
    dp = dp or MemoryDataPlane()
    s = CoreSettings(realm=REALM, restricted=restricted, **settings)
    creds = (
        LongTermCredentials(USER, PASSWORD, REALM)
        if restricted
        else RestCredentials(list(secrets), REALM)
    )
    core = TurnCore(
        s,
        creds,
        dp,
        peer_policy=PeerPolicy(
            permissive=not restricted,
            server_addresses=["192.0.2.5"],  # listener / management address
            relay_addresses=["203.0.113.5"],  # MemoryDataPlane's relay address
            relay_ports=(50000, 50999),
        ),
        client_policy=ClientPolicy(restricted=restricted, media_nodes=media_nodes),
        nonces=NonceManager(600, key=b"n" * 32),
        guard=guard,
    )
    return core, dp


class Cli:
    """A minimal TURN client speaking to the core directly."""

    def __init__(
        self,
        core: TurnCore,
        ip: str = "10.0.0.11",
        port: int = 40000,
        *,
        username: str = USER,
        password: str = PASSWORD,
        transport: str = "udp",
    ) -> None:
        self.core = core
        self.ip, self.port = ip, port
        key: Any = (ip, port) if transport == "udp" else ("tcp", ip, port)
        self.client = Client(key, ip, port, transport, ClientSink(None, (ip, port)))
        self.username, self.password = username, password
        self.nonce: bytes | None = None
        self.key = long_term_key(username, REALM, password)

    def raw(self, now: float, data: bytes) -> list[Message]:
        return [parse_message(out) for out in self.core.handle(now, self.client, data)]

    def build(
        self,
        method: int,
        attrs: list[tuple[int, bytes]],
        *,
        auth: bool = True,
        tid: bytes | None = None,
        fingerprint: bool = False,
        cls: int = MsgClass.REQUEST,
    ) -> bytes:
        b = MessageBuilder(method, cls, tid or new_transaction_id())
        for a, v in attrs:
            b.add(a, v)
        if auth and self.nonce is not None:
            b.add(Attr.USERNAME, self.username.encode())
            b.add(Attr.REALM, REALM.encode())
            b.add(Attr.NONCE, self.nonce)
            return b.build(key=self.key, fingerprint=fingerprint)
        return b.build(fingerprint=fingerprint)

    def request(
        self, now: float, method: int, attrs: list[tuple[int, bytes]] | None = None, **kw: Any
    ) -> Message:
        """Send; on 401/438 with a NONCE, learn it and retry once (as real clients do)."""
        attrs = attrs or []
        out = self.raw(now, self.build(method, attrs, **kw))
        assert len(out) == 1
        resp = out[0]
        if resp.msg_class == MsgClass.ERROR and code(resp) in (401, 438) and kw.get("auth", True):
            nonce = resp.get(Attr.NONCE)
            assert nonce is not None
            self.nonce = nonce
            kw.pop("tid", None)
            out = self.raw(now, self.build(method, attrs, **kw))
            assert len(out) == 1
            resp = out[0]
        return resp

    def allocate(self, now: float, *extra: tuple[int, bytes], **kw: Any) -> Message:
        attrs = [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)), *extra]
        return self.request(now, Method.ALLOCATE, attrs, **kw)

    def peer_attr(self, ip: str = PEER, port: int = 5000, tid: bytes = bytes(12)) -> bytes:
        return encode_xor_address(ip, port, tid)

    def permission(self, now: float, *ips: str) -> Message:
        tid = new_transaction_id()
        attrs = [(Attr.XOR_PEER_ADDRESS, encode_xor_address(ip, 1, tid)) for ip in ips]
        return self.request(now, Method.CREATE_PERMISSION, attrs, tid=tid)

    def channel(self, now: float, number: int, ip: str = PEER, port: int = 5000) -> Message:
        tid = new_transaction_id()
        attrs = [
            (Attr.CHANNEL_NUMBER, encode_channel_number(number)),
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(ip, port, tid)),
        ]
        return self.request(now, Method.CHANNEL_BIND, attrs, tid=tid)

    def refresh(self, now: float, lifetime: int | None = None) -> Message:
        attrs = [] if lifetime is None else [(Attr.LIFETIME, encode_u32(lifetime))]
        return self.request(now, Method.REFRESH, attrs)

    def send(self, now: float, data: bytes, ip: str = PEER, port: int = 5000) -> None:
        tid = new_transaction_id()
        wire = self.build(
            Method.SEND,
            [(Attr.XOR_PEER_ADDRESS, encode_xor_address(ip, port, tid)), (Attr.DATA, data)],
            auth=False,
            tid=tid,
            cls=MsgClass.INDICATION,
        )
        assert self.core.handle(now, self.client, wire) == []


def code(msg: Message) -> int:
    if msg.msg_class == MsgClass.SUCCESS:
        return 200
    raw = msg.get(Attr.ERROR_CODE)
    assert raw is not None
    return decode_error_code(raw)[0]


# -- Binding and authentication ----------------------------------------------------------------


def test_binding_answered_to_anyone_with_xor_mapped_address() -> None:
    core, _ = make_core()
    cli = Cli(core, "192.0.2.99", 1234)  # not a media node
    tid = new_transaction_id()
    (resp,) = cli.raw(T0, MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build())
    assert resp.msg_class == MsgClass.SUCCESS and resp.transaction_id == tid
    assert decode_xor_address(resp.get(Attr.XOR_MAPPED_ADDRESS) or b"", tid) == ("192.0.2.99", 1234)
    assert resp.fingerprint_offset < 0  # no FINGERPRINT unless the request had one
    assert not resp.has(Attr.SOFTWARE)
    wire = MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build(fingerprint=True)
    (resp,) = cli.raw(T0, wire)
    assert resp.fingerprint_offset >= 0


def test_allocate_flow_401_then_success() -> None:
    core, dp = make_core()
    cli = Cli(core)
    wire = cli.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))])
    (challenge,) = cli.raw(T0, wire)
    assert code(challenge) == 401
    assert challenge.get(Attr.REALM) == REALM.encode()
    assert challenge.get(Attr.NONCE)
    assert challenge.integrity_offset < 0
    err = challenge.get(Attr.ERROR_CODE)
    assert err is not None and decode_error_code(err) == (401, "")  # no reason phrase by default
    resp = cli.allocate(T0, fingerprint=True)
    assert code(resp) == 200
    assert check_integrity(resp, cli.key)  # MESSAGE-INTEGRITY on authenticated responses
    assert resp.fingerprint_offset >= 0
    tid = resp.transaction_id
    relay = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", tid)
    assert relay == ("203.0.113.5", 50000)
    assert decode_xor_address(resp.get(Attr.XOR_MAPPED_ADDRESS) or b"", tid) == (cli.ip, cli.port)
    assert decode_u32(resp.get(Attr.LIFETIME) or b"") == 600
    assert len(dp.allocations) == 1


def test_wrong_password_401_and_guard_records() -> None:
    guard = FakeGuard()
    core, dp = make_core(guard=guard)
    cli = Cli(core, password="wrong")
    resp = cli.allocate(T0)
    assert code(resp) == 401
    assert guard.failures == [cli.ip]
    assert guard.checked  # checked before auth work
    assert not dp.allocations
    wrong_user = Cli(core, port=40001, username="someone")
    assert code(wrong_user.allocate(T0)) == 401
    assert guard.failures == [cli.ip, cli.ip]


def test_banned_client_is_dropped_silently() -> None:
    guard = FakeGuard()
    guard.banned.add("10.0.0.11")
    core, _ = make_core(guard=guard)
    cli = Cli(core)
    wire = cli.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))])
    assert cli.raw(T0, wire) == []


def test_missing_username_is_400() -> None:
    core, _ = make_core()
    cli = Cli(core)
    b = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
    (resp,) = cli.raw(T0, b.build(key=cli.key))
    assert code(resp) == 400


def test_stale_nonce_gets_438_with_a_new_nonce() -> None:
    core, _ = make_core()
    cli = Cli(core)
    assert code(cli.allocate(T0)) == 200
    old = cli.nonce
    wire = cli.build(Method.REFRESH, [])
    (resp,) = cli.raw(T0 + 600, wire)  # nonce_lifetime = 600
    assert code(resp) == 438
    assert resp.get(Attr.NONCE) not in (None, old)
    assert resp.get(Attr.REALM) == REALM.encode()
    assert code(cli.refresh(T0 + 600)) == 200  # retry with the new nonce works


def test_nonce_of_another_client_is_stale() -> None:
    core, _ = make_core()
    a, b = Cli(core), Cli(core, port=40001)
    assert code(a.allocate(T0)) == 200
    b.nonce = a.nonce
    wire = b.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))])
    (resp,) = b.raw(T0, wire)
    assert code(resp) == 438


def test_unauth_budget_drops_beyond_limit() -> None:
    core, _ = make_core(unauth_budget=3)
    cli = Cli(core)
    wire = cli.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))])
    answers = [len(cli.raw(T0 + i * 0.1, wire)) for i in range(5)]
    assert answers == [1, 1, 1, 0, 0]
    assert len(cli.raw(T0 + 10.5, wire)) == 1  # next window


def test_software_and_reason_phrases_when_configured() -> None:
    core, _ = make_core(software="confedge-test", reason_phrases=True)
    cli = Cli(core)
    wire = cli.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))])
    (resp,) = cli.raw(T0, wire)
    assert resp.get(Attr.SOFTWARE) == b"confedge-test"
    assert decode_error_code(resp.get(Attr.ERROR_CODE) or b"") == (401, "Unauthenticated")


# -- restricted / permissive modes -------------------------------------------------------------


def test_restricted_mode_refuses_non_media_nodes() -> None:
    core, dp = make_core(media_nodes=("10.0.0.11",))
    outsider = Cli(core, "10.0.0.12")
    resp = outsider.allocate(T0)
    assert code(resp) == 403
    assert resp.get(Attr.NONCE) is None  # refused before any authentication work
    assert not dp.allocations
    assert code(Cli(core, "10.0.0.11").allocate(T0)) == 200


def test_permissive_rest_credentials_and_expiry() -> None:
    guard = FakeGuard()
    core, _ = make_core(restricted=False, media_nodes=(), guard=guard)
    core.wall_offset = 1_700_000_000.0 - T0  # monotonic T0 == wall 1.7e9
    expiry = 1_700_000_000 + 60
    user = f"{expiry}:alice"
    pw_old = RestCredentials.password_for("old", user)  # rotated secret still valid
    cli = Cli(core, "192.0.2.50", username=user, password=pw_old)
    assert code(cli.allocate(T0)) == 200
    # Once the username's expiry passes, new requests are refused (existing refresh too).
    assert code(cli.refresh(T0 + 61)) == 401
    late = Cli(core, "192.0.2.51", username=user, password=pw_old)
    assert code(late.allocate(T0 + 61)) == 401
    assert guard.failures == []  # an expired credential is not a guess
    bad = Cli(core, "192.0.2.52", username=user, password=RestCredentials.password_for("x", user))
    assert code(bad.allocate(T0)) == 401
    assert guard.failures == ["192.0.2.52"]


# -- Allocate details --------------------------------------------------------------------------


def test_allocate_retransmission_and_mismatch() -> None:
    core, dp = make_core()
    cli = Cli(core)
    first = cli.allocate(T0)
    assert code(first) == 200
    tid = first.transaction_id
    wire = cli.build(
        Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))], tid=tid
    )
    (again,) = cli.raw(T0 + 1, wire)
    assert again.raw == first.raw  # same answer, no second relay
    assert len(dp.allocations) == 1
    assert code(cli.allocate(T0 + 2)) == 437  # new transaction on a used 5-tuple


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ([], 400),  # no REQUESTED-TRANSPORT
        ([(Attr.REQUESTED_TRANSPORT, encode_requested_transport(6))], 442),
        (
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.REQUESTED_ADDRESS_FAMILY, encode_requested_address_family(2)),
            ],
            440,  # no IPv6 relay address on this data plane
        ),
        (
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.REQUESTED_ADDRESS_FAMILY, encode_requested_address_family(7)),
            ],
            440,
        ),
        (
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.RESERVATION_TOKEN, b"12345678"),
                (Attr.EVEN_PORT, encode_even_port(False)),
            ],
            400,
        ),
        (
            [
                (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17)),
                (Attr.RESERVATION_TOKEN, b"12345678"),
            ],
            508,  # unknown token
        ),
        ([(Attr.REQUESTED_TRANSPORT, b"\x11")], 400),  # malformed attribute
    ],
)
def test_allocate_errors(attrs: list[tuple[int, bytes]], expected: int) -> None:
    core, dp = make_core()
    resp = Cli(core).request(T0, Method.ALLOCATE, attrs)
    assert code(resp) == expected
    assert not dp.allocations


def test_unknown_comprehension_required_attribute_420() -> None:
    core, _ = make_core()
    cli = Cli(core)
    resp = cli.allocate(T0, (0x7F01, b"\0\0\0\0"), (0xC001, b"ok"))
    assert code(resp) == 420
    assert decode_unknown_attributes(resp.get(Attr.UNKNOWN_ATTRIBUTES) or b"") == [0x7F01]
    assert check_integrity(resp, cli.key)


def test_ipv6_relay_when_requested_and_available() -> None:
    core, _ = make_core(dp=MemoryDataPlane(v6=True))
    cli = Cli(core)
    resp = cli.allocate(T0, (Attr.REQUESTED_ADDRESS_FAMILY, encode_requested_address_family(2)))
    assert code(resp) == 200
    relay = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
    assert relay[0] == "2001:db8::5"
    # Peers of the other family: 443 (RFC 6156).
    assert code(cli.permission(T0, PEER)) == 443
    assert code(cli.permission(T0, "2001:4860::1")) == 200


def test_even_port_reservation_token() -> None:
    core, _ = make_core()
    a = Cli(core)
    resp = a.allocate(T0, (Attr.EVEN_PORT, encode_even_port(True)))
    assert code(resp) == 200
    port = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)[1]
    assert port % 2 == 0
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert token is not None and len(token) == 8
    b = Cli(core, port=40001)
    resp = b.allocate(T0 + 1, (Attr.RESERVATION_TOKEN, token))
    assert code(resp) == 200
    rport = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)[1]
    assert rport == port + 1
    # A token is single-use.
    c = Cli(core, port=40002)
    assert code(c.allocate(T0 + 2, (Attr.RESERVATION_TOKEN, token))) == 508


def test_unused_reservation_expires() -> None:
    core, dp = make_core()
    resp = Cli(core).allocate(T0, (Attr.EVEN_PORT, encode_even_port(True)))
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert token is not None
    core.tick(T0 + 29)
    assert dp.released == []
    core.tick(T0 + 30)
    assert dp.released == [token]
    assert code(Cli(core, port=40001).allocate(T0 + 31, (Attr.RESERVATION_TOKEN, token))) == 508


def test_dont_fragment_reaches_the_data_plane() -> None:
    core, dp = make_core()
    assert code(Cli(core).allocate(T0, (Attr.DONT_FRAGMENT, b""))) == 200
    (alloc,) = dp.allocations.values()
    assert alloc["dont_fragment"] is True


# -- lifetimes ---------------------------------------------------------------------------------


def test_allocation_lifetime_rules_and_expiry(caplog: pytest.LogCaptureFixture) -> None:
    core, dp = make_core()
    cli = Cli(core)
    resp = cli.allocate(T0, (Attr.LIFETIME, encode_u32(30)))
    assert decode_u32(resp.get(Attr.LIFETIME) or b"") == 600  # below default -> default
    assert decode_u32(cli.refresh(T0 + 10, 99999).get(Attr.LIFETIME) or b"") == 3600  # capped
    assert decode_u32(cli.refresh(T0 + 20, 1200).get(Attr.LIFETIME) or b"") == 1200
    assert decode_u32(cli.refresh(T0 + 30).get(Attr.LIFETIME) or b"") == 600  # none -> default
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        core.tick(T0 + 629)
        assert len(dp.allocations) == 1  # the earlier, longer timers are superseded
        core.tick(T0 + 630)
    assert not dp.allocations and not core.allocations
    (line,) = [r.getMessage() for r in caplog.records if "allocation ended" in r.getMessage()]
    assert "user=turnuser" in line and "reason=expired" in line and "relay=203.0.113.5:" in line
    assert PASSWORD not in caplog.text
    assert code(cli.refresh(T0 + 631)) == 437  # gone


def test_refresh_zero_deletes() -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    resp = cli.refresh(T0 + 5, 0)
    assert code(resp) == 200 and decode_u32(resp.get(Attr.LIFETIME) or b"") == 0
    assert not dp.allocations
    assert code(cli.allocate(T0 + 6)) == 200  # 5-tuple free again


def test_other_username_on_allocation_is_441() -> None:
    core, _ = make_core(restricted=False, media_nodes=())
    core.wall_offset = 1e9
    u1 = f"{int(1e9 + T0) + 600}:a"
    u2 = f"{int(1e9 + T0) + 600}:b"
    cli = Cli(core, username=u1, password=RestCredentials.password_for("current", u1))
    assert code(cli.allocate(T0)) == 200
    other = Cli(core, username=u2, password=RestCredentials.password_for("current", u2))
    other.nonce = cli.nonce
    assert code(other.refresh(T0)) == 441


def test_permission_lifetime_and_refresh() -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.permission(T0, PEER, "198.51.100.21")) == 200
    (alloc,) = dp.allocations.values()
    assert alloc["perms"] == {PEER, "198.51.100.21"}
    assert code(cli.permission(T0 + 200, PEER)) == 200  # refresh one
    core.tick(T0 + 300)
    assert alloc["perms"] == {PEER}
    core.tick(T0 + 500)
    assert alloc["perms"] == set()


def test_send_indication_needs_permission() -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.send(T0, b"early")  # no allocation: dropped
    cli.allocate(T0)
    cli.send(T0, b"nope")  # no permission: dropped
    assert dp.sent == []
    cli.permission(T0, PEER)
    cli.send(T0 + 1, b"hello", PEER, 7000)
    assert dp.sent == [(1, (PEER, 7000), b"hello")]
    core.tick(T0 + 301)
    cli.send(T0 + 301, b"late", PEER, 7000)
    assert len(dp.sent) == 1


def _relaying(alloc: dict[str, Any]) -> set[int]:
    """The channels a data plane relays under the DataPlane contract: bound, and their peer IP
    holding a permission (RFC 8656 §9, §12)."""
    return {ch for ch, peer in alloc["channels"].items() if peer[0] in alloc["perms"]}


def test_lapsed_permission_suspends_bound_channel_until_renewed() -> None:
    """A permission lasts 300 s, a channel 600 s: a client refreshing neither keeps its channel
    bound for 300 s more, but nothing may be relayed on it (§9); a CreatePermission or a
    ChannelBind refresh for the IP makes it relay again, with the same number and peer."""
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.refresh(T0, 3600)) == 200
    assert code(cli.channel(T0, 0x4000, PEER, 5000)) == 200
    assert code(cli.channel(T0, 0x4001, "198.51.100.21", 5000)) == 200
    (alloc,) = dp.allocations.values()
    assert _relaying(alloc) == {0x4000, 0x4001}
    assert code(cli.permission(T0 + 200, "198.51.100.21")) == 200  # keeps 0x4001's to T0+500
    core.tick(T0 + 299.9)
    assert _relaying(alloc) == {0x4000, 0x4001}
    core.tick(T0 + 300)
    assert alloc["perms"] == {"198.51.100.21"} and alloc["channels"][0x4000] == (PEER, 5000)
    assert _relaying(alloc) == {0x4001}
    assert code(cli.permission(T0 + 310, PEER)) == 200  # CreatePermission renews it
    assert _relaying(alloc) == {0x4000, 0x4001}
    core.tick(T0 + 500)
    assert _relaying(alloc) == {0x4000}
    assert code(cli.channel(T0 + 510, 0x4001, "198.51.100.21", 5000)) == 200  # bind refresh
    assert _relaying(alloc) == {0x4000, 0x4001}
    core.tick(T0 + 610)  # PEER's renewed permission lapses; 0x4000 bound until T0+600 only
    assert 0x4000 not in alloc["channels"] and _relaying(alloc) == {0x4001}
    core.tick(T0 + 810)  # 0x4001's permission (T0+510) lapses; the channel stays to T0+1110
    assert alloc["channels"] == {0x4001: ("198.51.100.21", 5000)} and _relaying(alloc) == set()
    core.tick(T0 + 1110)
    assert alloc["channels"] == {}


def test_channel_0x7fff_binds_as_coturn_clients_pick_it() -> None:
    """coturn's uclient picks channels uniformly in 0x4000-0x7FFF (RFC 5766 §11's range, 0x7FFF
    included): one bind in 16,384 used to get 400 and fail the client's run."""
    core, _ = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.channel(T0, 0x7FFF, PEER, 5000)) == 200


def test_channel_bind_lifetime_and_rebinding_rules() -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.channel(T0, 0x4000, PEER, 5000)) == 200
    (alloc,) = dp.allocations.values()
    assert alloc["channels"] == {0x4000: (PEER, 5000)}
    assert alloc["perms"] == {PEER}  # ChannelBind installs the permission
    assert code(cli.channel(T0 + 1, 0x4000, PEER, 5001)) == 400  # number bound to another peer
    assert code(cli.channel(T0 + 1, 0x4001, PEER, 5000)) == 400  # peer bound to another number
    assert code(cli.channel(T0 + 1, 0x3FFF, PEER, 5002)) == 400  # below the channel range
    assert code(cli.channel(T0 + 1, 0x8000, PEER, 5002)) == 400  # above it
    assert code(cli.channel(T0 + 1, 0x5000, PEER, 5002)) == 200  # RFC 5766 range accepted
    assert code(cli.channel(T0 + 500, 0x4000, PEER, 5000)) == 200  # refresh
    assert code(cli.refresh(T0 + 500, 3600)) == 200  # keep the allocation itself alive
    core.tick(T0 + 601)
    assert 0x5000 not in alloc["channels"]  # expired after 600 s
    assert 0x4000 in alloc["channels"]
    core.tick(T0 + 1100)
    assert alloc["channels"] == {}
    # Cool-down (RFC 8656 §11): the pair cannot be rebound differently for 5 minutes...
    assert code(cli.channel(T0 + 1101, 0x4000, PEER, 6000)) == 400
    assert code(cli.channel(T0 + 1101, 0x4002, PEER, 5000)) == 400
    # ...but the same pair may be bound again, and anything after the cool-down.
    assert code(cli.channel(T0 + 1102, 0x4000, PEER, 5000)) == 200
    assert code(cli.channel(T0 + 1500, 0x5000, PEER, 6000)) == 200


# -- quotas and caps ---------------------------------------------------------------------------


def test_user_quota_486_and_total_508() -> None:
    core, _ = make_core(user_quota=2, max_allocations=3)
    clients = [Cli(core, port=41000 + i) for i in range(3)]
    assert [code(c.allocate(T0)) for c in clients] == [200, 200, 486]
    core2, _ = make_core(user_quota=10, max_allocations=2)
    clients = [Cli(core2, port=41000 + i) for i in range(3)]
    assert [code(c.allocate(T0)) for c in clients] == [200, 200, 508]
    # Ending one frees quota.
    clients[0].refresh(T0 + 1, 0)
    assert code(clients[2].allocate(T0 + 2)) == 200


def test_capacity_error_from_data_plane_is_508() -> None:
    core, _ = make_core(dp=MemoryDataPlane(capacity=1))
    assert code(Cli(core).allocate(T0)) == 200
    assert code(Cli(core, port=40001).allocate(T0)) == 508


def test_permission_and_channel_caps_508() -> None:
    core, _ = make_core(max_permissions=2, max_channels=1)
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.permission(T0, "198.51.100.1", "198.51.100.2")) == 200
    assert code(cli.permission(T0, "198.51.100.3")) == 508
    assert code(cli.permission(T0, "198.51.100.1")) == 200  # refreshing is fine at the cap
    assert code(cli.channel(T0, 0x4000, "198.51.100.1")) == 200
    assert code(cli.channel(T0, 0x4001, "198.51.100.2")) == 508


# -- peer policy on every path -----------------------------------------------------------------


@pytest.mark.parametrize("peer", ["127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254"])
def test_refused_peers_403_on_permission_channel_and_send(
    peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        assert code(cli.permission(T0, peer)) == 403
        assert code(cli.channel(T0, 0x4000, peer)) == 403
    assert "rule=" in caplog.text and "peer refused" in caplog.text
    # Mixed request: all-or-nothing.
    assert code(cli.permission(T0, PEER, peer)) == 403
    (alloc,) = dp.allocations.values()
    assert alloc["perms"] == set() and alloc["channels"] == {}
    cli.send(T0, b"x", peer)
    assert dp.sent == []


# -- TCP clients and shutdown ------------------------------------------------------------------


def test_tcp_client_gone_ends_allocation(caplog: pytest.LogCaptureFixture) -> None:
    core, dp = make_core()
    cli = Cli(core, transport="tcp")
    assert code(cli.allocate(T0)) == 200
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        core.client_gone(T0 + 5, cli.client.key)
    assert not dp.allocations
    assert "reason=tcp-closed" in caplog.text and "/tcp" in caplog.text


def test_shutdown_ends_everything(caplog: pytest.LogCaptureFixture) -> None:
    core, dp = make_core()
    for i in range(3):
        Cli(core, port=42000 + i).allocate(T0)
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        core.shutdown(T0 + 1)
    assert not dp.allocations
    assert caplog.text.count("reason=shutdown") == 3
    assert core.stats()["allocations"] == 0


def test_garbage_never_raises() -> None:
    core, _ = make_core()
    cli = Cli(core)
    for data in [
        b"",
        b"\x00",
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + bytes(12) + b"x",
        bytes(100),
    ]:
        core.handle(T0, cli.client, data)
    # A truncated attribute in a request with a readable header gets 400.
    wire = bytearray(cli.build(Method.ALLOCATE, [(Attr.LIFETIME, encode_u32(1))], auth=False))
    wire[22:24] = b"\x00\x40"
    (resp,) = cli.raw(T0, bytes(wire))
    assert code(resp) == 400


def test_settings_from_config() -> None:
    from confedge.turn.testing import turn_config

    cfg = turn_config(mode="permissive")
    s = CoreSettings.from_config(cfg)
    assert s.realm == "example.test" and not s.restricted and s.user_quota == 10
    s2 = CoreSettings.from_config(turn_config())
    assert s2.user_quota == s2.max_allocations  # restricted: one shared credential
    assert replace(s2, max_channels=1).max_channels == 1


def test_refreshes_do_not_grow_the_timer_heap_and_shortening_works() -> None:
    core, dp = make_core()
    cli = Cli(core)
    cli.allocate(T0, (Attr.LIFETIME, encode_u32(3600)))
    cli.channel(T0, 0x4000)
    base = len(core._timers)
    for i in range(200):
        assert code(cli.permission(T0 + i, PEER)) == 200
        assert code(cli.channel(T0 + i, 0x4000)) == 200
        assert code(cli.refresh(T0 + i, 3600)) == 200
    assert len(core._timers) == base
    (alloc,) = dp.allocations.values()
    # Last refreshes at T0+199: permission until T0+499, channel until T0+799.
    core.tick(T0 + 498)
    assert alloc["perms"] == {PEER}
    core.tick(T0 + 499)
    assert alloc["perms"] == set()
    # Shortening the allocation with Refresh takes effect at the new, earlier time.
    assert decode_u32(cli.refresh(T0 + 300, 600).get(Attr.LIFETIME) or b"") == 600
    core.tick(T0 + 798)
    assert 0x4000 in alloc["channels"]
    core.tick(T0 + 799)
    assert alloc["channels"] == {}
    core.tick(T0 + 899)
    assert dp.allocations
    core.tick(T0 + 900)
    assert not dp.allocations


def test_relay_to_relay_allowed_only_on_relay_ports(caplog: pytest.LogCaptureFixture) -> None:
    """Two clients that both need a relay talk relay to relay; the server's other ports (TURN
    listener, HTTPS, management) and its listener/management address stay out of reach."""
    core, dp = make_core()
    a, b = Cli(core), Cli(core, port=40001)
    a.allocate(T0)
    b.allocate(T0)
    relay_b = ("203.0.113.5", 50001)
    assert code(a.permission(T0, relay_b[0])) == 200  # IP-only: fine
    assert code(a.channel(T0, 0x4000, *relay_b)) == 200
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        assert code(a.channel(T0, 0x4001, "203.0.113.5", 3478)) == 403
        assert code(a.channel(T0, 0x4002, "203.0.113.5", 443)) == 403
    assert "not a relay port" in caplog.text
    assert code(a.permission(T0, "192.0.2.5")) == 403  # listener/management address
    a.send(T0, b"to relay", *relay_b)
    a.send(T0, b"to listener", "203.0.113.5", 3478)
    assert dp.sent == [(1, relay_b, b"to relay")]


def test_reservations_count_against_quota_and_keep_their_family() -> None:
    core, _ = make_core(user_quota=2, dp=MemoryDataPlane(v6=True))
    a = Cli(core)
    resp = a.allocate(
        T0,
        (Attr.EVEN_PORT, encode_even_port(True)),
        (Attr.REQUESTED_ADDRESS_FAMILY, encode_requested_address_family(2)),
    )
    assert code(resp) == 200
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert token is not None
    # Allocation + held port = the user's quota of 2: a third relay is refused...
    assert code(Cli(core, port=40001).allocate(T0)) == 486
    # ...but taking the held port is fine, and it keeps the reservation's family (IPv6).
    b = Cli(core, port=40002)
    resp = b.allocate(T0 + 1, (Attr.RESERVATION_TOKEN, token))
    assert code(resp) == 200
    relay = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
    assert relay[0] == "2001:db8::5"
    assert code(Cli(core, port=40003).allocate(T0 + 1)) == 486
    # An expired reservation gives its quota back.
    core2, _ = make_core(user_quota=2)
    e = Cli(core2)
    assert code(e.allocate(T0, (Attr.EVEN_PORT, encode_even_port(True)))) == 200
    f = Cli(core2, port=40001)
    assert code(f.allocate(T0 + 1)) == 486
    core2.tick(T0 + 30)
    assert code(f.allocate(T0 + 31)) == 200


def test_unusable_password_is_a_config_error() -> None:
    from confedge.config import ConfigError
    from confedge.turn.testing import turn_config

    # Refused by the configuration's own validation now (confedge check says so too) ...
    with pytest.raises(ConfigError, match=r"turn\.password") as info:
        turn_config(password="bad\x07password")
    assert "bad" not in str(info.value)  # ... without echoing the secret
    # ... and still by the core for a Config built past validation.
    cfg = turn_config()
    cfg = structs.replace(cfg, turn=structs.replace(cfg.turn, password="bad\x07password"))
    with pytest.raises(ConfigError, match=r"turn\.password"):
        TurnCore.from_config(cfg, MemoryDataPlane())


# -- issue 11: spoofed-source denial of the 401 budget ----------------------------------------


def _unauth_allocate(cli: Cli, now: float) -> int:
    """Answers to one unauthenticated Allocate (0 = dropped by the budget)."""
    attrs = [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]
    return len(cli.raw(now, cli.build(Method.ALLOCATE, attrs, auth=False)))


def test_budget_never_applies_to_stream_transports() -> None:
    """Forged UDP from a node's address spends the budget; the node's TCP and TLS requests
    from that address are still challenged (the handshake proved the source)."""
    core, _ = make_core(unauth_budget=3)
    forged = Cli(core, "10.0.0.11", 40000)
    assert [_unauth_allocate(forged, T0) for _ in range(5)] == [1, 1, 1, 0, 0]
    for transport, first in (("tcp", 41000), ("tls", 42000)):
        for port in range(first, first + 20):
            node = Cli(core, "10.0.0.11", port, transport=transport)
            assert code(node.allocate(T0 + 1)) == 200, (transport, port)
    # Restricted-mode 403s to outsiders over TCP are not limited either.
    outsider = Cli(core, "192.0.2.99", 1, transport="tcp")
    assert all(code(outsider.allocate(T0)) == 403 for _ in range(10))


def test_node_budget_is_per_socket_and_others_per_address() -> None:
    core, _ = make_core(unauth_budget=3, media_nodes=("10.0.0.11",))
    forged = Cli(core, "10.0.0.11", 40000)
    for _ in range(10):
        _unauth_allocate(forged, T0)
    assert _unauth_allocate(forged, T0) == 0  # that socket's budget is spent...
    assert code(Cli(core, "10.0.0.11", 40001).allocate(T0)) == 200  # ...not the node's
    # An outsider (403 in restricted mode) is limited per address, whatever the port.
    outsider = [Cli(core, "192.0.2.99", p) for p in range(5)]
    assert [_unauth_allocate(c, T0) for c in outsider] == [1, 1, 1, 0, 0]


def test_node_budget_cannot_be_evicted_by_a_flood_of_other_sources() -> None:
    core, _ = make_core(unauth_budget=2)
    core.budget.MAX_SOURCES = 8  # the everyone-else table forgets all when full
    core.node_budget.MAX_SOURCES = 8
    forged = Cli(core, "10.0.0.11", 40000)
    assert [_unauth_allocate(forged, T0) for _ in range(3)] == [1, 1, 0]
    for i in range(50):  # spoofed outsiders: fill and clear the other table several times
        _unauth_allocate(Cli(core, f"192.0.2.{i}", 1), T0)
    assert _unauth_allocate(forged, T0) == 0  # the node table was not cleared by them


def test_exhausted_budget_still_answers_a_client_holding_our_nonce() -> None:
    """A node that has a nonce is unaffected by forged datagrams spending its socket's budget:
    fresh nonce -> served; stale nonce with valid integrity -> 438 (outside the budget) and then
    served; a stale nonce with a wrong integrity stays within the (spent) budget."""
    core, _ = make_core(unauth_budget=3)
    node = Cli(core, "10.0.0.11", 40000)
    assert code(node.allocate(T0)) == 200  # learnt a nonce on the way
    for _ in range(10):
        _unauth_allocate(node, T0 + 1)  # the forger, with the node's exact address and port
    assert _unauth_allocate(node, T0 + 1) == 0
    assert code(node.refresh(T0 + 2)) == 200
    assert code(node.permission(T0 + 2, PEER)) == 200
    # The nonce goes stale (lifetime 600 s); budget spent again in the new window.
    later = T0 + 700
    for _ in range(10):
        _unauth_allocate(node, later)
    stale = node.nonce
    (resp,) = node.raw(later, node.build(Method.REFRESH, []))
    assert code(resp) == 438 and resp.get(Attr.NONCE) not in (None, stale)
    assert code(node.refresh(later)) == 200  # learns the fresh nonce, retries
    # A forger replaying the stale nonce without the password gets nothing.
    liar = Cli(core, "10.0.0.11", 40000, password="wrong")
    liar.nonce = stale
    assert liar.raw(later, liar.build(Method.REFRESH, [])) == []


def test_host_addresses_withdraw_existing_permissions() -> None:
    core, dp = make_core()
    cli = Cli(core)
    assert code(cli.allocate(T0)) == 200
    assert code(cli.channel(T0, 0x4001, PEER, 5000)) == 200
    assert code(cli.permission(T0, "198.51.100.21")) == 200
    (alloc,) = dp.allocations.values()
    core.set_host_addresses(T0 + 1, ["127.0.0.1", PEER])
    assert alloc["perms"] == {"198.51.100.21"}
    assert alloc["channels"] == {}
    assert code(cli.permission(T0 + 2, PEER)) == 403
    assert code(cli.permission(T0 + 2, "::ffff:" + PEER)) == 403
    core.set_host_addresses(T0 + 3, ["127.0.0.1"])
    assert code(cli.permission(T0 + 4, PEER)) == 200


def test_rotated_away_passwords_are_refused_uncounted_and_bounded() -> None:
    """A password a reload rotated away is refused (401) but not reported to the guard (the
    node that still has it is late, not guessing); a reload that changes nothing keeps the
    list; only the last RETIRED_CREDENTIALS passwords are remembered."""
    guard = FakeGuard()
    core, _ = make_core(guard=guard)

    def reload(password: str) -> None:
        fresh, _ = make_core()
        fresh.creds = LongTermCredentials(USER, password, REALM)
        core.adopt(T0, fresh, ())

    reload("second")
    reload("second")  # no change: "turnpass" stays the only retired one
    assert code(Cli(core, port=40001).allocate(T0)) == 401
    assert guard.failures == []
    assert code(Cli(core, port=40002, password="second").allocate(T0)) == 200
    for n in range(RETIRED_CREDENTIALS):
        reload(f"p{n}")
    assert code(Cli(core, port=40003, password="second").allocate(T0)) == 401
    assert guard.failures == []  # "second" is among the last four
    assert code(Cli(core, port=40004).allocate(T0)) == 401
    assert guard.failures == ["10.0.0.11"]  # "turnpass" is forgotten: counted again
