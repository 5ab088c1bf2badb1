"""A WebRTC call to the simulated node, with a real TURN server between them.

The "browser" here is aiortc in the test; the node answers with an aiortc endpoint that
allocated a relayed address on the TURN server (each test runs against coturn's ``turnserver``,
the reference, and against confedge's TurnService in restricted mode, both with a long-term
credential as the node is configured in restricted mode), offers only that relay
candidate, and echoes the media. The test checks that the answer carries only relay candidates,
that the browser's nominated pair goes to the relay address, and that the frames it sent come
back (by colour: a flat frame survives VP8 nearly unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

aiortc = pytest.importorskip("aiortc")
av = pytest.importorskip("av")

from aiortc import (  # noqa: E402
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)

from confedge.nodesim import Conference, NodeSim, TurnInfo  # noqa: E402

API = "/api/client/v2"
TURN_USER, TURN_PASS, REALM = "nodeuser", "node-secret", "confedge.test"


@contextlib.contextmanager
def run_coturn(tmp_path: Path) -> Iterator[TurnInfo]:
    """coturn on loopback: long-term credential, loopback peers allowed, no TLS, no CLI."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn's turnserver is not installed (apt-get install coturn)")
    port = free_port(35100, 35500, shuffle=True, udp=True)
    relay_lo = random.randrange(35500, 35950, 50)
    log = tmp_path / "turn.log"
    proc = subprocess.Popen(
        [
            binary, "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
            "--relay-ip=127.0.0.1", f"--min-port={relay_lo}", f"--max-port={relay_lo + 49}",
            "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASS}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli",
            f"--log-file={log}", "--simple-log", f"--pidfile={tmp_path / 'turn.pid'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):  # wait until it answers on TCP
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            if proc.poll() is not None:
                pytest.fail(f"turnserver exited: {log.read_text() if log.exists() else ''}")
            import time

            time.sleep(0.05)
        yield TurnInfo("127.0.0.1", port, TURN_USER, TURN_PASS)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def run_confedge_turn(tmp_path: Path) -> AsyncIterator[TurnInfo]:
    """confedge's own TURN server in restricted mode: the node (127.0.0.1) is the media node;
    loopback peers allowed, as the demo configures it."""
    from confedge.config import parse_config
    from confedge.turn.service import TurnService, host_peer_entries

    relay_lo = random.randrange(35500, 35950, 50)
    cfg = parse_config(
        {
            "server": {
                "internal_address": "127.0.0.1",
                "domain": REALM,
                "state_dir": str(tmp_path),
            },
            "proxy": {"enabled": False},
            "turn": {
                "mode": "restricted",
                "port": 0,
                "tls_port": 0,  # the default 5349 is fixed: parallel runs collide
                "relay_ports": f"{relay_lo}-{relay_lo + 49}",
                "username": TURN_USER,
                "password": TURN_PASS,
                "media_nodes": ["127.0.0.1/32"],
                # aiortc/Chromium on this host offer its addresses as candidates.
                "allowed_peers": ["127.0.0.0/8", *host_peer_entries()],
            },
        }
    )
    service = TurnService(cfg)
    await service.start()
    try:
        info = service.info()
        yield TurnInfo(info["host"], info["port"], info["username"], info["password"])
    finally:
        await service.close()


@pytest.fixture(params=["coturn", "confedge"])
async def turn(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnInfo]:
    """The TURN server between node and browser: coturn (the reference) and confedge's."""
    if request.param == "coturn":
        with run_coturn(tmp_path) as info:
            yield info
    else:
        async with run_confedge_turn(tmp_path) as info:
            yield info


class FlatVideo(MediaStreamTrack):
    """Small flat-colour frames: cheap to encode, and recognisable when they come back."""

    kind = "video"

    def __init__(self, y: int = 180, u: int = 60, v: int = 200) -> None:
        super().__init__()
        self.n = 0
        self.yuv = (y, u, v)

    async def recv(self) -> Any:
        await asyncio.sleep(1 / 15)
        self.n += 1
        frame = av.VideoFrame(160, 120, "yuv420p")
        for plane, value in zip(frame.planes, self.yuv, strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts = self.n * 6000
        frame.time_base = fractions.Fraction(1, 90000)
        return frame


async def http(
    node: NodeSim, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request on its own connection (urllib would block the loop)."""
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    data = b"" if body is None else json.dumps(body).encode()
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: node",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    w.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    raw = await asyncio.wait_for(r.read(), 30)
    w.close()
    head_b, _, payload = raw.partition(b"\r\n\r\n")
    return int(head_b.split()[1]), json.loads(payload)


@pytest.fixture
async def node(turn: TurnInfo) -> AsyncIterator[NodeSim]:
    sim = NodeSim([Conference("meet", "1234")], turn=turn, node_name="media-node")
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.close()


def nominated_remote(pc: RTCPeerConnection) -> Any:
    """The remote candidate of the browser side's nominated ICE pair (aioice internals)."""
    transport = pc.getTransceivers()[0].receiver.transport.transport
    pairs = transport._connection._nominated
    return pairs[1].remote_candidate if 1 in pairs else None


async def test_call_through_turn_echoes_media(node: NodeSim, turn: TurnInfo) -> None:
    status, body = await http(
        node,
        "POST",
        f"{API}/conferences/meet/request_token",
        {"display_name": "Browser"},
        {"pin": "1234"},
    )
    assert status == 200
    token, me = body["result"]["token"], body["result"]["participant_uuid"]

    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    browser.addTrack(FlatVideo())
    received: list[Any] = []
    readers: list[asyncio.Task[None]] = []

    @browser.on("track")
    def _on_track(track: Any) -> None:
        async def read() -> None:
            with contextlib.suppress(Exception):
                while True:
                    received.append(await track.recv())

        readers.append(asyncio.ensure_future(read()))

    try:
        await browser.setLocalDescription(await browser.createOffer())
        status, body = await http(
            node, "POST", f"{API}/conferences/meet/participants/{me}/calls",
            {"call_type": "WEBRTC", "sdp": browser.localDescription.sdp}, {"token": token},
        )  # fmt: skip
        assert status == 200, body
        call_uuid, answer = body["result"]["call_uuid"], body["result"]["sdp"]
        cands = [line for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert cands and all(" typ relay " in c for c in cands), cands
        relay_ports = {int(c.split()[5]) for c in cands}
        assert all(c.split()[4] == "127.0.0.1" for c in cands)
        assert "a=sendrecv" in answer  # the node sends our video back

        await browser.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        status, body = await http(
            node,
            "POST",
            f"{API}/conferences/meet/participants/{me}/calls/{call_uuid}/ack",
            None,
            {"token": token},
        )
        assert (status, body) == (200, {"status": "success", "result": None})

        for _ in range(150):
            if len(received) >= 10:
                break
            await asyncio.sleep(0.1)
        assert browser.connectionState == "connected"
        assert len(received) >= 10, f"only {len(received)} echoed frames"
        remote = nominated_remote(browser)
        assert remote is not None and remote.type == "relay"
        assert (remote.host, remote.port) in {("127.0.0.1", p) for p in relay_ports}
        # The echoed frame is ours: luma near the 180 we sent (one middle row, without the
        # plane's line padding).
        frame = received[-1]
        plane = frame.planes[0]
        row = bytes(plane)[(frame.height // 2) * plane.line_size :][: frame.width]
        assert abs(sum(row) / len(row) - 180) < 20, sum(row) / len(row)

        # The participant shows as in a call.
        status, body = await http(
            node, "GET", f"{API}/conferences/meet/participants", None, {"token": token}
        )
        assert body["result"][0]["has_media"] is True
        # Hanging up the call closes the node's endpoint.
        status, body = await http(
            node,
            "POST",
            f"{API}/conferences/meet/participants/{me}/calls/{call_uuid}/disconnect",
            None,
            {"token": token},
        )
        assert (status, body) == (200, {"status": "success", "result": True})
        assert call_uuid not in node.media
        status, body = await http(
            node, "GET", f"{API}/conferences/meet/participants", None, {"token": token}
        )
        assert body["result"][0]["has_media"] is False
    finally:
        await browser.close()


async def test_release_token_tears_down_media(node: NodeSim) -> None:
    status, body = await http(
        node,
        "POST",
        f"{API}/conferences/meet/request_token",
        {"display_name": "B"},
        {"pin": "1234"},
    )
    token, me = body["result"]["token"], body["result"]["participant_uuid"]
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    browser.addTrack(FlatVideo())
    try:
        await browser.setLocalDescription(await browser.createOffer())
        status, body = await http(
            node, "POST", f"{API}/conferences/meet/participants/{me}/calls",
            {"call_type": "WEBRTC", "sdp": browser.localDescription.sdp}, {"token": token},
        )  # fmt: skip
        assert status == 200
        endpoint = node.media[body["result"]["call_uuid"]]
        status, _ = await http(
            node, "POST", f"{API}/conferences/meet/release_token", None, {"token": token}
        )
        assert status == 200
        assert node.media == {}
        for _ in range(50):
            if endpoint.connection_state == "closed":
                break
            await asyncio.sleep(0.05)
        assert endpoint.connection_state == "closed"
    finally:
        await browser.close()


async def test_wrong_turn_credential_gives_clear_error(turn: TurnInfo) -> None:
    bad = TurnInfo(turn.host, turn.port, turn.username, "wrong-password")
    async with NodeSim([Conference("meet")], turn=bad) as sim:
        await sim.start("127.0.0.1", 0)
        status, body = await http(
            sim, "POST", f"{API}/conferences/meet/request_token", {"display_name": "C"}
        )
        token, me = body["result"]["token"], body["result"]["participant_uuid"]
        browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        browser.addTrack(FlatVideo())
        try:
            await browser.setLocalDescription(await browser.createOffer())
            status, body = await http(
                sim, "POST", f"{API}/conferences/meet/participants/{me}/calls",
                {"call_type": "WEBRTC", "sdp": browser.localDescription.sdp}, {"token": token},
            )  # fmt: skip
        finally:
            await browser.close()
        assert status == 502
        assert body["status"] == "failure"
        assert f"{turn.host}:{turn.port}" in body["result"] and "TURN" in body["result"]
        assert sim.media == {}
