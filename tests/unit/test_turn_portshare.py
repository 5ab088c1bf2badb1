"""The HTTP-or-TURN decision on the HTTPS port, and the PROXY v2 header of relayed clients
(confedge.turn.portshare): one concern per test, hostile inputs included."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confedge.proxy.request import ALLOWED_METHODS, NOT_ALLOWED_METHODS
from confedge.stun import Method, MsgClass
from confedge.stun.framing import encode_channel_data
from confedge.stun.message import MessageBuilder
from confedge.turn.portshare import (
    FIRST_HTTP,
    FIRST_MORE,
    FIRST_TURN,
    PROXY_V2_SIGNATURE,
    ProxyHeaderError,
    classify,
    decode_proxy_v2,
    encode_proxy_v2,
)

TID = bytes(range(12))
BINDING = MessageBuilder(Method.BINDING, MsgClass.REQUEST, TID).build()
ALLOCATE = MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, TID).build()


# -- classify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [BINDING, ALLOCATE], ids=["binding", "allocate"])
def test_stun_messages_are_turn(msg: bytes) -> None:
    assert classify(msg) == FIRST_TURN
    assert classify(memoryview(msg)) == FIRST_TURN


def test_stun_needs_the_magic_cookie() -> None:
    """RFC 8489 §5: bits 00 alone are not enough; without the cookie it is not STUN (and the
    HTTP parser refuses it)."""
    assert classify(BINDING[:7]) == FIRST_MORE
    assert classify(BINDING[:8]) == FIRST_TURN
    assert classify(BINDING[:4] + b"\x00\x00\x00\x00" + BINDING[8:]) == FIRST_HTTP


@pytest.mark.parametrize("channel", [0x4000, 0x4FFF, 0x5123, 0x7FFE, 0x7FFF])
def test_channel_data_is_turn(channel: int) -> None:
    """RFC 8656 §12: first two bits 01; the length's high byte is no token character."""
    assert classify(encode_channel_data(channel, b"x" * 100)) == FIRST_TURN
    assert classify(encode_channel_data(channel, b"")) == FIRST_TURN


@pytest.mark.parametrize("method", sorted(ALLOWED_METHODS | NOT_ALLOWED_METHODS))
def test_every_method_is_http(method: bytes) -> None:
    line = method + b" /api/client/v2/status HTTP/1.1\r\n"
    assert classify(line) == FIRST_HTTP
    # Byte by byte, it is undecided until the space, then HTTP.
    for i in range(1, len(method) + 1):
        assert classify(line[:i]) == FIRST_MORE, line[:i]
    assert classify(line[: len(method) + 1]) == FIRST_HTTP


def test_other_http_looking_starts_stay_http() -> None:
    """Whatever the proxy refused before the option existed it still refuses (no TURN)."""
    for data in (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"get / HTTP/1.1\r\n",
        b"M-SEARCH * HTTP/1.1",
    ):
        assert classify(data) == FIRST_HTTP, data
    assert classify(b"\x16\x03\x01\x02\x00\x01\x00\x01") == FIRST_HTTP  # TLS in TLS: no cookie
    assert classify(b"\x80\x00") == FIRST_HTTP  # RTP-like / binary above 0x7F
    assert classify(b"\xff" * 3) == FIRST_HTTP
    assert classify(b"A" * 16) == FIRST_HTTP  # an endless token: the parser says 501/400


def test_undecided_inputs_ask_for_more() -> None:
    assert classify(b"") == FIRST_MORE
    assert classify(b"G") == FIRST_MORE
    assert classify(b"GE") == FIRST_MORE
    assert classify(b"A" * 15) == FIRST_MORE
    assert classify(b"\x00\x01\x00") == FIRST_MORE


def test_non_token_after_a_letter_is_channel_data() -> None:
    assert classify(b"G\x00") == FIRST_TURN
    assert classify(b"@ ") == FIRST_TURN  # "@" is no token character: not a method
    assert classify(b"GE\r\n") == FIRST_TURN


@given(st.binary(max_size=64))
def test_any_bytes_get_an_answer(data: bytes) -> None:
    kind = classify(data)
    assert kind in (FIRST_HTTP, FIRST_TURN, FIRST_MORE)
    if kind == FIRST_MORE:
        assert len(data) < 16  # never waits for more than 16 bytes
    # An answer never changes once given: more bytes never turn HTTP into TURN or back.
    if kind != FIRST_MORE:
        assert classify(data + b"\r\n more") == kind


# -- PROXY protocol v2 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("203.0.113.9", 51000), ("10.0.0.5", 443)),
        (("2001:db8::9", 1), ("2001:db8::5", 443)),
        (("::ffff:198.51.100.7", 65535), ("198.51.100.1", 443)),
        (("2001:db8::9", 40000), ("10.0.0.5", 443)),  # mixed families: destination zeroed
    ],
)
def test_proxy_v2_round_trip(src: tuple[str, int], dst: tuple[str, int]) -> None:
    header = encode_proxy_v2(src, dst)
    assert header.startswith(PROXY_V2_SIGNATURE)
    assert header[12] == 0x21  # version 2, PROXY
    want_ip = ipaddress.ip_address(src[0])
    if isinstance(want_ip, ipaddress.IPv6Address) and want_ip.ipv4_mapped:
        want_ip = want_ip.ipv4_mapped
    got = decode_proxy_v2(header + b"rest")
    assert got == ((str(want_ip), src[1]), len(header))


def test_proxy_v2_incomplete_is_none_at_every_cut() -> None:
    header = encode_proxy_v2(("2001:db8::9", 4000), ("2001:db8::5", 443))
    for i in range(len(header)):
        assert decode_proxy_v2(header[:i]) is None, i


def test_proxy_v2_local_command_has_no_client() -> None:
    assert decode_proxy_v2(PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00") == (None, 16)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),  # the v1 text form
        (PROXY_V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version/command"),
        (PROXY_V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "family"),  # UDP
        (PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "family"),  # block too short
        (PROXY_V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "family"),  # AF_UNIX
        (PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff", "too long"),
    ],
)
def test_proxy_v2_refusals(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        decode_proxy_v2(data)


@given(st.binary(max_size=300))
def test_proxy_v2_any_bytes(data: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        decode_proxy_v2(data)
    with contextlib.suppress(ProxyHeaderError):
        decode_proxy_v2(PROXY_V2_SIGNATURE + data)
