"""The guard through the real proxy: a scripted PIN guesser is banned on every worker, a
legitimate user is not, bans end, survive a restart, are shared through Redis, and the usual
spellings of the request_token path do not evade the count."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from guard_redis import redis_server
from guard_upstream import PinNode
from msgspec.structs import replace

from confedge.config import Config, parse_config
from confedge.guard import create_guard
from confedge.proxy.service import ProxyService

TOKEN = "/api/client/v2/conferences/meet/request_token"


def _ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    elif "content-length" in hdrs:
        body = await reader.readexactly(int(hdrs["content-length"]))
    else:
        body = await reader.read()
    return status, hdrs, body


def _raw(target: str, pin: str | None, *, version: str = "1.1", extra: str = "") -> bytes:
    p = f"pin: {pin}\r\n" if pin is not None else ""
    return (
        f"POST {target} HTTP/{version}\r\nHost: localhost\r\n{p}{extra}Content-Length: 0\r\n\r\n"
    ).encode()


async def send(
    port: int,
    raws: list[bytes],
    source: str = "127.0.0.1",
    ctx: ssl.SSLContext | None = None,
) -> list[tuple[int, dict[str, str], bytes]]:
    """Write all requests at once (pipelined when several), read as many answers as come.

    `ctx`: a client context to share between many parallel calls (test_guard_inflight_proxy's
    attacks): building one per connection loads the system's CA file, tens of milliseconds on
    a loaded 2-core host, and 200 of them delayed the first connections' TLS handshakes past
    the proxy's handshake timeout (proxy.header_timeout, 10 s), which then closed them."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx or _ssl(), local_addr=(source, 0)
    )
    out = []
    try:
        writer.write(b"".join(raws))
        for _ in raws:
            try:
                out.append(await asyncio.wait_for(_read(reader), 10))
            except (asyncio.IncompleteReadError, ConnectionError):
                break
    finally:
        writer.close()
    return out


async def attempt(port: int, pin: str | None, source: str = "127.0.0.1", **kw: Any) -> int:
    target = kw.pop("target", TOKEN)
    (r,) = await send(port, [_raw(target, pin, **kw)], source)
    return r[0]


def config(
    node: PinNode, state: Path, *, workers: int = 1, health_interval: float = 0.5, **guard: Any
) -> Config:
    g: dict[str, Any] = {
        "enabled": True,
        "maxretry": 4,
        "findtime": 60,
        "bantime": 2,
        "jitter": 0.0,
        "escalation": 1.0,
        "ignore": [],
        "conference_maxretry": 1000,
        "store": "sqlite",
    }
    g.update(guard)
    return parse_config(
        {
            "server": {"state_dir": str(state)},
            "turn": {"enabled": False},
            "proxy": {
                "https_port": 0,
                "http_port": 0,
                "workers": workers,
                "nodes": [node.address],
                "access_log": str(state / "access.log"),
                "health_interval": health_interval,
            },
            "guard": g,
            "management": {"port": 0},  # Runtime would bind the fixed 9090 otherwise
        }
    )


@pytest.fixture
async def node() -> Any:
    n = await PinNode().start()
    yield n
    await n.stop()


