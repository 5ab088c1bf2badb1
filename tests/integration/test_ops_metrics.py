"""Proxy live metrics (issue 15): per-node latency histograms and guard decisions in /metrics,
read with prometheus_client's parser, and the status page naming the node each proxied session
is on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ops_support import admin_get, edge_config, get, metrics, sse, start_edge, status
from proxy_upstream import Upstream


async def test_latency_histograms_guard_decisions_and_sessions(tmp_path: Path) -> None:
    fast, slow = await Upstream("fast").start(), await Upstream("slow", delay=0.3).start()
    text = edge_config(tmp_path, nodes=[fast.address, slow.address])
    text += "\n[guard]\nenabled = true\nmaxretry = 2\n"
    edge = start_edge(tmp_path, text)
    try:
        for _ in range(10):
            assert (await get(edge.https, "/x"))[0] == 200
        pin = "/api/client/v2/conferences/meet/request_token"
        answers = [
            (await get(edge.https, pin, method="POST", extra="pin: 9\r\n", source="127.0.0.3"))[0]
            for _ in range(3)
        ]
        assert answers[-1] == 429, answers
        stream = asyncio.create_task(sse(edge.https, n=30, interval=0.1))
        await asyncio.sleep(1.0)

        fams = await asyncio.to_thread(metrics, edge.admin)
        hist = fams["confedge_proxy_node_latency_seconds"]
        counts = {
            s.labels["node"]: s.value
            for s in hist
            if s.name == "confedge_proxy_node_latency_seconds_count"
        }
        sums = {
            s.labels["node"]: s.value
            for s in hist
            if s.name == "confedge_proxy_node_latency_seconds_sum"
        }
        assert set(counts) == {fast.address, slow.address}, counts
        assert sum(counts.values()) >= 12  # 10 requests, the PIN guesses, the stream
        # The slow node's answers took at least its delay: the sum shows it, its buckets too.
        assert sums[slow.address] >= 0.3 * counts[slow.address] * 0.9
        under_100ms = {
            s.labels["node"]: s.value
            for s in hist
            if s.name == "confedge_proxy_node_latency_seconds_bucket" and s.labels["le"] == "0.1"
        }
        assert under_100ms[slow.address] == 0
        assert under_100ms[fast.address] > 0

        decisions = {s.labels["decision"]: s.value for s in fams["confedge_proxy_guard_decisions"]}
        assert decisions.get("pin_failure") == 2, decisions
        assert decisions.get("banned") == 1, decisions
        assert decisions.get("pin_admitted", 0) >= 2, decisions

        snap = await asyncio.to_thread(status, edge.admin)
        (row,) = [s for s in snap["proxy"]["sessions"] if s["kind"] == "sse"]
        netloc = row["node"]
        assert netloc in (fast.address[7:], slow.address[7:])
        page = (await asyncio.to_thread(admin_get, edge.admin, "/status")).decode()
        assert "Sessions on nodes" in page and netloc in page and "/sse" in page
        assert len(await stream) == 30
    finally:
        edge.stop()
        await fast.kill()
        await slow.kill()
