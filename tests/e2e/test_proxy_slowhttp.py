"""slowhttptest against the proxy: slow headers (Slowloris) and slow body (R-U-Dead-Yet).

SPEC §2 "Limits against slow or abusive clients": a client that trickles its headers or its body
must be cut off by the header/body timeouts, the proxy must keep answering everyone else, and
the half-sent requests must never reach a node (a node's worker is more precious than an edge
socket). slowhttptest opens the connections at a steady rate and sends a few bytes per interval
forever; without the timeouts its connections would stay open for the whole test.

Each run: 60 connections at 30/s, a follow-up every second, 9 s long, against a proxy whose
header and body timeouts are 2 s. Asserted from slowhttptest's report: the proxy closed every
connection well before the run's time limit ("No open connections left") and its probe always
found the service available; from our own probe, in parallel: the status path keeps answering
200 quickly; from the upstream (which, like a real node, waits for a request's whole body): no
slow request arrived.
"""

from __future__ import annotations

import asyncio
import csv
import re
import shutil
import ssl
import time
from pathlib import Path

import pytest
from proxy_e2e_support import Upstream, running_proxy, wait_healthy

SLOWHTTPTEST = shutil.which("slowhttptest")
PORTS = (32600, 32650)
CONNECTIONS = 60
LENGTH = 9
TIMEOUT = 2.0

pytestmark = pytest.mark.skipif(
    SLOWHTTPTEST is None, reason="slowhttptest is missing (apt-get install slowhttptest)"
)


async def _probe(url: str, stop: asyncio.Event) -> list[float]:
    """Fetch the status path once every 0.3 s over fresh TLS connections; return latencies."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    out: list[float] = []
    while not stop.is_set():
        t0 = time.monotonic()
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 3)
        w.write(
            b"GET /api/client/v2/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        data = await asyncio.wait_for(r.read(), 3)
        w.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        out.append(time.monotonic() - t0)
        await asyncio.sleep(0.3)
    return out


async def _attack(mode: str, url: str, prefix: Path) -> tuple[str, list[dict[str, str]]]:
    """Run slowhttptest; return its (ANSI-stripped) report and its per-second CSV rows."""
    assert SLOWHTTPTEST is not None
    args = [
        SLOWHTTPTEST, mode, "-c", str(CONNECTIONS), "-r", "30", "-i", "1", "-l", str(LENGTH),
        "-x", "10", "-p", "2", "-u", url, "-g", "-o", str(prefix),
    ]  # fmt: skip
    if mode == "-B":
        args += ["-s", "8192"]  # Content-Length announced; the body trickles 10 bytes a second
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), LENGTH + 20)
    report = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
    with open(f"{prefix}.csv", newline="") as f:
        return report, list(csv.DictReader(f))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "target"),
    [
        ("-H", "/api/slow-headers"),
        # Bodies are received whole (up to proxy.request_buffer_bytes) within body_timeout in
        # total before any node is chosen, so a trickled body never reaches a node.
        ("-B", "/api/slow-body"),
    ],
)
async def test_slow_clients_are_cut_off(tmp_path: Path, mode: str, target: str) -> None:
    up = Upstream()
    await up.start()
    try:
        async with running_proxy(
            tmp_path, [up.port], PORTS, header_timeout=TIMEOUT, body_timeout=TIMEOUT
        ) as info:
            await wait_healthy(info["https"])
            stop = asyncio.Event()
            probe = asyncio.create_task(_probe(info["https"], stop))
            report, rows = await _attack(
                mode, info["https"].rstrip("/") + target, tmp_path / "slow"
            )
            stop.set()
            latencies = await probe
    finally:
        await up.close()

    # Nothing slow reached the node: only slowhttptest's probe GETs (about one a second) may.
    slow_method = b"POST" if mode == "-B" else b"GET"
    reached = sum(
        1
        for m, t in zip(up.methods, up.requests, strict=True)
        if m == slow_method and t == target.encode()
    )
    probes = len(rows) + 2 if mode == "-H" else 0
    assert reached <= probes, f"{reached} slow requests reached the node"
    # Every connection was closed by the proxy before slowhttptest's time limit: it stops early
    # with "No open connections left" (its CSV is sampled once a second, so its last row may
    # still show a few connections that closed within that second).
    ended = re.search(r"Test ended on (\d+)\w* second", report)
    assert "No open connections left" in report, report[-600:]
    assert ended and int(ended[1]) <= TIMEOUT + CONNECTIONS / 30 + 2, report[-600:]
    # Never more open at once than the opening rate times (timeout + slack).
    assert max(int(r["Connected"]) for r in rows) <= 30 * (TIMEOUT + 1.5), rows
    # slowhttptest's own probe never found the service unavailable ...
    assert "service available:   NO" not in report
    # ... nor did ours: the status path answered 200 throughout, quickly.
    assert latencies and max(latencies) < 1.0, latencies
