"""Adversarial QA of the TURN core (sans-I/O): hostile credentials and state abuse.

Each test pins a behaviour a hostile client or careless operator once broke, or one the brief of
the QA pass asked to confirm (RFC 8656 state rules, quotas). Simulated time, in-memory data plane.
"""

from __future__ import annotations

import logging
import random

import pytest
from test_turn_core import REALM, T0, Cli, code, make_core

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    encode_even_port,
    new_transaction_id,
)
from confedge.turn.auth import RestCredentials
from confedge.turn.testing import turn_config

# -- REST usernames (permissive mode) -----------------------------------------------------------

HOSTILE_REST_USERNAMES = [
    "²:x",  # str.isdigit() is true, int() refuses it: raised out of the listener before
    "¹²³⁴⁵⁶⁷⁸⁹:x",
    "١٢٣٤٥٦٧٨٩٠:x",  # Arabic-Indic digits: int() accepts them, the REST scheme does not
    "\uff19" * 10 + ":x",  # fullwidth digits
    ":",
    "abc:def",
    "99999999999999999999:x",
    "-5:x",
    "+99999999:x",
    " 99999999:x",
    "0x7fffffff:x",
    "1_000_000_000_0:x",
    "",
    ":" * 500,
    "9" * 12 + "\x00",
]


@pytest.mark.parametrize("username", HOSTILE_REST_USERNAMES)
def test_hostile_rest_username_is_refused_not_raised(username: str) -> None:
    """A well-signed request with a hostile REST username gets 401, never an exception."""
    core, dp = make_core(restricted=False)
    # The attacker signs with the right HMAC for that username: only the username is hostile.
    password = RestCredentials.password_for("current", username)
    cli = Cli(core, username=username, password=password)
    resp = cli.allocate(T0)
    assert code(resp) == 401
    assert not dp.allocations


def test_rest_expiry_accepts_only_ascii_digits() -> None:
    assert RestCredentials.expiry_of("123:alice") == 123
    assert RestCredentials.expiry_of("123") == 123
    for username in HOSTILE_REST_USERNAMES:
        assert RestCredentials.expiry_of(username) is None, username


def test_hostile_usernames_through_guard_path_do_not_raise() -> None:
    """The guard is told about failures only for non-expired credentials: same parser."""
    from test_turn_core import FakeGuard

    guard = FakeGuard()
    core, _ = make_core(restricted=False, guard=guard)
    for username in HOSTILE_REST_USERNAMES:
        cli = Cli(core, username=username, password="wrong")
        assert code(cli.allocate(T0)) == 401
    assert len(guard.failures) == len(HOSTILE_REST_USERNAMES)


def test_testing_helper_leaves_tls_off() -> None:
    """turn_config() must not inherit the fixed tls_port default (5349): parallel tests and a
    running confedge collided on it ("address already in use")."""
    assert turn_config().turn.tls_port == 0
    assert turn_config(tls_port=38555).turn.tls_port == 38555


# -- authenticated fuzz -----------------------------------------------------------------------

_METHODS = [0x001, 0x003, 0x004, 0x006, 0x007, 0x008, 0x009, 0x00A, 0x00B, 0x00C, 0x016, 0xFFF]


def test_authenticated_junk_never_raises() -> None:
    """Seeded fuzz *past* authentication (valid nonce and MESSAGE-INTEGRITY), in both modes,
    including REST usernames like the ones above; the property tests of test_turn_fuzz stop at
    the 401."""
    rng = random.Random(20240611)
    attrs = [int(a) for a in Attr] + [0x0000, 0x7FFF, 0x8000, 0xFFFF]
    for i in range(600):
        restricted = i % 2 == 0
        core, _ = make_core(restricted=restricted, max_permissions=3, max_channels=3)
        if restricted:
            cli = Cli(core)
        else:
            user = rng.choice(["4000000000:u", *HOSTILE_REST_USERNAMES])
            cli = Cli(core, username=user, password=RestCredentials.password_for("current", user))
        if rng.random() < 0.7:
            cli.allocate(T0)
        if cli.nonce is None:
            cli.request(T0, Method.REFRESH)  # learn a nonce
        for step in range(4):
            tid = new_transaction_id()
            b = MessageBuilder(rng.choice(_METHODS), rng.randrange(4), tid)
            for _ in range(rng.randrange(8)):
                b.add(rng.choice(attrs), rng.randbytes(rng.choice([0, 1, 4, 8, 20, 300])))
            b.add(Attr.USERNAME, cli.username.encode())
            b.add(Attr.REALM, REALM.encode())
            b.add(Attr.NONCE, cli.nonce or b"")
            wire = b.build(key=cli.key, fingerprint=rng.random() < 0.5)
            if rng.random() < 0.2:
                w = bytearray(wire)
                w[rng.randrange(len(w))] ^= 1 << rng.randrange(8)
                wire = bytes(w)
            core.handle(T0 + step, cli.client, wire)
        core.tick(T0 + rng.choice([1, 301, 601, 4000]))


