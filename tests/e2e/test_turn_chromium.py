"""Headless Chromium relays a WebRTC DataChannel through confedge's TURN server.

What is exercised: Chromium's own TURN client (the one in every browser that joins a conference)
against confedge, over UDP and over TCP to the server, with ``iceTransportPolicy: "relay"`` and
confedge as the only ICE server. Two RTCPeerConnections in one page each allocate on confedge,
so the DataChannel message can only travel client -> relay -> relay -> client, and getStats must
show a succeeded, nominated pair whose local and remote candidates are both of type "relay" on
relay ports confedge handed out.

Which mode, and why: permissive mode with a TURN REST credential (SPEC §3). That is the path a
browser really takes: browsers are never on the restricted-mode safelist (that is for
conferencing nodes), they receive a time-limited ``<expiry>:<user>`` / HMAC-SHA1 credential from
the web app. The credential is derived here from the shared secret with the formula, not with
confedge's helper, so a wrong derivation in confedge would fail this test. ``allowed_peers``
lists 127.0.0.0/8 because the peer of each allocation is the other allocation's loopback relay
address, which permissive mode refuses by default (as coturn does without
``--allow-loopback-peers``). A third case checks the refusal: in restricted mode a browser that
is not a listed media node gets no relay candidate at all.

Chromium needs no special flags for a loopback TURN server: it sends to 127.0.0.1 from the
loopback interface and accepts 127.0.0.1 relay candidates (checked on Chromium 156 and coturn
4.6). The flags used are the project's standard headless set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from confedge.config import Config, parse_config
from confedge.turn.service import TurnService

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CONFEDGE_CHROMIUM", "/usr/bin/chromium")
DRIVER = HERE / "turn_chromium_driver.mjs"
# Relay ports for this test: disjoint from the benchmark's (bench/turn uses 41000-44599).
RELAY_LO, RELAY_HI = 44600, 44999
SECRET = "chromium-e2e-secret"

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"chromium not installed at {CHROMIUM}"),
]


def _config(tmp_path: Path, mode: str, **extra: Any) -> Config:
    turn: dict[str, Any] = {
        **extra,
        "enabled": True,
        "mode": mode,
        "port": 0,
        "tls_port": 0,
        "relay_ports": f"{RELAY_LO}-{RELAY_HI}",
        "allowed_peers": ["127.0.0.0/8"],
    }
    if mode == "permissive":
        turn["secrets"] = [SECRET]
    else:
        # A conferencing node's address, not the browser's: Chromium must be refused.
        turn |= {"username": "node", "password": "node-password", "media_nodes": ["10.0.0.11"]}
    return parse_config(
        {
            "server": {
                "domain": "e2e.test",
                "internal_address": "127.0.0.1",
                "state_dir": str(tmp_path),
            },
            "proxy": {"enabled": False},
            "turn": turn,
        }
    )


def rest_credential(secret: str, user: str, ttl: int = 600) -> tuple[str, str]:
    """TURN REST API credential (SPEC §3): "<expiry>:<user>", base64(HMAC-SHA1(secret, name))."""
    username = f"{int(time.time()) + ttl}:{user}"
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


async def _chromium(
    url: str, username: str, credential: str, timeout_ms: int, follow_ups: int = 0
) -> dict[str, Any]:
    """Run the page in headless Chromium (via playwright-core) and return its JSON report;
    `follow_ups` more DataChannel messages after the first (turn_chromium_driver.mjs)."""
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail(
            "playwright-core is missing: run `npm install --prefix tests/e2e` "
            "(needs node and npm; Chromium itself is Debian's /usr/bin/chromium)"
        )
    arg = json.dumps(
        {
            "url": url,
            "username": username,
            "credential": credential,
            "timeoutMs": timeout_ms,
            "chromium": CHROMIUM,
            "followUps": follow_ups,
        }
    )
    # A subprocess awaited on this loop: the TURN server under test runs on the same loop.
    proc = await asyncio.create_subprocess_exec(
        node,
        str(DRIVER),
        arg,
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_ms / 1000 + 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the Chromium driver did not finish in time")
    lines = out.decode(errors="replace").strip().splitlines()
    assert lines, f"no report from the Chromium driver; stderr:\n{err.decode(errors='replace')}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


@pytest.fixture
async def turn_server(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    # "permissive-multiplex": turn.relay_multiplex = 4 (docs/TURN.md "Shared relay sockets"),
    # at least 2 sockets per relay thread: the two allocations, each the other's peer, land on
    # different shared sockets (on one socket relay-to-relay cannot work: the trade-off).
    mode, _, multiplex = request.param.partition("-")
    svc = TurnService(_config(tmp_path, mode, relay_multiplex=4 if multiplex else 0))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("turn_server", ["permissive", "permissive-multiplex"], indirect=True)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_chromium_datachannel_relay_to_relay(
    turn_server: TurnService, transport: str
) -> None:
    started = time.monotonic()
    username, credential = rest_credential(SECRET, "chromium-e2e")
    url = f"turn:127.0.0.1:{turn_server.port}?transport={transport}"
    report = await _chromium(url, username, credential, timeout_ms=12000)
    detail = json.dumps(report, indent=1)[:3000]

    assert report.get("ok"), f"DataChannel message did not cross:\n{detail}"
    assert report["message"] == "hello through confedge TURN"
    # Only relay candidates were gathered (iceTransportPolicy "relay"), on our relay range.
    for side in ("pc1", "pc2"):
        assert report["candidates"][side], f"{side} gathered no candidate:\n{detail}"
        for cand in report["candidates"][side]:
            assert " typ relay " in cand, cand
    for key in ("pair", "pair2"):
        pair = report[key]
        assert pair is not None, f"no selected candidate pair in getStats:\n{detail}"
        assert pair["state"] == "succeeded", detail
        assert pair["local"]["candidateType"] == "relay", detail
        assert pair["remote"]["candidateType"] == "relay", detail
        assert pair["local"]["address"] == "127.0.0.1", detail
        assert RELAY_LO <= pair["local"]["port"] <= RELAY_HI, detail
        assert RELAY_LO <= pair["remote"]["port"] <= RELAY_HI, detail
        # How Chromium reached the TURN server (RTCIceCandidateStats.relayProtocol).
        assert pair["local"]["relayProtocol"] == transport, detail
        assert pair["bytesSent"] > 0 and pair["bytesReceived"] > 0, detail
    # The relayed bytes went through confedge's data plane, both ways.
    stats = turn_server.stats()
    assert stats["packets_to_peer"] > 0, stats
    assert time.monotonic() - started < 20, "case took longer than its 20 s budget"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("turn_server", ["restricted"], indirect=True)
async def test_chromium_refused_in_restricted_mode(turn_server: TurnService) -> None:
    """A browser is not a media node: restricted mode must give it no relay candidate."""
    url = f"turn:127.0.0.1:{turn_server.port}?transport=udp"
    report = await _chromium(url, "node", "node-password", timeout_ms=4000)
    detail = json.dumps(report, indent=1)[:3000]
    assert "error" not in report, detail
    assert not report["ok"], f"the message crossed although Chromium is not a media node:\n{detail}"
    assert report["candidates"] == {"pc1": [], "pc2": []}, detail
    assert turn_server.stats()["allocations"] == 0
