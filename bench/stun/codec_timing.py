"""Micro-benchmark of the STUN codec's hot-path functions (timeit, best of 5 repeats).

Run: ``.venv/bin/python bench/stun/codec_timing.py [--quick]``. Prints microseconds per call.
Single-threaded, bounded (about 10 s; ``--quick`` about 1 s), no network.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

from confedge.stun import (
    Attr,
    MessageBuilder,
    Method,
    MsgClass,
    check_integrity,
    decode_xor_address,
    encode_channel_data,
    encode_requested_transport,
    encode_u32,
    encode_xor_address,
    long_term_key,
    parse_channel_data,
    parse_message,
)


def main() -> None:
    quick = "--quick" in sys.argv
    scale = 10 if quick else 1
    tid = bytes(range(12))
    key = long_term_key("turnuser", "example.com", "secret")
    allocate = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, tid)
        .add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
        .add(Attr.LIFETIME, encode_u32(600))
        .add(Attr.USERNAME, b"turnuser")
        .add(Attr.REALM, b"example.com")
        .add(Attr.NONCE, b"0123456789abcdef0123456789abcdef")
        .build(key=key, fingerprint=True)
    )
    payload = b"x" * 1000
    send = (
        MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
        .add_xor_address(Attr.XOR_PEER_ADDRESS, "203.0.113.9", 50000)
        .add(Attr.DATA, payload)
        .build()
    )
    channel_data = encode_channel_data(0x4001, payload)
    parsed = parse_message(allocate)
    xv4 = encode_xor_address("203.0.113.9", 5000, tid)

    def data_indication() -> bytes:
        return (
            MessageBuilder(Method.DATA, MsgClass.INDICATION, tid)
            .add_xor_address(Attr.XOR_PEER_ADDRESS, "203.0.113.9", 5000)
            .add(Attr.DATA, payload)
            .build()
        )

    cases: list[tuple[str, Callable[[], object], int]] = [
        (f"parse_message: Allocate request ({len(allocate)} B, MI + FP)", lambda: parse_message(allocate), 100_000),
        ("parse_message: Send indication (1000 B payload)", lambda: parse_message(send), 100_000),
        ("check_integrity: Allocate request (HMAC-SHA1)", lambda: check_integrity(parsed, key), 100_000),
        ("parse_channel_data (1000 B payload)", lambda: parse_channel_data(channel_data), 500_000),
        ("encode_channel_data (1000 B payload)", lambda: encode_channel_data(0x4001, payload), 500_000),
        ("decode_xor_address (IPv4)", lambda: decode_xor_address(xv4, tid), 200_000),
        ("build Data indication (1000 B payload)", data_indication, 100_000),
    ]  # fmt: skip
    for label, fn, number in cases:
        number //= scale
        best = min(timeit.repeat(fn, number=number, repeat=5))
        print(f"{label:58s} {best / number * 1e6:7.3f} us")


if __name__ == "__main__":
    main()