async def test_guesser_banned_on_every_worker_legit_user_joins_ban_ends(
    node: PinNode, tmp_path: Path
) -> None:
    svc = ProxyService(config(node, tmp_path, workers=2, bantime=3), guard_factory=create_guard)
    await svc.start()
    try:
        port = svc.https_port
        assert await attempt(port, None) == 403  # "PIN required" is not a failure
        for guess in ("0000", "0001", "0002"):
            assert await attempt(port, guess) == 403
        assert await attempt(port, "0003") == 403  # the 4th failure: banned
        banned_at = time.monotonic()
        reached = node.attempts_from("127.0.0.1")
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - banned_at)))
        # One second later every worker refuses: 20 fresh connections (spread by SO_REUSEPORT
        # over both workers) all get the ban status with Retry-After, right PIN or not.
        results = await asyncio.gather(*(send(port, [_raw(TOKEN, "1234")]) for _ in range(20)))
        assert {r[0][0] for r in results} == {429}
        retry = {int(r[0][1]["retry-after"]) for r in results}
        assert retry <= {1, 2, 3}
        assert node.attempts_from("127.0.0.1") == reached  # nothing reached the node
        # Meanwhile a legitimate participant from another address joins.
        assert await attempt(port, "1234", source="127.0.0.2") == 200
        assert await attempt(port, "9999", source="127.0.0.2") == 403  # one typo: fine
        assert await attempt(port, "1234", source="127.0.0.2") == 200
        # After the ban time the guesser is let in again.
        await asyncio.sleep(max(0.0, 3.0 + 0.6 - (time.monotonic() - banned_at)))
        statuses = [await attempt(port, "1234") for _ in range(6)]
        assert statuses == [200] * 6
    finally:
        await svc.close()


async def test_ban_survives_a_restart(node: PinNode, tmp_path: Path) -> None:
    cfg = config(node, tmp_path, bantime=60)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    try:
        for i in range(4):
            assert await attempt(svc.https_port, f"000{i}") == 403
        assert await attempt(svc.https_port, "1234") == 429
    finally:
        await svc.close()
    svc2 = ProxyService(cfg, guard_factory=create_guard)
    await svc2.start()
    try:
        assert await attempt(svc2.https_port, "1234") == 429
        assert await attempt(svc2.https_port, "1234", source="127.0.0.2") == 200
    finally:
        await svc2.close()


@contextlib.asynccontextmanager
async def two_instances(
    node: PinNode, tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[ProxyService, ProxyService]]:
    """Two proxy instances sharing one throwaway Redis as their guard store."""
    with redis_server() as srv:
        a = ProxyService(
            config(node, tmp_path / "a", store=srv.url, **kw), guard_factory=create_guard
        )
        b = ProxyService(
            config(node, tmp_path / "b", store=srv.url, **kw), guard_factory=create_guard
        )
        await a.start()
        await b.start()
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


async def test_two_instances_share_a_ban_through_redis(node: PinNode, tmp_path: Path) -> None:
    async with two_instances(node, tmp_path, bantime=30, ban_status=403) as (a, b):
        assert await attempt(b.https_port, "1234", source="127.0.0.3") == 200
        for i in range(4):
            assert await attempt(a.https_port, f"000{i}", source="127.0.0.3") == 403
        t0 = time.monotonic()
        while await attempt(b.https_port, "1234", source="127.0.0.3") != 403:
            assert time.monotonic() - t0 < 1.0, "instance b did not refuse within 1 s"
            await asyncio.sleep(0.05)
        # 403 here is the ban (ban_status = 403): the right PIN no longer reaches a node.
        (r,) = await send(b.https_port, [_raw(TOKEN, "1234")], "127.0.0.3")
        assert r[0] == 403 and "retry-after" in r[1]


# Each spelling comes from its own source address with maxretry = 1, so "banned after one
# attempt" proves that this spelling was counted.
EVASIONS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("upper case", {"target": "/API/Client/V2/Conferences/MEET/REQUEST_TOKEN"}),
    ("percent-encoded", {"target": "/api/client/v2/conferences/m%65et/request%5Ftoken"}),
    ("trailing slash", {"target": TOKEN + "/"}),
    ("double slashes", {"target": "//api/client//v2/conferences/meet//request_token"}),
    ("dot segment", {"target": "/api/client/v2/./conferences/meet/./request_token"}),
    ("dot-dot segment", {"target": "/api/client/v2/conferences/x/../meet/request_token"}),
    ("extra query", {"target": TOKEN + "?pin=1234&x=%2F"}),
    ("HTTP/1.0", {"version": "1.0"}),
    ("gzip answer", {"extra": "Accept-Encoding: gzip, deflate\r\n"}),
    ("spoofed XFF", {"extra": "X-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\n"}),
]


