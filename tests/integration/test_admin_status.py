"""The management listener in a full runtime on loopback: TURN traffic from aioice, a guard ban
from real wrong PINs through the proxy, a node that stops, the ACL, and Prometheus text.

One runtime per test (guard, TURN, proxy with two simulated nodes, management), all on ephemeral
ports except TURN relays (36100-36199).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from admin_support import get, metric, parse_metrics
from aioice.turn import create_turn_endpoint

from confedge.config import parse_config
from confedge.nodesim import Conference, NodeSim
from confedge.runtime import Runtime
from confedge.tls.certs import generate_self_signed

TURN_PASSWORD = "Tp-8c1e57-secret"  # must never appear in any output


@dataclass
class Stack:
    rt: Runtime
    nodes: list[NodeSim]

    @property
    def port(self) -> int:
        assert self.rt.admin is not None
        return int(self.rt.admin.port)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    nodes = [NodeSim([Conference("meet", "1234", None)], node_name=f"n{i}") for i in (1, 2)]
    for n in nodes:
        await n.start("127.0.0.1", 0)
    cfg = parse_config(
        {
            "server": {
                "hostname": "edge",
                "domain": "admin.test",
                "internal_address": "127.0.0.1",
                "state_dir": str(tmp_path),
            },
            "proxy": {
                "https_port": 0,
                "http_port": 0,
                "workers": 1,
                "nodes": [n.url for n in nodes],
                "health_interval": 0.2,
                "health_timeout": 1.0,
                "health_rise": 1,
                "health_fall": 1,
            },
            "turn": {
                "port": 0,
                "tls_port": 0,
                "relay_ports": "36100-36199",
                "username": "turnuser",
                "password": TURN_PASSWORD,
                "media_nodes": ["127.0.0.0/8"],
                "allowed_peers": ["127.0.0.0/8"],
            },
            "guard": {"enabled": True, "store": "memory", "maxretry": 3, "ignore": []},
            "management": {"port": 0, "networks": ["127.0.0.1/32"]},
        }
    )
    rt = Runtime(cfg)
    await rt.start()
    try:
        yield Stack(rt, nodes)
    finally:
        await rt.close()
        for n in nodes:
            await n.close()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


def _assert_no_secret(*bodies: bytes) -> None:
    for body in bodies:
        assert TURN_PASSWORD.encode() not in body


async def test_status_shows_turn_allocation_and_relayed_bytes(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    turn = stack.rt.turn
    peer_t, peer = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    turn_t, client = await create_turn_endpoint(
        _Collector,
        server_addr=("127.0.0.1", turn.port),
        username="turnuser",
        password=TURN_PASSWORD,
        transport="udp",
    )
    try:
        for _ in range(7):
            turn_t.sendto(b"x" * 100, peer_addr)
            _, src = await asyncio.wait_for(peer.received.get(), 5)
            peer_t.sendto(b"y" * 60, src)
            await asyncio.wait_for(client.received.get(), 5)

        j = (await get(stack.port, "/status.json")).json()
        t = j["turn"]
        assert t["enabled"] and t["mode"] == "restricted"
        assert t["allocations"] == 1
        assert (t["packets_to_peer"], t["bytes_to_peer"]) == (7, 700)
        assert (t["packets_to_client"], t["bytes_to_client"]) == (7, 420)
        assert {x["transport"] for x in t["listeners"]} == {"udp", "tcp"}
        assert t["relay"]["ports"] == "36100-36199"
        assert j["config"]["turn"]["password"] == "****"

        page = await get(stack.port, "/status")
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        assert b'http-equiv="refresh"' in page.body
        assert b"<h2>TURN</h2>" in page.body and b"700 B (700)" in page.body

        metrics = await get(stack.port, "/metrics")
        fam = parse_metrics(metrics.body.decode())
        assert metric(fam, "confedge_turn_allocations") == 1
        assert metric(fam, "confedge_turn_relayed_bytes_total", direction="to_peer") == 700
        assert metric(fam, "confedge_turn_relayed_bytes_total", direction="to_client") == 420
        assert metric(fam, "confedge_turn_relayed_packets_total", direction="to_client") == 7
        # The data plane: the native one's relay threads and drops; the Python one has neither.
        dp = t["dataplane"]
        if dp["backend"] == "native":
            assert metric(fam, "confedge_turn_relay_threads") == dp["threads"] >= 1
            assert metric(fam, "confedge_turn_relay_threads_folded") in (0, 1)
            # requests on the control socket: the kernel here takes the steering program
            assert dp["steered"] == 1 and metric(fam, "confedge_turn_requests_steered") == 1
            assert b"requests on the control socket" in page.body
            drops = "confedge_turn_dataplane_dropped_packets_total"
            assert metric(fam, drops, reason="kernel_drops_listener") == 0
        else:
            assert dp == {"backend": "python"}
            assert "confedge_turn_relay_threads" not in fam
        assert b"data plane" in page.body
        _assert_no_secret(
            page.body, metrics.body, json_body := (await get(stack.port, "/status.json")).body
        )
        assert b"turnuser" in json_body  # the user name is not a secret; the password is
    finally:
        turn_t.close()
        peer_t.close()
    # aioice refreshes to 0 on close: the page follows.
    for _ in range(100):
        if (await get(stack.port, "/status.json")).json()["turn"]["allocations"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await get(stack.port, "/status.json")).json()["turn"]["allocations"] == 0


async def _wrong_pin(https_port: int, source: str) -> int:
    """POST request_token with a wrong PIN through the proxy, from `source`; the status code."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", https_port, ssl=ctx, local_addr=(source, 0)
    )
    body = b'{"display_name": "Mallory"}'
    writer.write(
        b"POST /api/client/v2/conferences/meet/request_token HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\npin: 0000\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(data.split(b" ", 2)[1])


async def _wait_nodes_up(stack: Stack) -> None:
    for _ in range(100):
        j = (await get(stack.port, "/status.json")).json()
        if all(n["state"] == "up" for n in j["proxy"]["nodes"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("nodes never up")


async def test_guard_ban_appears(stack: Stack) -> None:
    await _wait_nodes_up(stack)
    https = stack.rt.proxy.https_port
    codes = [await _wrong_pin(https, "127.0.0.3") for _ in range(3)]
    assert codes == [403, 403, 403]
    assert await _wrong_pin(https, "127.0.0.3") == 429  # banned now: answered by confedge

    j = (await get(stack.port, "/status.json")).json()
    g = j["guard"]
    assert g["enabled"] and g["bans_total"] == 1
    ban = g["bans"][0]
    assert ban["source"] == "127.0.0.3"
    assert ban["count"] == 1 and ban["failures"] >= 3
    assert 0 < ban["remaining"] <= 300 * 1.1 + 1  # bantime with up to 10 % jitter
    assert ban["reason"]
    # The proxy counted every answer, its own refusal included.
    assert j["proxy"]["requests"]["total"] >= 4
    assert j["proxy"]["requests"]["4xx"] >= 4

    page = (await get(stack.port, "/status")).body.decode()
    assert "<code>127.0.0.3</code>" in page
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    assert metric(fam, "confedge_guard_bans") == 1
    assert metric(fam, "confedge_guard_enabled") == 1
    assert metric(fam, "confedge_proxy_requests_total", code="4xx") >= 4


async def test_node_down_after_it_stops(stack: Stack) -> None:
    await _wait_nodes_up(stack)
    n1, n2 = stack.nodes
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    assert metric(fam, "confedge_proxy_node_up", node=n2.url) == 1
    await n2.close()
    for _ in range(100):
        j = (await get(stack.port, "/status.json")).json()
        states = {n["node"]: n for n in j["proxy"]["nodes"]}
        if states[n2.url]["state"] == "down":
            break
        await asyncio.sleep(0.05)
    assert states[n2.url]["state"] == "down"
    assert states[n2.url]["reason"]  # why it went down, e.g. "1 status checks failed: ..."
    assert states[n2.url]["since"] is not None
    assert states[n1.url]["state"] == "up"
    assert j["proxy"]["health_source"] == "proxy"
    assert j["proxy"]["nodes_up"] == 1

    page = (await get(stack.port, "/status")).body.decode()
    assert '<span class="down">down</span>' in page and '<span class="up">up</span>' in page
    assert "<th>in flight</th>" in page  # the in-process proxy's counters
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    assert metric(fam, "confedge_proxy_node_up", node=n2.url) == 0
    assert metric(fam, "confedge_proxy_node_up", node=n1.url) == 1
    assert metric(fam, "confedge_proxy_node_state", node=n2.url, state="down") == 1


async def test_acl_refuses_source_outside_networks(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    from admin_support import raw

    request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with caplog.at_level(logging.WARNING, logger="confedge.admin"):
        for _ in range(2):
            try:
                data = await raw(stack.port, request, local="127.0.0.2")
            except OSError:  # reset, or "not connected" when half-closing after the abort
                data = b""
            assert data == b""  # closed at accept: not one byte of an answer
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert refusals == [
        "management: refused connection from 127.0.0.2: source not in management.networks"
    ]
    # An allowed source still gets through, and sees the refusals counted.
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    assert metric(fam, "confedge_management_refused_connections_total") == 2


async def test_metrics_are_prometheus_text(stack: Stack) -> None:
    await _wait_nodes_up(stack)
    reply = await get(stack.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = reply.body.decode()
    fam = parse_metrics(text)
    for name in (
        "confedge_build_info",
        "confedge_uptime_seconds",
        "confedge_turn_allocations",
        "confedge_proxy_node_up",
        "confedge_guard_bans",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ):
        assert name in fam, name
    assert metric(fam, "process_resident_memory_bytes") > 10_000_000
    prom = pytest.importorskip("prometheus_client.parser")
    parsed = {f.name: f for f in prom.text_string_to_metric_families(text)}
    # prometheus_client strips the _total suffix from counter family names.
    assert parsed["confedge_turn_relayed_bytes"].type == "counter"
    assert parsed["confedge_proxy_node_up"].type == "gauge"
    assert len(parsed["confedge_proxy_node_up"].samples) == 2


async def test_certificate_expiry_on_the_page_and_in_metrics(stack: Stack, tmp_path: Path) -> None:
    """The generated certificate's expiry is there at once; when the file is replaced (what
    a renewal's `confedge cert install` does), the next scrape shows the new one."""
    label = "default (generated, self-signed)"
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    name = "confedge_tls_certificate_expiry_timestamp_seconds"
    subject = "CN=edge.admin.test"
    first = metric(fam, name, certificate=label, subject=subject)
    assert 360 * 86400 < first - time.time() < 366 * 86400  # a year, as generated
    page = (await get(stack.port, "/status")).body.decode()
    assert "<h2>Certificates</h2>" in page and "edge.admin.test" in page
    # A certificate about to expire, written over the generated one.
    path = tmp_path / "tls" / "selfsigned.pem"
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    pem = generate_self_signed("edge.admin.test", [], soon - datetime.timedelta(days=10), days=10)
    path.write_bytes(pem)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # (a new mtime for sure)
    fam = parse_metrics((await get(stack.port, "/metrics")).body.decode())
    second = metric(fam, name, certificate=label, subject=subject)
    assert abs(second - soon.timestamp()) < 5, (second, soon)
    page = (await get(stack.port, "/status")).body.decode()
    assert '<span class="down">in 2d 23h</span>' in page or '<span class="down">in 3d' in page
