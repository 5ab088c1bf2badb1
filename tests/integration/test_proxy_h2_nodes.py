"""The node side of HTTP/2 requests is the HTTP/1.1 path's (proxy/upstream.py, one node adapter
for both client adapters): failover when a node is down, node-failure marking, the read
timeout, keep-alive pooling shared with HTTP/1.1 clients, the access log's upstream fields and
the `confedge_proxy_node_latency_seconds` histogram, all for requests that arrive over real
TLS with ALPN h2 (httpx with hyper-h2 underneath, and h2load, as the clients)."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import uvloop
from ops_support import HOST, edge_config, metrics, start_edge, tls_client
from proxy_upstream import Upstream, client_ssl, get, proxy_config

from confedge.proxy.health import NodeState
from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def _h2(port: int, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True,
        verify=client_ssl(),
        base_url=f"https://localhost:{port}",
        timeout=10,
        **kw,  # type: ignore[arg-type]
    )


def _upstream_fields(log: str, marker: str) -> tuple[str, str, str]:
    """The last access-log line containing `marker`: its upstream_addr, upstream_status and
    upstream_response_time (the reference format's last three quoted fields)."""
    line = [x for x in log.splitlines() if marker in x][-1]
    assert "HTTP/2.0" in line, line
    addr, status, rtime = re.findall(r'"([^"]*)"', line)[-3:]
    return addr, status, rtime


async def test_h2_fails_over_from_a_down_node_and_marks_it(tmp_path: Path) -> None:
    """The first node is down (connection refused): every HTTP/2 request, GET and POST with a
    body, is answered by the second node; the down node is marked DOWN at once (passive
    failure, as on HTTP/1.1) and the access log names both attempts."""
    n0, n1 = await Upstream("n0").start(), await Upstream("n1").start()
    svc = ProxyService(proxy_config([n0.address, n1.address], str(tmp_path), health_interval=30))
    await svc.start()
    core = svc.core
    assert core is not None
    try:
        await n0.kill()  # after the start's health check: only the requests can find out
        async with _h2(svc.https_port) as c:
            r = await c.post("/api/client/v2/echo?first=1", content=b"payload")
            assert r.http_version == "HTTP/2" and r.status_code == 200
            assert r.json()["node"] == "n1" and r.json()["body_len"] == 7
            assert core.health.states[0] is NodeState.DOWN
            for i in range(4):  # the down node is no longer tried
                r = await c.get(f"/api/client/v2/echo?after={i}")
                assert r.status_code == 200 and r.json()["node"] == "n1"
    finally:
        await svc.close()
        await n1.kill()
    log = (tmp_path / "access.log").read_text()
    addr, status, rtime = _upstream_fields(log, "echo?first=1")
    assert addr == f"{n0.address[7:]}, {n1.address[7:]}", addr
    assert status == "502, 200", status
    assert re.fullmatch(r"\d+\.\d{3}, \d+\.\d{3}", rtime), rtime
    addr, status, _ = _upstream_fields(log, "echo?after=3")
    assert addr == n1.address[7:] and status == "200"


async def test_h2_read_timeout_is_504_and_logged(tmp_path: Path) -> None:
    """A node that does not answer within proxy.read_timeout: the HTTP/2 stream gets 504 (the
    node timer of the core's sweep, as on HTTP/1.1), the node is marked failed, the log says
    504 for it."""
    slow = await Upstream("slow", delay=3.0).start()
    svc = ProxyService(
        proxy_config([slow.address], str(tmp_path), health_interval=30, read_timeout=0.5)
    )
    await svc.start()
    core = svc.core
    assert core is not None
    try:
        async with _h2(svc.https_port) as c:
            t0 = asyncio.get_running_loop().time()
            r = await c.get("/api/client/v2/echo?slow=1")
            took = asyncio.get_running_loop().time() - t0
            assert r.http_version == "HTTP/2" and r.status_code == 504
            assert 0.4 < took < 2.5, took
        assert core.health.states[0] is not NodeState.UP
    finally:
        await svc.close()
        await slow.kill()
    addr, status, _ = _upstream_fields((tmp_path / "access.log").read_text(), "echo?slow=1")
    assert addr == slow.address[7:] and status == "504"


async def test_h2_and_h1_share_the_node_keepalive_pool(tmp_path: Path) -> None:
    """Sequential HTTP/2 requests reuse one node connection; when the HTTP/2 client leaves, it
    stays in the worker's pool and the next HTTP/1.1 request goes out on it."""
    node = await Upstream("n0").start()
    svc = ProxyService(proxy_config([node.address], str(tmp_path), health_interval=30))
    await svc.start()
    core = svc.core
    assert core is not None
    try:
        async with _h2(svc.https_port) as c:
            for i in range(5):
                r = await c.get(f"/api/client/v2/echo?i={i}")
                assert r.status_code == 200 and r.http_version == "HTTP/2"
            assert len(core.upstreams) == 1
            assert len(core.pools[0].idle) == 1
        await asyncio.sleep(0.1)  # the HTTP/2 connection is gone; its node connection is not
        assert len(core.pools[0].idle) == 1
        (pooled,) = core.pools[0].idle
        r = await get(svc.https_port, "/api/client/v2/echo?h1=1")
        assert r.status == 200
        assert core.upstreams == {pooled}
    finally:
        await svc.close()
        await node.kill()


async def test_h2_requests_feed_the_node_latency_histogram(tmp_path: Path) -> None:
    """`confedge run` with two nodes, one slow; only HTTP/2 requests are proxied: /metrics
    (read with prometheus_client's parser) counts them per node in
    confedge_proxy_node_latency_seconds, the slow node's answers in its slow buckets."""
    fast, slow = await Upstream("fast").start(), await Upstream("slow", delay=0.3).start()
    edge = start_edge(tmp_path, edge_config(tmp_path, nodes=[fast.address, slow.address]))
    try:
        async with httpx.AsyncClient(
            http2=True,
            verify=tls_client(),
            base_url=f"https://127.0.0.1:{edge.https}",
            headers={"Host": HOST},
            timeout=10,
        ) as c:
            for i in range(8):
                r = await c.get(f"/x?i={i}")
                assert r.status_code == 200 and r.http_version == "HTTP/2"
        # And as load tools send them: h2load's streams, several at once per connection.
        h2load = 0
        if shutil.which("h2load") is not None:
            h2load = 40
            out = await asyncio.to_thread(
                subprocess.run,
                ["h2load", "-n", str(h2load), "-c", "2", "-m", "4",
                 "-H", f":authority: {HOST}", f"https://127.0.0.1:{edge.https}/x"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert "Application protocol: h2" in out.stdout, out.stdout + out.stderr
            assert f"{h2load} succeeded, 0 failed" in out.stdout, out.stdout
        fams = await asyncio.to_thread(metrics, edge.admin)
        hist = fams["confedge_proxy_node_latency_seconds"]

        def by_node(name: str, **labels: str) -> dict[str, float]:
            return {
                s.labels["node"]: s.value
                for s in hist
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            }

        counts = by_node("confedge_proxy_node_latency_seconds_count")
        assert set(counts) == {fast.address, slow.address}, counts
        assert sum(counts.values()) == 8 + h2load, counts
        sums = by_node("confedge_proxy_node_latency_seconds_sum")
        assert sums[slow.address] >= 0.3 * counts[slow.address] * 0.9
        under_100ms = by_node("confedge_proxy_node_latency_seconds_bucket", le="0.1")
        assert under_100ms[slow.address] == 0
        assert under_100ms[fast.address] > 0
    finally:
        edge.stop()
        await fast.kill()
        await slow.kill()


async def test_h2_requests_follow_node_pools(tmp_path: Path) -> None:
    """[[proxy.pools]] over HTTP/2: a request under a pool's prefix goes to that pool's
    nodes, fails over within it and never into the default pool, like on HTTP/1.1."""
    d0 = await Upstream("d0").start()
    s0, s1 = await Upstream("s0").start(), await Upstream("s1").start()
    pools = [{"prefix": "/scheduling/", "nodes": [s0.address, s1.address]}]
    svc = ProxyService(proxy_config([d0.address], str(tmp_path), health_interval=30, pools=pools))
    await svc.start()
    core = svc.core
    assert core is not None
    try:
        async with _h2(svc.https_port) as c:
            seen = {(await c.get(f"/scheduling/addin.html?i={i}")).json()["node"] for i in range(4)}
            assert seen == {"s0", "s1"}
            assert (await c.get("/webapp/home")).json()["node"] == "d0"
            await s0.kill()
            for i in range(4):
                r = await c.get(f"/scheduling/api?k={i}")
                assert r.status_code == 200 and r.json()["node"] == "s1"
        assert core.health.states[1] is NodeState.DOWN  # s0: the flat list is d0, s0, s1
        assert core.health.states[0] is NodeState.UP
    finally:
        await svc.close()
        for u in (d0, s1):
            await u.kill()


async def test_h2_access_log_remote_user(tmp_path: Path) -> None:
    """$remote_user over HTTP/2 as over HTTP/1.1: the Basic-auth user name (never the
    password) on a proxied request's line and on the proxy's own answer's line."""
    node = await Upstream("n0").start()
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), health_interval=30, path_allowlist=["/ok/"])
    )
    await svc.start()
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()}
    try:
        async with _h2(svc.https_port) as c:
            assert (await c.get("/ok/a", headers=auth)).status_code == 200
            assert (await c.get("/denied", headers=auth)).status_code == 404
    finally:
        await svc.close()
        await node.kill()
    text = (tmp_path / "access.log").read_text()
    assert "s3cret" not in text
    for path in ("/ok/a", "/denied"):
        (line,) = [x for x in text.splitlines() if f"GET {path} HTTP/2.0" in x]
        assert line.split(" ")[2] == "alice", line


