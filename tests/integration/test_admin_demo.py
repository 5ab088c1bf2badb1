"""The management listener where operators meet it: in the demo (on uvloop, as `confedge demo`
runs), and in front of proxy worker processes (proxy.workers > 1), whose health the listener
then checks itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import uvloop
from admin_support import get, metric, parse_metrics

import confedge.demo as demo_mod
from confedge.config import parse_config
from confedge.demo import Demo, _print_banner
from confedge.nodesim import Conference, NodeSim
from confedge.runtime import Runtime


def test_demo_names_the_status_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The demo's fixed ports, moved into this area's range / ephemeral ports so that the test
    # can run beside `confedge demo` and other tests.
    monkeypatch.setattr(demo_mod, "NODE_PORTS", (36201, 36202, 36203))

    async def main() -> None:
        demo = Demo(tmp_path)
        c = demo.cfg
        demo.cfg = c.model_copy(
            update={
                "proxy": c.proxy.model_copy(update={"https_port": 0, "http_port": 0}),
                "turn": c.turn.model_copy(
                    update={"port": 0, "tls_port": 0, "relay_ports": "36300-36399"}
                ),
                "management": c.management.model_copy(update={"port": 0}),
            }
        )
        demo.runtime = Runtime(demo.cfg)
        await demo.start()
        try:
            info = demo.info()
            port = demo.runtime.admin.port
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


async def test_workers_in_other_processes(tmp_path: Path) -> None:
    """With proxy.workers = 2 the node table comes from the listener's own status checks, and
    the worker processes' memory is reported."""
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
        assert p["requests"] is None  # counted in the workers, out of reach: absent, not 0
        assert len(j["process"]["children"]) >= 2
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
        assert "confedge_proxy_requests_total" not in fam
    finally:
        await rt.close()
        for n in nodes:
            await n.close()
