"""Headless Chromium joins a conference on the simulated node through its web page.

Real peers end to end: Chromium with a fake camera and microphone, the node's aiortc endpoint,
and confedge's TURN server in restricted mode between them (the node is the only media node).
What the browser itself reports decides: a wrong PIN shows "Invalid PIN"; with the right PIN
the call connects, ``getStats()`` counts decoded inbound video frames, and the selected
candidate pair's remote candidate is a relay candidate on the TURN server's relay address.
The page is loaded straight from the node, and through confedge's HTTPS proxy (SPEC §2).
A screenshot of each joined call goes to ``artifacts/nodesim_call_{direct,proxy}.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from chromium_driver import CHROMIUM, assert_loaded_over, require_browser, run_driver

pytest.importorskip("aiortc")

from confedge.config import parse_config
from confedge.nodesim import Conference, NodeSim, TurnInfo
from confedge.turn.service import TurnService, host_peer_entries

pytestmark = pytest.mark.chromium

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture
async def turn(tmp_path: Path) -> AsyncIterator[tuple[TurnService, tuple[int, int]]]:
    lo = random.randrange(35500, 35950, 50)
    cfg = parse_config(
        {
            "server": {
                "internal_address": "127.0.0.1",
                "domain": "confedge.test",
                "state_dir": str(tmp_path),
            },
            "proxy": {"enabled": False},
            "turn": {
                "mode": "restricted",
                "port": 0,
                "tls_port": 0,  # the default 5349 is the demo's turns: port
                "relay_ports": f"{lo}-{lo + 49}",
                "username": "nodeuser",
                "password": "node-secret",
                "media_nodes": ["127.0.0.1/32"],
                # aiortc/Chromium on this host offer its addresses as candidates.
                "allowed_peers": ["127.0.0.0/8", *host_peer_entries()],
            },
        }
    )
    service = TurnService(cfg)
    await service.start()
    try:
        yield service, (lo, lo + 49)
    finally:
        await service.close()


@contextlib.asynccontextmanager
async def https_proxy(tmp_path: Path, node: NodeSim) -> AsyncIterator[str]:
    """confedge's HTTPS proxy in front of the node (self-signed certificate, one worker)."""
    try:
        from confedge.proxy.service import ProxyService
    except ImportError:
        pytest.skip("confedge's HTTPS proxy (confedge.proxy.service) is not in the tree yet")
    cfg = parse_config(
        {
            "server": {
                "internal_address": "127.0.0.1",
                "domain": "confedge.test",
                "state_dir": str(tmp_path / "proxy-state"),
            },
            "proxy": {
                "https_port": 0,
                "http_port": 0,
                "workers": 1,
                "nodes": [node.url],
            },
            "turn": {"enabled": False},
        }
    )
    proxy = ProxyService(cfg)
    await proxy.start()
    try:
        yield f"https://127.0.0.1:{proxy.https_port}"
    finally:
        await proxy.close()


@pytest.mark.parametrize("path", ["direct", "proxy"])
async def test_join_with_pin_call_through_turn(
    turn: tuple[TurnService, tuple[int, int]], path: str, tmp_path: Path
) -> None:
    """The browser reaches the node directly, or through confedge's HTTPS proxy (SPEC §2)."""
    node_bin = require_browser()
    service, (relay_lo, relay_hi) = turn
    info = service.info()
    tinfo = TurnInfo(info["host"], info["port"], info["username"], info["password"])
    sim = NodeSim([Conference("meet", "1234", "5678")], turn=tinfo, node_name="e2e-node")
    await sim.start("127.0.0.1", 0)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / f"nodesim_call_{path}.png"
    try:
        async with contextlib.AsyncExitStack() as stack:
            base = sim.url
            if path == "proxy":
                base = await stack.enter_async_context(https_proxy(tmp_path, sim))
            result = await run_driver(
                node_bin,
                {
                    "url": f"{base}/webapp/",
                    "alias": "meet",
                    "name": "Chromium",
                    "pin": "1234",
                    "wrongPin": "0000",
                    "chromium": CHROMIUM,
                    "screenshot": str(shot),
                    "timeoutMs": 40000,
                    "ignoreHttpsErrors": path == "proxy",
                },
                timeout=70,
            )
            check_result(result, relay_lo, relay_hi)
            # The web app (page, script, style sheet, API calls, event stream) over HTTP/2
            # through the proxy (proxy.http2 is on by default); straight from the node, 1.1.
            assert_loaded_over(result, base, "h2" if path == "proxy" else "http/1.1")
        # The media really crossed confedge's TURN server, both ways.
        stats = service.stats()
        assert stats["bytes_to_peer"] > 10_000 and stats["bytes_to_client"] > 10_000, stats
        # Leaving released the token: the node has nobody left.
        for _ in range(50):
            if not sim.state.participants:
                break
            await asyncio.sleep(0.1)
        assert sim.state.participants == {}
        assert shot.stat().st_size > 10_000
    finally:
        await sim.close()


def check_result(result: dict[str, Any], relay_lo: int, relay_hi: int) -> None:
    diag = json.dumps(result, indent=1)[-4000:]
    assert result["ok"], diag
    # Wrong PIN: the node's 403 "Invalid PIN" reached the user, visibly.
    assert result["wrongPinError"] == "Invalid PIN", diag
    assert result["wrongPinVisible"] is True
    assert result["wrongPinState"] == "error"
    assert result["errorHiddenAfterJoin"] is True
    # Media: the browser decoded echoed video frames.
    assert result["framesDecoded"] > 0, diag
    assert result["remoteVideo"]["width"] > 0, diag
    # The node offered only its relayed address...
    cands = result["answerCandidates"]
    assert cands and all(" typ relay " in c for c in cands), cands
    relay_ports = {int(c.split()[5]) for c in cands}
    # ...and the browser's selected pair goes to it: a relay candidate on the TURN relay.
    remote = result["pair"]["remote"]
    assert remote["candidateType"] == "relay", diag
    assert remote["address"] == "127.0.0.1", diag
    assert relay_lo <= remote["port"] <= relay_hi and remote["port"] in relay_ports, diag
    assert result["pair"]["state"] == "succeeded"
    assert any(p.startswith("Chromium (you) [chair]") for p in result["participants"]), diag
