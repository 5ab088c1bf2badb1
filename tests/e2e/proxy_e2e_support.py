"""Shared pieces of the proxy's end-to-end tests: a stamping upstream and a running proxy.

The upstream is deliberately tiny and honest: it counts every connection and request it sees
(the slow-client tests assert that nothing reached it), serves one HTML page, answers the health
check, and streams Server-Sent Events whose ``data`` carries the wall-clock send time in
milliseconds, so a browser on the same host can measure per-event delay through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from confedge.config import parse_config
from ports import free_port

STATUS_PATH = b"/api/client/v2/status"
EVENTS_PATH = b"/api/client/v2/conferences/e2e/events"

PAGE = b"""<!doctype html><meta charset="utf-8"><title>confedge SSE test</title>
<script>
// Collect `count` events from a real EventSource; each carries its send time from the node.
function collect(count, timeoutMs) {
  return new Promise((resolve) => {
    const got = [];
    const es = new EventSource('/api/client/v2/conferences/e2e/events?token=abc');
    const done = (why) => { es.close(); resolve({why, got}); };
    es.addEventListener('stamp', (e) => {
      const recv = Date.now();
      const d = JSON.parse(e.data);
      got.push({seq: d.seq, sent: d.sent, recv});
      if (got.length >= count) done('ok');
    });
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) done('closed'); };
    setTimeout(() => done('timeout'), timeoutMs);
  });
}
</script>
<p>confedge e2e page</p>
"""


class StampingUpstream(asyncio.Protocol):
    """One connection of the upstream (HTTP/1.1, keep-alive, no request bodies expected)."""

    server: Upstream

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buf = b""
        self.pending: tuple[bytes, int] | None = None  # (target, body length) awaiting its body
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        # Like a real node: a request is recorded when its head arrives, answered only once its
        # Content-Length body is complete (no chunked request bodies in these tests).
        self.buf += data
        while True:
            if self.pending is None:
                if b"\r\n\r\n" not in self.buf:
                    return
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                target = parts[1] if len(parts) > 1 else b""
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                if not target.startswith(STATUS_PATH):
                    self.server.requests.append(target)
                    self.server.methods.append(parts[0])
                self.pending = (target, length)
            target, length = self.pending
            if len(self.buf) < length:
                return
            self.buf = self.buf[length:]
            self.pending = None
            self.answer(target)

    def answer(self, target: bytes) -> None:
        assert self.transport is not None
        if target.startswith(STATUS_PATH):
            self.send(200, b"application/json", b'{"status": "success"}')
        elif target.startswith(EVENTS_PATH):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            task = asyncio.get_running_loop().create_task(self.stream())
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
        elif target.split(b"?")[0] in (b"/", b"/page.html"):
            self.send(200, b"text/html; charset=utf-8", PAGE)
        else:
            self.send(404, b"text/plain", b"not found\n")

    def send(self, status: int, ctype: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, ctype, len(body), body)
        )

    async def stream(self) -> None:
        """Events every `interval`; each is stamped just before its write."""
        assert self.transport is not None
        srv = self.server
        for seq in range(srv.events):
            if self.transport.is_closing():
                return
            payload = json.dumps({"seq": seq, "sent": time.time() * 1000}).encode()
            event = b"event: stamp\ndata: " + payload + b"\n\n"
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(srv.interval)
        # Then idle, like a real conference stream between events.
        await asyncio.sleep(30)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed += 1


class Upstream:
    """A conferencing node stand-in on 127.0.0.1:port."""

    def __init__(self, *, events: int = 20, interval: float = 0.1) -> None:
        self.events = events
        self.interval = interval
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []  # targets, health checks excluded
        self.methods: list[bytes] = []  # their methods, in the same order
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: StampingUpstream(self), "127.0.0.1", port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


def proxy_config(
    tmp: Path, nodes: list[int], https_port: int, http_port: int, **proxy: Any
) -> dict[str, Any]:
    return {
        "server": {"state_dir": str(tmp / "state")},
        "proxy": {
            "https_port": https_port,
            "http_port": http_port,
            "nodes": [f"http://127.0.0.1:{p}" for p in nodes],
            "workers": 1,
            "access_log": str(tmp / "access.log"),
            "health_interval": 0.5,
            **proxy,
        },
        "turn": {"enabled": False},
        "guard": {"enabled": False},
        "management": {"port": 0},
    }


@contextlib.asynccontextmanager
async def running_proxy(
    tmp: Path, nodes: list[int], port_range: tuple[int, int], **proxy: Any
) -> AsyncIterator[dict[str, str]]:
    """Start confedge's ProxyService in this loop; yield its info() URLs."""
    from confedge.proxy.service import ProxyService

    (tmp / "state").mkdir(exist_ok=True)
    https_port = free_port(*port_range)
    http_port = free_port(https_port + 1, port_range[1])
    cfg = parse_config(proxy_config(tmp, nodes, https_port, http_port, **proxy))
    svc = ProxyService(cfg)
    await svc.start()
    try:
        yield svc.info()
    finally:
        await svc.close()


async def wait_healthy(url: str, timeout: float = 10.0) -> None:
    """Poll the proxy until a request to the node's status path answers 200."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    last = b""
    while time.monotonic() < deadline:
        try:
            r, w = await asyncio.open_connection(host.strip("[]"), int(port), ssl=ctx)
            w.write(
                b"GET /api/client/v2/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            last = await asyncio.wait_for(r.read(), 5)
            w.close()
            if last.startswith(b"HTTP/1.1 200"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"proxy at {url} never answered 200 for the status path: {last[:200]!r}")