async def test_h2_bursts_reuse_the_node_connections_they_opened(tmp_path: Path) -> None:
    """60 requests in flight on one HTTP/2 connection need 60 node connections (one per
    stream); after the burst all of them wait in the pool (proxy.upstream_keepalive, 256 by
    default), and the next burst of 60 opens none. With a pool smaller than a client's streams
    in flight, every burst closed and reopened the excess (docs/BENCHMARKS.md: 20% more CPU
    per HTTP/2 request under h2load)."""
    node = Upstream("n0", delay=0.3)
    accepted = 0
    handle = node._handle

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await handle(reader, writer)

    node._handle = counting  # type: ignore[method-assign]
    await node.start()
    svc = ProxyService(proxy_config([node.address], str(tmp_path), health_interval=30))
    await svc.start()
    core = svc.core
    assert core is not None
    try:
        async with _h2(svc.https_port) as c:

            async def burst(tag: str) -> None:
                rs = await asyncio.gather(
                    *(c.get(f"/api/client/v2/echo?{tag}={i}") for i in range(60))
                )
                assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in rs)

            await burst("a")
            opened = accepted
            assert opened >= 60  # (plus the health checks' own connections)
            assert len(core.pools[0].idle) == 60
            await burst("b")
            assert accepted == opened, "the second burst opened node connections anew"
            assert len(core.pools[0].idle) == 60
    finally:
        await svc.close()
        await node.kill()
