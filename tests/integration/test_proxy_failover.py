"""Failover and health: a node dies under load, maintenance drains, recovery, ip-hash affinity."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, get, proxy_config, read_response

from confedge.proxy.health import NodeState
from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def nodes():
    ups = [await Upstream(f"n{i}").start() for i in range(3)]
    yield ups
    for u in ups:
        await u.kill()


async def start(nodes, tmp_path, **kw) -> ProxyService:
    svc = ProxyService(proxy_config([u.address for u in nodes], str(tmp_path), **kw))
    await svc.start()
    return svc


async def _client(port: int, n: int, results: list[tuple[int, str]], body_size: int) -> None:
    """One keep-alive client alternating GET and POST, checking each echoed body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
    try:
        for i in range(n):
            if i % 2:
                body = (b"%d-" % i) * (body_size // 4)
                writer.write(
                    b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                    % len(body)
                    + body
                )
                r = await read_response(reader)
                ok = r.status == 200 and r.json()["body_sha"] == hashlib.sha256(body).hexdigest()
            else:
                writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
                r = await read_response(reader)
                ok = r.status == 200
            results.append(
                (r.status if ok else -r.status, r.json()["node"] if r.status == 200 else "")
            )
            await asyncio.sleep(0.002)
    finally:
        writer.close()


async def test_node_killed_under_load_costs_no_request(nodes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="confedge.proxy")
    svc = await start(nodes, tmp_path)
    try:
        results: list[tuple[int, str]] = []
        clients = [
            asyncio.create_task(_client(svc.https_port, 120, results, 20_000)) for _ in range(8)
        ]
        while len(results) < 150:  # kill n1 in the middle of the load
            await asyncio.sleep(0.01)
        await nodes[1].kill()
        killed_at = len(results)
        await asyncio.gather(*clients)
        assert len(results) == 8 * 120
        assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
        assert "n1" in [node for _, node in results[:killed_at]]
        assert len(results) - killed_at > 300  # and plenty of requests ran after it
        late = [node for _, node in results[-200:]]
        assert "n1" not in late
        assert svc.core.health.states[1] is NodeState.DOWN
        assert f"127.0.0.1:{nodes[1].port}: up -> down" in caplog.text
        # recovery: the node comes back on the same port and the status checks return it
        await nodes[1].start(nodes[1].port)
        for _ in range(100):
            if svc.core.health.states[1] is NodeState.UP:
                break
            await asyncio.sleep(0.05)
        assert svc.core.health.states[1] is NodeState.UP
        seen = {(await get(svc.https_port, "/echo")).json()["node"] for _ in range(6)}
        assert seen == {"n0", "n1", "n2"}
        assert "down -> up" in caplog.text
    finally:
        await svc.close()


async def test_5xx_answers_fail_over_post_included(nodes, tmp_path):
    svc = await start(nodes, tmp_path, health_interval=30)
    try:
        nodes[0].fail_status = 502
        nodes[1].fail_status = 500
        for _ in range(4):
            r = await get(svc.https_port, "/echo", method="POST", body=b"payload")
            assert r.status == 200 and r.json()["node"] == "n2"
            assert r.json()["body_len"] == 7
        # the POST reached n0 once at most: the passive failure (502) took it out of rotation
        assert len([x for x in nodes[0].requests() if x.method == "POST"]) == 1
        # every node failing: the self-retrying error page (the last node's 5xx is passed on)
        nodes[2].fail_status = 504
        r = await get(svc.https_port, "/echo")
        assert r.status in (500, 502, 503, 504)
    finally:
        await svc.close()


async def test_all_nodes_down_gives_retrying_page(nodes, tmp_path):
    svc = await start(nodes, tmp_path, health_interval=30)
    try:
        for u in nodes:
            await u.kill()
        r = await get(svc.https_port, "/webapp/")
        assert r.status == 502
        assert r.header("Retry-After") == "5"
        assert b'http-equiv="refresh"' in r.body and b"location.reload" in r.body
        r = await get(svc.https_port, "/webapp/")
        assert r.status == 503  # now known down: no attempt at all
    finally:
        await svc.close()


async def test_maintenance_drains_then_recovers(nodes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="confedge.proxy")
    svc = await start(nodes, tmp_path, health_interval=0.1, health_rise=2)
    try:
        nodes[2].maintenance = True
        for _ in range(100):
            if svc.core.health.states[2] is NodeState.MAINTENANCE:
                break
            await asyncio.sleep(0.05)
        assert svc.core.health.states[2] is NodeState.MAINTENANCE
        before = len(nodes[2].requests())
        seen = [(await get(svc.https_port, "/echo")).json()["node"] for _ in range(6)]
        assert "n2" not in seen and len(nodes[2].requests()) == before
        assert "up -> maintenance" in caplog.text
        nodes[2].maintenance = False
        for _ in range(100):
            if svc.core.health.states[2] is NodeState.UP:
                break
            await asyncio.sleep(0.05)
        assert svc.core.health.states[2] is NodeState.UP
    finally:
        await svc.close()


async def test_ip_hash_is_sticky_and_moves_only_the_dead_nodes_clients(nodes, tmp_path):
    svc = await start(
        nodes, tmp_path, balance="ip-hash", trusted_proxies=["127.0.0.0/8"], health_interval=30
    )
    try:

        async def node_for(ip: str) -> str:
            return (
                await get(svc.https_port, "/echo", headers=f"X-Forwarded-For: {ip}\r\n")
            ).json()["node"]

        ips = [f"198.51.100.{i}" for i in range(1, 31)]
        first = {ip: await node_for(ip) for ip in ips}
        assert len(set(first.values())) == 3  # spread over the nodes
        again = {ip: await node_for(ip) for ip in ips}
        assert again == first  # sticky
        await nodes[0].kill()
        after = {ip: await node_for(ip) for ip in ips}
        for ip in ips:
            if first[ip] != "n0":
                assert after[ip] == first[ip]  # clients of live nodes did not move
            else:
                assert after[ip] in ("n1", "n2")
    finally:
        await svc.close()


async def test_least_conn_prefers_idle_node(nodes, tmp_path):
    svc = await start(nodes, tmp_path, balance="least-conn", health_interval=30)
    try:
        nodes[0].delay = 0.5
        slow = asyncio.create_task(get(svc.https_port, "/echo"))
        await asyncio.sleep(0.1)
        quick = [(await get(svc.https_port, "/echo")).json()["node"] for _ in range(4)]
        assert "n0" not in quick
        assert (await slow).json()["node"] == "n0"
    finally:
        await svc.close()
