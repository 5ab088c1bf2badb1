"""Conference sessions across nodes: a token is valid only on the node that issued it.

A node in maintenance refuses new joins but keeps its calls (as a real node does); the proxy
takes it out of rotation for new requests, and a token-bearing request that another node
refuses (403) is retried on the nodes that still hold sessions.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from confedge.config import parse_config
from confedge.nodesim import Conference, NodeSim
from confedge.proxy.service import ProxyService
from ports import spare_port

API = "/api/client/v2/conferences/open"


async def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(head.encode() + b"\r\n" + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    return status, hdrs, json.loads(payload) if payload else None


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    confs = [Conference("open"), Conference("meet", "1234")]
    nodes = [NodeSim(conferences=confs, node_name=f"node{i}") for i in (1, 2)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    port = spare_port()
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {
                "https_port": port,
                "http_port": 0,
                "workers": 1,
                "balance": "ip-hash",
                "nodes": [f"http://127.0.0.1:{n.port}" for n in nodes],
                "health_interval": 0.2,
                "health_rise": 1,
                "health_fall": 1,
            },
            "turn": {"enabled": False},
            "management": {"enabled": False},
        }
    )
    proxy = ProxyService(cfg)
    await proxy.start()
    try:
        yield port, nodes, proxy
    finally:
        await proxy.close()
        for node in nodes:
            await node.close()


async def _wait_state(proxy: ProxyService, index: int, state: str) -> None:
    for _ in range(100):
        if proxy.core.health.states[index].value == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"node {index} never became {state}")


async def test_sessions_survive_their_node_entering_maintenance(cluster: Any) -> None:
    port, nodes, proxy = cluster
    join = json.dumps({"display_name": "Alice"}).encode()
    status, hdrs, body = await _request(
        port, "POST", f"{API}/request_token", {"Content-Type": "application/json"}, join
    )
    assert status == 200
    token = body["result"]["token"]
    home = hdrs["x-confedge-node"]
    home_index = [n.node_name for n in nodes].index(home)

    nodes[home_index].set_maintenance(True)
    await _wait_state(proxy, home_index, "maintenance")

    # A new join goes to the other node.
    status, hdrs, _ = await _request(
        port, "POST", f"{API}/request_token", {"Content-Type": "application/json"}, join
    )
    assert status == 200 and hdrs["x-confedge-node"] != home

    # The session on the node in maintenance goes on: refresh (token header) and a GET with
    # ?token= (as EventSource sends it) reach it after the other node refused the token.
    status, hdrs, body = await _request(port, "POST", f"{API}/refresh_token", {"token": token})
    assert (status, hdrs["x-confedge-node"]) == (200, home)
    token = body["result"]["token"]
    status, hdrs, body = await _request(port, "GET", f"{API}/participants?token={token}")
    assert (status, hdrs["x-confedge-node"]) == (200, home)
    assert [p["display_name"] for p in body["result"]] == ["Alice"]

    # A token no node knows is refused after every node holding sessions said so.
    status, _, body = await _request(port, "POST", f"{API}/refresh_token", {"token": "forged"})
    assert (status, body) == (403, {"status": "success", "result": "Invalid token"})

    # A node that is down is not asked.
    await nodes[home_index].close()
    await _wait_state(proxy, home_index, "down")
    status, _, _ = await _request(port, "POST", f"{API}/refresh_token", {"token": token})
    assert status == 403


async def test_a_token_header_does_not_buy_extra_pin_guesses(cluster: Any) -> None:
    """request_token is never retried on a 403: each retry would be a PIN guess on another node."""
    port, _, proxy = cluster
    seen: list[str | None] = []

    class Sink:
        def log(self, *args: Any) -> None:
            seen.append(args[8])  # upstream_status, e.g. "403" or "403, 403"

    proxy.core.access_log = Sink()
    join = json.dumps({"display_name": "Mallory"}).encode()
    headers = {"Content-Type": "application/json", "pin": "0000", "token": "anything"}
    status, _, body = await _request(
        port, "POST", "/api/client/v2/conferences/meet/request_token", headers, join
    )
    assert (status, body) == (403, {"status": "success", "result": "Invalid PIN"})
    assert seen == ["403"]  # one node, one guess
