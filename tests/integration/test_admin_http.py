"""The management listener's HTTP handling against hostile and odd clients, on real sockets.

A runtime with every part off except management (the listener must work on its own), and short
timeouts so that the timeout cases take well under a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from admin_support import get, parse_replies, raw

from confedge.admin import AdminService
from confedge.admin.http import Limits
from confedge.config import Config, parse_config
from confedge.runtime import Runtime

LIMITS = Limits(header_timeout=0.4, idle_timeout=0.6, max_connections=4)


def _config(tmp_path: Path, **management: object) -> Config:
    return parse_config(
        {
            "server": {"hostname": "mgmt", "domain": "example.test", "state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "management": {"port": 0, **management},
        }
    )


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[AdminService]:
    rt = Runtime(_config(tmp_path, allowed_hosts=["status.example.test"]))
    await rt.start()  # guard (off) only; the listener is ours, with short timeouts
    svc = AdminService(rt.cfg, rt, limits=LIMITS)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()
        await rt.close()


async def test_runtime_starts_management_and_disabled_means_off(tmp_path: Path) -> None:
    rt = Runtime(_config(tmp_path))
    await rt.start()
    try:
        assert rt.admin is not None and rt.admin.port > 0
        assert rt.admin.info() == {"status": f"http://127.0.0.1:{rt.admin.port}/status"}
        reply = await get(rt.admin.port, "/status.json")
        j = reply.json()
        assert j["proxy"] == {"enabled": False} and j["turn"] == {"enabled": False}
        assert j["guard"] == {"enabled": False}
    finally:
        await rt.close()
    rt = Runtime(_config(tmp_path, enabled=False))
    await rt.start()
    try:
        assert rt.admin is None
    finally:
        await rt.close()


async def test_port_in_use_is_a_clear_error(tmp_path: Path, admin: AdminService) -> None:
    rt = Runtime(_config(tmp_path, port=admin.port))
    with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+ for management"):
        await rt.start()
    assert rt.parts == []  # what had started was stopped again


async def test_routes(admin: AdminService) -> None:
    ok = await get(admin.port, "/healthz")
    assert (ok.status, ok.body) == (200, b"ok")
    assert ok.headers["cache-control"] == "no-store"
    assert ok.headers["x-content-type-options"] == "nosniff"
    page = await get(admin.port, "/status?refresh=1")  # a query string is ignored
    assert page.status == 200 and b"<!doctype html>" in page.body
    assert "default-src 'none'" in page.headers["content-security-policy"]
    j = await get(admin.port, "/status.json")
    assert j.headers["content-type"] == "application/json" and j.json()["version"]
    root = await get(admin.port, "/")
    assert (root.status, root.headers["location"]) == (302, "/status")
    assert (await get(admin.port, "/status/")).status == 404
    assert (await get(admin.port, "/../etc/passwd")).status == 404
    head = await get(admin.port, "/status", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 1000


async def test_only_get_and_head(admin: AdminService) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE"):
        reply = await get(admin.port, "/status", method=method)
        assert reply.status == 405, method
        assert reply.headers["allow"] == "GET, HEAD"
    data = await raw(admin.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 4")


async def test_body_header_and_target_limits(admin: AdminService) -> None:
    body = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello"
    assert parse_replies(await raw(admin.port, body))[0].status == 413
    chunked = (
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert parse_replies(await raw(admin.port, chunked))[0].status == 413
    big = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    assert parse_replies(await raw(admin.port, big))[0].status == 431
    many = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 60 + b"\r\n"
    assert parse_replies(await raw(admin.port, many))[0].status == 431
    long = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert parse_replies(await raw(admin.port, long))[0].status == 414
    garbage = await raw(admin.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64)
    assert parse_replies(garbage)[0].status == 400  # e.g. a TLS ClientHello on the plain port


async def test_host_header(admin: AdminService) -> None:
    for host in ("127.0.0.1:9090", "[::1]:9090", "mgmt", "mgmt.example.test.", "localhost:1"):
        assert (await get(admin.port, "/healthz", host_header=host)).status == 200, host
    assert (await get(admin.port, "/healthz", host_header="status.example.test")).status == 200
    evil = await get(admin.port, "/status.json", host_header="attacker.example")
    assert evil.status == 421
    assert b"management.allowed_hosts" in evil.body
    no_host = await raw(admin.port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert parse_replies(no_host)[0].status == 400
    two = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: attacker.example\r\n\r\n"
    assert parse_replies(await raw(admin.port, two))[0].status == 400
    http10 = await raw(admin.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert parse_replies(http10)[0].status == 200
    absolute = b"GET http://127.0.0.1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert parse_replies(await raw(admin.port, absolute))[0].status == 400


async def test_pipelined_requests_answered_in_order(admin: AdminService) -> None:
    req = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    payload = req % b"/healthz" + req % b"/nope" + req % b"/status.json" + req % b"/healthz"
    replies = parse_replies(await raw(admin.port, payload))
    assert [r.status for r in replies] == [200, 404, 200, 200]
    assert replies[2].json()["version"]


async def test_pipelined_burst_is_answered_over_several_loop_turns(admin: AdminService) -> None:
    """More answer bytes than one loop turn renders (turn_output): the rest are held and
    answered on the next turns, still in order, for a client that reads."""
    req = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    paths = [b"/status" if i % 3 else b"/nope" for i in range(24)]
    page = len((await get(admin.port, "/status")).body)
    assert 16 * page > LIMITS.turn_output  # some are really held
    replies = parse_replies(await raw(admin.port, b"".join(req % p for p in paths)))
    assert [r.status for r in replies] == [200 if p == b"/status" else 404 for p in paths]
    assert admin.http is not None and admin.http.refused == 0


async def test_client_that_never_reads_is_timed_out(admin: AdminService) -> None:
    """Requests held while the client does not read (a tiny receive window) do not keep the
    connection open beyond the idle timeout."""
    import socket

    # Small kernel buffers both sides (accepted sockets inherit the listener's SO_SNDBUF), so
    # that the answers back up into the transport and the listener pauses.
    assert admin._server is not None
    admin._server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", admin.port))
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 24)
    await asyncio.sleep(0.2)
    assert admin.http is not None and len(admin.http.connections) == 1
    t0 = time.monotonic()
    while admin.http.connections and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.05)
    assert not admin.http.connections
    assert time.monotonic() - t0 < 2 * LIMITS.idle_timeout + 0.5
    assert admin.http.refused == 0  # within the pipelining cap: timed out, not cut off
    writer.transport.abort()


async def test_timeouts_close_idle_and_slow_connections(admin: AdminService) -> None:
    loop = asyncio.get_running_loop()
    # Slow headers (slowloris): the request is never finished.
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = loop.time()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    assert 0.3 < loop.time() - t0 < 2.0
    writer.close()
    # Idle keep-alive after an answer.
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    t0 = loop.time()
    data = await asyncio.wait_for(reader.read(), 3)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
    assert 0.5 < loop.time() - t0 < 2.0
    writer.close()


async def test_connection_cap(admin: AdminService) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert admin.http is not None and len(admin.http.connections) == 4
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at accept
    writer.close()
    assert admin.http.refused == 1
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.05)
    assert (await get(admin.port, "/healthz")).status == 200


async def test_pipelining_without_reading_is_cut_off(admin: AdminService) -> None:
    """A client that floods pipelined requests and never reads cannot make the listener buffer
    answers without bound: it is cut off (over 1 MiB pending) or times out while paused."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    req = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    writer.write(req * 2000)  # ~90 KB of requests for ~10 MB of answers
    t0 = time.monotonic()
    assert admin.http is not None
    while admin.http.connections and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.05)
    assert not admin.http.connections
    assert admin.http.refused == 1
    writer.transport.abort()
    assert (await get(admin.port, "/healthz")).status == 200


async def test_ipv6_internal_address(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "server": {"internal_address": "::1", "state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "management": {"port": 0, "networks": ["::1/128"]},
        }
    )
    rt = Runtime(cfg)
    await rt.start()
    try:
        assert rt.admin.url == f"http://[::1]:{rt.admin.port}/status"
        data = await raw(
            rt.admin.port, b"GET /status.json HTTP/1.1\r\nHost: [::1]\r\n\r\n", host="::1"
        )
        reply = parse_replies(data)[0]
        assert reply.status == 200
        assert reply.json()["management"]["networks"] == ["::1/128"]
    finally:
        await rt.close()
