#!/usr/bin/env python3
"""The floor for a Python UDP relay on this host: a forwarder that does no TURN work at all.

    .venv/bin/python bench/turn/pyfloor.py              # uvloop transport, raw socket, blocking

Why: confedge's relay costs about twice coturn's CPU per packet. This separates what confedge's
own code costs from what any Python forwarder that makes one recv and one send syscall per packet
costs. Each variant receives ChannelData-shaped datagrams from a flood sender, strips the 4-byte
header and sends the payload to a sink; it reports server CPU per delivered packet (user/kernel),
the same measure as run.py.

Variants: "transport" (uvloop DatagramProtocol + transport.sendto, confedge's shape),
"socket" (uvloop receive, socket.sendto), "blocking" (recvfrom/sendto loop, no event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

from servers import free_udp_ports

# The forwarder's and the sink's UDP ports: chosen free within this range at each measure()
# and inherited by the forked children.
PORTS = range(40350, 40400)
IN_PORT, SINK_PORT = 0, 0


def _pick_ports() -> None:
    global IN_PORT, SINK_PORT
    IN_PORT, SINK_PORT = free_udp_ports(PORTS, 2)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _sink(counts: Any, stop: Any) -> None:  # pragma: no cover - child process
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", SINK_PORT))
    s.settimeout(0.05)
    buf = bytearray(4096)
    n = 0
    while not stop[0]:
        try:
            for _ in range(64):
                s.recv_into(buf)
                n += 1
        except OSError:
            pass
        counts[0] = n


def _sender(stop: Any, size: int) -> None:  # pragma: no cover - child process
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", IN_PORT))
    frame = bytes([0x40, 0, size >> 8, size & 0xFF]) + os.urandom(size)
    while not stop[0]:
        for _ in range(500):
            try:  # noqa: SIM105 - try/except is free on the hot path, suppress() is not
                s.send(frame)
            except OSError:
                pass


def _forwarder(variant: str) -> None:  # pragma: no cover - child process
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind(("127.0.0.1", 0))
    peer = ("127.0.0.1", SINK_PORT)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", IN_PORT))
    if variant == "blocking":
        recvfrom, sendto = sock.recvfrom, out.sendto
        while True:
            data, _ = recvfrom(2048)
            if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
                sendto(data[4 : 4 + (data[2] << 8 | data[3])], peer)

    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out_t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=out)
        send = out_t.sendto if variant == "transport" else out.sendto

        class Relay(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
                    send(data[4 : 4 + (data[2] << 8 | data[3])], peer)

        await loop.create_datagram_endpoint(Relay, sock=sock)
        await asyncio.Event().wait()

    uvloop.run(main())


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def measure(variant: str, size: int, window: float) -> dict[str, float]:
    _pick_ports()
    ctx = mp.get_context("fork")
    counts = ctx.RawArray("q", 1)
    stop = ctx.RawArray("q", 1)
    fwd = ctx.Process(target=_forwarder, args=(variant,))
    sink = ctx.Process(target=_sink, args=(counts, stop))
    fwd.start()
    sink.start()
    time.sleep(0.5)
    sender = ctx.Process(target=_sender, args=(stop, size))
    sender.start()
    time.sleep(1.0)
    assert fwd.pid is not None
    (u0, s0), p0, t0 = _cpu(fwd.pid), counts[0], time.monotonic()
    time.sleep(window)
    (u1, s1), p1, t1 = _cpu(fwd.pid), counts[0], time.monotonic()
    stop[0] = 1
    sender.join()
    sink.join()
    fwd.kill()
    fwd.join()
    n = max(p1 - p0, 1)
    return {
        "delivered_pps": n / (t1 - t0),
        "cpu_us_per_pkt": (u1 - u0 + s1 - s0) / n * 1e6,
        "user_us_per_pkt": (u1 - u0) / n * 1e6,
        "sys_us_per_pkt": (s1 - s0) / n * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("variants", nargs="*", default=["transport", "socket", "blocking"])
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--window", type=float, default=4.0)
    args = ap.parse_args()
    print("| forwarder | delivered pkt/s | CPU µs/pkt | user | kernel |")
    print("|---|---:|---:|---:|---:|")
    for v in args.variants:
        if v not in ("transport", "socket", "blocking"):
            ap.error(f"unknown variant {v!r}")
        r = measure(v, args.size, args.window)
        print(
            f"| {v} | {r['delivered_pps']:,.0f} | {r['cpu_us_per_pkt']:.2f} | "
            f"{r['user_us_per_pkt']:.2f} | {r['sys_us_per_pkt']:.2f} |",
            flush=True,
        )
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
