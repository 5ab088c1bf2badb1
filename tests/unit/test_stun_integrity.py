"""Keys, integrity checks and SASLprep (RFC 8489 §9.2, §14.5-§14.7; RFC 4013)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    check_integrity,
    long_term_key,
    long_term_key_sha256,
    parse_message,
    saslprep,
    short_term_key,
    userhash,
)

TID = bytes(range(12))


# -- SASLprep (RFC 4013 §3 examples and table coverage) ------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("The\u00adM\u00aatr\u2168", "TheMatrIX"),  # RFC 5769 §2.4
        ("a\u00a0b", "a b"),  # non-ASCII space -> space
        ("a\u200bb", "ab"),  # zero width space is B.1
        ("", ""),
        ("p@ss w0rd!", "p@ss w0rd!"),
        ("\u05d0\u05d1", "\u05d0\u05d1"),  # all RandAL is fine
        ("\u0627" + "1" + "\u0628", "\u0627" + "1" + "\u0628"),  # RandAL ends, digits inside
    ],
)
def test_saslprep(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "\u0007",  # C.2.1 ASCII control
        "a\u0000b",
        "\ue000",  # C.3 private use
        "\U000f0000",
        "\ufffe",  # C.4 non-character
        "\ud800",  # C.5 surrogate
        "\ufff9",  # C.6
        "\u2ff0",  # C.7
        "\u200e",  # C.8 LRM
        "\U000e0001",  # C.9 tagging
        "\u0627" + "a" + "\u0628",  # RandAL and L mixed
        "\u0627" + "1",  # RandAL must end the string
        "1" + "\u0627",
    ],
)
def test_saslprep_prohibited(given: str) -> None:
    with pytest.raises(ValueError, match="SASLprep"):
        saslprep(given)


# -- keys -----------------------------------------------------------------------------------------


def test_long_term_key_ascii() -> None:
    expected = hashlib.md5(b"user:example.org:pass").digest()
    assert long_term_key("user", "example.org", "pass") == expected
    assert long_term_key_sha256("user", "example.org", "pass") == (
        hashlib.sha256(b"user:example.org:pass").digest()
    )


def test_long_term_key_prohibited_password() -> None:
    with pytest.raises(ValueError):
        long_term_key("u", "r", "bad\u0007")


def test_realm_saslprep_fallback() -> None:
    # A realm with a prohibited char is used as is rather than failing.
    assert long_term_key("u", "r\u0007", "p") == hashlib.md5("u:r\u0007:p".encode()).digest()


def test_short_term_key_and_userhash() -> None:
    assert short_term_key("pa\u00adss") == b"pass"
    assert userhash("user", "example.org") == hashlib.sha256(b"user:example.org").digest()


# -- integrity checks -------------------------------------------------------------------------------


def test_integrity_covers_the_length_rewritten_prefix() -> None:
    """Recompute the HMAC by hand from the RFC's description to pin the covered bytes."""
    key = b"k" * 16
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, TID)
        .add(Attr.USERNAME, b"alice")
        .build(key=key, fingerprint=True)
    )
    mi_off = 20 + 12
    covered = data[:2] + (12 + 24).to_bytes(2, "big") + data[4:mi_off]
    assert data[mi_off + 4 : mi_off + 24] == hmac.new(key, covered, "sha1").digest()
    assert data[2:4] == (12 + 24 + 8).to_bytes(2, "big")


def test_sha256_preferred_when_both_present() -> None:
    key = b"k" * 16
    good = (
        MessageBuilder(Method.REFRESH, MsgClass.REQUEST, TID)
        .add(Attr.USERNAME, b"bob")
        .build(key=key)
    )
    # Append a MESSAGE-INTEGRITY-SHA256 computed correctly over good + its own header.
    body_len = len(good) - 20 + 36
    prefix = good[:2] + body_len.to_bytes(2, "big") + good[4:]
    mac = hmac.new(key, prefix, "sha256").digest()
    both = prefix + b"\x00\x1c\x00\x20" + mac
    msg = parse_message(both)
    assert msg.integrity_offset >= 0 and msg.integrity_sha256_offset >= 0
    assert check_integrity(msg, key)
    # Corrupt the SHA-256 MAC: the check must fail even though SHA-1 is still right.
    broken = both[:-1] + bytes([both[-1] ^ 1])
    assert not check_integrity(parse_message(broken), key)


def test_truncated_sha256() -> None:
    key = b"secret"
    full = MessageBuilder(Method.BINDING, MsgClass.REQUEST, TID).add(Attr.USERNAME, b"x").build()
    body_len = len(full) - 20 + 4 + 16
    prefix = full[:2] + body_len.to_bytes(2, "big") + full[4:]
    mac = hmac.new(key, prefix, "sha256").digest()[:16]
    msg = parse_message(prefix + b"\x00\x1c\x00\x10" + mac)
    assert check_integrity(msg, key)
    assert not check_integrity(msg, b"other")


def test_integrity_absent_or_unparsed() -> None:
    msg = parse_message(MessageBuilder(Method.BINDING, MsgClass.REQUEST, TID).build())
    assert not check_integrity(msg, b"k")
    hand = Message(Method.BINDING, MsgClass.REQUEST, TID, [(Attr.MESSAGE_INTEGRITY, bytes(20))])
    assert not check_integrity(hand, b"k")


def test_attribute_appended_after_integrity_does_not_break_or_bypass() -> None:
    key = b"k" * 16
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, TID)
        .add(Attr.USERNAME, b"alice")
        .build(key=key)
    )
    # An attacker appends LIFETIME after MESSAGE-INTEGRITY and fixes the length.
    tampered = (
        data[:2] + (len(data) - 20 + 8).to_bytes(2, "big") + data[4:] + b"\x00\x0d\x00\x04\0\0\0\0"
    )
    msg = parse_message(tampered)
    assert not msg.has(Attr.LIFETIME)  # ignored (RFC 8489 §14.5)
    assert check_integrity(msg, key)  # and the original integrity still holds
