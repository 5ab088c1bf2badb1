"""Headless Chromium through the proxy: a page load and a real EventSource (SPEC §2 streaming).

SSE responses must pass through unbuffered, event by event. The node stamps each event with its
send time; Chromium's EventSource notes the arrival time; every event must arrive within 50 ms.
A proxy that buffered (waiting for a chunk to fill, or for the response to end) would deliver
the events in bursts, hundreds of milliseconds late.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
from chromium_driver import run_driver
from proxy_e2e_support import Upstream, running_proxy, wait_healthy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = shutil.which("node")
HERE = Path(__file__).parent
DRIVER = HERE / "proxy_chromium_driver.mjs"
PLAYWRIGHT = HERE / "node_modules" / "playwright-core"
PORTS = (32400, 32450)
EVENTS = 20
INTERVAL_S = 0.1  # the node writes an event this often
# A proxy that buffers a stream holds each event until the next write or a flush: delays near
# INTERVAL_S for most events. One event late is the 2-core CI host's scheduler, not buffering
# (52 ms seen beside a full test run, and once 97 ms, with every other event under 6 ms): so the
# typical event must be prompt, and at most one of the 20 may come as late as a whole interval.
MEDIAN_DELAY_MS = 20.0
WORST_DELAY_MS = 0.9 * 1000 * INTERVAL_S
LATE_EVENTS_ALLOWED = 1

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed"),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not PLAYWRIGHT.exists(),
        reason="playwright-core missing: npm install --prefix tests/e2e (make test does it)",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
async def test_page_and_event_source_through_proxy(tmp_path: Path, http2: bool) -> None:
    up = Upstream(events=EVENTS, interval=INTERVAL_S)
    await up.start()
    try:
        async with running_proxy(tmp_path, [up.port], PORTS, http2=http2) as info:
            await wait_healthy(info["https"])
            cfg = {
                "url": info["https"].rstrip("/"),
                "count": EVENTS,
                "timeoutMs": 15000,
                "chromium": CHROMIUM,
            }
            assert NODE is not None
            out = await run_driver(NODE, cfg, 45, driver=DRIVER)
    finally:
        await up.close()
    assert out.get("error") is None, out["error"]
    assert out["status"] == 200 and out["title"] == "confedge SSE test"
    assert out["ok"], f"EventSource ended with {out['why']!r} after {len(out['got'])} events"
    got = out["got"]
    assert [e["seq"] for e in got] == list(range(EVENTS))  # all, in order, none duplicated
    delays = [e["recv"] - e["sent"] for e in got]
    worst = max(delays)
    print(f"SSE event delays through the proxy: max {worst:.1f} ms, all {delays}")
    assert statistics.median(delays) < MEDIAN_DELAY_MS, (
        f"event delays (ms) through the proxy: {delays}"
    )
    late = [d for d in delays if d >= WORST_DELAY_MS]
    assert len(late) <= LATE_EVENTS_ALLOWED, f"event delays (ms) through the proxy: {delays}"
    # proxy.http2 (on by default): the page and its EventSource came over h2 (ALPN), or over
    # HTTP/1.1 with the option off.
    proto = "h2" if http2 else "http/1.1"
    assert out["protocols"]["nav"] == proto, out["protocols"]
    assert out["protocols"]["sse"], out["protocols"]
    assert set(out["protocols"]["sse"]) == {proto}, out["protocols"]
    # The page and the stream really went through the proxy to the node.
    assert any(t.startswith(b"/page.html") for t in up.requests)
    assert any(t.startswith(b"/api/client/v2/conferences/e2e/events") for t in up.requests)
