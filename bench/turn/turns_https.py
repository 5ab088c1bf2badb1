"""What sharing the HTTPS port costs TURN over TLS (turn.tls_on_https), against confedge's own
turns: listener (turn.tls_port) in the same run.

One aioice client allocates over TLS and sends N packets, one at a time, to a UDP echo peer
through its relay; the time per round trip is measured for three ways in: the dedicated TLS
listener, the HTTPS port with the proxy in process (the connection is handed to TURN), and the
HTTPS port with two proxy worker processes (the worker relays the plaintext over a Unix socket).
Each way runs ROUNDS times, alternating, on loopback; the median of each is reported with its
ratio to the dedicated listener.

    .venv/bin/python bench/turn/turns_https.py [N] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import statistics
import sys
import tempfile
import time
from typing import Any

import uvloop
from aioice.turn import create_turn_endpoint
from msgspec.structs import replace

from confedge.runtime import Runtime
from confedge.turn.testing import shared_port_config

RELAYS = "39400-39499"


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def round_trips(port: int, n: int) -> float:
    """Seconds per round trip client -> TLS -> TURN -> peer -> TURN -> TLS -> client."""
    loop = asyncio.get_running_loop()
    echo_t, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    turn_t, inbox = await create_turn_endpoint(
        _Inbox,
        server_addr=("127.0.0.1", port),
        username="turnuser",
        password="turnpass",
        transport="tcp",
        ssl=ctx,
    )
    peer = echo_t.get_extra_info("sockname")
    payload = b"x" * 160  # an audio packet
    try:
        turn_t.sendto(payload, peer)  # the first one binds the channel
        await asyncio.wait_for(inbox.queue.get(), 5)
        start = time.perf_counter()
        for _ in range(n):
            turn_t.sendto(payload, peer)
            await asyncio.wait_for(inbox.queue.get(), 5)
        return (time.perf_counter() - start) / n
    finally:
        turn_t.close()
        echo_t.close()


async def one(way: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as state:
        workers = 2 if way == "https-port, 2 workers" else 1
        cfg = shared_port_config(state, ["http://127.0.0.1:9"], workers=workers, relay_ports=RELAYS)
        if way == "turn.tls_port":
            with socket.socket() as s:  # a free port for the dedicated listener
                s.bind(("127.0.0.1", 0))
                free = s.getsockname()[1]
            turn = replace(cfg.turn, tls_port=free, tls_on_https=False)
            cfg = replace(cfg, turn=turn)
        rt = Runtime(cfg)
        await rt.start()
        try:
            port = rt.turn.tls_port if way == "turn.tls_port" else rt.proxy.https_port
            return await round_trips(port, n)
        finally:
            await rt.close()


async def main(n: int, rounds: int) -> None:
    ways = ["turn.tls_port", "https-port, in process", "https-port, 2 workers"]
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(await one(way, n))
    base = statistics.median(times[ways[0]])
    out = {}
    for way in ways:
        med = statistics.median(times[way])
        out[way] = {"rtt_us": round(med * 1e6, 1), "ratio": round(med / base, 2)}
        print(f"{way:26s} {med * 1e6:8.1f} us per round trip  x{med / base:.2f}")
    print(json.dumps({"n": n, "rounds": rounds, "results": out}))


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(min(n, 20000), min(rounds, 10)))
