"""Credentials, nonces and the 401 budget (sans-I/O, simulated time)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from confedge.stun import long_term_key
from confedge.turn.auth import LongTermCredentials, NonceManager, RestCredentials, UnauthBudget

REALM = "example.com"


def test_long_term_credentials() -> None:
    c = LongTermCredentials("turnuser", "secret", REALM)
    assert c.keys_for("turnuser", 0) == [hashlib.md5(b"turnuser:example.com:secret").digest()]
    assert c.keys_for("turnuse", 0) == []
    assert c.keys_for("turnuserx", 0) == []
    assert c.keys_for("", 0) == []


def test_rest_password_is_coturn_compatible() -> None:
    # base64(HMAC-SHA1(secret, username)), as coturn's use-auth-secret expects.
    username = "1700000000:alice"
    expected = base64.b64encode(
        hmac.new(b"north", username.encode(), hashlib.sha1).digest()
    ).decode()
    assert RestCredentials.password_for("north", username) == expected


def test_rest_expiry_and_rotation() -> None:
    c = RestCredentials(["current", "previous"], REALM)
    now = 1_700_000_000.0
    user = f"{int(now) + 60}:alice"
    keys = c.keys_for(user, now)
    assert keys == [
        long_term_key(user, REALM, RestCredentials.password_for("current", user)),
        long_term_key(user, REALM, RestCredentials.password_for("previous", user)),
    ]
    assert c.keys_for(user, now + 60) != []  # valid up to and including the expiry second
    assert c.keys_for(user, now + 61) == []  # expired usernames are refused
    assert c.expired(user, now + 61) and not c.expired(user, now)
    assert not c.expired("alice", now)
    assert c.keys_for(str(int(now) + 60), now) != []  # bare "<expiry>" as coturn accepts
    for bad in ["alice", "alice:123", ":alice", "", "12ab:alice", "9" * 20 + ":x"]:
        assert c.keys_for(bad, now) == [], bad


def test_rest_make_uses_current_secret() -> None:
    c = RestCredentials(["current", "previous"], REALM)
    username, password = c.make("bob", 1000.0, ttl=50)
    assert username == "1050:bob"
    assert password == RestCredentials.password_for("current", username)


def test_nonce_bound_to_address_and_lifetime() -> None:
    n = NonceManager(lifetime=600, key=b"k" * 32)
    nonce = n.issue(1000.0, "192.0.2.1", 5000)
    assert len(nonce) == 36
    assert n.valid(nonce, 1000.0, "192.0.2.1", 5000)
    assert n.valid(nonce, 1599.0, "192.0.2.1", 5000)
    assert not n.valid(nonce, 1600.0, "192.0.2.1", 5000)  # stale after nonce_lifetime
    assert not n.valid(nonce, 1000.0, "192.0.2.2", 5000)  # other client IP
    assert not n.valid(nonce, 1000.0, "192.0.2.1", 5001)  # other client port
    assert not n.valid(nonce, 990.0, "192.0.2.1", 5000)  # from the future
    tampered = nonce[:11] + ("0" if nonce[11] != "0" else "1") + nonce[12:]
    assert not n.valid(tampered, 1000.0, "192.0.2.1", 5000)
    assert not n.valid("garbage", 1000.0, "192.0.2.1", 5000)
    assert not n.valid("z" * 36, 1000.0, "192.0.2.1", 5000)
    # Another process (another key) does not accept it.
    assert not NonceManager(600, key=b"x" * 32).valid(nonce, 1000.0, "192.0.2.1", 5000)


def test_unauth_budget() -> None:
    b = UnauthBudget(3)
    assert [b.spend(0.0, "a") for _ in range(4)] == [True, True, True, False]
    assert b.spend(0.0, "b")  # per source
    assert not b.spend(9.9, "a")
    assert b.spend(10.0, "a")  # new window
    b.spend(100.0, "c")  # sweeps stale entries
    assert "a" not in b._seen


def test_unauth_budget_memory_is_bounded() -> None:
    b = UnauthBudget(2)
    b.MAX_SOURCES = 100
    for i in range(1000):
        assert b.spend(1.0, f"10.0.{i // 256}.{i % 256}")
    assert len(b._seen) <= 100