async def test_spellings_of_request_token_do_not_evade(node: PinNode, tmp_path: Path) -> None:
    svc = ProxyService(config(node, tmp_path, maxretry=1, bantime=60), guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    missed: list[str] = []
    refused: list[str] = []
    try:
        for i, (name, kw) in enumerate(EVASIONS):
            src = f"127.0.1.{i + 1}"
            status = await attempt(port, "0000", source=src, **kw)
            if status == 400:
                # Refused by the proxy's vetting (e.g. any ".." segment): never reached a node,
                # so there is nothing to count, and nothing gained by the attacker.
                assert node.attempts_from(src) == 0, name
                refused.append(name)
                continue
            assert status == 403, f"{name}: the node should have answered Invalid PIN"
            if await attempt(port, "1234", source=src) != 429:
                missed.append(name)
        # Chunked answers from the node are buffered and counted too.
        node.chunked = True
        if await attempt(port, "0000", source="127.0.2.1") != 403:
            missed.append("chunked (no 403)")
        elif await attempt(port, "1234", source="127.0.2.1") != 429:
            missed.append("chunked answer")
    finally:
        node.chunked = False
        await svc.close()
    assert missed == []
    assert set(refused) <= {"dot-dot segment"}  # every other spelling must reach the node


async def test_pipelining_and_parallel_connections(node: PinNode, tmp_path: Path) -> None:
    svc = ProxyService(config(node, tmp_path, maxretry=3, bantime=60), guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    try:
        # Pipelining: ten guesses in one write. The first three reach the node; once the third
        # answer is counted the rest of the pipeline is refused without reaching it.
        answers = await send(port, [_raw(TOKEN, f"{i:04d}") for i in range(10)], "127.0.3.1")
        statuses = [a[0] for a in answers]
        assert statuses[:3] == [403, 403, 403]
        assert set(statuses[3:]) <= {429}
        assert node.attempts_from("127.0.3.1") == 3
        # Many parallel connections: each guess is reserved before it is forwarded, so no more
        # than maxretry reach the node however many are in flight (test_guard_inflight_proxy.py has
        # the 200-connection attacks); the rest are refused, and so is every later connection.
        statuses = []
        while statuses.count(403) < 3:
            results = await asyncio.gather(
                *(send(port, [_raw(TOKEN, f"{i:04d}")], "127.0.3.2") for i in range(30))
            )
            statuses += [r[0][0] for r in results]
            assert set(statuses) <= {403, 429}
            assert node.attempts_from("127.0.3.2") == statuses.count(403) <= 3
        later = await asyncio.gather(
            *(send(port, [_raw(TOKEN, "1234")], "127.0.3.2") for _ in range(30))
        )
        assert {r[0][0] for r in later} == {429}
    finally:
        await svc.close()


async def test_in_process_proxy_and_turn_share_one_guard(node: PinNode, tmp_path: Path) -> None:
    """workers = 1: the proxy bans from the runtime's own guard, the one TURN checks, so a PIN
    guesser banned by the proxy is refused by TURN at once, even with the in-memory store (two
    guard objects would each keep their own table)."""
    from confedge.runtime import Runtime

    cfg = config(node, tmp_path, store="memory", bantime=60)
    # The management listener's default port is the demo's 9090: an ephemeral one here.
    cfg = replace(cfg, management=replace(cfg.management, port=0))
    rt = Runtime(cfg)
    await rt.start()
    try:
        assert rt.proxy.core.guard is rt.guard
        port = rt.proxy.https_port
        for guess in ("0000", "0001", "0002", "0003"):
            assert await attempt(port, guess) == 403
        assert await attempt(port, "1234") == 429
        assert rt.guard.check("127.0.0.1") is not None  # what TURN asks before any work
    finally:
        await rt.close()
