"""Issue 16: Chromium loads the conferencing web app through confedge over HTTP/2.

The real web app (the simulated node's /webapp/: page, style sheet, script, the client REST API
calls and the conference's server-sent event stream read by the app's own EventSource), served by
a NodeSim behind confedge's HTTPS proxy. Headless Chromium joins a conference and leaves; then
the browser's Resource Timing says which protocol each load used (``nextHopProtocol``): ``h2``
for every one of them with ``proxy.http2`` on (the default), ``http/1.1`` with it off. confedge's
access log says the same from the server's side (``HTTP/2.0`` / ``HTTP/1.1`` request lines), so
the loads really crossed the proxy. The synthetic-page SSE timing test is test_proxy_chromium.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from chromium_driver import CHROMIUM, assert_loaded_over, require_browser, run_driver
from proxy_e2e_support import running_proxy, wait_healthy

pytest.importorskip("aiortc")

from confedge.nodesim import Conference, NodeSim

pytestmark = pytest.mark.chromium

DRIVER = Path(__file__).resolve().parent / "webapp_protocol_driver.mjs"
PORTS = (32700, 32750)
API = "/api/client/v2/conferences/meet/"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
async def test_webapp_protocol_through_proxy(tmp_path: Path, http2: bool) -> None:
    node_bin = require_browser()
    sim = NodeSim([Conference("meet", "1234", "5678")], node_name="e2e-node")
    await sim.start("127.0.0.1", 0)
    try:
        async with running_proxy(tmp_path, [sim.port], PORTS, http2=http2) as info:
            origin = info["https"].rstrip("/")
            await wait_healthy(origin)
            cfg = {
                "url": f"{origin}/webapp/?alias=meet",
                "name": "Chromium",
                "pin": "1234",
                "chromium": CHROMIUM,
                "timeoutMs": 20000,
            }
            out = await run_driver(node_bin, cfg, 45, driver=DRIVER)
            # Leaving released the token through the proxy: the node has nobody left.
            for _ in range(50):
                if not sim.state.participants:
                    break
                await asyncio.sleep(0.1)
            assert sim.state.participants == {}
    finally:
        await sim.close()
    diag = json.dumps(out, indent=1)[-4000:]
    assert out["ok"], diag
    assert out["status"] == 200 and out["state"] == "idle", diag
    assert any(p.startswith("Chromium (you) [chair]") for p in out["roster"]), diag
    proto = "h2" if http2 else "http/1.1"

    # The page itself (performance.getEntriesByType('navigation')[0].nextHopProtocol) and every
    # subresource from the proxy's origin: the app's style sheet and script, its API calls
    # (fetch) and its EventSource's event stream.
    assert out["nav"]["name"] == cfg["url"], diag
    paths = assert_loaded_over(out, origin, proto)
    for wanted in (
        "/webapp/style.css",
        "/webapp/app.js",
        API + "request_token",
        API + "events",
        API + "release_token",
    ):
        assert wanted in paths, (wanted, sorted(paths))
    assert any(p.startswith(API + "participants/") and p.endswith("/calls") for p in paths), paths
    print(f"{len(paths) + 1} loads over {proto}: /webapp/?alias=meet, {sorted(paths)}")

    # The server's side: confedge's access log has each of these requests in that version.
    version = "HTTP/2.0" if http2 else "HTTP/1.1"
    log = (tmp_path / "access.log").read_text()
    for request in (
        "GET /webapp/?alias=meet",
        "GET /webapp/app.js",
        f"POST {API}request_token",
        f"GET {API}events?token=",
    ):
        lines = [ln for ln in log.splitlines() if f'"{request}' in ln]
        assert lines, (request, log[-3000:])
        assert all(f' {version}" 200 ' in ln for ln in lines), lines
