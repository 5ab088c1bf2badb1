"""`confedge drain` on a running edge with real clients (issue 15, "Drain"): keep-alive load,
an SSE stream and TURN allocations relaying; the health endpoint says draining for the grace
period without failing a request (200 requests/s answered), a new Allocate is sent to the
alternate TURN server with 300 and the client follows it, then the listeners close, the stream
runs to its end, the allocations keep relaying, and the process exits by itself when they are
gone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from ops_support import (
    Load,
    Relay,
    edge_config,
    get,
    metrics,
    sse,
    start_edge,
    status,
    tls_client,
)
from proxy_upstream import Upstream

from confedge.stun import Attr, check_integrity, decode_address
from confedge.turn.service import TurnService
from confedge.turn.testing import UdpTurnClient, response_code, turn_config

GRACE = 3.0


def _sample(fams: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    for s in fams.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


@pytest.mark.parametrize("workers", [2])
async def test_drain_with_live_traffic(tmp_path: Path, workers: int) -> None:
    node = await Upstream("n1").start()
    # The alternate TURN server new Allocates are sent to (RFC 8489 §10).
    alt = TurnService(turn_config(domain="example.com"))
    await alt.start()
    edge = start_edge(
        tmp_path,
        edge_config(
            tmp_path,
            nodes=[node.address],
            workers=workers,
            extra=f"drain_grace = {GRACE}\ndrain_timeout = 60",
        ).replace(
            'password = "turnpass"',
            f'password = "turnpass"\nalternate_server = "127.0.0.1:{alt.port}"',
        ),
    )
    relays: list[Relay] = []
    try:
        # Both workers answer, and the health endpoint says serving.
        assert (await get(edge.https, "/health"))[:1] == (200,)
        for _ in range(10):
            relay = Relay(edge.turn)
            assert await relay.open() == 200
            relays.append(relay)
        assert all([await r.check() for r in relays])

        ws = await websockets.connect(f"wss://127.0.0.1:{edge.https}/ws", ssl=tls_client())
        await ws.send("before")
        assert await ws.recv() == "before"
        load = Load(edge.https, rate=200, connections=8)
        stream = asyncio.create_task(sse(edge.https, n=70, interval=0.1))  # ~7 s
        load_task = asyncio.create_task(load.run(GRACE + 5))
        await asyncio.sleep(0.5)

        t0 = time.monotonic()
        # Blocking calls go to a thread: the load shares this event loop.
        out = await asyncio.to_thread(edge.confedge, "drain")
        assert out.returncode == 0, out.stderr
        assert "draining (pid" in out.stdout

        # During the grace period: the health endpoint says draining, everything works.
        health = await get(edge.https, "/health")
        assert health[0] == 503 and health[2] == b"draining\n"
        # A new Allocate is answered 300 Try Alternate, and the client follows it.
        late = UdpTurnClient(("127.0.0.1", edge.turn), "turnuser", "turnpass", "example.com")
        msg = await late.allocate()
        late.close()
        assert msg is not None and response_code(msg) == 300
        assert check_integrity(msg, late.key)
        raw = msg.get(Attr.ALTERNATE_SERVER)
        assert raw is not None and decode_address(raw) == ("127.0.0.1", alt.port)
        follower = Relay(decode_address(raw)[1])
        try:
            assert await follower.open() == 200
            assert await follower.check()
        finally:
            follower.close()
        await asyncio.sleep(1.0)  # the workers report each second
        snap = await asyncio.to_thread(status, edge.admin)
        assert snap["drain"]["phase"] == "draining"
        assert snap["drain"]["proxy_connections"] >= 1
        assert snap["drain"]["turn_allocations"] == 10
        fams = await asyncio.to_thread(metrics, edge.admin)
        assert _sample(fams, "confedge_drain_state", phase="draining") == 1
        assert _sample(fams, "confedge_drain_left", what="turn_allocations") == 10
        # The sessions table names the node the SSE stream is on.
        sessions = snap["proxy"]["sessions"]
        assert any(s["kind"] == "sse" and s["node"] == node.address[7:] for s in sessions), sessions
        assert all([await r.check() for r in relays])

        # Stop the load just before the listeners close: not one request failed meanwhile.
        await asyncio.sleep(max(0.0, GRACE - 0.4 - (time.monotonic() - t0)))
        load.running = False
        await load_task
        assert load.failed == [], load.failed[:5]
        rate = load.measured()
        print(
            f"keep-alive load during the grace period: {load.ok} requests, {rate:.0f}/s "
            f"(asked {load.rate:.0f}/s; latest request {load.late * 1000:.0f} ms behind)"
        )
        assert rate >= 0.95 * load.rate, rate  # the 200 proxied requests/s, answered

        # After the grace: new connections are refused, on every worker.
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(status, edge.admin))["drain"]["phase"] != "closing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert time.monotonic() - t0 >= GRACE  # never before the grace period is over
        await asyncio.sleep(0.3)  # the command pipe reaches both workers
        for _ in range(6):
            with pytest.raises(OSError):
                await get(edge.https, "/health")
        assert edge.proc.poll() is None  # the stream and the allocations hold it open
        assert all([await r.check() for r in relays])  # existing allocations keep relaying
        await ws.send("after the listeners closed")  # the WebSocket goes on too
        assert await ws.recv() == "after the listeners closed"
        await ws.close()

        events = await asyncio.wait_for(stream, 20)
        assert len(events) == 70  # the SSE stream ran to its end
        assert edge.proc.poll() is None  # allocations still live
        for r in relays:
            assert await r.refresh(0) == 200  # the clients end their allocations
        rc = await asyncio.get_running_loop().run_in_executor(None, edge.proc.wait, 20)
        assert rc == 0
        assert time.monotonic() - t0 < 30
        log = edge.log.read_text()
        assert "drain: done" in log, log[-3000:]
        assert "Traceback" not in log, log
    finally:
        for r in relays:
            r.close()
        edge.stop()
        await node.kill()
        await alt.close()


async def test_drain_cancel_reopens_the_listeners(tmp_path: Path) -> None:
    node = await Upstream("n1").start()
    edge = start_edge(
        tmp_path,
        edge_config(tmp_path, nodes=[node.address], extra="drain_grace = 0.5"),
    )
    relay = Relay(edge.turn)  # something left, so the drain waits instead of exiting
    try:
        assert await relay.open() == 200
        # The signal is one-way; the answer in STATE_DIR/confedge.drain says what it did, so
        # cancelling an instance that serves is not reported as a cancelled drain.
        out = edge.confedge("drain", "--cancel")
        assert out.returncode == 0 and "nothing to cancel: it is serving" in out.stdout, out
        out = edge.confedge("drain")
        assert out.returncode == 0 and out.stdout.startswith("draining (pid"), out
        out = edge.confedge("drain")
        assert out.returncode == 0 and "nothing changed" in out.stdout, out  # (draining/closing)
        deadline = time.monotonic() + 10
        while status(edge.admin)["drain"]["phase"] != "closing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        with pytest.raises(OSError):
            await get(edge.https, "/health")
        out = edge.confedge("drain", "--cancel")
        assert out.returncode == 0 and out.stdout.startswith("drain cancelled"), out
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if (await get(edge.https, "/health"))[:1] == (200,):
                    break
            assert time.monotonic() < deadline, edge.log.read_text()[-2000:]
            await asyncio.sleep(0.2)
        assert status(edge.admin)["drain"]["phase"] == "serving"
        assert (await get(edge.https, "/api/client/v2/conferences/x/info"))[0] == 200
        assert await relay.check()
        await asyncio.sleep(1.0)
        assert edge.proc.poll() is None  # serving again: no exit when the drain's time passes
    finally:
        relay.close()
        edge.stop()
        await node.kill()


async def test_drain_turn_answers_new_allocates_with_alternate(tmp_path: Path) -> None:
    """`confedge drain` reaches TURN (TurnService.start_drain): a new Allocate gets 300 Try
    Alternate (RFC 8489 §10) while a live allocation goes on relaying and can be refreshed."""
    edge = start_edge(
        tmp_path,
        edge_config(tmp_path, nodes=[], extra="drain_grace = 30")
        .replace("[proxy]", "[proxy]\nenabled = false")
        .replace('password = "turnpass"', 'password = "turnpass"\nalternate_server = "192.0.2.9"'),
    )
    try:
        live = Relay(edge.turn)
        assert await live.open() == 200
        assert edge.confedge("drain").returncode == 0
        await asyncio.sleep(0.5)
        late = Relay(edge.turn)
        assert await late.open() == 300
        assert await live.check()
        assert await live.refresh(600) == 200  # existing allocations can be refreshed
        live.close()
        late.close()
    finally:
        edge.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_websocket_left_at_the_drain_deadline_gets_going_away(
    tmp_path: Path, workers: int
) -> None:
    """The drain's last step (`drain_timeout` passed, a WebSocket still open): the process
    exits, and the browser's WebSocket is ended with Close 1001 "going away" (RFC 6455 §7.4.1)
    rather than cut (1006), so the web app knows to reconnect elsewhere at once."""
    node = await Upstream("n1").start()
    deadline = "drain_grace = 0.5\ndrain_timeout = 2"
    cfg = edge_config(tmp_path, nodes=[node.address], workers=workers, extra=deadline)
    edge = start_edge(tmp_path, cfg)
    try:
        ws = await websockets.connect(
            f"wss://127.0.0.1:{edge.https}/ws", ssl=tls_client(), ping_interval=None
        )
        await ws.send("before")
        assert await ws.recv() == "before"
        t0 = time.monotonic()
        out = await asyncio.to_thread(edge.confedge, "drain")
        assert out.returncode == 0, out.stderr
        with pytest.raises(websockets.ConnectionClosed) as caught:
            while True:  # (echoes go on until the deadline)
                await asyncio.wait_for(ws.recv(), 10)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1001, caught.value
        rc = await asyncio.get_running_loop().run_in_executor(None, edge.proc.wait, 20)
        assert rc == 0
        assert 1.5 < time.monotonic() - t0 < 15
        log = edge.log.read_text()
        assert "Traceback" not in log, log
    finally:
        edge.stop()
        await node.kill()
