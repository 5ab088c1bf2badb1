"""The management listener where operators meet it: in the demo (on uvloop, as `confedge demo`
runs), and in front of proxy worker processes (proxy.workers > 1), whose health the listener
then checks itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from admin_support import get, metric, parse_metrics
from proxy_upstream import get as proxied_get

from confedge.config import parse_config
from confedge.demo import Demo, _print_banner
from confedge.nodesim import Conference, NodeSim
from confedge.runtime import Runtime
from ports import demo_port_base


def test_demo_names_the_status_page(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # `--port-base`: the demo's fixed ports moved as a whole, so that the test can run beside
    # `confedge demo` and other tests.
    base = demo_port_base()

    async def main() -> None:
        demo = Demo(tmp_path, port_base=base)
        await demo.start()
        try:
            info = demo.info()
            port = demo.runtime.admin.port
            assert port == base + 4
            assert info["status"] == f"http://127.0.0.1:{port}/status"
            json.dumps(info)  # still one JSON line
            _print_banner(info)
            j = (await get(port, "/status.json")).json()
            assert [n["node"] for n in j["proxy"]["nodes"]] == info["nodes"]
            assert j["turn"]["realm"] == "demo.confedge.test"
            assert j["config"]["turn"]["password"] == "****"
            assert info["turn"]["password"] not in (await get(port, "/status")).body.decode()
            # The demo's nodes are up once the proxy's first checks ran.
            for _ in range(60):
                j = (await get(port, "/status.json")).json()
                if j["proxy"]["nodes_up"] == 3:
                    break
                await asyncio.sleep(0.1)
            assert j["proxy"]["nodes_up"] == 3
        finally:
            await demo.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    banner = capfd.readouterr().out
    assert "  Status:      http://127.0.0.1:" in banner


async def _proxied_gets(port: int, n: int) -> list[int]:
    """n requests through the proxy, each on its own TLS connection (so both workers serve)."""
    return [(await proxied_get(port, "/api/client/v2/status")).status for _ in range(n)]


async def _wait_json(port: int, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(60):
        j: dict[str, Any] = (await get(port, "/status.json")).json()
        if ok(j):
            return j
        await asyncio.sleep(0.1)
    return j


async def test_workers_in_other_processes(tmp_path: Path) -> None:
    """With proxy.workers = 2 the node table comes from the listener's own status checks, the
    worker processes' memory is reported, and the workers' request counters are summed (and
    survive a worker's restart)."""
    nodes = [NodeSim([Conference("meet", None, None)], node_name=f"w{i}") for i in (1, 2)]
    for n in nodes:
        await n.start("127.0.0.1", 0)
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {
                "https_port": 0,
                "http_port": 0,
                "workers": 2,
                "nodes": [n.url for n in nodes],
                "health_interval": 0.2,
                "health_timeout": 1.0,
                "health_rise": 1,
                "health_fall": 1,
            },
            "turn": {"enabled": False},
            "management": {"port": 0},
        }
    )
    rt = Runtime(cfg)
    try:
        await rt.start()
        port = rt.admin.port
        for _ in range(50):
            j = (await get(port, "/status.json")).json()
            if j["proxy"]["nodes_up"] == 2:
                break
            await asyncio.sleep(0.1)
        p = j["proxy"]
        assert p["health_source"] == "management" and p["nodes_up"] == 2
        assert len(j["process"]["children"]) >= 2
        https = rt.proxy.https_port
        assert await _proxied_gets(https, 6) == [200] * 6
        # Each worker reports every STATS_INTERVAL (1 s) from its start: on a loaded machine
        # the one that served none of the six may not have reported yet when the counts arrive.
        j = await _wait_json(
            port,
            lambda j: (
                (j["proxy"]["requests"] or {}).get("total", 0) >= 6
                and j["proxy"].get("workers_reporting") == 2
            ),
        )
        p = j["proxy"]
        assert p["requests"]["total"] == 6 and p["requests"]["2xx"] == 6, p
        assert p["workers_reporting"] == 2
        assert [n["in_flight"] for n in p["nodes"]] == [0, 0]
        assert sum(n["idle_connections"] for n in p["nodes"]) >= 1  # kept alive to the nodes
        # A worker killed outright is restarted; what it had counted stays counted.
        victim = rt.proxy._procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        j = await _wait_json(
            port,
            lambda j: j["proxy"].get("workers_reporting") == 2 and rt.proxy._procs[0] is not victim,
        )
        assert j["proxy"]["requests"]["total"] == 6, j["proxy"]
        await _proxied_gets(https, 2)
        j = await _wait_json(port, lambda j: j["proxy"]["requests"]["total"] >= 8)
        assert j["proxy"]["requests"]["total"] == 8, j["proxy"]
        fam = parse_metrics((await get(port, "/metrics")).body.decode())
        assert metric(fam, "confedge_proxy_requests_total", code="2xx") == 8
        await nodes[1].close()
        for _ in range(50):
            j = (await get(port, "/status.json")).json()
            if j["proxy"]["nodes_up"] == 1:
                break
            await asyncio.sleep(0.1)
        states = {n["node"]: n["state"] for n in j["proxy"]["nodes"]}
        assert states == {nodes[0].url: "up", nodes[1].url: "down"}
        fam = parse_metrics((await get(port, "/metrics")).body.decode())
        assert metric(fam, "confedge_proxy_node_up", node=nodes[1].url) == 0
        assert metric(fam, "confedge_children_processes") >= 2
        assert metric(fam, "confedge_children_resident_memory_bytes") > 2 * 10_000_000
    finally:
        await rt.close()
        for n in nodes:
            await n.close()
