"""Cross-check against an independent implementation: aioice's STUN codec (what the aiortc
clients in the demo and e2e tests speak). Messages go both ways, with integrity and fingerprint.
"""

from __future__ import annotations

import pytest

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    check_fingerprint,
    check_integrity,
    decode_error_code,
    decode_u32,
    decode_xor_address,
    encode_requested_transport,
    encode_u32,
    long_term_key,
    parse_message,
)

stun = pytest.importorskip("aioice.stun", reason="aioice not installed (dev dependency)")

KEY = long_term_key("turnuser", "example.com", "secret")


def test_aioice_allocate_request_parses_and_verifies() -> None:
    req = stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST)
    req.attributes["LIFETIME"] = 600
    req.attributes["REQUESTED-TRANSPORT"] = 0x11000000
    req.attributes["USERNAME"] = "turnuser"
    req.attributes["REALM"] = "example.com"
    req.attributes["NONCE"] = b"abcdef0123456789"
    req.attributes["XOR-PEER-ADDRESS"] = ("2001:db8::5", 7000)
    req.add_message_integrity(KEY)
    req.add_fingerprint()
    msg = parse_message(bytes(req))
    assert msg.method == Method.ALLOCATE and msg.msg_class == MsgClass.REQUEST
    assert msg.transaction_id == req.transaction_id
    assert decode_u32(msg.get(Attr.LIFETIME) or b"") == 600
    assert msg.get(Attr.REQUESTED_TRANSPORT) == encode_requested_transport(17)
    assert msg.get(Attr.USERNAME) == b"turnuser"
    peer = decode_xor_address(msg.get(Attr.XOR_PEER_ADDRESS) or b"", msg.transaction_id)
    assert peer == ("2001:db8::5", 7000)
    assert check_integrity(msg, KEY)
    assert not check_integrity(msg, long_term_key("turnuser", "example.com", "wrong"))
    assert check_fingerprint(msg)


def test_our_response_parses_in_aioice() -> None:
    tid = bytes(range(12))
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.SUCCESS, tid)
        .add_xor_address(Attr.XOR_RELAYED_ADDRESS, "203.0.113.5", 50000)
        .add_xor_address(Attr.XOR_MAPPED_ADDRESS, "2001:db8::7", 40000)
        .add(Attr.LIFETIME, encode_u32(600))
        .build(key=KEY, fingerprint=True)
    )
    resp = stun.parse_message(data)  # raises on a bad FINGERPRINT
    assert resp.check_message_integrity(KEY)
    assert not resp.check_message_integrity(b"wrong key")
    assert resp.message_method == stun.Method.ALLOCATE
    assert resp.message_class == stun.Class.RESPONSE
    assert resp.transaction_id == tid
    assert resp.attributes["XOR-RELAYED-ADDRESS"] == ("203.0.113.5", 50000)
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 40000)
    assert resp.attributes["LIFETIME"] == 600
    corrupted = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ValueError, match="fingerprint"):
        stun.parse_message(corrupted)


def test_error_response_both_ways() -> None:
    tid = bytes(12)
    data = (
        MessageBuilder(Method.ALLOCATE, MsgClass.ERROR, tid)
        .add_error(401, "Unauthenticated")
        .add(Attr.REALM, b"example.com")
        .add(Attr.NONCE, b"n0nce")
        .build(fingerprint=True)
    )
    resp = stun.parse_message(data)
    assert resp.message_class == stun.Class.ERROR
    assert resp.attributes["ERROR-CODE"] == (401, "Unauthenticated")
    theirs = stun.Message(
        message_method=stun.Method.ALLOCATE, message_class=stun.Class.ERROR, transaction_id=tid
    )
    theirs.attributes["ERROR-CODE"] = (438, "Stale Nonce")
    theirs.add_fingerprint()
    msg = parse_message(bytes(theirs))
    assert decode_error_code(msg.get(Attr.ERROR_CODE) or b"") == (438, "Stale Nonce")
