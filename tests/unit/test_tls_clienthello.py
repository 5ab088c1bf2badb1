"""The ClientHello reader used to measure what `turns:` clients offer (tests/clienthello.py):
real ClientHellos from OpenSSL, every truncation, split records, and hostile bytes."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clienthello import ClientHello, ClientHelloError, NeedMore, parse_client_hello


def openssl_hello(alpn: list[str] | None = None, sni: str | None = None) -> bytes:
    """The first flight of a real client (Python's OpenSSL), captured from a memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


HELLO = openssl_hello(["stun.turn", "http/1.1"], "edge.example.com")


def test_real_hello_alpn_sni_versions() -> None:
    ch = parse_client_hello(HELLO)
    assert isinstance(ch, ClientHello)
    assert ch.alpn == ("stun.turn", "http/1.1")
    assert ch.sni == "edge.example.com"
    assert 0x0304 in ch.supported_versions
    assert 16 in ch.extensions and 0 in ch.extensions


def test_no_alpn_no_sni() -> None:
    """What Chromium's turns: client sends to an IP address: neither extension."""
    ch = parse_client_hello(openssl_hello())
    assert ch.alpn == () and ch.sni is None


def test_every_truncation_asks_for_more() -> None:
    for i in range(len(HELLO)):
        with pytest.raises(NeedMore):
            parse_client_hello(HELLO[:i])


def test_split_over_records() -> None:
    """RFC 8446 §5.1: a handshake message may be fragmented over several records."""
    body = HELLO[5:]
    cut = 40
    split = (
        HELLO[:3]
        + cut.to_bytes(2, "big")
        + body[:cut]
        + HELLO[:3]
        + (len(body) - cut).to_bytes(2, "big")
        + body[cut:]
    )
    assert parse_client_hello(split) == parse_client_hello(HELLO)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not handshake"),
        (b"\x16\x02\x00\x00\x05" + bytes(5), "not TLS"),
        (b"\x16\x03\x01\x00\x00", "out of range"),
        (b"\x16\x03\x01\x50\x00", "out of range"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "too large"),
        (b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", "runs past the end"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(ClientHelloError, match=match):
        parse_client_hello(data)


def _with_extensions(exts: bytes) -> bytes:
    """A minimal ClientHello carrying `exts` as its extensions block."""
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(exts).to_bytes(2, "big")
        + exts
    )
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


def _ext(etype: int, data: bytes) -> bytes:
    return etype.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


@pytest.mark.parametrize(
    ("exts", "match"),
    [
        (_ext(16, b"\x00\x00"), "empty list"),
        (_ext(16, b"\x00\x01\x00"), "empty protocol name"),
        (_ext(16, b"\x00\x05\x09stun"), "runs past the end"),
        (_ext(16, b"\x00\x02\x01a") + _ext(16, b"\x00\x02\x01b"), "sent twice"),
        (_ext(43, b"\x03\x03\x04\x03"), "odd length"),
        (b"\x00\x10\x00\xff", "runs past the end"),
    ],
)
def test_hostile_extensions(exts: bytes, match: str) -> None:
    with pytest.raises(ClientHelloError, match=match):
        parse_client_hello(_with_extensions(exts))


def test_minimal_hello_with_alpn() -> None:
    ch = parse_client_hello(_with_extensions(_ext(16, b"\x00\x0a\x09stun.turn")))
    assert ch.alpn == ("stun.turn",) and ch.legacy_version == 0x0303


@given(st.binary(max_size=600))
@settings(max_examples=400)
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(data)


@given(st.integers(min_value=0, max_value=len(HELLO) - 1), st.integers(0, 255))
@settings(max_examples=400)
def test_one_corrupted_byte_never_crashes(pos: int, value: int) -> None:
    data = bytearray(HELLO)
    data[pos] = value
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(bytes(data))
