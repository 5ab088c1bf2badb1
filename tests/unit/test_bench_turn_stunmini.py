"""The TURN benchmark's own client codec (bench/turn/stunmini.py) against RFC 5769 vectors.

Why: the benchmark deliberately does not use confedge.stun, so that a codec bug cannot flatter
confedge; its codec therefore needs its own check, or a broken MESSAGE-INTEGRITY would show up
only as "every allocation failed" against both servers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "turn"))

import stunmini as sm


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 §2.4: sample request with long-term authentication (password after SASLprep).
RFC5769_LONG_TERM = h(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
    53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)

# RFC 5769 §2.2: sample IPv4 response (XOR-MAPPED-ADDRESS 192.0.2.1:32853).
RFC5769_IPV4_RESPONSE = h(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)


def test_long_term_request_matches_rfc5769_vector() -> None:
    username = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    key = sm.long_term_key(username, "example.org", "TheMatrIX")
    txid, msg = sm.build_request(
        sm.BINDING,
        [
            (sm.ATTR_USERNAME, username.encode()),
            (sm.ATTR_NONCE, b"f//499k954d6OL34oL9FSTvy64sA"),
            (sm.ATTR_REALM, b"example.org"),
        ],
        key=key,
        txid=h("78 ad 34 33 c6 ad 72 c0 29 da 41 2e"),
    )
    assert msg == RFC5769_LONG_TERM
    assert txid == RFC5769_LONG_TERM[8:20]


def test_wrong_password_changes_integrity() -> None:
    username = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    _, msg = sm.build_request(
        sm.BINDING,
        [(sm.ATTR_USERNAME, username.encode())],
        key=sm.long_term_key(username, "example.org", "TheMatrix"),
        txid=bytes(12),
    )
    _, other = sm.build_request(
        sm.BINDING,
        [(sm.ATTR_USERNAME, username.encode())],
        key=sm.long_term_key(username, "example.org", "TheMatrIX"),
        txid=bytes(12),
    )
    assert msg[:-20] == other[:-20] and msg[-20:] != other[-20:]


def test_parse_rfc5769_ipv4_response() -> None:
    r = sm.parse_response(RFC5769_IPV4_RESPONSE)
    assert r.is_success
    assert r.txid == h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
    assert r.xor_address(sm.ATTR_XOR_MAPPED_ADDRESS) == ("192.0.2.1", 32853)
    assert r.attrs[0x8022] == b"test vector"
    assert r.error_code == 0


def test_error_code_and_peer_address_round_trip() -> None:
    # 401 with REALM and NONCE, as a server's challenge looks.
    body = (
        b"\x00\x09\x00\x04\x00\x00\x04\x01"  # ERROR-CODE 401 (class 4, number 1)
        + b"\x00\x14\x00\x04test"
        + b"\x00\x15\x00\x03abc\x00"
    )
    msg = b"\x01\x13" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + bytes(12) + body
    r = sm.parse_response(msg)
    assert not r.is_success
    assert r.error_code == 401
    assert r.attrs[sm.ATTR_NONCE] == b"abc"
    value = sm.xor_address_value("127.0.0.1", 40300)
    fake = sm.Response(0x0101, bytes(12), {sm.ATTR_XOR_PEER_ADDRESS: value})
    assert fake.xor_address(sm.ATTR_XOR_PEER_ADDRESS) == ("127.0.0.1", 40300)


def test_channel_data_framing() -> None:
    assert sm.channel_data(0x4000, b"abc") == b"\x40\x00\x00\x03abc"


@pytest.mark.parametrize(
    "bad", [b"", b"\x00" * 19, b"\xc0" + b"\x00" * 19, b"\x01\x01\x00\x08" + bytes(16)]
)
def test_malformed_responses_raise(bad: bytes) -> None:
    with pytest.raises(sm.StunError):
        sm.parse_response(bad)