# -- state abuse --------------------------------------------------------------------------------


def test_refresh_to_zero_twice_and_refresh_without_allocation() -> None:
    core, dp = make_core()
    cli = Cli(core)
    assert code(cli.allocate(T0)) == 200
    assert code(cli.refresh(T0 + 1, 0)) == 200
    assert not dp.allocations
    assert code(cli.refresh(T0 + 2, 0)) == 437  # RFC 8656 §7.3: no allocation any more
    fresh = Cli(core, port=40001)
    assert code(fresh.refresh(T0 + 3, 600)) == 437


def test_channel_rebinding_rules() -> None:
    core, _ = make_core()
    cli = Cli(core)
    cli.allocate(T0)
    assert code(cli.channel(T0, 0x4000, port=5000)) == 200
    assert code(cli.channel(T0, 0x4000, port=5001)) == 400  # number to another peer
    assert code(cli.channel(T0, 0x4001, port=5000)) == 400  # peer to a second number
    assert code(cli.channel(T0, 0x4000, port=5000)) == 200  # same pair: a refresh


def test_permission_cap_counts_distinct_peers() -> None:
    core, _ = make_core(max_permissions=64)
    cli = Cli(core)
    cli.allocate(T0)
    for i in range(64):
        assert code(cli.permission(T0, f"198.51.100.{i + 1}")) == 200
    assert code(cli.permission(T0, "198.51.100.200")) == 508
    assert code(cli.permission(T0, "198.51.100.1")) == 200  # refreshing an existing one is fine
    # One request with many addresses is all-or-nothing.
    other = Cli(core, port=40002)
    other.allocate(T0)
    assert code(other.permission(T0, *[f"198.51.101.{i}" for i in range(1, 41)])) == 200
    assert code(other.permission(T0, *[f"198.51.102.{i}" for i in range(1, 41)])) == 508
    assert code(other.permission(T0, *[f"198.51.102.{i}" for i in range(1, 25)])) == 200
    # More attributes than a message may carry (64) is a 400, not a partial install.
    third = Cli(core, port=40003)
    third.allocate(T0)
    assert code(third.permission(T0, *[f"198.51.103.{i}" for i in range(1, 70)])) == 400


def test_reservation_token_single_use_and_not_with_even_port() -> None:
    core, _ = make_core()
    a = Cli(core, port=40010)
    resp = a.allocate(T0, (Attr.EVEN_PORT, encode_even_port(True)))
    assert code(resp) == 200
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert token is not None and len(token) == 8
    # EVEN-PORT together with a RESERVATION-TOKEN is a 400 (RFC 8656 §7.2).
    b = Cli(core, port=40011)
    both = b.allocate(
        T0, (Attr.RESERVATION_TOKEN, token), (Attr.EVEN_PORT, encode_even_port(False))
    )
    assert code(both) == 400
    # Another client may use it (the RFC does not bind it to a client) -- but only once.
    assert code(b.allocate(T0, (Attr.RESERVATION_TOKEN, token))) == 200
    c = Cli(core, port=40012)
    assert code(c.allocate(T0, (Attr.RESERVATION_TOKEN, token))) == 508
    assert code(c.allocate(T0, (Attr.RESERVATION_TOKEN, b"\0" * 8))) == 508


def test_quota_exhaustion_then_release_frees_quota() -> None:
    core, _ = make_core(max_allocations=3)
    clis = [Cli(core, port=41000 + i) for i in range(4)]
    for c in clis[:3]:
        assert code(c.allocate(T0)) == 200
    assert code(clis[3].allocate(T0)) == 508
    assert code(clis[0].refresh(T0 + 1, 0)) == 200
    assert code(clis[3].allocate(T0 + 1)) == 200


def test_refusal_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    core, _ = make_core(media_nodes=("10.0.0.0/24",), unauth_budget=10_000)
    caplog.set_level(logging.INFO, "confedge.turn")
    outsider = Cli(core, "192.0.2.77", 1)
    for _ in range(500):
        outsider.raw(T0, outsider.build(Method.ALLOCATE, [], auth=False))
    refused = [r for r in caplog.records if "not in turn.media_nodes" in r.getMessage()]
    assert 1 <= len(refused) <= 20


def test_stun_without_username_but_with_integrity_is_400() -> None:
    core, _ = make_core()
    cli = Cli(core)
    cli.allocate(T0)  # learn a nonce
    b = MessageBuilder(Method.REFRESH, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.REALM, REALM.encode())
    b.add(Attr.NONCE, cli.nonce or b"")
    (resp,) = cli.raw(T0, b.build(key=cli.key))
    assert code(resp) == 400
    b = MessageBuilder(Method.REFRESH, MsgClass.REQUEST, new_transaction_id())
    b.add(Attr.USERNAME, b"\xff\xfe\xc3")  # not UTF-8
    b.add(Attr.REALM, REALM.encode())
    b.add(Attr.NONCE, cli.nonce or b"")
    (resp,) = cli.raw(T0, b.build(key=cli.key))
    assert code(resp) == 400
