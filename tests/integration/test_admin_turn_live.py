"""TURN's live figures on the management listener (issue 15): per-allocation counters that grow
while the allocation lives, relay throughput, answers by cause, the lifetime histogram and the
status page's busiest allocations, scraped with prometheus_client's own text parser.

A runtime with TURN and the management listener only; aioice relays a steady flow to a UDP peer
for a few seconds (the service samples the data plane once a second).  Runs on the data plane
the suite selects (CONFEDGE_DATAPLANE).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from admin_support import get, metric, parse_metrics
from aioice.turn import create_turn_endpoint

from confedge.config import parse_config
from confedge.runtime import Runtime
from confedge.turn.testing import UdpTurnClient

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[Runtime]:
    cfg = parse_config(
        {
            "server": {"domain": "live.test", "state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {
                "port": 0,
                "tls_port": 0,
                "relay_ports": "36200-36299",
                "username": "turnuser",
                "password": "turnpass",
                "media_nodes": ["127.0.0.0/8"],
                "allowed_peers": ["127.0.0.0/8"],
                "bandwidth_per_allocation": "2Mbit",
            },
            "management": {"port": 0, "networks": ["127.0.0.1/32"]},
        }
    )
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.n = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.n += 1


def _samples(text: str, name: str) -> list[Any]:
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    return list(fams[name].samples) if name in fams else []


async def test_live_turn_metrics_and_status_page(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    assert rt.admin is not None and rt.turn is not None
    admin = int(rt.admin.port)
    peer_t, _ = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    peer = peer_t.get_extra_info("sockname")
    # A wrong password first: 401 by cause.
    wrong = UdpTurnClient(("127.0.0.1", rt.turn.port), "turnuser", "nope", "live.test")
    try:
        msg = await wrong.allocate()
        assert msg is not None
    finally:
        wrong.close()
    turn_t, _ = await create_turn_endpoint(
        _Sink,
        server_addr=("127.0.0.1", rt.turn.port),
        username="turnuser",
        password="turnpass",
        transport="udp",
    )
    try:
        scrapes: list[str] = []
        for second in range(4):
            for _ in range(50):  # 50 x 500 bytes per ~second: 25 kB/s, under the cap
                turn_t.sendto(b"m" * 500, peer)
                await asyncio.sleep(0.02)
            if second >= 2:
                scrapes.append((await get(admin, "/metrics")).body.decode())
        page = (await get(admin, "/status")).body.decode()
        j = (await get(admin, "/status.json")).json()
    finally:
        turn_t.close()
        peer_t.close()

    # Per-allocation counters while the allocation lives, growing between two scrapes.
    grown = []
    for text in scrapes:
        parse_metrics(text)  # our own strict reader too
        rows = [
            s
            for s in _samples(text, "confedge_turn_allocation_bytes")
            if s.labels["direction"] == "to_peer" and s.name.endswith("_total")
        ]
        assert len(rows) == 1, rows
        assert rows[0].labels["user"] == "turnuser"
        grown.append(rows[0].value)
    assert 0 < grown[0] < grown[1]
    last = scrapes[-1]
    fam = parse_metrics(last)
    through = metric(fam, "confedge_turn_relay_throughput_bytes_per_second", direction="to_peer")
    assert 10_000 < through < 60_000, through  # ~25 kB/s
    answers = {
        (s.labels["code"], s.labels["cause"]): s.value
        for s in _samples(last, "confedge_turn_error_responses")
        if s.name.endswith("_total")
    }
    assert answers[("401", "bad-credentials")] >= 1
    assert answers[("401", "no-credentials")] >= 2  # the wrong client's and aioice's first try
    assert metric(fam, "confedge_turn_draining") == 0

    # The status page: throughput and the allocation among the busiest, with its user.
    assert "Busiest allocations now" in page and "turnuser" in page
    assert "relaying now" in page and "kbit/s" in page
    top = j["turn"]["live"]["top"]
    assert len(top) == 1 and top[0]["rate_to_peer"] > 10_000
    assert j["turn"]["live"]["bandwidth"]["per_allocation"] == 250_000

    # After the allocation ends (aioice refreshes to 0 on close) the histogram counts it.
    for _ in range(100):
        if rt.turn.stats()["allocations"] == 0:
            break
        await asyncio.sleep(0.05)
    text = (await get(admin, "/metrics")).body.decode()
    hist = {s.name: s for s in _samples(text, "confedge_turn_allocation_lifetime_seconds")}
    assert hist["confedge_turn_allocation_lifetime_seconds_count"].value == 1
    assert 3 < hist["confedge_turn_allocation_lifetime_seconds_sum"].value < 60
