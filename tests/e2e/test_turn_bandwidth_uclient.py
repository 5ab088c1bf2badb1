"""Bandwidth caps with coturn's turnutils_uclient (issue 15 "done means").

Two uclient flows through one confedge (UDP clients, and TCP clients with ``-t``): flow A sends 1000-byte messages every 2 ms (about
500 kB/s each way) through an allocation capped at 100 kB/s; flow B sends 200-byte messages every
20 ms (10 kB/s), well under the cap.  A must be held to the cap within 10% while it runs (read
from the live per-allocation counters, as the metrics do), with its excess counted as drops on
its allocation; B must get back every message it sent and lose nothing to the cap.  Run on the
data plane the suite selects (``CONFEDGE_DATAPLANE``: ``make test`` runs it on both).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from typing import Any

import pytest

from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config
from ports import free_port

UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")

pytestmark = [
    pytest.mark.coturn,
    pytest.mark.skipif(
        not (UCLIENT and PEER), reason="coturn's turnutils_* tools are not installed"
    ),
]

CAP = 100_000  # bytes/s each direction
_TOTALS = re.compile(r"tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)")


async def _uclient(port: int, peer_port: int, *args: str) -> asyncio.subprocess.Process:
    assert UCLIENT is not None
    return await asyncio.create_subprocess_exec(
        UCLIENT,
        "-c",
        "-p",
        str(port),
        "-u",
        "turnuser",
        "-w",
        "turnpass",
        "-e",
        "127.0.0.1",
        "-r",
        str(peer_port),
        *args,
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def _steady_rate(samples: list[tuple[float, int]]) -> float:
    """bytes/s of one allocation over its steady part: from 1 s after its first byte (the
    bucket's initial burst spent) to its last sample that still moved."""
    moving = [(t, b) for t, b in samples if b > 0]
    assert moving, "the allocation relayed nothing"
    start = moving[0][0] + 1.0
    last = max(b for _, b in moving)
    window = [(t, b) for t, b in moving if t >= start and b < last]
    assert len(window) >= 4, f"too short a steady part: {samples}"
    (t1, b1), (t2, b2) = window[0], window[-1]
    return (b2 - b1) / (t2 - t1)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_uclient_flow_above_the_cap_is_held_to_it(transport: str) -> None:
    tcp = ["-t"] if transport == "tcp" else []
    svc = TurnService(turn_config(bandwidth_per_allocation=CAP))
    await svc.start()
    peer_port = free_port(20500, 20999, shuffle=True, udp=True)
    assert PEER is not None
    peer = await asyncio.create_subprocess_exec(
        PEER,
        "-p",
        str(peer_port),
        "-L",
        "127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.2)
        heavy = await _uclient(svc.port, peer_port, *tcp, "-n", "2500", "-l", "1000", "-z", "2")
        light = await _uclient(svc.port, peer_port, *tcp, "-n", "250", "-l", "200", "-z", "20")
        core = svc.core
        assert core is not None
        samples: dict[int, list[tuple[float, int]]] = {}
        counters: dict[int, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        while (heavy.returncode is None or light.returncode is None) and loop.time() < deadline:
            await asyncio.sleep(0.25)
            now = loop.time()
            for alloc in list(core.allocations.values()):
                c = core.dp.counters(alloc.id)
                counters[alloc.id] = c
                samples.setdefault(alloc.id, []).append((now, c.bytes_to_peer))
            for proc in (heavy, light):
                if proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), 0.001)
        outs = []
        for proc in (heavy, light):
            if proc.returncode is None:
                proc.kill()
            assert proc.stdout is not None
            outs.append((await proc.stdout.read()).decode(errors="replace"))
    finally:
        peer.terminate()
        await peer.wait()
        await svc.close()

    # The heavy flow's allocation: the one that moved the most.
    heavy_id = max(counters, key=lambda i: counters[i].bytes_to_peer)
    rate = _steady_rate(samples[heavy_id])
    assert abs(rate - CAP) <= 0.1 * CAP, f"heavy flow relayed {rate:.0f} B/s, cap {CAP}"
    assert counters[heavy_id].dropped_bandwidth > 0
    # Every other allocation (the light flow's) lost nothing to the cap ...
    for alloc_id, c in counters.items():
        if alloc_id != heavy_id:
            assert c.dropped_bandwidth == 0, (alloc_id, c)
    # ... and the light flow got back every message it sent.
    totals = _TOTALS.findall(outs[1])
    assert totals, outs[1][-2000:]
    sent, received = map(int, totals[-1])
    assert sent == 250 * 200, outs[1][-2000:]
    assert received == sent, f"light flow: received {received} of {sent}"
    # The heavy flow's uclient saw the cap as loss (sent 2.5 MB, got back about a fifth).
    heavy_sent, heavy_received = map(int, _TOTALS.findall(outs[0])[-1])
    assert heavy_sent == 2500 * 1000
    assert heavy_received < heavy_sent * 0.5
