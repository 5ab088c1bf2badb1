"""The basic proxy path: HTTPS listener -> balancer -> keep-alive pool -> node -> response."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, get, proxy_config, read_response

from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    # Production runs on uvloop; the tests exercise the same transports.
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def nodes():
    ups = [await Upstream(f"n{i}").start() for i in range(3)]
    yield ups
    for u in ups:
        await u.kill()


@pytest.fixture
async def proxy(nodes, tmp_path):
    svc = ProxyService(proxy_config([u.address for u in nodes], str(tmp_path)))
    await svc.start()
    yield svc
    await svc.close()


async def test_round_robin_over_one_keepalive_connection(proxy, nodes):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    seen = []
    for _ in range(6):
        writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = await read_response(reader)
        assert r.status == 200
        seen.append(r.json()["node"])
    writer.close()
    assert seen == ["n0", "n1", "n2", "n0", "n1", "n2"]
    # keep-alive pools: six requests used one upstream connection per node at most
    assert sum(len(u.writers) for u in nodes) <= 3


async def test_forwarded_headers_and_post_body(proxy, nodes):
    body = b"x" * 100_000
    r = await get(
        proxy.https_port,
        "/echo?q=1",
        method="POST",
        body=body,
        headers="X-Forwarded-For: 10.9.9.9\r\nX-Real-IP: 6.6.6.6\r\nConnection: X-Drop\r\nX-Drop: 1\r\n",
    )
    assert r.status == 200
    info = r.json()
    hdrs = {k.lower(): v for k, v in info["headers"]}
    assert info["target"] == "/echo?q=1"
    assert info["body_len"] == len(body)
    assert hdrs["host"] == "localhost"
    assert hdrs["x-real-ip"] == "127.0.0.1"
    assert hdrs["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert hdrs["x-forwarded-proto"] == "https"
    assert "x-drop" not in hdrs and "connection" not in hdrs
    assert r.header("Content-Security-Policy").startswith("upgrade-insecure-requests")


async def test_access_log_line(proxy, nodes, tmp_path):
    await get(proxy.https_port, "/echo?token=secret&x=1", headers="User-Agent: t/1\r\n")
    await proxy.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    line = [x for x in lines if "/echo" in x][-1]
    assert '"GET /echo?token=[FILTERED]&x=1 HTTP/1.1" 200' in line
    assert '"t/1"' in line and '"200"' in line and "127.0.0.1:" in line
