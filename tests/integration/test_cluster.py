"""Two `confedge run` instances sharing one redis-server, as an operator runs them behind one
name (docs/SCALING.md): bans, REST credentials, nonces and the allocation registry."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guard_redis import RedisServer, redis_server
from guard_upstream import PinNode
from prometheus_client.parser import text_string_to_metric_families

from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    decode_xor_address,
    encode_xor_address,
    new_transaction_id,
)
from confedge.turn.auth import RestCredentials
from confedge.turn.testing import UdpTurnClient, response_code
from ports import spare_ports

SECRET = "cluster-test-secret"
REALM = "example.com"
INTERVAL, TTL = 0.3, 2.0
BANNED = "127.0.0.55"  # the client `confedge bans add` bans (any 127/8 address is local)
GUESSER = "127.0.0.56"  # the client that guesses PINs through edge-a
TOKEN = "/api/client/v2/conferences/meet/request_token"
MAXRETRY = 3


@contextlib.contextmanager
def pin_node() -> Iterator[PinNode]:
    """The PIN-protected node both edges proxy to, served by an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    node = asyncio.run_coroutine_threadsafe(PinNode().start(), loop).result(10)
    try:
        yield node
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class Edge:
    name: str
    ip: str
    cfg: Path
    proc: subprocess.Popen[str]
    https: int
    turn: int
    mgmt: int

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection(self.ip, self.mgmt, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200, (path, resp.status)
            return resp.read()
        finally:
            conn.close()

    def status(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.get("/status.json"))
        return data


def _write_config(tmp: Path, name: str, ip: str, url: str, node: str) -> tuple[Path, int, int, int]:
    https, turn, mgmt, relay = spare_ports(4)
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[server]
hostname = "edge"
domain = "{REALM}"
internal_address = "{ip}"
state_dir = "{tmp / name}"
[proxy]
https_port = {https}
http_port = 0
nodes = ["{node}"]
[turn]
mode = "permissive"
secrets = ["{SECRET}"]
port = {turn}
tls_port = 0
relay_ports = "{relay}-{relay + 20}"
allowed_peers = ["127.0.0.0/8"]
[guard]
enabled = true
store = "{url}"
ignore = []
maxretry = {MAXRETRY}
[management]
port = {mgmt}
[cluster]
store = "{url}"
instance = "{name}"
interval = {INTERVAL}
ttl = {TTL}
"""
    )
    return path, https, turn, mgmt


def _start(tmp: Path, name: str, ip: str, redis: RedisServer, node: PinNode) -> Edge:
    cfg, https, turn, mgmt = _write_config(tmp, name, ip, redis.url, node.address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "confedge", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    edge = Edge(name, ip, cfg, proc, https, turn, mgmt)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with contextlib.suppress(OSError, AssertionError, http.client.HTTPException):
            edge.get("/healthz")
            return edge
        time.sleep(0.1)
    raise AssertionError(f"{name} never served its management port")


def _stop(edge: Edge) -> None:
    if edge.proc.poll() is None:
        edge.proc.send_signal(signal.SIGTERM)
        try:
            edge.proc.wait(10)
        except subprocess.TimeoutExpired:
            edge.proc.kill()
            edge.proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, Edge, Edge]]:
    with redis_server() as redis, pin_node() as node:
        a = _start(tmp_path, "edge-a", "127.0.0.1", redis, node)
        try:
            b = _start(tmp_path, "edge-b", "127.0.0.2", redis, node)
            try:
                yield redis, a, b
            finally:
                _stop(b)
        finally:
            _stop(a)


def _https_status(edge: Edge, source: str, pin: str | None = None) -> int:
    """The status of GET / (or, with `pin`, a request_token with that PIN) on the edge's proxy
    from `source` (0: refused before an answer)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(
        edge.ip, edge.https, timeout=5, context=ctx, source_address=(source, 0)
    )
    try:
        if pin is None:
            conn.request("GET", "/", headers={"Host": "edge.example.com"})
        else:
            conn.request("POST", TOKEN, headers={"Host": "edge.example.com", "pin": pin})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def _instances(edge: Edge) -> dict[str, dict[str, object]]:
    c = edge.status()["cluster"]
    assert isinstance(c, dict)
    return {str(i["instance"]): i for i in c["instances"]}


def _wait(cond: object, timeout: float, what: str) -> float:
    """Poll `cond()` until true; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_two_instances_share_credentials_nonces_registry_and_bans(
    cluster: tuple[RedisServer, Edge, Edge],
) -> None:
    _, a, b = cluster
    # One REST credential, minted once from the shared secret, allocates on both.
    username, password = RestCredentials([SECRET], REALM).make("alice", time.time(), ttl=600)

    async def allocations() -> tuple[list[UdpTurnClient], str]:
        ca = UdpTurnClient((a.ip, a.turn), username, password, REALM)
        cb = UdpTurnClient((b.ip, b.turn), username, password, REALM)
        msg_a: list[Message | None] = []
        for c in (ca, cb):
            msg = await c.allocate()
            msg_a.append(msg)
            assert msg is not None and response_code(msg) == 200, c.server
        # Media through A's allocation, both ways, so its counters move while it lives.
        relayed = allocated.get(Attr.XOR_RELAYED_ADDRESS) if (allocated := msg_a[0]) else None
        assert relayed is not None
        relay = decode_xor_address(relayed, allocated.transaction_id)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(2)
        assert await ca.create_permission("127.0.0.1") == 200
        tid = new_transaction_id()
        paddr = peer.getsockname()
        ca.sock.send(
            MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
            .add(Attr.XOR_PEER_ADDRESS, encode_xor_address(paddr[0], paddr[1], tid))
            .add(Attr.DATA, b"m" * 1000)
            .build()
        )
        data, src = peer.recvfrom(2000)
        assert (len(data), src) == (1000, relay)
        peer.sendto(b"r" * 500, relay)
        peer.close()
        # A nonce from A is accepted by B: the unauthenticated request goes to A, the
        # authenticated one (same client address and port) to B, with A's nonce, and B allocates
        # without another 401/438.
        first = UdpTurnClient((a.ip, a.turn), username, password, REALM)
        local = first.local
        msg = await first.request(Method.BINDING, auth=False)
        assert msg is not None and response_code(msg) == 200
        ch = await first.transact(
            first.build(
                Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")], b"n" * 12, False
            ),
            b"n" * 12,
        )
        assert ch is not None and response_code(ch) == 401
        nonce = ch.get(Attr.NONCE)
        first.close()
        moved = UdpTurnClient((b.ip, b.turn), username, password, REALM, local=local)
        moved.nonce = nonce
        tid = b"m" * 12
        ok = await moved.transact(
            moved.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")], tid, True),
            tid,
        )
        assert ok is not None and ok.msg_class == MsgClass.SUCCESS, (
            response_code(ok) if ok else None
        )
        return [ca, cb, moved], f"{local[0]}:{local[1]}/udp"

    clients, moved_client = asyncio.run(allocations())
    try:
        # Each status page lists the other's allocations (within a publication interval or two).
        ca_addr = f"{clients[0].local[0]}:{clients[0].local[1]}/udp"
        cb_addr = f"{clients[1].local[0]}:{clients[1].local[1]}/udp"

        def b_seen_by_a() -> bool:
            i = _instances(a).get("edge-b")
            return i is not None and {x["client"] for x in i["allocations"]} == {
                cb_addr,
                moved_client,
            }  # type: ignore[index, attr-defined]

        def a_seen_by_b() -> bool:
            # Listed with the media relayed so far (1000 bytes out, 500 back, payload bytes).
            i = _instances(b).get("edge-a")
            return (
                i is not None
                and [x["client"] for x in i["allocations"]] == [ca_addr]  # type: ignore[index]
                and i["allocations"][0]["bytes_to_peer"] >= 1000  # type: ignore[index]
                and i["allocations"][0]["bytes_to_client"] >= 500  # type: ignore[index]
            )

        _wait(b_seen_by_a, 5, "edge-a's /status.json lists edge-b's two allocations")
        _wait(a_seen_by_b, 5, "edge-b's /status.json lists edge-a's allocation")
        row = _instances(b)["edge-a"]["allocations"][0]  # type: ignore[index]
        assert row["username"] == username and row["relay"].startswith("127.0.0.1:")  # type: ignore[index]
        page = b.get("/status").decode()
        assert "Allocations on edge-a" in page and ca_addr in page and username in page
        page = a.get("/status").decode()
        assert "Allocations on edge-b" in page and cb_addr in page and moved_client in page
        assert _instances(a)["edge-b"]["state"] == "serving"
        assert _instances(a)["edge-b"]["same_secret"] is True

        # /metrics, read by Prometheus's own parser.
        fams = {f.name: f for f in text_string_to_metric_families(a.get("/metrics").decode())}
        per = {
            s.labels["instance"]: s.value
            for s in fams["confedge_cluster_instance_allocations"].samples
        }
        assert per == {"edge-a": 1.0, "edge-b": 2.0}
        assert fams["confedge_cluster_store_up"].samples[0].value == 1.0
        assert fams["confedge_cluster_instances"].samples[0].value == 2.0

        # Wrong PINs through edge-a ban the guesser there; edge-b refuses it within 1 s.
        assert _https_status(b, GUESSER, "1234") == 200  # the right PIN, before
        for i in range(MAXRETRY):
            assert _https_status(a, GUESSER, f"000{i}") == 403  # the node's "Invalid PIN"
        took = _wait(lambda: _https_status(b, GUESSER, "1234") == 429, 1.0, "edge-b refuses")
        print(f"guesser banned on edge-a refused by edge-b after {took:.3f} s")
        assert _https_status(a, GUESSER, "1234") == 429

        # A ban made with edge-a's configuration refuses the address on edge-b within 1 s.
        assert _https_status(b, BANNED) not in (0, 429)
        subprocess.run(
            [sys.executable, "-m", "confedge", "bans", "add", BANNED, "--config", str(a.cfg)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        took = _wait(lambda: _https_status(b, BANNED) == 429, 1.0, "edge-b refuses the ban")
        print(f"ban made on edge-a refused by edge-b after {took:.3f} s")
        _wait(lambda: _https_status(a, BANNED) == 429, 1.0, "edge-a refuses the ban")

        # Killing edge-b (no clean exit) makes its allocations vanish from edge-a's page
        # within the record's TTL.
        b.proc.kill()
        b.proc.wait()
        gone = _wait(lambda: "edge-b" not in _instances(a), TTL + 2 * INTERVAL + 1, "edge-b gone")
        print(f"killed edge-b left edge-a's page after {gone:.3f} s (ttl {TTL} s)")
        assert "Allocations on edge-b" not in a.get("/status").decode()
    finally:
        for c in clients:
            c.close()
