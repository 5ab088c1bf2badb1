"""Adversarial QA of the simulated node's HTTP side (it faces only the proxy, but the proxy
forwards what clients send): hostile requests get a 4xx, and nothing is logged as a crash."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from confedge.nodesim.core import Conference
from confedge.nodesim.node import NodeSim

P = b"/api/client/v2/conferences"
TOKEN = P + b"/room/request_token"


def _post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: n\r\nContent-Type: application/json\r\n"
        + head
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


HOSTILE: list[tuple[str, bytes, int]] = [
    ("deep-json", _post(TOKEN, b"[" * 100_000 + b"]" * 100_000), 400),
    ("deep-json-object", _post(TOKEN, b'{"a":' * 30_000 + b"1" + b"}" * 30_000), 400),
    ("json-not-object", _post(TOKEN, b"[]"), 400),
    ("json-broken", _post(TOKEN, b"{{{{"), 400),
    ("json-not-utf8", _post(TOKEN, b'{"display_name": "\xff"}'), 400),
    ("bad-method", b"FOO / HTTP/1.1\r\n\r\n", 400),
    ("huge-header", b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ("negative-length", b"POST " + TOKEN + b" HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (
        "te-and-cl",
        b"POST " + TOKEN + b" HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("traversal", b"GET /webapp/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\n\r\n", 404),
    ("pin-not-ascii", _post(TOKEN, b"{}", b"pin: \xff"), 400),
    ("long-path", b"GET " + P + b"/" + b"a" * 10_000 + b"/conference_status HTTP/1.1\r\n\r\n", 414),
    ("binary", random.Random(7).randbytes(4000), 400),
]


async def _exchange(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        return await asyncio.wait_for(r.readuntil(b"\r\n"), 5)
    finally:
        w.close()


async def test_hostile_requests_get_4xx_and_no_crash(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = NodeSim([Conference(alias="room", host_pin="1234")])
    await node.start()
    port = int(node.url.rsplit(":", 1)[1])
    try:
        for name, data, status in HOSTILE:
            line = await _exchange(port, data)
            assert line.startswith(b"HTTP/1.1 %d " % status), (name, line)
        # Still serving.
        line = await _exchange(port, b"GET /api/client/v2/status HTTP/1.1\r\n\r\n")
        assert line.startswith(b"HTTP/1.1 200 ")
    finally:
        await node.close()
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert crashes == [], [r.getMessage() for r in crashes]
