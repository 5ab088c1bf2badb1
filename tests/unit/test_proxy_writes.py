"""Syscall economy of the proxy's hot path, with counting fake transports: one write to the node
per request (head and buffered body together) and one write to the client per small response
(head and body together), which is one TLS record and one write(2) each (issue 3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from confedge.config import parse_config
from confedge.proxy.core import ProxyCore
from confedge.proxy.server import ClientConnection
from confedge.proxy.upstream import UpstreamConnection


class CountingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.writes.append(b"".join(chunks))  # one writev(2)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def feed(client: ClientConnection, data: bytes) -> None:
    """What the TLS transport does for a BufferedProtocol."""
    buf = client.get_buffer(len(data))
    buf[: len(data)] = data
    client.buffer_updated(len(data))


async def test_one_write_each_way(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "turn": {"enabled": False},
            "proxy": {"nodes": ["http://127.0.0.1:9"]},
        }
    )
    core = ProxyCore(cfg, asyncio.get_running_loop())
    client = ClientConnection(core)
    ct = CountingTransport()
    client.connection_made(ct)  # type: ignore[arg-type]
    up = UpstreamConnection(core.pools[0])
    ut = CountingTransport()
    up.connection_made(ut)  # type: ignore[arg-type]
    core.pools[0].idle.append(up)
    body = b'{"status": "success"}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    requests = [
        b"GET /api/client/v2/status HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    ]
    for n, raw in enumerate(requests, start=1):
        feed(client, raw)
        assert len(ut.writes) == n  # head (+ body) in one write to the node
        assert ut.writes[-1].startswith(raw.split(b" ", 1)[0])
        assert raw.endswith(b"hello") == ut.writes[-1].endswith(b"\r\n\r\nhello")
        up.data_received(answer)
        assert len(ct.writes) == n  # head and body in one write to the client
        assert ct.writes[-1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert ct.writes[-1].endswith(b"\r\n\r\n" + body)
        assert up in core.pools[0].idle  # kept alive for the next request
    # Reads land in one buffer per worker, not a fresh allocation per read or per connection.
    other = ClientConnection(core)
    assert client.get_buffer(1) is other.get_buffer(65536) is core.read_view
    await core.close()
